"""The organism study: registry, across-seed rule, saturation, and a miniature replicate trained
and measured end to end through ``moe-book zoo study``."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moe_utils.analysis.headlines import topk_overlap
from moe_utils.zoo import configs
from moe_utils.zoo import replicates as R
from moe_utils.zoo import study_results as S


def test_registry_has_three_seeds_of_every_kind_and_distinct_seeds() -> None:
    for kind in ("dense", "upcycled", "scratch", "fine"):
        reps = [r for r in R.REPLICATES.values() if r.kind == kind and r.ladder is None]
        assert len(reps) >= 3
        assert len({r.spec.seed for r in reps}) == len(reps)
    assert R.get("upcycled-s2").parent == "dense-s2"
    assert [r.name for r in R.chain("upcycled-s1")] == ["dense-s1", "upcycled-s1"]
    shipped = {r.shipped_as for r in R.REPLICATES.values() if r.shipped_as}
    assert shipped == {"tiny-dense", "tiny-moe-upcycled", "tiny-moe-scratch", "tiny-moe-fine"}
    # the shipped seeds are the ones the shipped organisms were trained with
    for name, spec in configs.TRAIN_SPECS.items():
        rep = next(r for r in R.REPLICATES.values() if r.shipped_as == name)
        assert rep.spec == spec
    with pytest.raises(KeyError, match="did you mean 'fine-s1'"):
        R.get("fine-s01")


def test_placement_variants_cover_first_inner_and_last_layer() -> None:
    layers = configs.PLACEMENT_SHAPE["num_hidden_layers"]
    positions = {r.dense_layer for r in R.REPLICATES.values() if r.kind == "placement"}
    assert {None, 0, layers - 1} <= positions
    assert len(positions - {None, 0, layers - 1}) >= 3


def test_fine_organism_matches_scratch_neurons_and_active_width() -> None:
    fine, scratch = configs.fine_config(), configs.moe_config()
    assert fine.num_experts >= 16 and fine.num_experts_per_tok >= 4 and fine.mlp_only_layers == [0]
    per_layer = fine.shared_expert_intermediate_size + fine.num_experts * fine.moe_intermediate_size
    assert per_layer == scratch.num_local_experts * scratch.intermediate_size
    active = fine.shared_expert_intermediate_size + fine.num_experts_per_tok * fine.moe_intermediate_size
    assert active == scratch.num_experts_per_tok * scratch.intermediate_size == fine.intermediate_size


def test_topk_overlap_against_sets() -> None:
    a = np.array([[0, 1], [2, 3], [4, 5]])
    b = np.array([[1, 0], [2, 4], [6, 7]])
    assert topk_overlap(a, b) == pytest.approx((2 + 1 + 0) / 6)


def test_ladder_rungs_change_only_depth_or_length() -> None:
    """A rung keeps its base replicate's seed and recipe; only the layers or the steps differ."""
    for rep in R.REPLICATES.values():
        if rep.ladder is None:
            continue
        base = R.get(rep.name.replace(f"-L{rep.layers}", "").replace("-long", ""))
        if rep.ladder == "depth":
            assert rep.layers in R.LADDER_DEPTHS + (16,) and rep.spec == base.spec
        else:
            assert rep.layers is None and rep.spec.seed == base.spec.seed and rep.spec.lr == base.spec.lr
            assert rep.spec.steps + (600 if rep.kind == "upcycled" else 0) == 4 * configs.TOTAL_STEPS
            assert max(rep.snapshots) == rep.spec.steps
    assert R.get("scratch-L16-s2").build()(0).config.num_hidden_layers == 16
    assert {r.layers for r in R.REPLICATES.values() if r.kind == "scratch"} >= {None, 4, 16}


def _rows(org: str, claim: str, effects, ses, **extra) -> list[dict]:
    return [
        {
            "organism": org,
            "seed": i,
            "claim": claim,
            "observation": 1,
            "effect": e,
            "se": s,
            "null": 0.0,
            "verdict": "holds",
            "ladder": "",
            **extra,
        }
        for i, (e, s) in enumerate(zip(effects, ses, strict=True))
    ]


