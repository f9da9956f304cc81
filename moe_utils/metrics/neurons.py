"""Neuron-level views of expert weights (paper §4.1.2, App. D, Table 2).

A *neuron* ``i`` of an expert is row ``i`` of W_up / W_act (``[I, H]``) and column ``i`` of W_down
(``[H, I]``), so every neuron is a vector of length H (d_hid).

Neuron axis convention: functions take ``neuron_axis`` either as a matrix kind (``"up"``,
``"act"``, ``"down"``, also ``"w_up"``...) or as an explicit integer axis of the array they are
given. For a stack ``[E, I, H]`` / ``[E, H, I]`` the kinds map to axis 1 / 2; for one matrix
``[I, H]`` / ``[H, I]`` to axis 0 / 1.

* **Averaging** (App. D): the mean over the neuron axis, one H-vector per expert
  (``torch.mean(W, dim=0)`` for up/act and ``dim=1`` for down in the reference code).
* **Reordering** (Table 2): for an expert pair (j, k) and one matrix, the I x I neuron cosine matrix
  is solved as a linear assignment maximising total similarity (Jonker-Volgenant,
  ``scipy.optimize.linear_sum_assignment``); expert k's neurons are permuted, the
  cosine of the flattened matrices is recomputed, and Kendall's tau between the permutation and
  the identity order 0..I-1 is reported. The cosine matrix is computed in float32 (unit neuron
  vectors, blocks of rows) straight into the float64 cost matrix the solver works on, negated so
  the solver needs no copy of its own (minimising ``-cos`` is what ``maximize=True`` does);
  the before/after similarities are float64 sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from ..core.errors import ArgumentError, ShapeError
from ._arrays import ArrayLike, to_numpy
from ._scipy import kendall
from .blocks import block_size, neuron_blocks, neuron_rows
from .similarity import cosine_matrix

_ROW_KINDS = {"up", "act", "w_up", "w_act", "gate", "w_gate", "gate_proj", "up_proj"}
_COL_KINDS = {"down", "w_down", "down_proj"}


def resolve_neuron_axis(neuron_axis: int | str, ndim: int) -> int:
    """Integer neuron axis for an array with ``ndim`` dims (3 = expert stack, 2 = one matrix)."""
    if isinstance(neuron_axis, str):
        key = neuron_axis.lower()
        if key in _ROW_KINDS:
            base = 0
        elif key in _COL_KINDS:
            base = 1
        else:
            raise ArgumentError(f"unknown matrix kind {neuron_axis!r}; use 'up', 'act' or 'down', or an integer axis")
        if ndim not in (2, 3):
            raise ShapeError(f"expected a matrix [I, H] or a stack [E, I, H]; got {ndim} dims")
        return base + (ndim - 2)
    axis = int(neuron_axis)
    if not -ndim <= axis < ndim:
        raise ArgumentError(f"neuron_axis {axis} is out of range for an array with {ndim} dims")
    return axis % ndim


def neuron_vectors(matrix: ArrayLike, neuron_axis: int | str) -> np.ndarray:
    """One expert matrix as ``[I, H]`` float64 rows, one row per neuron (W_down is transposed)."""
    m = to_numpy(matrix)
    if m.ndim != 2:
        raise ShapeError(f"expected one expert matrix (2 dims); got shape {m.shape}")
    axis = resolve_neuron_axis(neuron_axis, 2)
    return m if axis == 0 else m.T


def neuron_average(w: ArrayLike, neuron_axis: int | str) -> np.ndarray:
    """Mean over the neuron axis: ``[E, I, H]`` or ``[E, H, I]`` -> ``[E, H]`` (one matrix -> ``[H]``).

    Experts are converted one at a time, so a bfloat16 stack is never copied whole to float64.
    """
    ndim = len(w.shape)
    axis = resolve_neuron_axis(neuron_axis, ndim)
    if ndim == 2:
        return to_numpy(w).mean(axis=axis)
    if ndim != 3:
        raise ShapeError(f"expected [E, I, H] / [E, H, I] or one matrix; got shape {tuple(w.shape)}")
    if axis == 0:
        raise ArgumentError("axis 0 of a stack is the expert axis, not a neuron axis; pass 1 or 2")
    return np.stack([_block_mean(w[e], axis - 1) for e in range(int(w.shape[0]))])


def _block_mean(matrix: ArrayLike, axis: int) -> np.ndarray:
    """Mean of one matrix over its neuron ``axis`` in float64, from bounded float32 blocks."""
    total = None
    for _, x in neuron_blocks(matrix, axis):
        part = x.sum(axis=0, dtype=np.float64)
        total = part if total is None else total + part
    if total is None:
        raise ShapeError(f"cannot average over an empty axis {axis} of a matrix of shape {tuple(matrix.shape)}")
    return total / int(matrix.shape[axis])


def neuron_level_similarity(w: ArrayLike, neuron_axis: int | str, extra: ArrayLike | None = None) -> np.ndarray:
    """Cosine similarity of neuron-averaged experts (App. D, Fig. 8) -> ``[E, E]``.

    ``extra`` is an optional single matrix (the dense FFN "F", or a shared expert, whose neuron count
    may differ) appended as the last row/column.
    """
    avg = neuron_average(w, neuron_axis)
    if extra is not None:
        ax = resolve_neuron_axis(neuron_axis, 3) - 1
        ref = to_numpy(extra).mean(axis=ax)
        if ref.shape[0] != avg.shape[1]:
            raise ShapeError(
                f"extra averages to length {ref.shape[0]} but experts to {avg.shape[1]}; pass a matrix of the experts' shape"
            )
        avg = np.vstack([avg, ref[None, :]])
    return cosine_matrix(avg)


def neuron_cosine_matrix(a: ArrayLike, b: ArrayLike, neuron_axis: int | str) -> np.ndarray:
    """``[I, I]`` cosine similarity between every neuron of matrix ``a`` and every neuron of ``b``
    (float32 products in blocks of rows, returned as float64). A zero neuron has no direction:
    its row (or column) is NaN, as in :func:`cosine_between`."""
    axis = resolve_neuron_axis(neuron_axis, 2)
    ra, rb = _all_rows(a, axis), _all_rows(b, axis)
    zero_a, zero_b = _row_norms(ra) == 0, _row_norms(rb) == 0
    out = _cosine_cost(_unit(ra), _unit(rb), negate=False)
    out[zero_a, :] = np.nan
    out[:, zero_b] = np.nan
    return out


def _all_rows(matrix: ArrayLike, axis: int) -> np.ndarray:
    """Every neuron of one matrix as rows (float32; float64 inputs stay float64)."""
    if len(matrix.shape) != 2:
        raise ShapeError(f"expected one expert matrix (2 dims); got shape {tuple(matrix.shape)}")
    return neuron_rows(matrix, axis, 0, int(matrix.shape[axis]))


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), in place."""
    x /= np.where((n := _row_norms(x)) > 0, n, 1.0).astype(x.dtype)[:, None]
    return x


