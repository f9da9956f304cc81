"""PCA projections of experts and neurons (paper App. C, Figs. 6 and 7).

Method (as in the reference code): stack the items (whole flattened expert matrices, or single
neurons), standardise each feature to zero mean and unit variance across the stacked items
(sample standard deviation, ddof=1, which is what the reference code uses; scikit-learn's
``StandardScaler`` would use ddof=0; a constant feature, or a single item, becomes 0), then
``sklearn.decomposition.PCA(svd_solver="full")``. ddof only rescales every coordinate by
``sqrt((n-1)/n)``; explained-variance ratios do not depend on it.

For very large inputs the same projection is computed exactly from an ``n x n`` Gram matrix
(few items, many features: flattened Mixtral matrices) or a ``d x d`` covariance matrix (many
items, few features: every neuron of every expert), accumulated in float64 chunks. All methods
apply one sign convention, so their coordinates agree: each component is flipped so that its
largest-magnitude coordinate is positive.

The paper transposes W_down before flattening; PCA does not depend on the order of features, so
the flattened layout is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from ._arrays import ArrayLike, flatten_rows, to_numpy
from .neurons import neuron_vectors, resolve_neuron_axis

PCAMethod = Literal["auto", "sklearn", "gram", "covariance"]
#: Inputs with more elements than this use the Gram/covariance route under ``method="auto"``.
SKLEARN_MAX_ELEMENTS = 50_000_000
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Projection:
    """PCA coordinates ``[n, k]`` with the variance each component explains, and row labels."""

    coords: np.ndarray
    explained_variance_ratio: np.ndarray
    explained_variance: np.ndarray
    method: str
    labels: list[str] = field(default_factory=list)


def standardize(x: ArrayLike) -> np.ndarray:
    """Z-score each column across rows (sample std, ddof=1); constant columns become 0."""
    a = to_numpy(x)
    mean = a.mean(axis=0)
    std = _sample_std(a)
    return (a - mean) / np.where(std > 0, std, 1.0)


def _sample_std(c: np.ndarray) -> np.ndarray:
    """Column standard deviations with ddof=1 (0 for a single row, so it is left unscaled)."""
    return c.std(axis=0, ddof=1) if c.shape[0] > 1 else np.zeros(c.shape[1])


def _fix_signs(coords: np.ndarray) -> np.ndarray:
    if coords.size == 0:
        return coords
    idx = np.argmax(np.abs(coords), axis=0)
    signs = np.sign(coords[idx, np.arange(coords.shape[1])])
    signs[signs == 0] = 1.0
    return coords * signs


def _column_stats(blocks: list, d: int, standardize_: bool) -> tuple[np.ndarray, np.ndarray]:
    n = sum(int(b.shape[0]) for b in blocks)
    step = max(1, _CHUNK // max(n, 1))
    means, scales = np.empty(d), np.empty(d)
    for s in range(0, d, step):
        c = np.concatenate([to_numpy(b[:, s : s + step]) for b in blocks], axis=0)
        means[s : s + step] = c.mean(axis=0)
        sd = _sample_std(c) if standardize_ else np.ones(c.shape[1])
        scales[s : s + step] = np.where(sd > 0, sd, 1.0)
    return means, scales


def _pca_gram(blocks: list, k: int, standardize_: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = int(blocks[0].shape[1])
    n = sum(int(b.shape[0]) for b in blocks)
    step = max(1, _CHUNK // max(n, 1))
    g = np.zeros((n, n))
    for s in range(0, d, step):
        c = np.concatenate([to_numpy(b[:, s : s + step]) for b in blocks], axis=0)
        c = c - c.mean(axis=0)
        if standardize_:
            sd = _sample_std(c)
            c = c / np.where(sd > 0, sd, 1.0)
        g += c @ c.T
    vals, vecs = np.linalg.eigh(g)
    order = np.argsort(vals)[::-1][:k]
    lam = np.clip(vals[order], 0.0, None)
    coords = vecs[:, order] * np.sqrt(lam)
    total = float(np.trace(g))
    ratio = lam / total if total > 0 else np.zeros_like(lam)
    return coords, lam / max(n - 1, 1), ratio


def _pca_covariance(blocks: list, k: int, standardize_: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = int(blocks[0].shape[1])
    n = sum(int(b.shape[0]) for b in blocks)
    means, scales = _column_stats(blocks, d, standardize_)
    rows_step = max(1, _CHUNK // max(d, 1))
    cov = np.zeros((d, d))
    for b in blocks:
        for s in range(0, int(b.shape[0]), rows_step):
            z = (to_numpy(b[s : s + rows_step]) - means) / scales
            cov += z.T @ z
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:k]
    lam = np.clip(vals[order], 0.0, None)
    v = vecs[:, order]
    parts = []
    for b in blocks:
        for s in range(0, int(b.shape[0]), rows_step):
            parts.append(((to_numpy(b[s : s + rows_step]) - means) / scales) @ v)
    coords = np.concatenate(parts, axis=0)
    total = float(np.trace(cov))
    ratio = lam / total if total > 0 else np.zeros_like(lam)
    return coords, lam / max(n - 1, 1), ratio


def _pca_sklearn(blocks: list, k: int, standardize_: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    x = np.concatenate([to_numpy(b) for b in blocks], axis=0)
    x = standardize(x) if standardize_ else x
    pca = PCA(n_components=k, svd_solver="full")
    coords = pca.fit_transform(x)
    return coords, pca.explained_variance_, pca.explained_variance_ratio_


def pca_projection(
    x: ArrayLike | Sequence[ArrayLike],
    standardize: bool = True,
    n_components: int = 2,
    method: PCAMethod = "auto",
    labels: Sequence[str] | None = None,
) -> Projection:
    """Project the rows of ``x`` ([n, d], or a list of row blocks sharing d) onto the top components.

    ``method="auto"`` uses scikit-learn (``svd_solver="full"``) up to ``SKLEARN_MAX_ELEMENTS``
    elements, otherwise the exact Gram (n <= d) or covariance (n > d) route.
    """
    blocks = [flatten_rows(b) for b in (x if isinstance(x, (list, tuple)) else [x])]
    d = int(blocks[0].shape[1])
    if any(int(b.shape[1]) != d for b in blocks):
        raise ValueError("all row blocks must have the same number of features")
    n = sum(int(b.shape[0]) for b in blocks)
    k = int(n_components)
    if not 1 <= k <= min(n, d):
        raise ValueError(f"n_components must be between 1 and min(rows, features) = {min(n, d)}; got {k}")
    if method == "auto":
        method = "sklearn" if n * d <= SKLEARN_MAX_ELEMENTS else ("gram" if n <= d else "covariance")
    fn = {"sklearn": _pca_sklearn, "gram": _pca_gram, "covariance": _pca_covariance}.get(method)
    if fn is None:
        raise ValueError(f"unknown PCA method {method!r}; use 'auto', 'sklearn', 'gram' or 'covariance'")
    coords, var, ratio = fn(blocks, k, standardize)
    lab = [str(v) for v in labels] if labels is not None else [str(i) for i in range(n)]
    if len(lab) != n:
        raise ValueError(f"got {len(lab)} labels for {n} rows")
    return Projection(_fix_signs(np.asarray(coords, dtype=np.float64)), np.asarray(ratio), np.asarray(var), method, lab)


def matrix_pca(
    w: ArrayLike,
    extra: ArrayLike | None = None,
    n_components: int = 2,
    standardize: bool = True,
    method: PCAMethod = "auto",
) -> Projection:
    """Matrix-level PCA (Fig. 6): one point per expert (flattened ``[E, a, b]``), plus "F" if given."""
    blocks = [flatten_rows(w)]
    labels = [str(e) for e in range(int(w.shape[0]))]
    if extra is not None:
        blocks.append(extra.reshape(1, -1))
        labels.append("F")
    return pca_projection(blocks, standardize, n_components, method, labels)


def neuron_pca(
    w: ArrayLike,
    neuron_axis: int | str,
    extra: ArrayLike | None = None,
    n_components: int = 2,
    standardize: bool = True,
    method: PCAMethod = "auto",
) -> Projection:
    """Neuron-level PCA (Fig. 7): one point per neuron of every expert (plus "F"'s neurons).

    ``labels`` give each row's expert (``"0"``.., ``"F"``); rows are ordered expert by expert.
    """
    axis2 = resolve_neuron_axis(neuron_axis, 3) - 1 if isinstance(neuron_axis, str) else int(neuron_axis) - 1
    blocks, labels = [], []
    for e in range(int(w.shape[0])):
        nv = neuron_vectors(w[e], axis2)
        blocks.append(nv)
        labels += [str(e)] * nv.shape[0]
    if extra is not None:
        nv = neuron_vectors(extra, axis2)
        blocks.append(nv)
        labels += ["F"] * nv.shape[0]
    return pca_projection(blocks, standardize, n_components, method, labels)


def dbscan_outliers(coords: ArrayLike, eps: float = 50.0, min_samples: int = 5) -> np.ndarray:
    """Indices that DBSCAN labels as noise (the paper drops these from DeepSeek plots, eps = 50)."""
    from sklearn.cluster import DBSCAN

    lab = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(to_numpy(coords))
    return np.flatnonzero(lab == -1)
