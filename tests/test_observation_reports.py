"""The per-observation analysis calls (one per page) against naive recomputations from the raw
weights and traces of tiny models, written from the paper's definitions."""

from __future__ import annotations

import math
from itertools import combinations, permutations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment
from summary_checks import check_obs1, check_obs2, check_obs3, naive_mean, naive_table3
from tiny_models import synthetic_mixtral, tiny

from moe_utils.analysis import obs1_neurons, obs2_norms, obs3_depth, paper, summary
from moe_utils.analysis.context import open_study
from moe_utils.analysis.results import read_result, write_result
from moe_utils.models.weights import layer_weights


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))


def lower_pairs(n: int) -> list[tuple[int, int]]:
    return [(j, i) for i, j in combinations(range(n), 2)]


def naive_kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Neurons are rows: the permutation of b's rows that maximises the summed row cosine, and its tau."""
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    _, perm = linear_sum_assignment(-(an @ bn.T))
    return float(stats.kendalltau(np.arange(len(perm)), perm).statistic)


# ---- observation 1 -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tensors = synthetic_mixtral(folder, E=4, H=12, I=10, layers=3, dtype=torch.float32)
    study = open_study(str(folder), None, weights_only=True, results_dir=tmp_path_factory.mktemp("res"))
    return study, tensors


@pytest.fixture(scope="module")
def obs1_report(mixtral_study):
    study, _ = mixtral_study
    return obs1_neurons.neurons_report(
        study.weights_source, study.layers, None, model_name="tiny", reorder_max_pairs=None, seed=0, workers=1
    )


def _raw(tensors, layer: int, e: int, w: str) -> np.ndarray:
    return tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"].double().numpy()


MIXTRAL_NAMES = {"W_act": "w1", "W_up": "w3", "W_down": "w2"}


def test_obs1_similarity_tables_match_a_naive_recomputation(obs1_report, mixtral_study):
    study, tensors = mixtral_study
    r = obs1_report
    assert r.matrices == ["W_act", "W_up", "W_down"] and r.has_act and r.note == ""
    per_level = {"matrix": [], "neuron": []}
    for layer in range(3):
        for m, w in MIXTRAL_NAMES.items():
            mats = [_raw(tensors, layer, e, w) for e in range(4)]
            axis = 1 if m == "W_down" else 0  # W_down [H, I]: neurons are columns
            avgs = [x.mean(axis=axis) for x in mats]
            per_level["matrix"].append(naive_mean([cos(mats[i], mats[j]) for i, j in combinations(range(4), 2)]))
            per_level["neuron"].append(naive_mean([cos(avgs[i], avgs[j]) for i, j in combinations(range(4), 2)]))
            line = r.similarity_lines[(r.similarity_lines.layer == layer) & (r.similarity_lines.series == f"{m} S_ee")]
            assert line.similarity.iloc[0] == pytest.approx(per_level["matrix"][-1], abs=1e-6)
    for level, values in per_level.items():
        assert r.overall_similarity.loc[f"tiny: {level} level", "S_ee"] == pytest.approx(naive_mean(values), abs=1e-6)
    for key, v in paper.MATRIX_SIMILARITY.items():
        col = "S_ef" if key.endswith("vs F") else "S_ee"
        assert r.overall_similarity.loc[f"paper: {key}", col] == v.value
    assert set(r.matrix_similarity.level) == {"matrix"} and set(r.neuron_similarity.level) == {"neuron"}


