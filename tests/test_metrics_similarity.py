"""Similarity metrics against naive loops written from the paper's definitions."""

import math

import numpy as np
import pytest
import torch

from moe_utils.metrics import (
    angular_similarity,
    cosine,
    cosine_between,
    cosine_matrix,
    gram_matrix,
    matrix_level_similarity,
    stack_with_reference,
)


def naive_cos(u, v):
    u = [float(x) for x in np.ravel(u)]
    v = [float(x) for x in np.ravel(v)]
    nu = math.sqrt(sum(x * x for x in u))
    nv = math.sqrt(sum(x * x for x in v))
    if nu == 0 or nv == 0:
        return float("nan")  # a zero vector has no direction
    return sum(a * b for a, b in zip(u, v)) / (nu * nv)


def naive_cos_matrix(rows):
    n = len(rows)
    return np.array([[naive_cos(rows[i], rows[j]) for j in range(n)] for i in range(n)])


def test_cosine_matrix_matches_naive_loop():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 37))
    np.testing.assert_allclose(cosine_matrix(v), naive_cos_matrix(v), atol=1e-12)


def test_cosine_matrix_chunking_does_not_change_result():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(5, 101))
    np.testing.assert_allclose(cosine_matrix(v, chunk_elements=7), cosine_matrix(v), atol=1e-12)


def test_zero_vectors_give_nan_not_zero():
    v = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, -1.0, 2.0]])
    c = cosine_matrix(v)
    assert np.isnan(c[1]).all() and np.isnan(c[:, 1]).all()
    assert not np.isnan(np.delete(np.delete(c, 1, 0), 1, 1)).any()
    assert c[0, 0] == 1.0 and c[2, 2] == 1.0
    np.testing.assert_allclose(c[0, 2], naive_cos(v[0], v[2]))


def test_torch_bfloat16_input():
    torch.manual_seed(0)
    w = torch.randn(4, 8, 6).to(torch.bfloat16)
    flat = w.float().reshape(4, -1).numpy()
    np.testing.assert_allclose(matrix_level_similarity(w), naive_cos_matrix(flat), atol=1e-6)
    np.testing.assert_allclose(matrix_level_similarity(w, chunk_elements=20), naive_cos_matrix(flat), atol=1e-6)


def test_angular_similarity_definition_and_diagonal():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(5, 9))
    cos = cosine_matrix(v)
    ang = angular_similarity(cos)
    for i in range(5):
        for j in range(5):
            if i != j:
                assert ang[i, j] == pytest.approx(1 - math.acos(naive_cos(v[i], v[j])) / math.pi, abs=1e-9)
    assert np.all(np.diag(ang) == 1.0)


def test_angular_similarity_never_nan_on_rounding_errors():
    cos = np.array([[1 + 1e-12, -1 - 1e-12], [-1 - 1e-12, 1 + 1e-12]])
    ang = angular_similarity(cos)
    assert not np.isnan(ang).any()
    assert ang[0, 1] == pytest.approx(0.0)
    assert np.all(np.diag(ang) == 1.0)
    # a zero vector: undefined everywhere, its diagonal included; the other diagonal stays 1
    a = angular_similarity(cosine_matrix(np.array([[0.0, 0.0], [1.0, 0.0]])))
    assert np.isnan(a[0]).all() and np.isnan(a[:, 0]).all() and a[1, 1] == 1.0


def test_angular_similarity_batched_diagonals():
    cos = np.stack([np.eye(3) * 0.5, np.full((3, 3), 0.2)])
    ang = angular_similarity(cos)
    assert ang.shape == (2, 3, 3)
    assert np.all(ang[:, [0, 1, 2], [0, 1, 2]] == 1.0)


def test_matrix_level_similarity_with_reference_row():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 4, 5))
    f = w[1] * 2.0 + rng.normal(size=(4, 5)) * 0.01
    sim = matrix_level_similarity(w, extra=f)
    mats = [w[0], w[1], w[2], f]
    np.testing.assert_allclose(sim, naive_cos_matrix(mats), atol=1e-12)
    assert sim.shape == (4, 4)
    np.testing.assert_allclose(sim, matrix_level_similarity(stack_with_reference(w, f)), atol=1e-12)


def test_matrix_level_similarity_rejects_wrong_reference_shape():
    with pytest.raises(ValueError, match="shape"):
        matrix_level_similarity(np.zeros((2, 3, 4)), extra=np.zeros((4, 3)))


def test_stack_with_reference_torch_and_axis():
    out = torch.randn(5, 3, 4)
    f = torch.randn(5, 4)
    s = stack_with_reference(out, f, axis=1)
    assert s.shape == (5, 4, 4) and torch.equal(s[:, 3], f)


def test_single_expert_and_gram():
    assert cosine_matrix(np.array([[3.0, 4.0]])).tolist() == [[1.0]]
    a = np.arange(6.0).reshape(2, 3)
    b = np.ones((1, 3))
    g = gram_matrix([a, b], chunk_elements=2)
    stacked = np.vstack([a, b])
    np.testing.assert_allclose(g, stacked @ stacked.T)


def test_cosine_between_and_cosine():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(3, 7)), rng.normal(size=(4, 7))
    b[2] = 0
    cb = cosine_between(a, b)
    for i in range(3):
        for j in range(4):
            assert cb[i, j] == pytest.approx(naive_cos(a[i], b[j]), abs=1e-12, nan_ok=True)
    assert cosine(a, a * 3) == pytest.approx(1.0)
    assert math.isnan(cosine(a, np.zeros_like(a)))