def test_across_seed_rule_combines_estimates_not_votes() -> None:
    import pandas as pd

    from moe_utils import metrics as M

    # three seeds whose means agree closely but whose own errors are large: not "holds"
    v = pd.DataFrame(_rows("tiny-moe-scratch", "obs1", [0.031, 0.032, 0.027], [0.04, 0.04, 0.04]))
    row = S.across_seed_rows(v).set_index(["claim", "organism"]).loc[("obs1", "tiny-moe-scratch")]
    assert row.verdict in ("inconclusive", "does not hold") and row.ci_low < 0 < row.ci_high
    ref = M.random_effects([0.031, 0.032, 0.027], [0.04, 0.04, 0.04])
    assert (row.effect, row.ci_low, row.ci_high) == pytest.approx((ref.estimate, ref.low, ref.high))
    # a clear effect above the floor holds
    v = pd.DataFrame(_rows("tiny-moe-fine", "obs1", [0.30, 0.32, 0.29], [0.02, 0.02, 0.02]))
    assert S.across_seed_rows(v).set_index("claim").loc["obs1"].verdict == "holds"
    # one measured seed gives no across-seed verdict; ladder rows never enter
    v = pd.DataFrame(
        _rows("tiny-moe-fine", "obs1", [0.3], [0.02])
        + _rows("tiny-moe-fine", "obs2", [0.3, 0.3], [0.02, 0.02], ladder="depth")
    )
    out = S.across_seed_rows(v).set_index("claim")
    assert out.loc["obs1"].verdict == "undefined" and out.loc["obs2"].seeds == 0
    assert "p_holm" in out and (out.p_holm.dropna() >= out.p_value.dropna()).all()


def test_ladder_rungs_combine_their_own_seeds() -> None:
    import pandas as pd

    from moe_utils import metrics as M

    rung = {"kind": "scratch", "steps": 1200}
    v = pd.DataFrame(
        _rows("tiny-moe-scratch", "obs2", [0.30, 0.32, 0.29], [0.02, 0.02, 0.02], layers=4, **rung)
        + _rows("tiny-moe-scratch", "obs2", [0.01, 0.40], [0.02, 0.02], layers=8, **rung)
        + _rows("tiny-moe-scratch", "obs1", [0.2], [0.02], layers=8, **rung)
    )
    out = S.ladder_across_seeds(v).set_index(["layers", "claim"])
    l4 = out.loc[(4, "obs2")]
    ref = M.random_effects([0.30, 0.32, 0.29], [0.02, 0.02, 0.02])
    assert l4.seeds == 3 and l4.outcome == "holds"
    assert (l4.effect, l4.ci_low, l4.ci_high) == pytest.approx((ref.estimate, ref.low, ref.high))
    assert out.loc[(8, "obs2")].outcome == "inconclusive"  # two seeds that disagree
    assert out.loc[(8, "obs1")].outcome == "undefined" and out.loc[(8, "obs1")].seeds == 1
    from moe_utils.zoo.replication import ladder_across_grid

    grid = ladder_across_grid(S.ladder_across_seeds(v), "depth")
    assert list(grid.columns) == [("scratch", 4), ("scratch", 8)] and "obs1" not in grid.index
    assert grid.loc["obs2", ("scratch", 4)].startswith("holds: ") and grid.loc["obs2", ("scratch", 4)].endswith(
        ", 3 seeds"
    )


def test_scratch_observation1_is_not_a_finding_on_the_shipped_weights() -> None:
    """The old rule called observation 1 on tiny-moe-scratch "holds across seeds"; against its
    label-permutation null the shipped seed-0 weights show no effect above the floor."""
    from moe_utils.analysis import headlines as H
    from moe_utils.analysis.context import checkpoint_only
    from moe_utils.core.paths import zoo_path

    eff = H.observation1(checkpoint_only(str(zoo_path("tiny-moe-scratch"))))
    assert eff.verdict != "holds"
    assert eff.null < 0  # the null of the statistic is not 0
    across = S.replication_tables(S.load_shipped())["across_seeds"].set_index(["claim", "organism"])
    assert across.loc[("obs1", "tiny-moe-scratch")].verdict != "holds"


