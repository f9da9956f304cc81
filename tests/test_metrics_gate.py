"""Gate-embedding vs expert-weight correlation (paper §4.2, Tables 3 and 5)."""

import math

import numpy as np
import pytest

from moe_utils.analysis import paper
from moe_utils.metrics import (
    average_r2,
    gate_expert_correlation,
    gate_expert_regression,
    gate_similarity,
    layer_gate_correlations,
    lower_triangle,
    neuron_level_similarity,
)


def naive_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def test_lower_triangle_pairs():
    m = np.arange(64.0).reshape(8, 8)
    lt = lower_triangle(m)
    expected = [m[i, j] for i in range(8) for j in range(i)]
    assert lt.tolist() == expected and len(lt) == 28


def test_correlation_matches_naive_pearson():
    rng = np.random.default_rng(0)
    router = rng.normal(size=(6, 10))
    act = rng.normal(size=(6, 5, 10))
    x = gate_similarity(router)
    y = neuron_level_similarity(act, "act")
    xs = [x[i, j] for i in range(6) for j in range(i)]
    ys = [y[i, j] for i in range(6) for j in range(i)]
    r_naive = naive_pearson(xs, ys)
    r, r2 = gate_expert_correlation(x, y)
    assert r == pytest.approx(r_naive) and r2 == pytest.approx(r_naive**2)
    reg = gate_expert_regression(x, y)
    assert reg.n_pairs == 15 and 0 <= reg.p_value <= 1
    # the regression direction does not change r
    assert gate_expert_correlation(y, x).r == pytest.approx(r)


@pytest.mark.parametrize("model", sorted(paper.GATE_ACT_R_PER_LAYER))
def test_table5_squared_and_averaged_gives_table3(model):
    rs, table3 = paper.GATE_ACT_R_PER_LAYER[model], paper.GATE_R2[model]["W_act"]
    # Table 5 prints R to 2 decimals, so both conventions land on Table 3's Y_act value
    assert round(average_r2(rs), 2) == table3
    assert round(average_r2(rs, decimals=None), 2) == table3
    assert average_r2(rs) == pytest.approx(sum(round(r * r, 2) for r in rs) / len(rs))


def test_average_r2_rounding_vs_unrounded():
    rs = [0.7071, 0.1]  # r^2 = 0.49999..., 0.01
    assert average_r2(rs) == pytest.approx((0.5 + 0.01) / 2)
    assert average_r2(rs, decimals=None) == pytest.approx((0.7071**2 + 0.01) / 2)
    assert average_r2([float("nan"), 0.5]) == pytest.approx(0.25)
    assert math.isnan(average_r2([float("nan")]))


def test_undefined_correlation_is_nan():
    two = gate_expert_correlation(np.eye(2), np.eye(2))  # one pair only
    assert math.isnan(two.r) and math.isnan(two.r2)
    const = gate_expert_correlation(np.ones((4, 4)), np.random.default_rng(1).normal(size=(4, 4)))
    assert math.isnan(const.r)


def test_layer_gate_correlations_table():
    rng = np.random.default_rng(2)
    router = rng.normal(size=(5, 8))
    mats = {
        "act": rng.normal(size=(5, 4, 8)),
        "up": rng.normal(size=(5, 4, 8)),
        "down": rng.normal(size=(5, 8, 4)),
        "none": None,
    }
    df = layer_gate_correlations(router, mats, layer=3)
    assert df["matrix"].tolist() == ["act", "up", "down"]
    r_down = gate_expert_correlation(gate_similarity(router), neuron_level_similarity(mats["down"], "down")).r
    assert df.set_index("matrix").loc["down", "r"] == pytest.approx(r_down)
    assert (df["layer"] == 3).all() and (df["n_pairs"] == 10).all()