def _row_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


#: float32 products per row block of the reordering's cosine matrix (32 MiB): one large product
#: per block keeps the BLAS kernel efficient (measured here at I = 14336, H = 4096: 13.4-14.5 s
#: for the whole matrix in blocks of 584 rows, 17-18 s in blocks of 146, 23.7 s in blocks of 73).
COSINE_BLOCK_ELEMENTS = 8 * 1024 * 1024


def _cosine_cost(
    an: np.ndarray, bn: np.ndarray, negate: bool, block_elements: int = COSINE_BLOCK_ELEMENTS
) -> np.ndarray:
    """``an @ bn.T`` (clipped to [-1, 1], negated if asked) into a float64 matrix, by row blocks."""
    out = np.empty((an.shape[0], bn.shape[0]), dtype=np.float64)
    step = block_size(bn.shape[0], 1, block_elements)
    for r in range(0, an.shape[0], step):
        block = out[r : r + step]
        block[...] = an[r : r + step] @ bn.T
        np.clip(block, -1.0, 1.0, out=block)
        if negate:
            np.negative(block, out=block)
    return out


def _row_dot(a: np.ndarray, b: np.ndarray, perm: np.ndarray | None = None, weights: np.ndarray | None = None) -> float:
    """``sum_i w_i <a_i, b_perm(i)>`` in float64 (``w_i = 1`` by default), by blocks."""
    total, step = 0.0, block_size(a.shape[1])
    for r in range(0, a.shape[0], step):
        bb = b[r : r + step] if perm is None else b[perm[r : r + step]]
        per_row = np.einsum("ij,ij->i", a[r : r + step], bb, dtype=np.float64)
        total += float(per_row.sum() if weights is None else per_row @ weights[r : r + step])
    return total


