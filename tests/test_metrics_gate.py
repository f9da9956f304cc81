"""Gate-embedding vs expert-weight correlation (paper §4.2, Tables 3 and 5)."""

import math

import numpy as np
import pytest

from moe_utils.metrics import (
    average_r2,
    gate_expert_correlation,
    gate_expert_regression,
    gate_similarity,
    layer_gate_correlations,
    lower_triangle,
    neuron_level_similarity,
)

# Table 5 of the paper (v3): per-layer Pearson R between X and Y_act.
MIXTRAL_R = [
    0.82,
    -0.44,
    0.26,
    0.54,
    0.48,
    0.70,
    0.84,
    0.74,
    0.42,
    0.66,
    0.53,
    0.32,
    0.14,
    0.51,
    0.66,
    0.40,
    0.39,
    0.53,
    0.35,
    0.17,
    0.51,
    0.63,
    0.36,
    0.51,
    0.48,
    0.66,
    0.81,
    0.63,
    0.73,
    0.75,
    0.84,
    0.57,
]
DEEPSEEK_R = [
    0.75,
    0.78,
    0.71,
    0.77,
    0.77,
    0.69,
    0.73,
    0.66,
    0.66,
    0.63,
    0.60,
    0.54,
    0.60,
    0.56,
    0.58,
    0.53,
    0.55,
    0.57,
    0.57,
    0.58,
    0.62,
    0.62,
    0.62,
    0.68,
    0.62,
    0.58,
    0.46,
]
GROK_R = [
    0.89,
    -0.10,
    -0.28,
    0.66,
    0.52,
    0.37,
    0.28,
    0.17,
    0.51,
    0.84,
    0.28,
    0.30,
    0.46,
    0.14,
    0.00,
    0.54,
    0.32,
    0.30,
    0.10,
    -0.17,
    0.24,
    0.58,
    0.46,
    0.14,
    0.10,
    0.00,
    -0.10,
    -0.26,
    -0.66,
    -0.41,
    -0.83,
    -0.76,
    -0.24,
    -0.53,
    -0.46,
    0.14,
    0.17,
    -0.46,
    -0.17,
    -0.26,
    -0.70,
    0.17,
    0.00,
    -0.17,
    -0.22,
    0.14,
    -0.47,
    -0.44,
    -0.17,
    -0.14,
    0.17,
    0.22,
    0.10,
    0.33,
    -0.24,
    -0.57,
    -0.24,
    -0.37,
    0.00,
    -0.69,
    -0.17,
    0.35,
    0.30,
    0.10,
]


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


@pytest.mark.parametrize("rs, table3", [(MIXTRAL_R, 0.33), (DEEPSEEK_R, 0.40), (GROK_R, 0.15)])
def test_table5_squared_and_averaged_gives_table3(rs, table3):
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
