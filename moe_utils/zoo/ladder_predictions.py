"""The ladder's pre-registered predictions, checked against the measured rungs.

``book/preregistration.md`` fixed, before any ladder result, what along each axis would support
the paper and what would count against it. This module states each of those rules as a function
of the ladder's tables, so that the replication page says which ones the data meet, which they
contradict and which still wait for a replicate, instead of a reader comparing tables by eye.

Depth axis (from-scratch kind at the organisms' budget; each rung's seeds combined by random
effects, as ``study_results.ladder_across_seeds``). Training-length axis (the 4x runs' snapshots,
the ``trajectory`` table with ``ladder == "length"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple, cast

import numpy as np
import pandas as pd

from moe_utils import metrics as M
from moe_utils.analysis.claims import CLAIMS
from moe_utils.zoo.replicates import REPLICATES
from moe_utils.zoo.study_results import rung_outcome

PENDING = "waits for replicates"
MET = "met"
NOT_MET = "not met"
SUPPORTS, AGAINST, NEITHER = "supports the paper", "counts against the paper", "neither yet"
# The quantities of the length snapshots that carry each effect (names as in the results files).
LENGTH_CLAIMS = ("obs1", "obs2")
# Mixtral 8x7B's matrix-level expert similarity, the range of the paper's App. D.
MIXTRAL_MATRIX_SIMILARITY = (0.2, 0.4)


@dataclass(frozen=True)
class Check:
    """One pre-registered rule: which side it is on, whether the data meet it, and the numbers."""

    axis: str
    side: str  # "supports" or "against"
    rule: str
    status: str  # MET, NOT_MET or PENDING
    evidence: str

    def row(self) -> dict[str, str]:
        return {
            "axis": self.axis,
            "side": self.side,
            "rule": self.rule,
            "status": self.status,
            "evidence": self.evidence,
        }


def _listed(kind: str, layers: int | None, ladder: str | None) -> int:
    """How many replicates the registry lists for one rung."""
    return sum(1 for r in REPLICATES.values() if r.kind == kind and r.layers == layers and r.ladder == ladder)


def deepest_rung(kind: str = "scratch") -> int:
    """The deepest rung of the depth axis the registry lists for ``kind`` (the predictions' target)."""
    return max((r.layers or 8 for r in REPLICATES.values() if r.kind == kind and r.ladder == "depth"), default=8)


def _cell(c: M.Combined | None) -> str:
    if c is None or not np.isfinite(c.estimate):
        return "not measured"
    return f"{c.estimate:+.3f} [{c.low:+.3f}, {c.high:+.3f}], {c.seeds} seeds"


def depth_checks(
    rungs: Mapping[int, Mapping[str, M.Combined]],
    outcomes: Mapping[int, Mapping[str, str]],
    complete: Mapping[int, bool],
) -> list[Check]:
    """The depth predictions from each depth's combined effects (``rungs[layers][claim]``, parts
    ``obs3_slope`` and ``obs3_residual`` included), their outcomes, and whether every listed seed
    of a depth is measured. The registry's deepest rung and the organisms' depth (8) are compared;
    every rule waits until all the deepest rung's seeds are measured."""
    depths = sorted(rungs)
    deepest = deepest_rung()
    ready = deepest in rungs and complete.get(deepest, False) and 8 in rungs

    def status(ok: bool) -> str:
        return (MET if ok else NOT_MET) if ready else PENDING

    def get(layers: int, key: str) -> M.Combined | None:
        return rungs.get(layers, {}).get(key)

    res = {d: get(d, "obs3_residual") for d in depths}
    res_floor, slope_floor = CLAIMS["obs3_residual"].floor, CLAIMS["obs3_slope"].floor
    positive = all(c is not None and c.low > 0 for c in res.values())
    no_shrink = all(
        (b := res[d2]) is not None and (a := res[d1]) is not None and b.high >= a.estimate
        for d1, d2 in pairwise(depths)
    )
    keep = [outcomes.get(deepest, {}).get(k) == outcomes.get(8, {}).get(k) for k in ("obs1", "obs2")]
    deep_res, deep_slope = get(deepest, "obs3_residual"), get(deepest, "obs3_slope")
    residual_cells = "; ".join(f"{d} layers {_cell(res[d])}" for d in depths)
    keep_cells = "; ".join(
        f"{k} {outcomes.get(8, {}).get(k, 'not measured')} at 8 layers, "
        f"{outcomes.get(deepest, {}).get(k, 'not measured')} at {deepest}"
        for k in ("obs1", "obs2")
    )
    return [
        Check(
            "depth",
            "supports",
            f"observation 3's weak form holds at {deepest} layers",
            status(outcomes.get(deepest, {}).get("obs3_weak") == "holds"),
            f"{outcomes.get(deepest, {}).get('obs3_weak', 'not measured')} at {deepest} layers",
        ),
        Check(
            "depth",
            "supports",
            "the combined last-layer residual is positive at every depth and does not shrink as depth grows "
            "(each deeper rung's interval reaches the shallower rung's estimate)",
            status(positive and no_shrink),
            residual_cells,
        ),
        Check(
            "depth",
            "supports",
            f"observations 1 and 2 keep their 8-layer outcome at {deepest} layers",
            status(all(keep)),
            keep_cells,
        ),
        Check(
            "depth",
            "against",
            f"at {deepest} layers the last-layer residual's interval lies below its floor ({res_floor})",
            status(deep_res is not None and deep_res.high < res_floor),
            f"{deepest} layers: {_cell(deep_res)}",
        ),
        Check(
            "depth",
            "against",
            f"at {deepest} layers the slope's interval lies above -{slope_floor} (no decline across the depth)",
            status(deep_slope is not None and deep_slope.low > -slope_floor),
            f"{deepest} layers: {_cell(deep_slope)}",
        ),
    ]


def _rows(frame: pd.DataFrame, **equal: object) -> pd.DataFrame:
    """The rows of ``frame`` whose columns equal the given values (a typed boolean filter)."""
    mask = pd.Series(True, index=frame.index)
    for col, value in equal.items():
        mask &= frame[col] == value
    return cast(pd.DataFrame, frame.loc[mask])


class Doubling(NamedTuple):
    """One 4x run's claim over its last doubling of training: the effect at the last two snapshots
    and the last one's interval."""

    replicate: str
    previous: float
    last: float
    previous_step: int
    last_step: int
    ci_low: float
    ci_high: float


def last_doubling(runs: pd.DataFrame, key: str) -> list[Doubling]:
    """Per 4x run in ``runs`` (trajectory rows), the claim's effect over its last two snapshots."""
    out: list[Doubling] = []
    for rep in sorted(runs.replicate.unique()) if len(runs) else []:
        q = _rows(runs, replicate=rep, quantity=CLAIMS[key].quantity).sort_values(by="step")
        if len(q) >= 2:
            a, b = q.iloc[-2], q.iloc[-1]
            out.append(
                Doubling(
                    str(rep),
                    float(a["value"]),
                    float(b["value"]),
                    int(a["step"]),
                    int(b["step"]),
                    float(b["ci_low"]),
                    float(b["ci_high"]),
                )
            )
    return out


def _describe(rows: list[Doubling]) -> str:
    if not rows:
        return "no 4x run measured yet"
    return "; ".join(
        f"{d.replicate}: {d.previous:+.3f} -> {d.last:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]" for d in rows
    )


def length_checks(trajectory: pd.DataFrame, kinds: tuple[str, ...] = ("scratch", "upcycled")) -> list[Check]:
    """The training-length predictions from the 4x runs' snapshots (``trajectory`` rows with
    ``ladder == "length"``): per kind, the last doubling of observations 1 and 2, and for the
    upcycled kind the matrix-level expert similarity against Mixtral's."""
    if not {"ladder", "kind", "replicate"} <= set(trajectory.columns):
        trajectory = pd.DataFrame(
            columns=["replicate", "ladder", "kind", "step", "quantity", "value", "ci_low", "ci_high"]
        )
    t = _rows(trajectory, ladder="length")
    checks: list[Check] = []
    for kind in kinds:
        runs = _rows(t, kind=kind)
        ready = _listed(kind, None, "length") > 0 and len(runs) > 0

        def status(ok: bool, ready: bool = ready) -> str:
            return (MET if ok else NOT_MET) if ready else PENDING

        doubling = {k: last_doubling(runs, k) for k in LENGTH_CLAIMS}
        stable = all(
            rows and all(abs(d.last - d.previous) < CLAIMS[k].floor and d.ci_low > CLAIMS[k].floor for d in rows)
            for k, rows in doubling.items()
        )
        falls = any(d.last - d.previous < -CLAIMS["obs2"].floor for d in doubling["obs2"])
        obs1 = _rows(runs, quantity=CLAIMS["obs1"].quantity)
        obs1 = obs1[np.isfinite(obs1.ci_high.astype(float))]  # the upcycled start has no MoE to measure
        below = len(obs1) > 0 and bool((obs1.ci_high.astype(float) < CLAIMS["obs1"].floor).all())
        place = f"length ({kind})"
        checks += [
            Check(
                place,
                "supports",
                "observations 1 and 2 change by less than their floors over the last doubling and end with their "
                "intervals above their floors",
                status(bool(stable)),
                f"obs1: {_describe(doubling['obs1'])}. obs2: {_describe(doubling['obs2'])}",
            ),
            Check(
                place,
                "against",
                "observation 2's effect falls by more than its floor over the last doubling",
                status(falls),
                f"obs2: {_describe(doubling['obs2'])}",
            ),
            Check(
                place,
                "against",
                "observation 1's interval lies below its floor at every snapshot",
                status(below),
                f"{len(obs1)} snapshots measured",
            ),
        ]
        if kind == "upcycled":
            checks.append(_drift_check(place, _rows(runs, quantity="expert_matrix_similarity"), ready))
    return checks


def _drift_check(place: str, sim: pd.DataFrame, ready: bool) -> Check:
    """Whether the upcycled experts' matrix-level similarity falls at every snapshot."""
    falling, finals = True, []
    for rep in sorted(sim.replicate.unique()) if len(sim) else []:
        v = _rows(sim, replicate=rep).sort_values(by="step")["value"].to_numpy(dtype=float)
        falling = falling and bool(np.all(np.diff(v) < 0))
        finals.append(f"{rep} from {v[0]:.3f} to {v[-1]:.3f}")
    measured = ready and len(sim) > 1
    lo, hi = MIXTRAL_MATRIX_SIMILARITY
    return Check(
        place,
        "supports",
        f"the upcycled experts' matrix-level similarity falls at every snapshot, towards Mixtral's {lo}-{hi}",
        (MET if falling else NOT_MET) if measured else PENDING,
        "; ".join(finals) + f" (Mixtral 8x7B: {lo}-{hi}, the paper's App. D)" if finals else "not measured yet",
    )


def verdict(checks: list[Check]) -> str:
    """The axis in one phrase: supports, counts against, neither yet, or waits for replicates when
    no rule can be applied yet."""
    if any(c.side == "against" and c.status == MET for c in checks):
        return AGAINST
    if checks and all(c.status == PENDING for c in checks):
        return PENDING
    support = [c for c in checks if c.side == "supports"]
    if support and all(c.status == MET for c in support):
        return SUPPORTS
    return NEITHER


def checks_table(checks: list[Check]) -> pd.DataFrame:
    """The checks as a table for the page (axis, side, rule, status, evidence)."""
    return pd.DataFrame([c.row() for c in checks], columns=["axis", "side", "rule", "status", "evidence"])


def depth_rungs(
    verdicts: pd.DataFrame, kind: str = "scratch"
) -> tuple[dict[int, dict[str, M.Combined]], dict[int, dict[str, str]], dict[int, bool]]:
    """From the replicates' verdict rows: per depth of ``kind`` at its organisms' budget, each
    claim's (and observation 3's parts') seeds combined, their outcomes, and whether every seed the
    registry lists for that depth is measured."""
    steps = REPLICATES[f"{kind}-s0"].spec.steps
    v = verdicts.dropna(subset=["claim"]) if "claim" in verdicts else verdicts.iloc[0:0]
    v = v[(v.kind == kind) & (v.steps.astype(int) == steps)] if len(v) else v
    rungs: dict[int, dict[str, M.Combined]] = {}
    outcomes: dict[int, dict[str, str]] = {}
    complete: dict[int, bool] = {}
    for d in sorted({int(x) for x in v.layers}) if len(v) else []:
        g = cast(pd.DataFrame, v[v.layers.astype(int) == d])
        rungs[d], outcomes[d] = {}, {}
        for key in ("obs1", "obs2", "obs3_weak", "obs3_slope", "obs3_residual"):
            comb, out = rung_outcome(g, key)
            rungs[d][key], outcomes[d][key] = comb, out
        listed = _listed(kind, None if d == 8 else d, None if d == 8 else "depth")
        complete[d] = g.seed.nunique() >= max(listed, 2)
    return rungs, outcomes, complete
