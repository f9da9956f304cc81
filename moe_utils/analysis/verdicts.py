"""Descriptive summary entries and the baseline comparison of the secondary quantities.

The claims' verdicts (an effect against its computed null, an interval, a floor and four
outcomes) are in :mod:`moe_utils.analysis.effects`. What stays here is the plain comparison of a
secondary share with its baseline (the repeat rate against its frequency baseline, the
interventions' recovery ratio): it holds when the whole 95% interval lies above the baseline,
does not hold when the whole interval lies at or below it, and is inconclusive otherwise.
"""

from __future__ import annotations

import math
from typing import Any

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
