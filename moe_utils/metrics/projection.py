"""PCA projections of experts and neurons (paper App. C, Figs. 6 and 7).

Method (as in the reference code): stack the items (whole flattened expert matrices, or single
neurons), standardise each feature to zero mean and unit variance across the stacked items
(sample standard deviation, ddof=1, which is what the reference code uses; scikit-learn's
``StandardScaler`` would use ddof=0; a constant feature, or a single item, becomes 0), then
``sklearn.decomposition.PCA(svd_solver="full")``. ddof only rescales every coordinate by
``sqrt((n-1)/n)``; explained-variance ratios do not depend on it.

For very large inputs the same projection is computed from an ``n x n`` Gram matrix (few
items, many features: flattened Mixtral matrices; exact, :func:`flattened_grams` accumulates it
in one pass over bounded blocks, never a dense float64 copy) or, for every neuron of every expert (``8 x 14336`` neurons of 4096
features), a streamed randomized SVD (:func:`randomized_neuron_pca`: Halko, Martinsson and
Tropp's range finder with ``q`` power iterations over float32 blocks, ``(2 q + 2)`` passes of
``2 n d l`` flops; its accuracy against the full SVD is tested). All methods apply one sign
convention, so their coordinates agree: each component is flipped so that its largest-magnitude
coordinate is positive.

The paper transposes W_down before flattening; PCA does not depend on the order of features, so
the flattened layout is used as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..core.errors import ArgumentError, ShapeError
from ._arrays import ArrayLike, flatten_rows, to_numpy
from .blocks import BLOCK_ELEMENTS, BlockReader, block_size, block_source, neuron_count
from .neurons import neuron_vectors, resolve_neuron_axis
from .threads import run_split

PCAMethod = Literal["auto", "sklearn", "gram", "randomized"]
#: Inputs with more elements than this use the Gram or randomized route under ``method="auto"``.
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
    return pca_from_gram(g, k)


def pca_from_gram(g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates, explained variance and ratio of the top ``k`` components from the Gram
    matrix ``Z Z^T`` of the (column-centred, optionally standardised) items ``Z``."""
    g = np.asarray(g, dtype=np.float64)
    n = g.shape[0]
    vals, vecs = np.linalg.eigh(g)
    order = np.argsort(vals)[::-1][:k]
    lam = np.clip(vals[order], 0.0, None)
    coords = vecs[:, order] * np.sqrt(lam)
    total = float(np.trace(g))
    ratio = lam / total if total > 0 else np.zeros_like(lam)
    return coords, lam / max(n - 1, 1), ratio


@dataclass(frozen=True)
class SketchStart:
    """The first pass of :func:`randomized_neuron_pca`: per-feature sums ``s1`` and sums of squares
    ``s2`` over all neurons (float64 ``[d]``), the sketch ``Y = X Omega`` (``[n, l]``) and the
    product ``X^T Y`` (``[d, l]``, float64; the first half of a power iteration), all of the raw
    (uncentred) neurons, so a caller that already walks the weights can supply it
    (:func:`flattened_pass`)."""

    s1: np.ndarray
    s2: np.ndarray
    y: np.ndarray
    xty: np.ndarray


@dataclass(frozen=True)
class FlattenedPass:
    """What one pass over same-shaped matrices gives (:func:`flattened_pass`)."""

    gram: np.ndarray  # [n, n] <W_i, W_j> of the flattened matrices
    std_gram: np.ndarray  # [n, n] Gram after centring (and scaling) every position across items
    neuron_sums: np.ndarray  # [n, d] each matrix's sum over its neurons (float64)
    sketch: SketchStart | None  # the randomized PCA's first pass over all their neurons


#: Default oversampling of the randomized PCA (Halko, Martinsson and Tropp suggest 5 to 10).
OVERSAMPLE = 5
#: The sketch's columns are rounded up to a multiple of this: the thin products run in SIMD
#: panels of 8 float32 columns, so 8 columns cost half of 12 and 16 cost what 12 do (measured here).
SKETCH_COLUMNS_MULTIPLE = 8


