"""The per-observation glue against naive computations written straight from the paper's definitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import linregress
from tiny_models import sequences, tiny

from moe_utils import metrics as M
from moe_utils.analysis import dynamic, static, summary, verdicts
from moe_utils.analysis.results import write_result
from moe_utils.models.trace import trace


def _mixtral_expert_mats(lm, layer: int) -> dict[str, torch.Tensor]:
    """W_act, W_up [E,I,H] and W_down [E,H,I] read directly from the model's fused parameters."""
    experts = lm.model.model.layers[layer].mlp.experts
    gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    i = down.shape[-1]
    return {"W_act": gu[:, :i], "W_up": gu[:, i:], "W_down": down}


def _naive_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


def test_matrix_and_neuron_similarity_match_naive_loops():
    lm = tiny("mixtral")
    sim = static.weight_similarity(lm.model)
    for layer in lm.moe_layers:
        mats = _mixtral_expert_mats(lm, layer)
        e = mats["W_up"].shape[0]
        for m, w in mats.items():
            got = sim[(sim.layer == layer) & (sim.matrix == m)]
            for level in ("matrix", "neuron"):
                g = got[got.level == level].set_index(["expert_i", "expert_j"]).similarity
                for i in range(e):
                    for j in range(e):
                        if level == "matrix":
                            want = _naive_cos(w[i], w[j])
                        else:
                            axis = 1 if m == "W_down" else 0  # average over the neuron axis
                            want = _naive_cos(w[i].mean(axis), w[j].mean(axis))
                        assert g[(str(i), str(j))] == pytest.approx(want, abs=1e-6)


def test_dense_baseline_appears_as_F_when_widths_match():
    lm = tiny("mixtral")
    mats = _mixtral_expert_mats(lm, 0)
    e, i, h = mats["W_up"].shape

    class FakeDense:  # a dense "F" whose FFN equals expert 0 of the same layer
        pass

    from moe_utils.models.weights import DenseMLPWeights

    def fake_dense_weights(source, layer, dtype=torch.float32):
        m = _mixtral_expert_mats(lm, layer)
        return DenseMLPWeights(layer, m["W_act"][0], m["W_up"][0], m["W_down"][0], "silu")

    import moe_utils.analysis.static as st

    original = st.dense_mlp_weights
    st.dense_mlp_weights = fake_dense_weights
    try:
        sim = static.weight_similarity(lm.model, dense_baseline=FakeDense())
    finally:
        st.dense_mlp_weights = original
    g = (
        sim[(sim.layer == 0) & (sim.matrix == "W_act") & (sim.level == "matrix")]
        .set_index(["expert_i", "expert_j"])
        .similarity
    )
    assert g[("0", "F")] == pytest.approx(1.0, abs=1e-9)
    assert g[("1", "F")] == pytest.approx(_naive_cos(mats["W_act"][1], mats["W_act"][0]), abs=1e-6)
    summ = static.offdiagonal_summary(sim)
    assert {"S_ee", "S_ef"} <= set(summ.columns)


@pytest.mark.parametrize("dense_width", [3, 50])
def test_intermediate_frame_draws_a_dense_baseline_of_another_width(monkeypatch, dense_width):
    """Fig. 12's table keeps each side's own neurons: a baseline F narrower or wider than the experts
    (and than ``max_neurons``) gives its own rows, equal to act(W_act x) computed by hand."""
    from moe_utils.engine.canonical import DenseMLPWeights

    lm = tiny("mixtral")
    seqs = sequences(lengths=(6, 4))
    tr = trace(lm, seqs)
    h = _mixtral_expert_mats(lm, 0)["W_up"].shape[-1]
    g = torch.Generator().manual_seed(7)
    w_act, w_up = torch.randn(dense_width, h, generator=g), torch.randn(dense_width, h, generator=g)
    w_down = torch.randn(h, dense_width, generator=g)
    monkeypatch.setattr(
        dynamic, "dense_mlp_weights", lambda src, layer, dtype=None: DenseMLPWeights(layer, w_act, w_up, w_down, "silu")
    )
    max_neurons = 20
    frame = dynamic.intermediate_frame(lm, tr, 0, dense_lm=object(), dense_tr=tr, max_neurons=max_neurons)  # type: ignore[arg-type]
    f = frame[frame.expert == "F"].sort_values(["token_index", "neuron"])
    x = tr.per_layer[0].x.reshape(-1, h).float()
    want = F.silu(x @ w_act.T)[:, :max_neurons]
    assert f.neuron.nunique() == min(dense_width, max_neurons)
    assert f.token_index.nunique() == x.shape[0]
    np.testing.assert_allclose(f.value.to_numpy().reshape(want.shape), want.numpy(), rtol=1e-5, atol=1e-6)
    experts = frame[frame.expert != "F"]
    i = _mixtral_expert_mats(lm, 0)["W_up"].shape[1]
    assert experts.neuron.nunique() == min(i, max_neurons)
    assert list(f.token.unique()) == list(dict.fromkeys(dynamic.token_labels(tr)))