def test_obs1_gate_and_tau_tables_match_a_naive_recomputation(obs1_report, mixtral_study):
    study, tensors = mixtral_study
    r = obs1_report
    r_by_matrix = {m: [] for m in MIXTRAL_NAMES}
    for layer in range(3):
        router = tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"].double().numpy()
        x = [cos(router[i], router[j]) for i, j in lower_pairs(4)]
        for m, w in MIXTRAL_NAMES.items():
            axis = 1 if m == "W_down" else 0
            avgs = [_raw(tensors, layer, e, w).mean(axis=axis) for e in range(4)]
            y = [cos(avgs[i], avgs[j]) for i, j in lower_pairs(4)]
            r_by_matrix[m].append(float(stats.pearsonr(x, y).statistic))
            pts = r.pairs_for(layer, m)
            assert sorted(pts.gate_similarity) == pytest.approx(sorted(x), abs=1e-6)
    for m, rs in r_by_matrix.items():
        assert r.gate_r2.loc[m, "average r^2 (paper rounding)"] == pytest.approx(naive_table3(rs))
        assert r.gate_correlation.loc[r.gate_correlation.matrix == m, "r"].mean() == pytest.approx(
            naive_mean(rs), abs=1e-6
        )
        for name, values in paper.GATE_R2.items():
            assert r.gate_r2.loc[m, f"paper: {name}"] == values[m]

    def signed(v):
        return math.copysign(v * v, v)

    diffs = [
        r_by_matrix["W_act"][l] ** 2 - max(r_by_matrix["W_up"][l] ** 2, r_by_matrix["W_down"][l] ** 2) for l in range(3)
    ]
    assert r.summary["gate_act_advantage"]["value"] == pytest.approx(naive_mean(diffs), abs=1e-6)
    # the verdict: signed r2 of W_act minus the larger of the others, minus the same statistic
    # averaged over every relabelling of the router's experts (4! = 24, enumerated here)
    null = r.tables["gate_null"].set_index("layer")
    effects = []
    for layer in range(3):
        router = tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"].double().numpy()
        ys = {}
        for m, w in MIXTRAL_NAMES.items():
            axis = 1 if m == "W_down" else 0
            avgs = [_raw(tensors, layer, e, w).mean(axis=axis) for e in range(4)]
            ys[m] = [cos(avgs[i], avgs[j]) for i, j in lower_pairs(4)]

        def stat(order, router=router, ys=ys):
            x = [cos(router[order[i]], router[order[j]]) for i, j in lower_pairs(4)]
            s_ = {m: signed(float(stats.pearsonr(x, y).statistic)) for m, y in ys.items()}
            return s_["W_act"] - max(s_["W_up"], s_["W_down"])

        observed = stat(range(4))
        exact_null = naive_mean([stat(p) for p in permutations(range(4))])
        assert null.loc[layer, "observed"] == pytest.approx(observed, abs=1e-6)
        assert null.loc[layer, "null_mean"] == pytest.approx(exact_null, abs=0.03)  # 2,000 random draws
        effects.append(observed - exact_null)
    assert r.verdict is not None and r.verdict["value"] == pytest.approx(naive_mean(effects), abs=0.03)
    assert r.verdict["verdict"] in ("holds", "detectable but below the floor", "inconclusive", "does not hold")
    # Kendall tau of the best permutation, layer 0, W_up (neurons are rows), every expert pair
    taus = [
        naive_kendall_tau(_raw(tensors, 0, a, "w3"), _raw(tensors, 0, b, "w3")) for a, b in combinations(range(4), 2)
    ]
    row = r.tau_by_layer[(r.tau_by_layer.layer == 0) & (r.tau_by_layer.matrix == "W_up")]
    assert row.tau.iloc[0] == pytest.approx(naive_mean(taus), abs=1e-9)
    assert (
        r.tau_table.loc[(obs1_neurons.PAIR_EXPERTS, "W_up"), "paper: mean tau"]
        == paper.KENDALL_TAU["Mixtral 8x7B"].value
    )


def test_obs1_report_saves_a_results_file_its_summary_can_be_recomputed_from(obs1_report, mixtral_study):
    study, _ = mixtral_study
    res = read_result(study.save(obs1_neurons.ANALYSIS, obs1_report.tables, obs1_report.summary))
    check_obs1(res)
    assert set(res.tables) == {"weight_similarity", "reordering", "gate_correlation", "gate_null", "pca_matrix"}


def test_obs1_without_a_gate_projection_computes_the_rest():
    """relu^2 experts (Nemotron-H) have only W_up and W_down: no W_act parts, no verdict, a note."""
    lm = tiny("nemotron_h")
    layer = lm.moe_layers[0]
    w = layer_weights(lm, layer)
    assert w.w_act is None
    r = obs1_neurons.neurons_report(lm, [layer], None, model_name="nemotron", reorder_max_pairs=0)
    assert r.matrices == ["W_up", "W_down"] and not r.has_act and r.verdict is None
    assert "no gate projection" in r.note
    assert "gate_act_advantage" not in r.summary and "gate_r2_act" not in r.summary
    assert list(r.gate_r2.index) == ["W_up", "W_down"]
    assert r.reordering.empty and r.tau_table.empty
    e = w.w_up.shape[0]
    router = w.router.double().numpy()
    x = [cos(router[i], router[j]) for i, j in lower_pairs(e)]
    up = w.w_up.double().numpy()
    y = [cos(up[i].mean(axis=0), up[j].mean(axis=0)) for i, j in lower_pairs(e)]
    expected = float(stats.pearsonr(x, y).statistic)
    g = r.gate_correlation
    assert g.loc[g.matrix == "W_up", "r"].mean() == pytest.approx(expected, abs=1e-6)
    assert r.summary["gate_r2_up"]["value"] == pytest.approx(naive_table3([expected]))


# ---- observations 2 and 3 (forward passes) --------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral_forward_study(tmp_path_factory):
    return open_study("random:mixtral", None, results_dir=tmp_path_factory.mktemp("res"), inputs="short")


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def naive_expert_outputs(lm, layer: int, x: np.ndarray) -> np.ndarray:
    """[N, E, H] every expert's output y = W_down (silu(W_act x) * W_up x), from the raw weights."""
    w = layer_weights(lm, layer)
    act, up, down = (t.double().numpy() for t in (w.w_act, w.w_up, w.w_down))
    return np.stack([(_silu(x @ act[e].T) * (x @ up[e].T)) @ down[e].T for e in range(act.shape[0])], axis=1)


