"""The book-level pages' tables (replication, interventions, organisms) against naive code."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from moe_utils.analysis import paper
from moe_utils.zoo import advice, replication
from moe_utils.zoo import report as organisms


@pytest.fixture(scope="module")
def shipped():
    return replication.replication_report()


def test_replication_summary_has_one_entry_per_kind_and_claim(shipped):
    across = shipped.across
    assert len(shipped.summary) == len(across) > 0
    for r in across.itertuples():
        entry = shipped.summary[f"{r.claim}_{r.organism}"]
        assert entry["verdict"] == r.verdict
        assert entry["value"] == r.effect or (math.isnan(entry["value"]) and math.isnan(r.effect))
        assert entry["floor"] == r.floor
        assert entry["note"]  # the numbers behind it, or why there is no across-seed verdict
        if r.seeds < 2:
            assert r.verdict == "undefined" and "pending" in entry["note"]
    assert shipped.replicates == sorted(shipped.replicates)


def test_replication_grids_and_narrative_state_each_verdict(shipped):
    grid = shipped.verdict_grid
    issued = {"obs1", "obs2", "obs3_weak", "obs3_strong"}
    base = shipped.verdicts[shipped.verdicts.ladder.fillna("") == ""]  # ladder rungs have their own grid
    for r in base[base.claim.isin(issued)].itertuples():
        cell = grid.loc[(r.observation, r.claim), (r.organism, r.seed)]
        assert cell.startswith(f"{r.verdict}: {r.effect:.3f}")
        assert ("[" in cell) == (not math.isnan(r.ci_low))
        # every measured row carries its null, floor and interval
        assert not math.isnan(r.floor) and not math.isnan(r.null)
    text = shipped.narrative
    for r in shipped.across.itertuples():
        assert f"**{r.organism}**: {r.verdict}" in text
    decided = int(shipped.across.verdict.isin(["holds", "does not hold", "detectable but below the floor"]).sum())
    assert f"Decided across seeds: {decided} of {len(shipped.across)}" in text
    # replicates measured before the nulls are listed as pending, never with their old verdicts
    # (a ladder rung shares its kind and seed with an 8-layer replicate, so only those are compared)
    base = shipped.verdicts[shipped.verdicts.ladder.fillna("") == ""]
    assert set(zip(shipped.tables["pending"].organism, shipped.tables["pending"].seed)).isdisjoint(
        set(zip(base.organism, base.seed))
    )
    reps = shipped.replicate_table
    held = shipped.tables["heldout"]
    assert len(reps) == int(((held.kind != "placement") & (held.ladder.fillna("") == "")).sum())


def test_seed0_check_pairs_the_study_row_with_the_page_number():
    verdicts = pd.DataFrame(
        {
            "organism": ["a", "a", "b"],
            "seed": [0, 1, 0],
            "quantity": ["q", "q", "q"],
            "effect": [0.5, 0.7, 0.1],
            "verdict": ["holds", "holds", "inconclusive"],
        }
    )
    pages = pd.DataFrame(
        {"model": ["zoo:a", "zoo:c"], "quantity": ["q", "q"], "value": [0.5, 0.2], "verdict": ["holds", "holds"]}
    )
    check = replication.seed0_check(verdicts, pages)
    assert check.to_dict("records") == [
        {"organism": "a", "quantity": "q", "study": 0.5, "page": 0.5, "same verdict": True}
    ]
    assert replication.seed0_check(verdicts, pd.DataFrame()).empty


def test_emergence_series_marks_each_series_last_step():
    em = pd.DataFrame(
        {
            "organism": ["a"] * 4,
            "seed": [0, 0, 1, 1],
            "quantity": ["q"] * 4,
            "step": [1, 5, 2, 3],
            "tokens_seen": [10, 50, 20, 30],
            "value": [0.1, 0.2, 0.3, 0.4],
        }
    )
    out = replication.emergence_series(em)
    assert out[out.final].step.tolist() == [5, 3]
    assert out.series.tolist() == ["a seed 0", "a seed 0", "a seed 1", "a seed 1"]
    marks = replication.emergence_paper_marks()
    g = paper.GATE_R2["Mixtral 8x7B"]
    assert marks["gate_act_advantage"] == pytest.approx(g["W_act"] - max(g["W_up"], g["W_down"]))


def test_k_table_finds_the_best_and_the_trained_k():
    sweep = pd.DataFrame(
        {
            "organism": ["a"] * 3 + ["b"] * 3,
            "k": [1, 2, 3] * 2,
            "nll": [3.0, 2.5, 2.6, 4.0, 3.9, 3.8],
            "trained_k": [False, True, False, True, False, False],
        }
    )
    t = advice.k_table(sweep)
    assert t.loc["a"].tolist() == [2, 2.5, 2, 2.5]
    assert t.loc["b"].tolist() == [1, 4.0, 3, 3.8]


def test_advice_rows_and_summary_cover_every_organism():
    v = {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "baseline": 0.0, "verdict": "holds", "note": "n"}
    norm, causal = {"a": v, "b": v}, {"a": {**v, "verdict": "inconclusive"}, "b": v}
    place = {**v, "verdict": None}
    table = advice.advice_table(["a", "b"], norm, causal, place)
    assert len(table) == 5 and list(table.columns) == ["advice", "organism", *advice.VERDICT_COLUMNS]
    assert table.iloc[-1].organism == advice.PLACEMENT_ORGANISMS
    s = advice.interventions_summary(["a", "b"], norm, causal, place)
    assert set(s) == {"norm_routing_a", "norm_causal_a", "norm_routing_b", "norm_causal_b", "dense_placement"}
    assert s["norm_causal_a"]["verdict"] == "inconclusive" and s["dense_placement"]["paper"] == {}
    t6 = advice.paper_table6()
    assert t6["paper: PPL"].tolist() == [p for p, _ in paper.DENSE_LAYER_EXPERIMENT.values()]
    assert advice.placement_rule().startswith("(a)")


def test_organism_sentences_and_load_summary():
    losses = pd.DataFrame(
        {
            "model": ["unigram", "x", "y"],
            "nats_per_token": [6.0, 4.0, 5.0],
            "perplexity": np.exp([6.0, 4.0, 5.0]),
            "tokens": [100, 100, 100],
        }
    )
    assert "the best, `x`, reaches 4.00 nats/token (perplexity 55)" in organisms.heldout_sentence(losses)
    worse = losses.assign(nats_per_token=[6.0, 4.0, 7.0])
    assert organisms.heldout_sentence(worse).startswith("**At least one organism does not beat")
    loads = pd.DataFrame(
        {"model": ["m"] * 4 + ["n"] * 2, "selections": [0, 3, 0, 5, 1, 1], "share": [0.0, 0.375, 0.0, 0.625, 0.5, 0.5]}
    )
    s = organisms.load_summary(loads)
    assert s.loc["m"].tolist() == [2, 0.0, 0.625] and s.loc["n"].tolist() == [0, 0.5, 0.5]


def test_ladder_frames_keep_series_with_two_rungs_and_chart_them():
    from moe_utils.publish import study_charts

    rows = []
    for layers, eff in ((4, 0.01), (8, 0.02), (16, 0.04)):
        rows.append(
            {
                "kind": "scratch",
                "layers": layers,
                "steps": 1200,
                "seed": 0,
                "observation": 3,
                "claim": "obs3_weak",
                "effect": eff,
                "null": 0.0,
                "ci_low": eff - 0.01,
                "ci_high": eff + 0.01,
                "floor": 0.005,
                "outcome": "holds",
            }
        )
    rows.append({**rows[0], "kind": "fine", "layers": 8})  # one rung only: no series on the depth axis
    ladder = pd.DataFrame(rows)
    depth = replication.ladder_frame(ladder, "depth")
    assert set(depth.series) == {"scratch seed 0"} and sorted(depth.layers) == [4, 8, 16]
    assert replication.ladder_frame(ladder, "length").empty
    grid = replication.ladder_grid(ladder, "depth")
    assert grid.loc["obs3_weak", ("scratch", 16, 0)] == "holds: 0.040 [0.030, 0.050]"
    spec = study_charts.ladder_lines(depth, x="layers", x_title="decoder layers", title="t").to_dict()
    assert spec["vconcat"]
