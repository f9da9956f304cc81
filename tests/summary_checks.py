"""Naive recomputation of every summary quantity an observation page writes, from the tables of
its results file (shared by tests/test_trust_numbers.py and tests/test_notebooks.py). The code is
written from the paper's definitions, independently of the moe_utils.analysis observation modules."""

from __future__ import annotations

import math

import pytest

from moe_utils.analysis import paper
from moe_utils.analysis.verdicts import FAILS, HOLDS, INCONCLUSIVE

CHECKS = {}


def naive_mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def naive_table3(r_per_layer) -> float:
    """Paper Table 3: per-layer r^2 rounded to 2 decimals, averaged over layers."""
    return naive_mean([round(float(r) ** 2, 2) for r in r_per_layer if r is not None and not math.isnan(r)])


def naive_verdict(low, high, baseline) -> str:
    if low is None or high is None:
        return INCONCLUSIVE
    return HOLDS if low > baseline else FAILS if high <= baseline else INCONCLUSIVE


def assert_close(a, b, tol=1e-9):
    if a is None or (isinstance(a, float) and math.isnan(a)):
        assert b is None or math.isnan(b), (a, b)
    else:
        assert a == pytest.approx(b, abs=tol), (a, b)


def check_obs1(res) -> None:
    gate, sim, reorder, s = (
        res.tables["gate_correlation"],
        res.tables["weight_similarity"],
        res.tables["reordering"],
        res.summary,
    )
    for m, key in (("W_act", "gate_r2_act"), ("W_up", "gate_r2_up"), ("W_down", "gate_r2_down")):
        assert_close(s[key]["value"], naive_table3(gate[gate.matrix == m].r.tolist()))
        assert s[key]["paper"] == {k: d[m] for k, d in paper.GATE_R2.items()}
    by_layer = {}
    for row in gate.itertuples():
        by_layer.setdefault(row.layer, {})[row.matrix] = row.r
    diffs = [
        d["W_act"] ** 2 - max(d["W_up"] ** 2, d["W_down"] ** 2)
        for d in by_layer.values()
        if all(d.get(m) is not None and not math.isnan(d[m]) for m in ("W_act", "W_up", "W_down"))
    ]
    adv = s["gate_act_advantage"]
    assert_close(adv["value"], naive_mean(diffs))
    if adv["ci_low"] is not None:
        assert adv["ci_low"] <= adv["value"] <= adv["ci_high"]
    assert adv["verdict"] == naive_verdict(adv["ci_low"], adv["ci_high"], 0.0)
    ee, ef = {}, {}
    for row in sim[sim.level == "matrix"].itertuples():
        if row.expert_i == row.expert_j or not row.expert_i.isdigit():
            continue
        target = ee if row.expert_j.isdigit() else ef if row.expert_j == "F" else None
        if target is not None:
            target.setdefault((row.layer, row.matrix), []).append(row.similarity)
    assert_close(s["matrix_similarity_experts"]["value"], naive_mean([naive_mean(v) for v in ee.values()]))
    assert_close(s["matrix_similarity_vs_F"]["value"], naive_mean([naive_mean(v) for v in ef.values()]))
    assert_close(s["kendall_tau"]["value"], naive_mean([r.tau for r in reorder.itertuples() if r.expert_j != "F"]))


def check_obs2(res) -> None:
    rc, s = res.tables["rank_counts"], res.summary
    e = int(rc.score_rank.max())
    top = rc[rc.score_rank == e]  # rows of the top-scored expert of each token
    n = sum(top["count"])
    for key, k in (("top1_norm_agreement", 1), ("top2_norm_agreement", 2)):
        hits = sum(c for c, nr in zip(top["count"], top.norm_rank) if nr > e - k)
        entry = s[key]
        assert_close(entry["value"], hits / n)
        assert_close(entry["baseline"], k / e)
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
        assert entry["verdict"] == naive_verdict(entry["ci_low"], entry["ci_high"], entry["baseline"])
    ratios = res.tables["activation_ratio"]
    assert_close(
        s["activation_ratio"]["value"], naive_mean([r.ratio for r in ratios.itertuples() if str(r.expert) != "F"])
    )


def naive_spearman(x, y):
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                out[order[t]] = (i + j) / 2 + 1
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = naive_mean(rx), naive_mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    rho = num / den
    from scipy.stats import t as student_t

    n = len(x)
    tstat = rho * math.sqrt((n - 2) / max(1e-300, 1 - rho * rho))
    return rho, 2 * student_t.sf(abs(tstat), n - 2)


def check_obs3(res) -> None:
    s, avg = res.summary, res.tables["average_output_similarity"]
    per_layer = {}
    for row in avg.itertuples():
        if row.expert_i.isdigit() and row.expert_j.isdigit() and row.expert_i != row.expert_j:
            per_layer.setdefault(row.layer, []).append(row.similarity)
    layers = sorted(per_layer)
    vals = [naive_mean(per_layer[l]) for l in layers]
    last, prev = vals[-1], vals[:-1]
    entry = s["last_layer_output_similarity"]
    assert_close(entry["value"], last)
    assert_close(entry["baseline"], naive_mean(prev))
    mean = naive_mean(prev)
    z = float("nan")
    if len(prev) >= 2:
        sd = math.sqrt(sum((v - mean) ** 2 for v in prev) / (len(prev) - 1))
        z = (last - mean) / sd if sd > 0 else (0.0 if last == mean else math.copysign(math.inf, last - mean))
    assert_close(s["depth_pattern"]["value"], z)
    rho, p = naive_spearman(layers[:-1], prev) if len(prev) >= 3 and len(set(prev)) > 1 else (float("nan"), 1.0)
    declines = rho < 0 and p < 0.05
    rises = z > 1 and last - prev[-1] > 0
    measured = not (math.isnan(rho) or math.isnan(z))  # an unmeasurable part never supports "does not hold"
    assert s["depth_pattern"]["verdict"] == (
        HOLDS if declines and rises else FAILS if measured and not (declines or rises) else INCONCLUSIVE
    )
    top1 = res.tables["long_top1"]
    same = pairs = 0
    freq = []
    for layer, g in top1.groupby("layer"):
        counts = g.expert.value_counts()
        freq.append(sum((c / len(g)) ** 2 for c in counts))
        for _, sg in g.groupby("seq"):
            ex = sg.sort_values("position").expert.tolist()
            same += sum(a == b for a, b in zip(ex, ex[1:]))
            pairs += len(ex) - 1
    rep = s["routing_repeat_rate"]
    assert_close(rep["value"], same / pairs)
    assert_close(rep["baseline"], naive_mean(freq))
    assert rep["ci_low"] <= rep["value"] <= rep["ci_high"]
    assert rep["verdict"] == naive_verdict(rep["ci_low"], rep["ci_high"], rep["baseline"])


CHECKS.update(
    {"obs1_neurons_as_experts": check_obs1, "obs2_router_norms": check_obs2, "obs3_depth_diversity": check_obs3}
)
