"""Turn measured effects into the book's verdicts: "holds", "does not hold" or "inconclusive".

The rules are deliberately simple and stated in full, so a reader can check them:

* a share compared with its random baseline holds when the whole 95% interval lies above the
  baseline, does not hold when the whole interval lies at or below it, and is inconclusive
  otherwise;
* a mean difference (for example r^2 of W_act minus the larger of W_up and W_down) holds when its
  interval lies above 0, does not hold when it lies below 0, and is inconclusive otherwise;
* the depth pattern of observation 3 has two parts, a decline with depth before the last layer
  (Spearman rho < 0 with p < 0.05) and a last layer that rises above the layer before it by more
  than the spread of the preceding layers (z > 1 and delta > 0). Both: holds; neither: does not
  hold; one of the two: inconclusive (the note says which part held). A part that cannot be
  measured (too few layers: rho needs 3 layers before the last, z needs 2) is undefined, and an
  undefined part never supports "does not hold": the verdict is then at best inconclusive.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import metrics as M

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
NAN = float("nan")


def descriptive(value: float, paper_values: Any = None, note: str = "", baseline: float = NAN) -> dict[str, Any]:
    """A summary entry for a number that is reported, not tested (verdict None); ``paper_values``
    maps paper model -> the paper's value."""
    return {
        "value": float(value),
        "ci_low": NAN,
        "ci_high": NAN,
        "baseline": float(baseline),
        "verdict": None,
        "paper": dict(paper_values or {}),
        "note": note,
    }


def versus_baseline(low: float, high: float, baseline: float) -> str:
    """Verdict for an interval [low, high] compared with a baseline value."""
    if any(math.isnan(v) for v in (low, high)):
        return INCONCLUSIVE
    if low > baseline:
        return HOLDS
    if high <= baseline:
        return FAILS
    return INCONCLUSIVE


def mean_difference(diffs: Any, seed: int = 0) -> dict[str, float | str]:
    """Bootstrap interval of the mean of per-layer differences and its verdict against 0."""
    d = np.asarray(diffs, dtype=float)
    ci = M.bootstrap_mean_ci(d, seed=seed)
    return {
        "value": ci.estimate,
        "ci_low": ci.low,
        "ci_high": ci.high,
        "baseline": 0.0,
        "verdict": versus_baseline(ci.low, ci.high, 0.0),
    }


def depth_pattern(per_layer: dict[int, float]) -> dict[str, Any]:
    """Observation 3's two-part verdict from a per-layer similarity summary."""
    o = M.last_layer_outlier(per_layer)
    declines = (not math.isnan(o.trend_rho)) and o.trend_rho < 0 and o.trend_p < 0.05
    last_up = (not math.isnan(o.z)) and o.z > 1 and o.delta_previous > 0
    measured = not (math.isnan(o.trend_rho) or math.isnan(o.z))
    verdict = HOLDS if declines and last_up else FAILS if measured and not (declines or last_up) else INCONCLUSIVE
    parts = []
    parts.append(
        f"decline before the last layer: rho = {o.trend_rho:.2f} (p = {o.trend_p:.3g})"
        + (" - yes" if declines else " - no")
    )
    parts.append(
        f"last layer vs the rest: z = {o.z:.2f}, change from the layer before = {o.delta_previous:+.3f}"
        + (" - rises" if last_up else " - no rise")
    )
    return {
        "value": o.z,
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "baseline": 0.0,
        "verdict": verdict,
        "note": "; ".join(parts),
        "trend_rho": o.trend_rho,
        "trend_p": o.trend_p,
        "delta_previous": o.delta_previous,
    }
