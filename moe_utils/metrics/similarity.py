"""Cosine and angular similarity between experts (paper §2 "Metric", §4.1.1 matrix level).

Conventions used everywhere in ``moe_utils.metrics``:

* A zero vector has no direction, so its cosine similarity with every vector, itself included, is
  **undefined: NaN** (never 0 or 1, which would read as "unrelated" or "identical"). Pages show
  such cells as missing, with a note. The diagonal is exactly 1 for non-zero rows.
* Angular similarity is ``1 - arccos(cos) / pi`` (paper Eq. 2) with ``cos`` clipped to [-1, 1]
  first, so rounding errors never produce NaN; its diagonal is set to exactly 1 (as the reference
  code does) except for zero rows, which stay NaN.
* Gram matrices are accumulated in float64 over chunks of the feature axis, so flattened expert
  matrices with tens of millions of entries (Mixtral: 14336 x 4096) are compared without ever
  materialising a float64 copy of the whole stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.errors import ArgumentError, ShapeError
from ._arrays import ArrayLike, column_chunk, flatten_rows, to_numpy

#: Number of float64 elements per chunk when accumulating Gram matrices (about 64 MiB).
CHUNK_ELEMENTS = 8 * 1024 * 1024


def gram_matrix(blocks: Sequence[ArrayLike], chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """Inner products between all rows of the stacked ``blocks`` ([n_i, d] each), in float64.

    The blocks are never concatenated: columns are read ``chunk`` at a time from every block, cast
    to float64 and multiplied, so peak extra memory is about ``chunk_elements`` doubles.
    """
    blocks = [flatten_rows(b) for b in blocks]
    if not blocks:
        raise ArgumentError("gram_matrix needs at least one block of row vectors")
    d = int(blocks[0].shape[1])
    for b in blocks:
        if int(b.shape[1]) != d:
            raise ShapeError(
                f"all blocks must have the same number of columns; got {[int(x.shape[1]) for x in blocks]}"
            )
    n = sum(int(b.shape[0]) for b in blocks)
    g = np.zeros((n, n), dtype=np.float64)
    step = max(1, chunk_elements // max(n, 1))
    for start in range(0, d, step):
        stop = min(d, start + step)
        chunk = np.concatenate([column_chunk(b, start, stop) for b in blocks], axis=0)
        g += chunk @ chunk.T
    return g


def cosine_from_gram(g: ArrayLike) -> np.ndarray:
    """Turn a Gram matrix (numpy array or torch tensor) into cosine similarities, as float64 numpy:
    zero rows -> NaN, diagonal 1 for non-zero rows, values clipped to [-1, 1]."""
    g = to_numpy(g, np.float64)
    sq = np.clip(np.diag(g), 0.0, None)
    norms = np.sqrt(sq)
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, g / np.where(denom > 0, denom, 1.0), np.nan)
    cos = np.clip(cos, -1.0, 1.0)
    np.fill_diagonal(cos, np.where(norms > 0, 1.0, np.nan))
    return cos


def _as_row(x: ArrayLike) -> ArrayLike:
    """View any tensor/array as a single row ``[1, size]``."""
    return x.reshape(1, -1) if hasattr(x, "reshape") else np.reshape(np.asarray(x), (1, -1))


def cosine_matrix(v: ArrayLike, chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """Cosine similarity between all rows of ``v`` ([n, d], or [n, ...] flattened per row) -> [n, n]."""
    return cosine_from_gram(gram_matrix([v], chunk_elements))


def cosine_between(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Cosine similarity of every row of ``a`` [n, d] with every row of ``b`` [m, d] -> [n, m].

    Zero rows give NaN (undefined). Computed in float64 (the result is dense, so this is meant for moderate n, m).
    """
    a = to_numpy(flatten_rows(a))
    b = to_numpy(flatten_rows(b))
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    an = a / np.where(na > 0, na, 1.0)[:, None]
    bn = b / np.where(nb > 0, nb, 1.0)[:, None]
    cos = np.clip(an @ bn.T, -1.0, 1.0)
    cos[na == 0, :] = np.nan
    cos[:, nb == 0] = np.nan
    return cos


def cosine(a: ArrayLike, b: ArrayLike) -> float:
    """Cosine similarity of two tensors of the same size, both flattened (NaN if either is zero)."""
    ra, rb = _as_row(a), _as_row(b)
    if int(ra.shape[1]) != int(rb.shape[1]):
        raise ShapeError(f"cosine needs two tensors of the same size; got {int(ra.shape[1])} and {int(rb.shape[1])}")
    return float(cosine_from_gram(gram_matrix([ra, rb]))[0, 1])


def angular_similarity(cos: ArrayLike, set_diagonal: bool = True) -> np.ndarray:
    """``1 - arccos(clip(cos, -1, 1)) / pi`` (paper Eq. 2), in [0, 1]; NaN only where ``cos`` is NaN.

    ``cos`` may be a square matrix or a stack ``[..., n, n]``; with ``set_diagonal`` the diagonal of
    the last two axes is set to exactly 1, as the reference code does (undefined entries stay NaN).
    """
    c = np.clip(to_numpy(cos), -1.0, 1.0)
    ang = 1.0 - np.arccos(c) / np.pi
    if set_diagonal and ang.ndim >= 2 and ang.shape[-1] == ang.shape[-2]:
        idx = np.arange(ang.shape[-1])
        ang[..., idx, idx] = np.where(np.isnan(ang[..., idx, idx]), np.nan, 1.0)
    return ang


def stack_with_reference(experts: ArrayLike, reference: ArrayLike, axis: int = 0) -> ArrayLike:
    """Append one reference item (e.g. the dense model's FFN matrix "F") after the experts.

    ``experts`` has the expert axis at ``axis``; ``reference`` has the same shape without it. Torch
    inputs give a torch tensor, anything else a numpy array. For matrix-level similarity prefer
    ``matrix_level_similarity(W, extra=F)``, which avoids this copy.
    """
    if type(experts).__module__.startswith("torch"):
        import torch

        ref = reference if type(reference).__module__.startswith("torch") else torch.as_tensor(reference)
        return torch.cat([experts, ref.to(experts.dtype).unsqueeze(axis)], dim=axis)
    e = np.asarray(experts)
    r = to_numpy(reference, e.dtype)
    return np.concatenate([e, np.expand_dims(r, axis)], axis=axis)


def matrix_level_similarity(
    w: ArrayLike, extra: ArrayLike | None = None, chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """Cosine similarity of whole flattened expert matrices (paper §4.1.1, Fig. 1).

    ``w`` is ``[E, a, b]`` (one matrix per expert); ``extra`` is an optional ``[a, b]`` matrix
    (the dense FFN "F") appended as the last row/column, giving ``[E+1, E+1]``. Flattening order
    does not matter as long as it is the same for every matrix, so W_down needs no transpose.
    """
    blocks = [flatten_rows(w)]
    if extra is not None:
        if tuple(extra.shape) != tuple(w.shape[1:]):
            raise ShapeError(
                f"extra matrix has shape {tuple(extra.shape)} but each expert matrix is {tuple(w.shape[1:])}"
            )
        blocks.append(_as_row(extra))
    return cosine_from_gram(gram_matrix(blocks, chunk_elements))
