"""Catalogue of the cases where a number could silently be wrong.

1. Every summary quantity an observation page writes is recomputed from the tables of its results
   file with naive code written from the paper's definitions (Table 3 above all).
2. Non-finite weights or activations stop the run with an error naming layer, expert and tensor;
   the ``allow_invalid`` opt-in excludes the experts and marks the results invalid.
3. Degenerate experts (zero, constant, identical, a single expert) give undefined (NaN) numbers
   where the quantity is undefined, never 0 or 1.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from summary_checks import check_obs1, check_obs2, check_obs3, naive_mean, naive_table3
from tiny_models import write_checkpoint

from moe_utils import metrics as M
from moe_utils.analysis import obs1_neurons, paper, static, summary
from moe_utils.analysis.context import open_study
from moe_utils.analysis.results import read_result
from moe_utils.core.errors import NonFiniteError
from moe_utils.core.finite import ScreenedSource
from moe_utils.engine.expert_math import expert_outputs
from moe_utils.models.expert_gram import expert_grams
from moe_utils.models.trace import trace
from moe_utils.models.weights import iter_layer_weights, layer_weights

E, H, I, LAYERS = 5, 12, 16, 3


# ---- a small synthetic Mixtral checkpoint -----------------------------------------------------------
def mixtral_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for n in range(LAYERS):
        p = f"model.layers.{n}.block_sparse_moe."
        t[p + "gate.weight"] = torch.randn(E, H, generator=g)
        for e in range(E):
            t[p + f"experts.{e}.w1.weight"] = torch.randn(I, H, generator=g)
            t[p + f"experts.{e}.w2.weight"] = torch.randn(H, I, generator=g)
            t[p + f"experts.{e}.w3.weight"] = torch.randn(I, H, generator=g)
    return t


def write_mixtral(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": LAYERS,
        "num_local_experts": E,
        "num_experts_per_tok": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "max_position_embeddings": 64,
        "vocab_size": 32,
    }
    return write_checkpoint(folder, {"model.safetensors": tensors}, config)


def expert_key(layer: int, expert: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


# ---- 1. Table 3 and every summary quantity -----------------------------------------------------------
@pytest.mark.parametrize("model", ["Mixtral 8x7B", "DeepSeekMoE 16B"])
def test_table3_average_from_the_papers_own_table5(model):
    """Feeding the paper's per-layer r (Table 5) must give its Table 3 W_act average."""
    r = paper.GATE_ACT_R_PER_LAYER[model]
    rng = np.random.default_rng(0)
    gate = pd.DataFrame(
        [
            {"layer": l, "matrix": m, "r": (r[l] if m == "W_act" else rng.uniform(-0.3, 0.3))}
            for l in range(len(r))
            for m in ("W_act", "W_up", "W_down")
        ]
    )
    gate["r2"] = gate.r**2
    s = obs1_neurons.obs1_summary(
        {
            "gate_correlation": gate,
            "weight_similarity": pd.DataFrame(
                columns=["layer", "matrix", "level", "expert_i", "expert_j", "similarity"]
            ),
            "reordering": pd.DataFrame(columns=["expert_j", "tau"]),
            "gate_null": pd.DataFrame(columns=static.GATE_NULL_COLUMNS),
        }
    )
    assert s["router_act_alignment"]["verdict"] == "undefined"  # no null computed: no verdict
    assert round(s["gate_r2_act"]["value"], 2) == paper.GATE_R2[model]["W_act"]
    assert s["gate_r2_act"]["value"] == pytest.approx(naive_table3(r))
    # the quantity is r^2 averaged, not r^4 (squaring r^2 again gave 0.0025 instead of 0.03 before)
    assert s["gate_r2_act"]["value"] != pytest.approx(naive_mean([round(x**4, 2) for x in r]))


def test_obs1_summary_recomputed_from_its_results_file(tmp_path):
    folder = write_mixtral(tmp_path / "ckpt", mixtral_tensors())
    study = open_study(str(folder), None, weights_only=True, results_dir=tmp_path / "res")
    report = static.weight_report(study.weights_source, study.layers)
    tables = {
        "weight_similarity": report["similarity"],
        "reordering": report["reordering"],
        "gate_correlation": report["gate_correlation"],
        "gate_null": report["gate_null"],
    }
    path = study.save("obs1_neurons_as_experts", tables, obs1_neurons.obs1_summary(tables))
    res = read_result(path)
    assert not res.is_invalid
    check_obs1(res)


