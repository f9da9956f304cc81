"""Gate embedding vs expert weights (paper §4.2, Tables 3 and 5).

Per layer: X = cosine similarity between router rows W_g[e, :]; Y = neuron-averaged similarity
(App. D) of W_act, W_up or W_down. The pairs are the strictly lower triangle of the E x E maps
(28 pairs for 8 experts, 2016 for 64); F and shared experts are excluded. A linear regression
(``scipy.stats.linregress``) gives Pearson r; the paper reports r^2 rounded to 2 decimals per
layer and then averaged over layers (``average_r2``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..core.errors import ShapeError
from ._arrays import ArrayLike, to_numpy
from ._scipy import linear_fit
from .neurons import neuron_level_similarity
from .similarity import cosine_matrix


def lower_triangle(s: ArrayLike) -> np.ndarray:
    """Strictly-lower-triangle entries of a square matrix, row by row (``i > j``)."""
    m = to_numpy(s)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ShapeError(f"expected a square similarity matrix; got shape {m.shape}")
    i, j = np.tril_indices(m.shape[0], k=-1)
    return m[i, j]


def gate_similarity(router: ArrayLike) -> np.ndarray:
    """X of the paper: cosine similarity between the rows of the router matrix ``[E, H]``."""
    return cosine_matrix(router)


class GateCorrelation(NamedTuple):
    """Pearson r between gate and expert similarities of one layer, and r squared."""

    r: float
    r2: float


@dataclass(frozen=True)
class GateRegression:
    """Full per-layer regression of gate similarity on expert similarity."""

    r: float
    r2: float
    slope: float
    intercept: float
    p_value: float
    n_pairs: int


def gate_expert_regression(gate_sim: ArrayLike, expert_sim: ArrayLike) -> GateRegression:
    """Regress the lower-triangle gate similarities on the expert similarities (``linregress``).

    Pairs with an undefined similarity (NaN: a zero-norm router row or expert) are left out and
    ``n_pairs`` counts the pairs used. With fewer than 3 pairs (E < 3) or a constant side, r is
    undefined and every other field is NaN. The regression direction does not change r.
    """
    x = lower_triangle(expert_sim)
    y = lower_triangle(gate_sim)
    if x.shape != y.shape:
        raise ShapeError(f"gate map has {y.size} pairs but expert map has {x.size}; compute both over the same experts")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return GateRegression(nan, nan, nan, nan, nan, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r, slope, intercept, p = linear_fit(x, y)
    return GateRegression(r, r * r, slope, intercept, p, n)


def gate_expert_correlation(gate_sim: ArrayLike, expert_sim: ArrayLike) -> GateCorrelation:
    """Pearson ``(r, r2)`` over the strictly lower triangle (NaN when undefined, see regression)."""
    reg = gate_expert_regression(gate_sim, expert_sim)
    return GateCorrelation(reg.r, reg.r2)


def average_r2(rs: Iterable[float], decimals: int | None = 2) -> float:
    """Mean of r^2 over layers; with ``decimals`` each layer's r^2 is rounded first (paper's Table 3).

    ``decimals=None`` gives the unrounded mean. Layers with an undefined (NaN) r are skipped; if all
    are NaN the result is NaN. Rounding uses Python's ``round`` (correct decimal rounding).
    """
    vals = [float(r) for r in rs]
    sq = [r * r for r in vals if not math.isnan(r)]
    if decimals is not None:
        sq = [round(v, decimals) for v in sq]
    return float(np.mean(sq)) if sq else float("nan")


def layer_gate_correlations(
    router: ArrayLike, matrices: Mapping[str, ArrayLike | None], layer: int | None = None
) -> pd.DataFrame:
    """Gate-vs-expert regression for one layer and several matrix kinds, as tidy rows.

    ``matrices`` maps a kind (``"act"``, ``"up"``, ``"down"``) to its ``[E, ...]`` stack (``None``
    entries are skipped, e.g. W_act of gate-less experts). Y uses neuron averaging with the kind's
    neuron axis. Columns: ``layer, matrix, r, r2, slope, intercept, p_value, n_pairs``.
    """
    x = gate_similarity(router)
    rows = []
    for kind, w in matrices.items():
        if w is None:
            continue
        if int(w.shape[0]) != x.shape[0]:
            raise ShapeError(
                f"router has {x.shape[0]} experts but {kind} has {int(w.shape[0])}; pass one layer's router and experts"
            )
        reg = gate_expert_regression(x, neuron_level_similarity(w, kind))
        rows.append({"layer": layer, "matrix": kind, **reg.__dict__})
    cols = ["layer", "matrix", "r", "r2", "slope", "intercept", "p_value", "n_pairs"]
    return pd.DataFrame(rows, columns=cols)
