"""zoo.ladder_predictions: the pre-registered rules of both ladder axes, on planted tables whose
answer is known, and the 4x runs kept apart from the organism replicates they share a seed with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moe_utils.analysis.claims import CLAIMS
from moe_utils.metrics import Combined
from moe_utils.zoo import ladder_predictions as P
from moe_utils.zoo import replication as R
from moe_utils.zoo import study_results as S


def comb(est: float, half: float, seeds: int = 3) -> Combined:
    return Combined(est, half / 3, est - half, est + half, 0.0, seeds, 0.01)


def rungs(residual16: tuple[float, float], slope16: tuple[float, float]) -> dict[int, dict[str, Combined]]:
    base = {"obs1": comb(-0.06, 0.08), "obs2": comb(0.1, 0.05), "obs3_weak": comb(0.04, 0.01)}
    return {
        4: {**base, "obs3_residual": comb(0.03, 0.01), "obs3_slope": comb(-0.08, 0.01)},
        8: {**base, "obs3_residual": comb(0.04, 0.01), "obs3_slope": comb(-0.06, 0.01)},
        16: {**base, "obs3_residual": comb(*residual16), "obs3_slope": comb(*slope16)},
    }


OUTCOMES = {d: {"obs1": "does not hold", "obs2": "inconclusive", "obs3_weak": "holds"} for d in (4, 8, 16)}
COMPLETE = {4: True, 8: True, 16: True}


def test_the_deepest_rung_is_the_registrys() -> None:
    assert P.deepest_rung() == 16


def test_depth_rules_that_all_support_the_paper() -> None:
    checks = P.depth_checks(rungs((0.05, 0.01), (-0.05, 0.01)), OUTCOMES, COMPLETE)
    assert [c.status for c in checks if c.side == "supports"] == [P.MET] * 3
    assert [c.status for c in checks if c.side == "against"] == [P.NOT_MET] * 2
    assert P.verdict(checks) == P.SUPPORTS


@pytest.mark.parametrize(
    ("residual16", "slope16", "broken"),
    [
        ((0.001, 0.002), (-0.05, 0.01), 3),  # residual interval [-0.001, 0.003] below its floor 0.005
        ((0.05, 0.01), (-0.005, 0.003), 4),  # slope interval [-0.008, -0.002] above -0.01
    ],
)
def test_depth_rules_that_count_against_it(residual16, slope16, broken: int) -> None:
    checks = P.depth_checks(rungs(residual16, slope16), OUTCOMES, COMPLETE)
    assert checks[broken].side == "against" and checks[broken].status == P.MET
    assert P.verdict(checks) == P.AGAINST


def test_a_shrinking_residual_does_not_support() -> None:
    # 16 layers: 0.01 [0.007, 0.013] does not reach the 8-layer estimate 0.04
    checks = P.depth_checks(rungs((0.01, 0.003), (-0.05, 0.01)), OUTCOMES, COMPLETE)
    assert checks[1].status == P.NOT_MET
    assert P.verdict(checks) == P.NEITHER


def test_depth_rules_wait_for_every_seed_of_the_deepest_rung() -> None:
    data = rungs((0.05, 0.01), (-0.05, 0.01))
    assert {c.status for c in P.depth_checks(data, OUTCOMES, {**COMPLETE, 16: False})} == {P.PENDING}
    del data[16]
    assert {c.status for c in P.depth_checks(data, OUTCOMES, COMPLETE)} == {P.PENDING}
    assert P.verdict(P.depth_checks(data, OUTCOMES, COMPLETE)) == P.PENDING


def trajectory(obs2_values: list[float], obs1_values: list[float], similarity: list[float]) -> pd.DataFrame:
    steps = [300, 600, 1200, 2400, 4800][-len(obs2_values) :]
    rows = []
    for kind, name in (("scratch", "scratch-long-s0"), ("upcycled", "upcycled-long-s0")):
        for q, values in ((CLAIMS["obs2"].quantity, obs2_values), (CLAIMS["obs1"].quantity, obs1_values)):
            rows += [
                {"replicate": name, "ladder": "length", "kind": kind, "seed": 0, "step": s, "quantity": q, "value": v}
                | {"ci_low": v - 0.02, "ci_high": v + 0.02}
                for s, v in zip(steps, values, strict=True)
            ]
        if kind == "upcycled":
            rows += [
                {"replicate": name, "ladder": "length", "kind": kind, "seed": 0, "step": s}
                | {"quantity": "expert_matrix_similarity", "value": v, "ci_low": np.nan, "ci_high": np.nan}
                for s, v in zip(steps, similarity, strict=True)
            ]
    return pd.DataFrame(rows)


def test_length_rules_on_a_settled_trajectory() -> None:
    t = trajectory([0.3, 0.25, 0.22, 0.21, 0.20], [0.2, 0.15, 0.12, 0.11, 0.11], [0.9, 0.8, 0.6, 0.45, 0.35])
    checks = P.length_checks(t)
    assert [c.status for c in checks if c.side == "supports"] == [P.MET, P.MET, P.MET]
    assert [c.status for c in checks if c.side == "against"] == [P.NOT_MET] * 4
    assert "upcycled-long-s0 from 0.900 to 0.350" in checks[-1].evidence


def test_length_rules_on_a_falling_transient() -> None:
    # obs2 falls 0.35 -> 0.10 over the last doubling (more than its floor 0.14); obs1 never reaches its floor
    t = trajectory([0.4, 0.45, 0.4, 0.35, 0.10], [0.01, 0.0, 0.02, 0.01, 0.0], [0.9, 0.92, 0.9, 0.91, 0.9])
    checks = P.length_checks(t)
    against = [c for c in checks if c.side == "against"]
    assert all(c.status == P.MET for c in against)
    assert checks[-1].status == P.NOT_MET  # the similarity does not fall at every snapshot
    assert P.verdict(checks) == P.AGAINST


def test_length_rules_wait_without_a_4x_run() -> None:
    assert {c.status for c in P.length_checks(pd.DataFrame())} == {P.PENDING}


def test_a_4x_run_and_an_organism_replicate_with_the_same_seed_stay_apart() -> None:
    def em(step: int, value: float) -> pd.DataFrame:
        return pd.DataFrame(
            [{"organism": "tiny-moe-scratch", "kind": "scratch", "seed": 1, "step": step, "tokens_seen": step * 2048}]
        ).assign(quantity=CLAIMS["obs2"].quantity, value=value, ci_low=value - 0.01, ci_high=value + 0.01)

    shipped = {"scratch-s1": {"emergence": em(1200, 0.1)}, "scratch-long-s1": {"emergence": em(4800, 0.3)}}
    tables = S.replication_tables(shipped)
    traj = R.trajectory_table(tables["emergence"])
    assert sorted(zip(traj.replicate, traj.ladder, traj.run_steps, strict=True)) == [
        ("scratch-long-s1", "length", 4800),
        ("scratch-s1", "", 1200),
    ]
    frame = R.length_frame(traj)
    assert list(frame.series) == ["scratch-long-s1"] and list(frame.steps) == [4800]
    assert list(frame.outcome) == ["holds"]  # [0.29, 0.31] lies above obs2's floor 0.14


def test_the_length_grid_states_each_snapshots_outcome() -> None:
    t = trajectory([0.3, 0.25, 0.22, 0.21, 0.20], [0.2, 0.15, 0.12, 0.11, 0.11], [0.9, 0.8, 0.6, 0.45, 0.35])
    grid = R.length_grid(t)
    # at 4,800 steps obs2 0.20 [0.18, 0.22] lies above its floor 0.14, obs1 0.11 [0.09, 0.13] above 0.065
    assert grid.loc[("scratch-long-s0", 4800), "obs2"].startswith("holds: 0.200")
    assert grid.loc[("scratch-long-s0", 4800), "obs1"].startswith("holds: 0.110")
    assert grid.loc[("scratch-long-s0", 300), "obs1"].startswith("holds: 0.200")
    assert R.length_grid(pd.DataFrame()).empty


def _with_upcycled_start(t: pd.DataFrame) -> pd.DataFrame:
    """``t`` with the upcycled run's step-0 snapshot: copies of the dense MLP, obs2 exactly 0 and no
    obs1 effect (the measurement returns NaN there)."""
    base = {"replicate": "upcycled-long-s0", "ladder": "length", "kind": "upcycled", "seed": 0, "step": 0}
    start = [
        base | {"quantity": CLAIMS["obs2"].quantity, "value": 0.0, "ci_low": 0.0, "ci_high": 0.0},
        base | {"quantity": CLAIMS["obs1"].quantity, "value": np.nan, "ci_low": np.nan, "ci_high": np.nan},
        base | {"quantity": "expert_matrix_similarity", "value": 1.0, "ci_low": np.nan, "ci_high": np.nan},
    ]
    return pd.concat([pd.DataFrame(start), t], ignore_index=True)


def test_a_snapshot_of_copied_experts_has_no_outcome() -> None:
    t = _with_upcycled_start(trajectory([0.3, 0.25], [0.2, 0.15], [0.9, 0.8]))
    frame = R.length_frame(t)
    start = frame[(frame.series == "upcycled-long-s0") & (frame.steps == 0)]
    assert set(start.claim) == {"obs1", "obs2"} and set(start.outcome) == {"undefined"}
    later = frame[(frame.series == "upcycled-long-s0") & (frame.steps == 4800)]
    assert set(later.outcome) == {"holds"}  # obs2 0.25 [0.23, 0.27] > 0.14, obs1 0.15 [0.13, 0.17] > 0.065


def test_obs1_below_its_floor_is_read_over_the_snapshots_that_have_an_effect() -> None:
    # obs1 0.01 [-0.01, 0.03] at every measured step lies below its floor 0.065; the start has none
    t = _with_upcycled_start(trajectory([0.3, 0.25], [0.01, 0.01], [0.9, 0.8]))
    below = [c for c in P.length_checks(t) if c.axis == "length (upcycled)" and "below its floor" in c.rule]
    assert [c.status for c in below] == [P.MET]
    assert below[0].evidence == "2 snapshots measured"