def test_gate_correlation_matches_scipy_on_the_lower_triangle():
    lm = tiny("mixtral")
    got = static.gate_correlation(lm.model)
    for layer in lm.moe_layers:
        router = lm.model.model.layers[layer].mlp.gate.weight.detach()
        mats = _mixtral_expert_mats(lm, layer)
        e = router.shape[0]
        pairs = [(j, i) for j in range(e) for i in range(j)]
        x = [_naive_cos(router[j], router[i]) for j, i in pairs]
        for m, w in mats.items():
            axis = 1 if m == "W_down" else 0
            y = [_naive_cos(w[j].mean(axis), w[i].mean(axis)) for j, i in pairs]
            row = got[(got.layer == layer) & (got.matrix == m)].iloc[0]
            assert row.r == pytest.approx(linregress(x, y).rvalue, abs=1e-6)
            assert row.n_pairs == len(pairs)


def test_norms_scores_and_rank_counts_from_a_naive_per_expert_loop():
    lm = tiny("mixtral")
    seqs = sequences(lengths=(9, 6))
    tr = trace(lm, seqs)
    ns = dynamic.norms_and_scores(lm, tr)
    for layer in tr.layers:
        mats = _mixtral_expert_mats(lm, layer)
        x = tr.per_layer[layer].x.double()
        for e in range(mats["W_up"].shape[0]):
            y = (F.silu(x @ mats["W_act"][e].double().T) * (x @ mats["W_up"][e].double().T)) @ mats["W_down"][
                e
            ].double().T
            np.testing.assert_allclose(ns.norms[layer][:, e], y.norm(dim=-1).numpy(), rtol=1e-4)
        logits = x @ lm.model.model.layers[layer].mlp.gate.weight.detach().double().T
        np.testing.assert_allclose(ns.scores[layer], torch.softmax(logits, -1).numpy(), rtol=1e-4, atol=1e-7)
    counts = dynamic.rank_count_frame(ns)
    n_tokens = sum(len(s) for s in seqs)
    per_norm_rank = counts.groupby(["layer", "norm_rank"])["count"].sum()
    assert (per_norm_rank == n_tokens).all()
    total = dynamic.summed_rank_counts(counts)
    assert total.groupby("norm_rank")["share_of_norm_rank"].sum().round(9).eq(1.0).all()
    agree = dynamic.agreement_table(ns, n_boot=200)
    pooled = agree[agree.scope == "all"].iloc[0]
    naive = np.mean(
        [np.argmax(ns.norms[l][t]) == np.argmax(ns.scores[l][t]) for l in ns.layers for t in range(n_tokens)]
    )
    assert pooled.share == pytest.approx(naive)
    bars = dynamic.token_bars_frame(ns, tr)
    assert bars.groupby(["layer", "token_index"]).chosen.sum().eq(2).all()  # top-2 routing


def test_output_similarity_and_routing_frames():
    lm = tiny("mixtral")
    tr = trace(lm, sequences(lengths=(7,)))
    tok = dynamic.token_output_similarity(lm, tr)
    diag = tok[tok.expert_i == tok.expert_j].similarity
    assert np.allclose(diag, 1.0)
    avg = dynamic.average_output_similarity(lm, tr)
    assert avg.similarity.between(0, 1).all()
    routes = dynamic.routing_frame(tr)
    assert len(routes) == len(tr.layers) * tr.num_tokens * 2
    assert routes.groupby(["layer", "token_index"]).weight.sum().round(5).eq(1.0).all()  # Mixtral renormalises