@pytest.fixture(scope="module")
def observation_runs(tmp_path_factory, repo_root):
    """The three observation notebooks run once on a random tiny Mixtral (the notebook code path)."""
    out = tmp_path_factory.mktemp("runs")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_utils.publish.cli",
            "run",
            "--model",
            "random:mixtral",
            "--notebooks",
            "obs1_neurons_as_experts",
            "obs2_router_norms",
            "obs3_depth_diversity",
            "--out",
            str(out),
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return out / "random-mixtral" / "results"


@pytest.mark.slow
@pytest.mark.parametrize(
    "analysis,check",
    [("obs1_neurons_as_experts", check_obs1), ("obs2_router_norms", check_obs2), ("obs3_depth_diversity", check_obs3)],
    ids=["obs1", "obs2", "obs3"],
)
def test_every_summary_quantity_recomputed_from_the_notebooks_results(observation_runs, analysis, check):
    res = read_result(observation_runs / f"{analysis}.json")
    check(res)
    assert not res.is_invalid


# ---- 2. non-finite weights and activations -------------------------------------------------------------
@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_nonfinite_weight_stops_every_reader_naming_layer_expert_tensor(tmp_path, value, what):
    t = mixtral_tensors()
    t[expert_key(1, 2, "w3")][4, 5] = value  # W_up of expert 2, layer 1
    folder = write_mixtral(tmp_path / "ckpt", t)
    layer_weights(folder, 0)  # other layers read fine
    for read in (
        lambda: layer_weights(folder, 1),
        lambda: list(iter_layer_weights(folder)),
        lambda: static.weight_report(folder),
        lambda: expert_grams(folder, 1),
    ):
        with pytest.raises(NonFiniteError) as err:
            read()
        assert (err.value.layer, err.value.expert, err.value.tensor) == (1, 2, "W_up")
        assert "layer 1, expert 2: W_up" in str(err.value) and what in str(err.value)


def test_nonfinite_router_row_names_the_expert(tmp_path):
    t = mixtral_tensors()
    t["model.layers.2.block_sparse_moe.gate.weight"][3, 0] = float("-inf")
    folder = write_mixtral(tmp_path / "ckpt", t)
    with pytest.raises(NonFiniteError) as err:
        layer_weights(folder, 2)
    assert (err.value.layer, err.value.expert, err.value.tensor, err.value.n_inf) == (2, 3, "router row", 1)


def test_allow_invalid_excludes_the_expert_and_marks_the_results(tmp_path):
    t = mixtral_tensors()
    t[expert_key(1, 2, "w1")][0, 0] = float("nan")
    folder = write_mixtral(tmp_path / "ckpt", t)
    study = open_study(
        str(folder), None, weights_only=True, results_dir=tmp_path / "runs" / "m" / "results", allow_invalid=True
    )
    report = static.weight_report(study.weights_source)
    sim = report["similarity"]
    assert "2" not in set(sim[sim.layer == 1].expert_i) and "2" in set(sim[sim.layer == 0].expert_i)
    assert set(sim[sim.layer == 1].expert_i) == {"0", "1", "3", "4"}  # original labels kept
    gate = report["gate_correlation"]
    assert set(gate[gate.layer == 1].n_pairs) == {6}  # C(4, 2) pairs
    assert study.excluded == [{"layer": 1, "expert": 2, "tensor": "W_act", "n_nan": 1, "n_inf": 0}]
    assert "INVALID" in study.validity_note()
    tables = {
        "weight_similarity": sim,
        "reordering": report["reordering"],
        "gate_correlation": gate,
        "gate_null": report["gate_null"],
    }
    res = read_result(study.save("obs1_neurons_as_experts", tables, obs1_neurons.obs1_summary(tables)))
    assert res.is_invalid and res.invalid[0]["expert"] == 2 and res.params["allow_invalid"] is True
    check_obs1(res)  # still consistent with its tables
    verdicts = summary.verdict_table(summary.collect(tmp_path / "runs"))  # the summary page says so too
    assert verdicts[study.name].str.startswith("INVALID").all()
    # the excluded layer's numbers equal those of a checkpoint without that expert at all
    direct = ScreenedSource(folder)
    w = layer_weights(direct, 1)
    assert w.ids == [0, 1, 3, 4] and w.num_experts == 4 and len(direct.excluded) == 1
    clean = layer_weights(folder, 0)
    assert torch.equal(layer_weights(ScreenedSource(folder), 0).w_up, clean.w_up)