def sketch_width(n: int, d: int, k: int, oversample: int = OVERSAMPLE) -> int:
    """Columns ``l`` of the randomized PCA's sketch of ``n`` neurons of ``d`` features: at least
    ``k + oversample``, rounded up to a multiple of :data:`SKETCH_COLUMNS_MULTIPLE`, at most
    ``min(n, d)``."""
    want = int(k) + max(0, int(oversample))
    want = -(-want // SKETCH_COLUMNS_MULTIPLE) * SKETCH_COLUMNS_MULTIPLE
    return int(min(want, n, d))


def sketch_matrix(d: int, ell: int, seed: int = 0) -> np.ndarray:
    """The Gaussian test matrix ``Omega`` ``[d, l]`` (float32) of :func:`randomized_neuron_pca`."""
    return np.random.default_rng(seed).standard_normal((d, ell)).astype(np.float32)


def flattened_grams(
    matrices: Sequence[ArrayLike], axis: int = 0, standardize: bool = True, block_elements: int = BLOCK_ELEMENTS
) -> tuple[np.ndarray, np.ndarray]:
    """The two Gram matrices of :func:`flattened_pass` (raw, standardised), float64 ``[n, n]``."""
    res = flattened_pass(matrices, axis, standardize, block_elements=block_elements)
    return res.gram, res.std_gram


def flattened_pass(
    matrices: Sequence[ArrayLike],
    axis: int = 0,
    standardize: bool = True,
    omega: np.ndarray | None = None,
    block_elements: int = BLOCK_ELEMENTS,
    threads: int | None = None,
) -> FlattenedPass:
    """One pass over same-shaped matrices, each element converted to float32 once, giving: the
    Gram matrix of the flattened matrices (``<W_i, W_j>``, for cosine similarity); the Gram
    matrix of the flattened matrices after centring (and, with ``standardize``, scaling) every
    element position across the items (for matrix-level PCA, :func:`pca_from_gram`); each
    matrix's sum over its neurons (``axis``: the neuron axis of one matrix; neuron averaging);
    and, given the sketch matrix ``omega`` ``[d, l]`` (:func:`sketch_matrix`), the first pass of
    the randomized PCA of all their neurons, rows matrix by matrix (:class:`SketchStart`).

    Blocks of neurons at the same positions of every matrix are copied in their stored layout
    (no transposed copy) into one reused ``[n, block]`` buffer (float32; float64 for float64
    inputs) and processed in place, so the working memory is a few ``block_elements``. Each
    block's products are taken in the buffer's precision and accumulated over blocks in float64
    (for float32 the error of a cosine stays near float32 rounding, ~1e-7). The neurons are split
    into ``threads`` contiguous ranges (default: the cores) walked in parallel
    (:func:`~moe_utils.metrics.threads.run_split`), each with its own buffer.
    """
    import torch

    mats = list(matrices)
    if not mats:
        raise ArgumentError("flattened_grams needs at least one matrix")
    shape = tuple(mats[0].shape)
    if len(shape) != 2 or any(tuple(m.shape) != shape for m in mats):
        raise ShapeError(f"flattened_grams needs same-shaped 2-D matrices; got {[tuple(m.shape) for m in mats]}")
    if axis not in (0, 1):
        raise ArgumentError(f"the neuron axis of one matrix is 0 or 1; got {axis}")
    tens = [block_source(m) for m in mats]
    wide = all(t.dtype == torch.float64 for t in tens)
    n, width = len(tens), shape[1 - axis]
    total = shape[axis]
    if omega is not None and int(omega.shape[0]) != width:
        raise ShapeError(f"the sketch matrix needs {width} rows (the neurons' length); got {tuple(omega.shape)}")
    step = block_size(width, n, block_elements)
    work = np.float64 if wide else np.float32
    om = np.zeros((width, 0), dtype=work) if omega is None else omega.astype(work)
    om_t = np.ascontiguousarray(om.T)
    ell = int(om.shape[1])
    sketch = None
    if omega is not None:
        sketch = SketchStart(np.zeros(width), np.zeros(width), np.empty((n * total, ell)), np.zeros((width, ell)))

    def part(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", over="ignore"):  # a NaN or infinity shows in the results
            return _part(lo, hi)

    def _part(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        buf = torch.empty((n, step * width), dtype=torch.float64 if wide else torch.float32)
        bn = buf.numpy()
        raw, std, sums, s2 = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, width)), np.zeros(width)
        xty = np.zeros((width, ell))
        mean_buf, ss_buf = np.empty(step * width, dtype=work), np.empty(step * width, dtype=work)
        dof = max(n - 1, 1)  # sample std (ddof=1), as standardize()
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            k = b - a
            c = buf[:, : k * width]
            for i, t in enumerate(tens):  # the stored layout: contiguous runs, no transpose
                if axis == 0:
                    c[i].view(k, width).copy_(t[a:b])
                else:
                    c[i].view(width, k).copy_(t[:, a:b])
            cn = bn[:, : k * width]
            raw += cn @ cn.T
            if axis == 0:  # item i's neurons are the rows of cn[i] as [k, width]
                sums += cn.reshape(n, k, width).sum(axis=1)
                if sketch is not None:
                    rows = cn.reshape(n * k, width)
                    y = rows @ om  # every item's neurons in one product
                    xty += rows.T @ y
                    for i in range(n):
                        sketch.y[i * total + a : i * total + b] = y[i * k : (i + 1) * k]
            else:  # the columns of cn[i] as [width, k]
                cols = cn.reshape(n, width, k)
                sums += cols.sum(axis=2)
                if sketch is not None:
                    yt = np.matmul(om_t, cols)  # [n, ell, k]: Y^T of each item's neurons
                    xty += np.matmul(cols, yt.transpose(0, 2, 1)).sum(axis=0)
                    for i in range(n):
                        sketch.y[i * total + a : i * total + b] = yt[i].T
            # per-position mean and spread over the n items, centred in place (the raw products
            # above are done with the block)
            mean, ss = mean_buf[: k * width], ss_buf[: k * width]
            np.sum(cn, axis=0, out=mean)
            mean /= n
            np.subtract(cn, mean, out=cn)
            if standardize or sketch is not None:
                np.einsum("ij,ij->j", cn, cn, out=ss)
            if sketch is not None:  # sum of squares of the raw values: centred ones + n mean^2
                raw_ss = ss + n * mean * mean
                s2 += raw_ss.reshape(k, width).sum(axis=0) if axis == 0 else raw_ss.reshape(width, k).sum(axis=1)
            if standardize:
                ss[ss == 0] = dof  # constant positions: scale 1
                ss /= dof
                np.sqrt(ss, out=ss)
                np.divide(cn, ss, out=cn)
            std += cn @ cn.T
        return raw, std, sums, s2, xty

    with torch.no_grad():
        parts = run_split(part, total, step, threads)
    raw, std, sums = (np.sum([p[k] for p in parts], axis=0) for k in range(3))
    if sketch is not None:
        sketch.s2[:] = sum(p[3] for p in parts)
        sketch.xty[:] = sum(p[4] for p in parts)
        sketch.s1[:] = sums.sum(axis=0)
    return FlattenedPass(raw, std, sums, sketch)


def _orth(y: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(y)
    return q


def randomized_neuron_pca(
    sources: Sequence[tuple[ArrayLike, int]],
    k: int = 2,
    standardize: bool = True,
    oversample: int = OVERSAMPLE,
    power_iterations: int = 1,
    seed: int = 0,
    block_elements: int = BLOCK_ELEMENTS,
    first_pass: SketchStart | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Streamed randomized PCA of the neurons of several matrices, rows in source order.

    ``sources`` are ``(matrix, neuron_axis)`` pairs (axis 0: rows are neurons, axis 1: columns).
    The standardised data ``Z = (X - 1 mu^T) D`` (``n`` neurons x ``d`` features, ``D`` the
    inverse standard deviations) is never formed: every pass walks float32 neuron blocks of
    ``X`` (:class:`~moe_utils.metrics.blocks.BlockReader`: the stored layout, one reused buffer,
    no copy at all for float32 inputs) and multiplies them by thin ``d x l`` factors (``l``:
    :func:`sketch_width`, 8 for two components), the centring and scaling being applied to the thin factors instead.

    The algorithm is Halko, Martinsson and Tropp's range finder with ``q = power_iterations``
    power iterations, arranged so that it needs ``q + 1`` passes over the weights instead of
    ``2 q + 2``: each pass computes both ``Y = Z M`` and ``Z^T Y`` block by block (a block's
    rows of ``Y`` are all that ``Z^T Y`` needs). Orthonormalising ``Y`` before multiplying by
    ``Z^T`` only changes the basis of the same column space (``Z^T Q = Z^T Y R^{-1}`` with
    ``Y = Q R``), so the next iteration takes ``orth(Z^T Y)`` and the last step ``B = Q^T Z =
    R^{-T} (Z^T Y)^T``: the same subspaces as the textbook order, up to rounding. Pass 1 also
    gathers the feature means and variances (the sketch of the raw neurons is centred
    afterwards: ``(X - 1 mu^T)^T (X - 1 mu^T) Omega = X^T X Omega - n mu mu^T Omega``);
    ``first_pass`` supplies it when the caller has already walked the weights
    (:func:`flattened_pass` with ``omega = sketch_matrix(d, sketch_width(n, d, k, oversample),
    seed)``). Products are float32 per block and accumulated in float64; they lose accuracy only
    when a feature's mean is many orders of magnitude larger than its spread (not the case for
    weights). The blocks of each pass are split between ``threads`` (default: the cores,
    :func:`~moe_utils.metrics.threads.run_split`). Returns ``(coords [n, k], explained variance,
    ratio)`` like the exact methods (ratio = component variance / total variance of ``Z``).
    """
    srcs = [(m, int(ax)) for m, ax in sources]
    d = int(srcs[0][0].shape[1 - srcs[0][1]])
    if any(int(m.shape[1 - ax]) != d for m, ax in srcs):
        raise ShapeError("all sources must have neurons of the same length")
    counts = [neuron_count(m, ax) for m, ax in srcs]
    n = sum(counts)
    if not 1 <= k <= min(n, d):
        raise ArgumentError(f"n_components must be between 1 and min(neurons, features) = {min(n, d)}; got {k}")
    step = block_size(d, 1, block_elements)
    spans = []  # (first row in the stacked neurons, source, first neuron, end)
    row = 0
    for (m, ax), cnt in zip(srcs, counts, strict=True):
        spans += [(row + a, m, ax, a, min(cnt, a + step)) for a in range(0, cnt, step)]
        row += cnt

    def walk(visit: Callable[[int, np.ndarray], np.ndarray]) -> list[np.ndarray]:
        """``visit(row, block)`` on every neuron block, the blocks split between threads; the
        per-thread float64 sums of what ``visit`` returns, in range order."""

        def part(lo: int, hi: int) -> np.ndarray:
            reader = BlockReader(block_elements)
            r, m, ax, a, b = spans[lo]
            acc = visit(r, reader.rows(m, ax, a, b)).astype(np.float64)
            for r, m, ax, a, b in spans[lo + 1 : hi]:
                acc += visit(r, reader.rows(m, ax, a, b))
            return acc

        return run_split(part, len(spans), 1, threads)

    ell = sketch_width(n, d, k, oversample)
    omega = sketch_matrix(d, ell, seed)
    if first_pass is None:
        y = np.empty((n, ell))

        def first(r: int, x: np.ndarray) -> np.ndarray:
            yb = x @ omega
            y[r : r + len(x)] = yb
            return np.concatenate([x.sum(axis=0)[:, None], np.einsum("ij,ij->j", x, x)[:, None], x.T @ yb], axis=1)

        acc = np.sum(walk(first), axis=0)
        s1, s2, xty = acc[:, 0].copy(), acc[:, 1].copy(), acc[:, 2:].copy()
    else:
        if tuple(first_pass.y.shape) != (n, ell) or tuple(first_pass.s1.shape) != (d,):
            raise ShapeError(
                f"the given first pass has a sketch of shape {tuple(first_pass.y.shape)}; these sources need {(n, ell)}"
            )
        s1, s2 = first_pass.s1, first_pass.s2
        y, xty = np.array(first_pass.y, dtype=np.float64), np.array(first_pass.xty, dtype=np.float64)
    mu = s1 / n
    var = np.clip(s2 / n - mu**2, 0.0, None)
    sd = np.sqrt(var * n / max(n - 1, 1))  # sample std (ddof=1), as standardize()
    scale = np.where(sd > 0, sd, 1.0) if standardize else np.ones(d)
    inv = 1.0 / scale
    total = float(n * np.sum(var / scale**2))
    mu_omega = mu @ omega
    y -= mu_omega[None, :]  # Y = (X - 1 mu^T) Omega = Z diag(scale) Omega
    zty = inv[:, None] * (xty - n * np.outer(mu, mu_omega))  # Z^T Y

    def sketch_pass(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # Y = Z m and Z^T Y, m [d, ell]
        dm = inv[:, None] * m
        off = (mu @ dm).astype(np.float32)
        dm32 = dm.astype(np.float32)
        out = np.empty((n, m.shape[1]))

        def visit(r: int, x: np.ndarray) -> np.ndarray:
            yb = x @ dm32
            yb -= off[None, :]
            out[r : r + len(x)] = yb
            return x.T @ yb

        acc = np.sum(walk(visit), axis=0)
        return out, inv[:, None] * (acc - mu[:, None] * out.sum(axis=0)[None, :])

    for _ in range(max(0, int(power_iterations))):
        y, zty = sketch_pass(_orth(zty))
    q, r = np.linalg.qr(y)
    b = np.linalg.solve(r.T, zty.T)  # [ell, d] = Q^T Z = R^{-T} (Z^T Y)^T
    ub, s, _ = np.linalg.svd(b, full_matrices=False)
    coords = q @ (ub[:, :k] * s[:k])
    lam = s[:k] ** 2
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
    elements, otherwise the exact Gram route (n <= d) or the streamed randomized SVD (n > d).
    """
    blocks = [flatten_rows(b) for b in (x if isinstance(x, (list, tuple)) else [x])]
    d = int(blocks[0].shape[1])
    if any(int(b.shape[1]) != d for b in blocks):
        raise ShapeError("all row blocks must have the same number of features")
    n = sum(int(b.shape[0]) for b in blocks)
    k = int(n_components)
    if not 1 <= k <= min(n, d):
        raise ArgumentError(f"n_components must be between 1 and min(rows, features) = {min(n, d)}; got {k}")
    if method == "auto":
        method = "sklearn" if n * d <= SKLEARN_MAX_ELEMENTS else ("gram" if n <= d else "randomized")
    fn = {
        "sklearn": _pca_sklearn,
        "gram": _pca_gram,
        "randomized": lambda bl, kk, st: randomized_neuron_pca([(b_, 0) for b_ in bl], kk, st),
    }.get(method)
    if fn is None:
        raise ArgumentError(f"unknown PCA method {method!r}; use 'auto', 'sklearn', 'gram' or 'randomized'")
    coords, var, ratio = fn(blocks, k, standardize)
    lab = [str(v) for v in labels] if labels is not None else [str(i) for i in range(n)]
    if len(lab) != n:
        raise ShapeError(f"got {len(lab)} labels for {n} rows")
    return Projection(_fix_signs(np.asarray(coords, dtype=np.float64)), np.asarray(ratio), np.asarray(var), method, lab)


def matrix_pca(
    w: ArrayLike,
    extra: ArrayLike | None = None,
    n_components: int = 2,
    standardize: bool = True,
    method: PCAMethod = "auto",
) -> Projection:
    """Matrix-level PCA (Fig. 6): one point per expert (flattened ``[E, a, b]``), plus "F" if given.

    Large stacks (``method="auto"`` above ``SKLEARN_MAX_ELEMENTS``, or ``"gram"``) go through
    :func:`flattened_grams`: one pass of bounded blocks, no dense float64 copy."""
    n_items = int(w.shape[0]) + (extra is not None)
    size = int(np.prod(w.shape[1:]))
    if (method == "gram" or (method == "auto" and n_items * size > SKLEARN_MAX_ELEMENTS)) and len(w.shape) == 3:
        mats = [w[e] for e in range(int(w.shape[0]))] + ([extra] if extra is not None else [])
        return matrix_pca_from_gram(
            flattened_grams(mats, 0, standardize)[1],
            n_components,
            [str(e) for e in range(int(w.shape[0]))] + (["F"] if extra is not None else []),
        )
    blocks = [flatten_rows(w)]
    labels = [str(e) for e in range(int(w.shape[0]))]
    if extra is not None:
        blocks.append(extra.reshape(1, -1))
        labels.append("F")
    return pca_projection(blocks, standardize, n_components, method, labels)


def matrix_pca_from_gram(gram: np.ndarray, n_components: int, labels: Sequence[str]) -> Projection:
    """Matrix-level PCA from the standardised Gram matrix of :func:`flattened_grams`."""
    n = int(np.asarray(gram).shape[0])
    if not 1 <= n_components <= n:
        raise ArgumentError(f"n_components must be between 1 and the number of matrices ({n}); got {n_components}")
    coords, var, ratio = pca_from_gram(gram, int(n_components))
    return Projection(_fix_signs(coords), ratio, var, "gram", [str(v) for v in labels])


def neuron_pca_randomized(n_rows: int, d: int, method: PCAMethod = "auto") -> bool:
    """Whether :func:`neuron_pca` of ``n_rows`` neurons of ``d`` features uses the randomized SVD."""
    return method == "randomized" or (method == "auto" and n_rows * d > SKLEARN_MAX_ELEMENTS and n_rows > d)


def neuron_pca(
    w: ArrayLike,
    neuron_axis: int | str,
    extra: ArrayLike | None = None,
    n_components: int = 2,
    standardize: bool = True,
    method: PCAMethod = "auto",
    power_iterations: int = 1,
    seed: int = 0,
    first_pass: SketchStart | None = None,
) -> Projection:
    """Neuron-level PCA (Fig. 7): one point per neuron of every expert (plus "F"'s neurons).

    ``labels`` give each row's expert (``"0"``.., ``"F"``); rows are ordered expert by expert.
    Above ``SKLEARN_MAX_ELEMENTS`` (``method="auto"``, :func:`neuron_pca_randomized`) the
    streamed randomized SVD is used, with ``power_iterations``, ``seed`` and an optional
    precomputed ``first_pass`` (:func:`randomized_neuron_pca`).
    """
    axis2 = resolve_neuron_axis(neuron_axis, 3) - 1 if isinstance(neuron_axis, str) else int(neuron_axis) - 1
    n_exp = int(w.shape[0])
    n_rows = n_exp * int(w.shape[1 + axis2]) + (int(extra.shape[axis2]) if extra is not None else 0)
    d = int(w.shape[2 - axis2])
    if neuron_pca_randomized(n_rows, d, method):
        sources = [(w[e], axis2) for e in range(n_exp)] + ([(extra, axis2)] if extra is not None else [])
        labels = [str(e) for e in range(n_exp) for _ in range(int(w.shape[1 + axis2]))]
        labels += ["F"] * (int(extra.shape[axis2]) if extra is not None else 0)
        coords, var, ratio = randomized_neuron_pca(
            sources, int(n_components), standardize, power_iterations=power_iterations, seed=seed, first_pass=first_pass
        )
        return Projection(_fix_signs(coords), ratio, var, "randomized", labels)
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