def test_shared_expert_joins_neuron_level_and_output_maps():
    lm = tiny("deepseek_v2")
    sim = static.weight_similarity(lm.model)
    assert "SE" in set(sim[sim.level == "neuron"].expert_i)
    assert "SE" not in set(sim[sim.level == "matrix"].expert_i)
    tr = trace(lm, sequences(lengths=(5,)))
    tok = dynamic.token_output_similarity(lm, tr)
    assert "SE" in set(tok.expert_i)


def test_verdict_rules():
    assert verdicts.versus_baseline(0.3, 0.5, 0.125) == verdicts.HOLDS
    assert verdicts.versus_baseline(0.05, 0.12, 0.125) == verdicts.FAILS
    assert verdicts.versus_baseline(0.1, 0.2, 0.125) == verdicts.INCONCLUSIVE
    assert verdicts.versus_baseline(float("nan"), 0.2, 0.125) == verdicts.INCONCLUSIVE


def test_summary_reads_results_files(tmp_path):
    for model, (eff, null) in (("m-a", (0.30, 0.10)), ("m-b", (0.02, 0.12))):
        write_result(
            tmp_path / model / "results",
            "obs2_router_norms",
            model,
            "fp-" + model,
            {},
            {"t": pd.DataFrame({"x": [1]})},
            {
                "norm_preference": {
                    "value": eff,
                    "ci_low": eff - 0.05,
                    "ci_high": eff + 0.05,
                    "baseline": 0.0,
                    "verdict": M.outcome(eff - 0.05, eff + 0.05, 0.14),
                    "paper": {"Mixtral 8x7B": 0.565},
                    "note": "",
                    "observed": eff + null,
                    "null": null,
                    "floor": 0.14,
                    "p_value": 0.001 if eff > 0.1 else 0.3,
                }
            },
        )
    table = summary.collect(tmp_path)
    v = summary.verdict_table(table)
    obs2 = summary.HEADLINES[("obs2_router_norms", "norm_preference")]
    assert v.loc[obs2, "m-a"] == "holds: 0.300 [0.250, 0.350]; observed 0.400 vs null 0.100"
    assert v.loc[obs2, "m-b"].startswith("does not hold: 0.020")
    assert "null 0.120" in v.loc[obs2, "m-b"]  # each model's own null, not one baseline for all
    assert v.loc[obs2, "floor"] == "0.140"
    assert "Mixtral 8x7B: 0.565" in v.loc[obs2, "paper (its models)"]
    detail = summary.detail_table(table)
    assert detail.loc[("obs2_router_norms", "norm_preference"), "m-a"].endswith("(holds)")
    assert "m-a" in summary.narrative(table)
    fam = summary.family_table(table, summary.book_level_verdicts(tmp_path))
    assert len(fam) == 2 and (fam["p (Holm)"] >= fam["p"]).all()


def test_weight_report_reads_each_layer_once_and_matches_the_single_analyses(monkeypatch):
    lm = tiny("mixtral")
    reads = []
    original = static.iter_layer_weights

    def counting(source, layers=None, **kw):
        for w in original(source, layers=layers, **kw):
            reads.append(w.layer)
            yield w

    monkeypatch.setattr(static, "iter_layer_weights", counting)
    report = static.weight_report(lm, seed=0)
    assert reads == lm.moe_layers
    pd.testing.assert_frame_equal(report["similarity"], static.weight_similarity(lm))
    pd.testing.assert_frame_equal(report["gate_correlation"], static.gate_correlation(lm))
    pd.testing.assert_frame_equal(report["reordering"], static.reordering(lm, seed=0))
    assert len(report["gate_pairs"]) == len(lm.moe_layers) * 3 * 4 * 3 // 2  # 4 experts: 6 pairs
    assert set(report["pca_matrix"].label) == {"0", "1", "2", "3"}
