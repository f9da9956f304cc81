"""The ladder's findings in plain words: what is settled at this scale, what drifts, and where the
paper's claims strengthen or weaken along depth and along training length.

The words are computed from the ladder's tables, never written by hand, so they follow the data
as rungs are added. The rules, stated once here and on the replication page:

- a claim is **settled at this scale** along depth when every depth with at least two seeds gives
  the same decided outcome (holds, does not hold, or detectable but below the floor);
- it **strengthens** (or **weakens**) with depth when its combined effect moves, in the direction
  the paper predicts (against it), at every step from the shallowest to the deepest rung, and the
  deepest rung's interval excludes the shallowest rung's estimate; otherwise the intervals cannot
  tell a trend apart;
- along training length, a quantity **has stopped moving** when its last doubling of training
  changed it by less than its claim's floor, and **still drifts** otherwise.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pandas as pd

from moe_utils.analysis.claims import CLAIMS
from moe_utils.zoo.ladder_predictions import LENGTH_CLAIMS, MIXTRAL_MATRIX_SIMILARITY, last_doubling

DECIDED = ("holds", "does not hold", "detectable but below the floor")
DEPTH_CLAIMS = ("obs1", "obs2", "obs3_weak", "obs3_strong")


def _direction(key: str) -> int:
    return CLAIMS[key].direction


def depth_trend(rows: pd.DataFrame, key: str) -> str:
    """ "strengthens", "weakens" or "no trend" for one claim's combined rows (one per depth,
    sorted by layers), by the rule in the module docstring."""
    if len(rows) < 2:
        return "no trend"
    sign = _direction(key)
    est = rows.effect.to_numpy(dtype=float) * sign
    steps = np.diff(est)
    first = float(rows.effect.iloc[0])
    lo, hi = float(rows.ci_low.iloc[-1]), float(rows.ci_high.iloc[-1])
    excludes_above = lo > first if sign > 0 else hi < first  # the deepest rung lies on the paper's side
    excludes_below = hi < first if sign > 0 else lo > first
    if np.all(steps > 0) and excludes_above:
        return "strengthens"
    if np.all(steps < 0) and excludes_below:
        return "weakens"
    return "no trend"


def _cells(rows: pd.DataFrame) -> str:
    return "; ".join(
        f"{int(r['layers'])} layers {r['outcome']} {r['effect']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] "
        f"({int(r['seeds'])} seeds)"
        for r in rows.to_dict("records")
    )


def depth_words(combined: pd.DataFrame, kind: str = "scratch", steps: int | None = None) -> str:
    """Markdown: for each claim of the depth axis (``combined`` is the ``ladder_across_seeds``
    table; rungs of ``kind`` at ``steps`` with at least two seeds), whether it is settled at this
    scale, and whether it strengthens or weakens with depth, with every rung's numbers."""
    t = combined[(combined.kind == kind) & (combined.seeds >= 2)]
    if steps is not None:
        t = t[t.steps == steps]
    t = cast(pd.DataFrame, t)
    depths = sorted({int(x) for x in t.layers})
    if len(depths) < 2:
        return (
            f"**Depth, in words:** fewer than two depths of the {kind} kind have two seeds measured, "
            "so nothing can be said yet about how the claims move with depth."
        )
    lines = [f"**Depth, in words** ({kind} kind; {', '.join(str(d) for d in depths)} layers):", ""]
    settled, moving = [], []
    for key in DEPTH_CLAIMS:
        rows = cast(pd.DataFrame, t[t.claim == key]).sort_values(by="layers")
        if rows.empty:
            continue
        outcomes = list(rows.outcome)
        same = len(set(outcomes)) == 1 and outcomes[0] in DECIDED and len(rows) == len(depths)
        trend = depth_trend(rows, key)
        if same:
            state = f"settled at this scale: {outcomes[0]} at every depth"
            settled.append(CLAIMS[key].title)
        elif all(o in DECIDED for o in outcomes):
            state = "decided at every depth but not the same way"
            moving.append(CLAIMS[key].title)
        else:
            undecided = [str(int(r["layers"])) for r in rows.to_dict("records") if r["outcome"] not in DECIDED]
            state = f"not settled: inconclusive at {', '.join(undecided)} layers"
        words = {
            "strengthens": "it strengthens with depth (its effect moves further in the paper's direction at each "
            "deeper rung, and the deepest rung's interval excludes the shallowest rung's estimate)",
            "weakens": "it weakens with depth (its effect moves against the paper's direction at each deeper rung, "
            "and the deepest rung's interval excludes the shallowest rung's estimate)",
            "no trend": "the intervals cannot tell a trend with depth apart from none",
        }[trend]
        lines.append(f"- {CLAIMS[key].title[:1].upper()}{CLAIMS[key].title[1:]}: {state}; {words}. {_cells(rows)}.")
    lines.append("")
    lines.append(
        "Settled at this scale: "
        + ("; ".join(settled) if settled else "no claim")
        + ". Decided differently at different depths: "
        + ("; ".join(moving) if moving else "no claim")
        + "."
    )
    return "\n".join(lines)


def length_words(trajectory: pd.DataFrame) -> str:
    """Markdown: per 4x run (``trajectory`` rows with ``ladder == "length"``), whether
    observations 1 and 2 had stopped moving over the last doubling of training, and for an
    upcycled run how far its experts' matrix-level similarity moved towards Mixtral's."""
    if "ladder" not in trajectory.columns:
        return "**Training length, in words:** no 4x run has been measured yet."
    t = cast(pd.DataFrame, trajectory[trajectory.ladder == "length"])
    if t.empty:
        return "**Training length, in words:** no 4x run has been measured yet."
    lines = ["**Training length, in words:**", ""]
    for rep in sorted(t.replicate.unique()):
        run = cast(pd.DataFrame, t[t.replicate == rep])
        parts = []
        for key in LENGTH_CLAIMS:
            for d in last_doubling(run, key):
                floor = CLAIMS[key].floor
                change = d.last - d.previous
                moved = "still drifts" if abs(change) >= floor else "has stopped moving"
                parts.append(
                    f"{key} {moved} ({d.previous:+.3f} at step {d.previous_step}, {d.last:+.3f} at step "
                    f"{d.last_step}: a change of {change:+.3f} against its floor {floor})"
                )
        sim = cast(pd.DataFrame, run[run.quantity == "expert_matrix_similarity"]).sort_values(by="step")
        if len(sim) >= 2:
            v = sim["value"].to_numpy(dtype=float)
            s = sim["step"].to_numpy(dtype=int)
            lo, hi = MIXTRAL_MATRIX_SIMILARITY
            pos = s > 0
            per_doubling = (
                (v[-1] - v[pos][0]) / np.log2(s[-1] / s[pos][0])
                if pos.sum() >= 2 and s[-1] > s[pos][0]
                else float("nan")
            )
            where = "inside" if lo <= v[-1] <= hi else ("above" if v[-1] > hi else "below")
            rate = f", {per_doubling:+.3f} per doubling of steps" if np.isfinite(per_doubling) else ""
            parts.append(
                f"its experts' matrix-level similarity went from {v[0]:.3f} (step {s[0]}) to {v[-1]:.3f} "
                f"(step {s[-1]}){rate}, {where} Mixtral 8x7B's {lo}-{hi} (the paper's App. D)"
            )
        if parts:
            lines.append(f"- **{rep}**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


__all__ = ["depth_trend", "depth_words", "length_words"]