def _poisoned_model(experts):
    """A fresh random tiny Mixtral whose first MoE layer has a NaN in W_act of ``experts``."""
    from moe_utils.models.loading import load_model

    lm = load_model("random:mixtral", seed=0)
    layer = lm.moe_layers[0]
    name, param = next(
        (n, p)
        for n, p in lm.model.named_parameters()
        if f"layers.{layer}." in n and "experts" in n and ("gate_up" in n or "w1" in n or "gate_proj" in n)
    )
    with torch.no_grad():
        for e in experts:
            (param[e] if param.dim() == 3 else param)[0, 0] = float("nan")  # fused [E, 2I, H]: row 0 is W_act
    return lm, layer


def test_nonfinite_activations_stop_trace_and_expert_outputs():
    lm, layer = _poisoned_model(experts=[1])
    with pytest.raises(NonFiniteError) as err:
        layer_weights(lm, layer)
    assert (err.value.layer, err.value.expert, err.value.tensor) == (layer, 1, "W_act")
    lm, layer = _poisoned_model(experts=range(lm.facts.num_experts))
    with pytest.raises(NonFiniteError) as err:  # every token's block output is NaN
        trace(lm, [[0] + list(range(3, 40))])
    assert (err.value.layer, err.value.expert, err.value.tensor) == (layer, 0, "W_act")  # the cause is named
    x = torch.randn(6, lm.facts.hidden_size)
    healthy = layer_weights(lm, lm.moe_layers[-1])
    healthy.w_up[3, 1, 1] = float("inf")
    with pytest.raises(NonFiniteError) as err:
        expert_outputs(healthy, x)
    assert (err.value.layer, err.value.expert, err.value.tensor) == (
        lm.moe_layers[-1],
        3,
        "expert output on the captured inputs",
    )