def _flat_cosine(dot: float, na2: float, nb2: float) -> float:
    denom = np.sqrt(na2) * np.sqrt(nb2)
    return float(np.clip(dot / denom, -1.0, 1.0)) if denom > 0 else 0.0


@dataclass(frozen=True)
class ReorderResult:
    """Outcome of matching the neurons of expert k (``b``) to those of expert j (``a``).

    ``perm[i]`` is the neuron of ``b`` assigned to neuron ``i`` of ``a``; ``b`` reordered is
    ``neurons(b)[perm]``. ``tau`` is Kendall's tau of ``perm`` against ``0..I-1`` (1 = order kept).
    """

    perm: np.ndarray
    tau: float
    tau_pvalue: float
    sim_before: float
    sim_after: float

    @property
    def gain(self) -> float:
        """Absolute similarity increase ``sim_after - sim_before``."""
        return self.sim_after - self.sim_before


def reorder_neurons(a: ArrayLike, b: ArrayLike, neuron_axis: int | str) -> ReorderResult:
    """Reorder ``b``'s neurons to best match ``a``'s and compare before/after (Table 2).

    ``a`` and ``b`` are single expert matrices of the same kind and shape. Similarities are cosines
    of the whole flattened matrices.
    """
    axis = resolve_neuron_axis(neuron_axis, 2)
    na = _all_rows(a, axis)
    nb = _all_rows(b, axis)
    if na.shape != nb.shape:
        raise ShapeError(f"the two matrices differ in shape: {na.shape} vs {nb.shape}")
    na2, nb2, dot_before = _row_dot(na, na), _row_dot(nb, nb), _row_dot(na, nb)
    norm_a, norm_b = _row_norms(na), _row_norms(nb)
    # a zero neuron has no direction: it stays a zero row, so it matches nothing (cosine 0)
    cost = _cosine_cost(_unit(na), _unit(nb), negate=True)
    rows, perm = linear_sum_assignment(cost)
    del cost
    perm = perm[np.argsort(rows)].astype(np.int64)
    # <a_i, b_perm(i)> = |a_i| |b_perm(i)| <unit a_i, unit b_perm(i)>
    dot_after = _row_dot(na, nb, perm, norm_a * norm_b[perm])
    if len(perm) > 1:
        tau, p = kendall(perm, np.arange(len(perm)))
    else:
        tau, p = float("nan"), float("nan")
    return ReorderResult(
        perm=perm,
        tau=tau,
        tau_pvalue=p,
        sim_before=_flat_cosine(dot_before, na2, nb2),
        sim_after=_flat_cosine(dot_after, na2, nb2),
    )


def reorder_layer(
    w: ArrayLike,
    neuron_axis: int | str,
    extra: ArrayLike | None = None,
    labels: Sequence[str] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Reorder every expert pair of one layer for one matrix kind; one tidy row per pair.

    ``w`` is the ``[E, ...]`` stack; ``extra`` (same shape as one expert, e.g. the dense FFN) is added
    as item E with label ``"F"``. ``pairs`` defaults to all ``(j, k)`` with ``j < k``; the second item
    of each pair is the one reordered. Columns: ``index_a, index_b, expert_a, expert_b, sim_before,
    sim_after, gain, tau, tau_pvalue``.
    """
    n_exp = int(w.shape[0])
    mats = [w[e] for e in range(n_exp)]
    names = [str(e) for e in range(n_exp)] if labels is None else [str(x) for x in labels]
    if extra is not None:
        mats.append(extra)
        if len(names) == n_exp:
            names.append("F")
    if len(names) != len(mats):
        raise ShapeError(f"got {len(names)} labels for {len(mats)} matrices; pass one label per matrix")
    pair_list = list(combinations(range(len(mats)), 2)) if pairs is None else [tuple(p) for p in pairs]
    rows = []
    for j, k in pair_list:
        res = reorder_neurons(mats[j], mats[k], neuron_axis)
        rows.append(
            {
                "index_a": j,
                "index_b": k,
                "expert_a": names[j],
                "expert_b": names[k],
                "sim_before": res.sim_before,
                "sim_after": res.sim_after,
                "gain": res.gain,
                "tau": res.tau,
                "tau_pvalue": res.tau_pvalue,
            }
        )
    cols = ["index_a", "index_b", "expert_a", "expert_b", "sim_before", "sim_after", "gain", "tau", "tau_pvalue"]
    return pd.DataFrame(rows, columns=cols)