def test_obs2_report_matches_norms_and_scores_recomputed_from_the_weights(mixtral_forward_study):
    study = mixtral_forward_study
    r = obs2_norms.norms_report(study, inputs="short", seed=0)
    check_obs2(read_result(study.save(obs2_norms.ANALYSIS, r.tables, r.summary, params=r.params)))
    tr = study.trace(study.inputs("short"))
    agree, pairs, diag = 0, 0, {}
    for layer in tr.layers:
        lt = tr.per_layer[layer]
        x = lt.x.double().numpy().reshape(-1, lt.x.shape[-1])
        norms = np.linalg.norm(naive_expert_outputs(study.lm, layer, x), axis=-1)
        logits = lt.router_logits.double().numpy()
        scores = np.exp(logits - logits.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
        np.testing.assert_allclose(r.norms.norms[layer], norms, rtol=1e-4)
        agree += int((norms.argmax(1) == scores.argmax(1)).sum())
        pairs += len(x)
        e = norms.shape[1]
        n_rank, s_rank = norms.argsort(1).argsort(1) + 1, scores.argsort(1).argsort(1) + 1
        for k in range(1, e + 1):
            hit = n_rank == k
            diag.setdefault(k, [0, 0])
            diag[k][0] += int((s_rank[hit] == k).sum())
            diag[k][1] += int(hit.sum())
    assert r.pooled.share == pytest.approx(agree / pairs)
    assert int(r.pooled.n) == pairs
    for k, (same, total) in diag.items():
        assert r.rank_diagonal.loc["share with equal score rank", k] == pytest.approx(round(same / total, 3))
    assert r.times_baseline == pytest.approx((agree / pairs) * e)
    ref = r.agreement_summary.loc["largest-norm expert gets the top score"]
    assert ref.share == paper.TOP1_NORM_AGREEMENT.value and ref["random baseline"] == 1 / 8
    assert r.has_act and r.intermediate is not None and r.activation == "silu"


def test_obs3_report_matches_output_similarity_and_repeat_rate_recomputed(mixtral_forward_study):
    study = mixtral_forward_study
    r = obs3_depth.depth_report(study, inputs="short", seed=0)
    check_obs3(read_result(study.save(obs3_depth.ANALYSIS, r.tables, r.summary, params=r.params)))
    assert set(r.trend.series) == {
        obs3_depth.SERIES_OUTPUTS_LONG,
        obs3_depth.SERIES_OUTPUTS_SHORT,
        obs3_depth.SERIES_WEIGHTS_MATRIX,
        obs3_depth.SERIES_WEIGHTS_NEURON,
    }
    tr = study.trace(study.inputs("short"))
    same, adjacent = 0, 0
    for layer in tr.layers:
        lt = tr.per_layer[layer]
        x = lt.x.double().numpy().reshape(-1, lt.x.shape[-1])
        y = naive_expert_outputs(study.lm, layer, x)
        e = y.shape[1]
        c = [cos(y[t, i], y[t, j]) for t in range(len(x)) for i in range(e) for j in range(e) if i != j]
        row = r.short_by_layer[r.short_by_layer.layer == layer].iloc[0]
        assert row.similarity == pytest.approx(naive_mean(c), abs=1e-5)
        assert row[obs3_depth.SHARE_HIGH] == pytest.approx(np.mean(np.asarray(c) > paper.LAST_LAYER_HIGH_SIMILARITY))
        idx, wt = lt.topk_index.numpy(), lt.topk_weight.float().numpy()
        top1 = idx[np.arange(len(idx)), wt.argmax(1)]
        seq = tr.seq_index.numpy()
        for t in range(1, len(top1)):
            if seq[t] == seq[t - 1]:
                adjacent += 1
                same += int(top1[t] == top1[t - 1])
    assert r.pooled_repeat.top1_rate == pytest.approx(same / adjacent)
    assert obs3_depth.SHARE_HIGH == "share above 0.8"


# ---- the summary page's per-layer series ------------------------------------------------------------
def test_summary_series_select_the_named_depth_series(tmp_path):
    trend = pd.DataFrame(
        {
            "layer": [0, 1, 0, 1],
            "series": [obs3_depth.SERIES_OUTPUTS_LONG] * 2 + [obs3_depth.SERIES_OUTPUTS_SHORT] * 2,
            "mean_offdiag": [0.1, 0.2, 0.7, 0.9],
        }
    )
    write_result(tmp_path / "m" / "results", obs3_depth.ANALYSIS, "m", "f" * 16, {}, {"depth_trend": trend}, {})
    out = summary.output_similarity_across_models(tmp_path)
    assert out.mean_offdiag.tolist() == [0.1, 0.2] and out.model.tolist() == ["m", "m"]
    assert math.isclose(summary.repeat_rate_across_models(tmp_path).shape[0], 0)