@pytest.mark.slow
def test_nan_expert_stops_the_notebook_run_and_allow_invalid_marks_the_page(tmp_path, repo_root):
    t = mixtral_tensors()
    t[expert_key(0, 4, "w2")][1, 1] = float("nan")  # W_down of expert 4, layer 0
    folder = write_mixtral(tmp_path / "nan-mixtral", t)
    cmd = [
        sys.executable,
        "-m",
        "moe_utils.publish.cli",
        "run",
        "--model",
        str(folder),
        "--notebooks",
        "obs1_neurons_as_experts",
        "--out",
        str(tmp_path / "out"),
    ]
    run = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert run.returncode != 0
    assert "NonFiniteError" in run.stderr + run.stdout and "layer 0, expert 4: W_down" in run.stderr + run.stdout
    assert not list((tmp_path / "out").glob("nan-mixtral*/results/obs1_neurons_as_experts.json"))
    run = subprocess.run(
        cmd + ["-p", "allow_invalid", "True"], cwd=repo_root, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = next((tmp_path / "out").glob("nan-mixtral*"))  # local folders get a content-hashed slug
    res = read_result(out / "results" / "obs1_neurons_as_experts.json")
    assert res.invalid == [{"layer": 0, "expert": 4, "tensor": "W_down", "n_nan": 1, "n_inf": 0}]
    check_obs1(res)
    page = (out / "obs1_neurons_as_experts.ipynb").read_text()
    assert "INVALID: this model's weights hold NaN or infinite values" in page


# ---- 3. degenerate experts ---------------------------------------------------------------------------------
def test_zero_norm_expert_gives_undefined_similarity_never_0_or_1(tmp_path):
    t = mixtral_tensors()
    for w in ("w1", "w2", "w3"):
        t[expert_key(0, 1, w)].zero_()
    folder = write_mixtral(tmp_path / "ckpt", t)
    report = static.weight_report(folder, layers=[0])
    sim = report["similarity"]
    one = sim[(sim.expert_i == "1") | (sim.expert_j == "1")]
    assert one.similarity.isna().all()  # matrix and neuron level, diagonal included
    others = sim[(sim.expert_i != "1") & (sim.expert_j != "1")]
    assert not others.similarity.isna().any()
    gate = report["gate_correlation"]
    assert set(gate.n_pairs) == {(E - 1) * (E - 2) // 2}  # pairs with the zero expert left out
    g = layer_weights(folder, 0)
    grams = expert_grams(folder, 0)
    cos = M.cosine_from_gram(grams["up"])
    assert np.isnan(cos[1]).all() and np.isnan(cos[:, 1]).all()
    np.testing.assert_allclose(
        np.delete(np.delete(cos, 1, 0), 1, 1),
        np.delete(np.delete(M.matrix_level_similarity(g.w_up), 1, 0), 1, 1),
        atol=1e-6,
    )  # float32 blocks
    ang = M.angular_similarity(M.cosine_matrix(g.w_up.reshape(E, -1)))
    assert np.isnan(ang[1]).all() and ang[0, 0] == 1.0


def test_constant_expert_is_well_defined():
    w = np.random.default_rng(0).normal(size=(3, 4, 6))
    w[1] = 0.5  # constant, non-zero
    sim = M.matrix_level_similarity(w)
    assert not np.isnan(sim).any() and sim[1, 1] == 1.0
    expected = w[0].sum() * 0.5 / (np.linalg.norm(w[0]) * np.linalg.norm(w[1]))
    assert sim[0, 1] == pytest.approx(expected)
    res = M.reorder_neurons(w[0], w[1], "up")  # every neuron of w[1] is the same vector
    assert res.sim_after == pytest.approx(res.sim_before)  # no permutation can change a constant matrix
    proj = M.matrix_pca(w)
    assert np.isfinite(proj.coords).all()


def test_identical_experts_give_similarity_one_and_undefined_correlation():
    rng = np.random.default_rng(1)
    one = rng.normal(size=(4, 6))
    w = np.stack([one] * 4)
    assert np.allclose(M.matrix_level_similarity(w), 1.0)
    reg = M.gate_expert_regression(M.gate_similarity(rng.normal(size=(4, 6))), M.neuron_level_similarity(w, "up"))
    assert math.isnan(reg.r) and reg.n_pairs == 6  # constant expert similarity: r undefined, not 0
    res = M.reorder_neurons(w[0], w[1], "up")
    assert res.tau == pytest.approx(1.0) and res.sim_after == pytest.approx(1.0)


@pytest.mark.parametrize("n_experts", [1, 2])
def test_too_few_experts_give_undefined_gate_numbers(n_experts):
    rng = np.random.default_rng(2)
    rows = M.layer_gate_correlations(
        rng.normal(size=(n_experts, 6)),
        {
            "act": rng.normal(size=(n_experts, 5, 6)),
            "up": rng.normal(size=(n_experts, 5, 6)),
            "down": rng.normal(size=(n_experts, 6, 5)),
        },
        layer=0,
    )
    assert rows.r.isna().all()
    gate = rows.assign(matrix=rows.matrix.map({"act": "W_act", "up": "W_up", "down": "W_down"}))
    s = obs1_neurons.obs1_summary(
        {
            "gate_correlation": gate,
            "weight_similarity": pd.DataFrame(
                columns=["layer", "matrix", "level", "expert_i", "expert_j", "similarity"]
            ),
            "reordering": pd.DataFrame(columns=["expert_j", "tau"]),
            "gate_null": pd.DataFrame(
                [{"layer": 0, **M.gate_permutation_null(np.eye(n_experts), {"W_act": np.eye(n_experts)}).as_dict()}]
            ),
        }
    )
    assert math.isnan(s["gate_r2_act"]["value"]) and math.isnan(s["gate_act_advantage"]["value"])
    assert (
        s["router_act_alignment"]["verdict"] == "undefined" and "too few experts" in s["router_act_alignment"]["note"]
    )


def test_allow_invalid_cannot_exclude_every_expert(tmp_path):
    t = mixtral_tensors()
    for e in range(E):
        t[expert_key(0, e, "w3")][0, 0] = float("nan")
    folder = write_mixtral(tmp_path / "ckpt", t)
    with pytest.raises(NonFiniteError, match="every expert"):
        layer_weights(ScreenedSource(folder), 0)


def test_invalid_shared_expert_is_dropped_with_allow_invalid(tmp_path):
    from tiny_models import deepseekmoe_config, synthetic_deepseekmoe

    t = synthetic_deepseekmoe(tmp_path / "first")
    t["model.layers.1.mlp.shared_experts.up_proj.weight"][0, 0] = float("inf")
    folder = write_checkpoint(tmp_path / "ckpt", {"model.safetensors": t}, deepseekmoe_config())
    with pytest.raises(NonFiniteError) as err:
        layer_weights(folder, 1)
    assert (err.value.layer, err.value.expert, err.value.tensor) == (1, "SE", "shared W_up")
    screen = ScreenedSource(folder)
    w = layer_weights(screen, 1)
    assert w.shared is None and w.num_experts == 6 and screen.excluded[0]["expert"] == "SE"
    sim = static.weight_similarity(ScreenedSource(folder), layers=[1, 2])
    assert "SE" not in set(sim[sim.layer == 1].expert_i) and "SE" in set(sim[sim.layer == 2].expert_i)


def test_finite_check_fast_path_is_exact():
    from moe_utils.core.finite import is_finite

    assert is_finite(torch.full((4, 4), 3e38))  # finite entries whose sum overflows
    assert is_finite(torch.zeros(0)) and is_finite(torch.arange(5))
    for v in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(5, 5)
        t[2, 3] = v
        assert not is_finite(t) and not is_finite(t.to(torch.bfloat16))
    t = torch.randn(5)
    t[0], t[1] = float("inf"), float("-inf")  # opposite infinities: NaN sum
    assert not is_finite(t)


def test_finite_check_of_a_gapped_view_finds_the_bad_entry():
    """Experts mapped from a file are a view with gaps between them (checked slice by slice)."""
    from moe_utils.core.finite import is_finite

    base = torch.randn(4, 3, 6, 5)
    view = base[:, 1]  # [4, 6, 5], not contiguous, each expert contiguous
    assert not view.is_contiguous() and is_finite(view)
    base[2, 1, 4, 3] = float("nan")
    assert not is_finite(view)
    base[2, 1, 4, 3] = 0.0
    base[2, 0, 4, 3] = float("inf")  # outside the view
    assert is_finite(view)


def test_weight_report_screens_the_expert_matrices_in_its_own_first_pass(tmp_path, monkeypatch):
    """A finite layer's expert matrices are not read once more just to check them; a NaN found
    by the first pass gives the same tables as checking every expert before the analysis."""
    from moe_utils.models import screening as W  # the expert screening moved out of weights.py

    t = mixtral_tensors()
    t[expert_key(1, 3, "w2")][2, 1] = float("nan")
    folder = write_mixtral(tmp_path / "ckpt", t)
    checked = []
    real = W.is_finite
    monkeypatch.setattr(W, "is_finite", lambda x: checked.append(tuple(x.shape)) or real(x))
    report = static.weight_report(ScreenedSource(folder), layers=[0, 1])
    stacks = [s for s in checked if len(s) == 3]
    assert len(stacks) == 3  # only layer 1's, after its first pass found the NaN
    eager = static.weight_similarity(ScreenedSource(folder), layers=[0, 1])
    sim = report["similarity"]
    assert "3" not in set(sim[sim.layer == 1].expert_i)
    pd.testing.assert_frame_equal(sim.reset_index(drop=True), eager.reset_index(drop=True))
    with pytest.raises(NonFiniteError) as err:
        static.weight_report(folder, layers=[1])
    assert (err.value.layer, err.value.expert, err.value.tensor) == (1, 3, "W_down")
