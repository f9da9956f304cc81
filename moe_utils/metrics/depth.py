"""Per-layer summaries and the last-layer effect (paper §4.1.1, §5.1, §6 / Table 6).

The paper's observation 3: expert similarity falls in deeper layers but rises again in the last
layer(s). ``last_layer_outlier`` turns this into numbers for any sequence of per-layer values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.errors import ArgumentError, ShapeError
from ._arrays import ArrayLike, to_numpy
from ._scipy import spearman


def mean_offdiagonal(s: ArrayLike, n: int | None = None) -> float:
    """Mean of the off-diagonal entries of the leading ``n x n`` block of a square matrix.

    Use ``n = E`` to get the expert-expert mean S_ee of a map with an appended "F" row/column.
    NaN when the block has fewer than 2 rows.
    """
    m = to_numpy(s)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ShapeError(f"expected a square similarity matrix; got shape {m.shape}")
    k = m.shape[0] if n is None else int(n)
    if k > m.shape[0]:
        raise ArgumentError(f"n = {k} exceeds the matrix size {m.shape[0]}; pass n <= {m.shape[0]} or None")
    if k < 2:
        return float("nan")
    b = m[:k, :k]
    return float((b.sum() - np.trace(b)) / (k * (k - 1)))


def reference_similarity(s: ArrayLike) -> float:
    """Mean similarity between the last item ("F") and every other item: S_ef = mean(S[-1, :-1])."""
    m = to_numpy(s)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ShapeError(f"expected a square matrix with at least 2 rows; got shape {m.shape}")
    return float(m[-1, :-1].mean())


def per_layer_summary(maps: Mapping[int, ArrayLike], n_experts: int | None = None) -> pd.DataFrame:
    """Tidy per-layer summary of similarity maps.

    Columns: ``layer, mean_offdiag`` (expert-expert, over the first ``n_experts`` rows),
    ``min_offdiag, max_offdiag`` and, when the maps have a row past ``n_experts`` (the reference
    "F"), ``mean_reference`` = mean similarity of each expert to that last row. No maps: no rows,
    the same columns.
    """
    rows = []
    for layer in sorted(maps):
        m = to_numpy(maps[layer])
        k = m.shape[0] if n_experts is None else int(n_experts)
        b = m[:k, :k]
        off = b[~np.eye(k, dtype=bool)]
        row = {
            "layer": layer,
            "mean_offdiag": mean_offdiagonal(m, k),
            "min_offdiag": float(off.min()) if off.size else float("nan"),
            "max_offdiag": float(off.max()) if off.size else float("nan"),
        }
        if m.shape[0] > k:
            row["mean_reference"] = float(m[-1, :k].mean())
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["layer", "mean_offdiag", "min_offdiag", "max_offdiag"])


@dataclass(frozen=True)
class LastLayerOutlier:
    """How the last layer's value compares with the layers before it.

    * ``z`` = (last value - mean of all preceding layers) / their sample std (ddof=1): the last
      layer's distance from the rest in units of their spread (``inf``/``-inf`` if the preceding
      values are constant and the last differs; NaN with fewer than 2 preceding layers).
    * ``delta_previous`` = last value - second-to-last value.
    * ``trend_rho`` / ``trend_p``: Spearman rank correlation (and two-sided p-value) between layer
      index and value over the preceding layers only; negative = similarity declines with depth
      before the last layer. NaN with fewer than 3 preceding layers.
    * ``note``: empty when the last layer has a finite value; otherwise one line saying why every
      number is undefined (NaN) and ``last_layer`` is None.
    """

    last_layer: int | None
    last_value: float
    preceding_mean: float
    preceding_std: float
    z: float
    delta_previous: float
    trend_rho: float
    trend_p: float
    n_preceding: int
    note: str = ""


def undefined_outlier(n_layers: int) -> LastLayerOutlier:
    """The result for a series without a finite value: every number NaN, with a one-line note."""
    nan = float("nan")
    note = (
        f"undefined: none of the {n_layers} per-layer value(s) is finite"
        if n_layers
        else "undefined: there are no per-layer values"
    )
    return LastLayerOutlier(None, nan, nan, nan, nan, nan, nan, nan, 0, note)


def last_layer_outlier(
    values: Mapping[int, float] | Sequence[float] | ArrayLike, layers: Sequence[int] | None = None
) -> LastLayerOutlier:
    """Compare the last (deepest) layer's value with the preceding layers; see ``LastLayerOutlier``.

    ``values`` is a mapping layer -> value, or a sequence with optional matching ``layers`` (default
    0..L-1). Layers are sorted; NaN and infinite values are dropped first. A series with no finite
    value gives :func:`undefined_outlier` (NaN everywhere and a note), not an error.
    """
    if isinstance(values, Mapping):
        pairs = sorted((int(k), float(v)) for k, v in values.items())
    else:
        v = to_numpy(values).reshape(-1)
        lay = list(range(len(v))) if layers is None else [int(x) for x in layers]
        if len(lay) != len(v):
            raise ShapeError(f"{len(v)} values but {len(lay)} layers; pass one layer index per value")
        pairs = sorted(zip(lay, v.tolist(), strict=True))
    finite = [(k, v) for k, v in pairs if math.isfinite(v)]
    if not finite:
        return undefined_outlier(len(pairs))
    pairs = finite
    lay = np.array([p[0] for p in pairs])
    val = np.array([p[1] for p in pairs], dtype=np.float64)
    last, prev = val[-1], val[:-1]
    nan = float("nan")
    mean = float(prev.mean()) if prev.size else nan
    std = float(prev.std(ddof=1)) if prev.size >= 2 else nan
    if prev.size < 2:
        z = nan
    elif std > 0:
        z = (last - mean) / std
    else:
        z = 0.0 if last == mean else math.copysign(math.inf, last - mean)
    if prev.size >= 3 and np.ptp(prev) > 0:
        rho, p = spearman(lay[:-1], prev)
    else:
        rho, p = nan, nan
    return LastLayerOutlier(
        last_layer=int(lay[-1]),
        last_value=float(last),
        preceding_mean=mean,
        preceding_std=std,
        z=float(z),
        delta_previous=float(last - prev[-1]) if prev.size else nan,
        trend_rho=rho,
        trend_p=p,
        n_preceding=int(prev.size),
    )
