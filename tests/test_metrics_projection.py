"""PCA projections against a naive SVD."""

import numpy as np
import pytest

from moe_utils.metrics import matrix_pca, neuron_pca, pca_projection, standardize


def naive_standardize(x):
    out = np.zeros_like(x, dtype=float)
    for j in range(x.shape[1]):
        col = x[:, j]
        m = sum(col) / len(col)
        sd = (sum((v - m) ** 2 for v in col) / (len(col) - 1)) ** 0.5  # sample std, as the paper's code
        out[:, j] = 0.0 if sd == 0 else (col - m) / sd
    return out


def naive_pca(x, k):
    z = naive_standardize(x)
    z = z - z.mean(axis=0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    coords = u[:, :k] * s[:k]
    for c in range(k):  # sign convention: largest-magnitude coordinate positive
        i = np.argmax(np.abs(coords[:, c]))
        coords[:, c] *= np.sign(coords[i, c])
    return coords, (s**2 / (s**2).sum())[:k]


def test_standardize_constant_feature():
    x = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    np.testing.assert_allclose(standardize(x), naive_standardize(x))
    assert (standardize(x)[:, 1] == 0).all()


@pytest.mark.parametrize("method", ["sklearn", "gram"])
def test_pca_matches_naive_svd(method):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 7)) * np.arange(1, 8)
    x[:, 3] = 2.0  # constant feature
    p = pca_projection(x, n_components=3, method=method)
    coords, ratio = naive_pca(x, 3)
    np.testing.assert_allclose(p.coords, coords, atol=1e-9)
    np.testing.assert_allclose(p.explained_variance_ratio, ratio, atol=1e-12)
    assert p.method == method


def test_pca_without_standardization_and_wide_input():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 40))
    p = pca_projection(x, standardize=False, method="gram")
    q = pca_projection(x, standardize=False, method="sklearn")
    np.testing.assert_allclose(p.coords, q.coords, atol=1e-9)
    np.testing.assert_allclose(p.explained_variance, q.explained_variance, atol=1e-9)


def test_matrix_pca_labels_and_reference():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 3, 5))
    f = rng.normal(size=(3, 5))
    p = matrix_pca(w, extra=f)
    assert p.coords.shape == (5, 2) and p.labels == ["0", "1", "2", "3", "F"]
    stacked = np.vstack([w.reshape(4, -1), f.reshape(1, -1)])
    np.testing.assert_allclose(p.coords, naive_pca(stacked, 2)[0], atol=1e-9)


def test_neuron_pca_down_uses_columns():
    rng = np.random.default_rng(3)
    down = rng.normal(size=(2, 6, 4))  # [E, H, I]: 4 neurons of length 6 per expert
    p = neuron_pca(down, "down", n_components=3)
    rows = np.vstack([down[0].T, down[1].T])
    assert p.labels == ["0"] * 4 + ["1"] * 4
    np.testing.assert_allclose(p.coords, naive_pca(rows, 3)[0], atol=1e-9)


def test_bad_component_count():
    with pytest.raises(ValueError, match="n_components"):
        pca_projection(np.zeros((3, 2)), n_components=3)