@pytest.mark.slow
def test_miniature_replicate_trains_resumes_and_measures(tmp_path: Path, monkeypatch) -> None:
    """A 6-step fine-grained replicate: interrupted after 3 steps, resumed, measured; a second
    run from scratch gives the same held-out loss and verdict rows."""
    from moe_utils.zoo import study

    def mini(name: str, snapshots: tuple[int, ...]) -> R.Replicate:
        rep = R.REPLICATES["fine-s1"]
        return replace(
            rep,
            name=name,
            spec=replace(rep.spec, steps=6, warmup_steps=2, batch_size=2, seq_len=32),
            snapshots=snapshots,
        )

    monkeypatch.setitem(R.REPLICATES, "mini-a", mini("mini-a", (0, 3, 6)))
    monkeypatch.setitem(R.REPLICATES, "mini-b", mini("mini-b", ()))
    monkeypatch.setattr(study, "check_prepared", lambda out: None)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    rng = np.random.default_rng(0)
    np.save(prepared / "train_ids.npy", rng.integers(3, configs.VOCAB_SIZE, size=5000).astype(np.uint16))
    windows = [[1] + rng.integers(3, configs.VOCAB_SIZE, size=31).tolist() for _ in range(4)]
    (prepared / "heldout_windows.json").write_text(json.dumps(windows))
    from moe_utils.zoo import zoo_path

    tok = prepared / "tokenizer"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tok / f).write_bytes((zoo_path("tiny-dense") / f).read_bytes())
    monkeypatch.setattr("moe_utils.zoo.train.prepare", lambda out, log=print: {})
    monkeypatch.setattr(S, "heldout", lambda folder, max_windows=None: _heldout(folder, windows))

    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what the study uses: one thread is bitwise reproducible
        # interrupted: a time limit of ~0 stops after the first checkpointed step
        assert study.train_replicate(R.get("mini-a"), tmp_path, max_seconds=0.0, progress=False) is False
        assert study.main(["--run", "mini-a", "--out", str(tmp_path), "--no-progress"]) == 0
        assert study.main(["--run", "mini-b", "--out", str(tmp_path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    from moe_utils.analysis.results import read_result

    a = read_result(tmp_path / "replicates" / "mini-a" / "results" / "study_replicate.json")
    b = read_result(tmp_path / "replicates" / "mini-b" / "results" / "study_replicate.json")
    assert a.tables["heldout"].heldout_loss.iloc[0] == pytest.approx(b.tables["heldout"].heldout_loss.iloc[0], abs=1e-6)
    va, vb = a.tables["verdicts"], b.tables["verdicts"]
    assert va.claim.tolist() == ["obs1", "obs2", "obs3_weak", "obs3_strong", "obs3_slope", "obs3_residual"]
    assert va[["effect", "verdict"]].equals(vb[["effect", "verdict"]])
    em = read_result(tmp_path / "replicates" / "mini-a" / "results" / "study_emergence.json").tables["emergence"]
    assert sorted(em.step.unique()) == [0, 3, 6]
    sat = em[em.quantity == "router_saturation"].set_index("step").value
    assert sat[6] == pytest.approx(1.0)  # the last snapshot is the final model


def _heldout(folder: Path, windows) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from moe_utils.zoo.evaluate import model_nll

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    nll = model_nll(m, windows)
    return {"heldout_loss": nll, "heldout_perplexity": math.exp(nll), "heldout_tokens": 124, "heldout_windows": 4}


def test_parameter_counts_of_the_fine_and_placement_organisms() -> None:
    from moe_utils.zoo import train
    from moe_utils.zoo.cards import parameter_counts

    tiny = dict(vocab_size=64)
    for model in (train.build_fine(0, **tiny), train.build_placement(0, 2, **tiny), train.build_moe(0, **tiny)):
        pc = parameter_counts(model.config.to_dict())
        assert pc["total"] == sum(p.numel() for p in model.parameters())
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        assert pc["experts_total"] == experts
        k, E = (
            model.config.num_experts_per_tok,
            (getattr(model.config, "num_experts", None) or model.config.num_local_experts),
        )
        assert pc["active"] == pc["total"] - experts + experts * k // E


def test_shipping_a_long_run_ships_its_streams_manifest(tmp_path, monkeypatch):
    """A 4x run's results go into the package with the manifest of the enlarged stream it trained
    on; an organism replicate's do not touch it."""
    from moe_utils.zoo import study as study_module
    from moe_utils.zoo.long_corpus import LONG_CORPUS_FILE, LONG_META_FILE
    from moe_utils.zoo.replicates import REPLICATES, replicate_dir

    package = tmp_path / "package"
    monkeypatch.setattr(study_module, "ZOO_STUDY_DIR", package)
    out = tmp_path / "out"
    (out / "prepared").mkdir(parents=True)
    (out / "prepared" / LONG_META_FILE).write_text(json.dumps({"tokens": 4}))
    for name in ("scratch-s1", "upcycled-long-s0"):
        results = replicate_dir(out, name) / "results"
        results.mkdir(parents=True)
        (results / "study_replicate.json").write_text("{}")
    study_module.ship_results(REPLICATES["scratch-s1"], out, log=lambda _: None)
    assert (package / "scratch-s1" / "study_replicate.json").is_file()
    assert not (package / LONG_CORPUS_FILE).exists()
    study_module.ship_results(REPLICATES["upcycled-long-s0"], out, log=lambda _: None)
    assert json.loads((package / LONG_CORPUS_FILE).read_text()) == {"tokens": 4}


def test_every_listed_replicate_ships_its_results_and_snapshots() -> None:
    """The book never retrains, so every replicate `zoo study --list` shows must have shipped results,
    with one measured snapshot per step its recipe lists."""
    shipped = S.load_shipped()
    assert sorted(set(R.REPLICATES) - set(shipped)) == []
    for rep in R.REPLICATES.values():
        if rep.snapshots:
            steps = set(shipped[rep.name]["emergence"].step.astype(int))
            assert set(rep.snapshots) <= steps, rep.name
