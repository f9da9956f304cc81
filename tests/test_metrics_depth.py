"""Per-layer summaries and the last-layer statistic."""

import math
import statistics

import numpy as np
import pytest

from moe_utils.metrics import last_layer_outlier, mean_offdiagonal, per_layer_summary, reference_similarity


def naive_offdiag(m, n):
    vals = [m[i][j] for i in range(n) for j in range(n) if i != j]
    return sum(vals) / len(vals)


def test_mean_offdiagonal_and_reference():
    rng = np.random.default_rng(0)
    m = rng.random((5, 5))
    assert mean_offdiagonal(m) == pytest.approx(naive_offdiag(m, 5))
    assert mean_offdiagonal(m, n=4) == pytest.approx(naive_offdiag(m, 4))
    assert reference_similarity(m) == pytest.approx(sum(m[4][j] for j in range(4)) / 4)
    assert math.isnan(mean_offdiagonal(np.ones((1, 1))))


def test_per_layer_summary_with_reference_row():
    rng = np.random.default_rng(1)
    maps = {3: rng.random((4, 4)), 1: rng.random((4, 4))}
    df = per_layer_summary(maps, n_experts=3)
    assert df["layer"].tolist() == [1, 3]
    assert df["mean_offdiag"].iloc[1] == pytest.approx(naive_offdiag(maps[3], 3))
    assert df["mean_reference"].iloc[0] == pytest.approx(maps[1][3, :3].mean())


def naive_spearman(x, y):
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0] * len(v)
        for k, i in enumerate(order):
            r[i] = k + 1
        return r

    rx, ry = ranks(x), ranks(y)
    n = len(x)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def test_last_layer_outlier_statistics():
    vals = {0: 0.40, 1: 0.38, 2: 0.33, 3: 0.35, 4: 0.30, 5: 0.28, 6: 0.62}
    res = last_layer_outlier(vals)
    prev = [vals[i] for i in range(6)]
    assert res.last_layer == 6 and res.n_preceding == 6
    assert res.z == pytest.approx((0.62 - statistics.mean(prev)) / statistics.stdev(prev))
    assert res.delta_previous == pytest.approx(0.62 - 0.28)
    assert res.trend_rho == pytest.approx(naive_spearman(list(range(6)), prev))
    assert res.trend_rho < 0 and res.trend_p < 0.05


def test_last_layer_outlier_sequence_and_edge_cases():
    res = last_layer_outlier([0.1, 0.2, float("nan"), 0.3], layers=[4, 5, 6, 7])
    assert res.last_layer == 7 and res.n_preceding == 2 and math.isnan(res.trend_rho)
    flat = last_layer_outlier([0.5, 0.5, 0.5, 0.9])
    assert flat.z == math.inf
    single = last_layer_outlier([0.3])
    assert math.isnan(single.z) and math.isnan(single.delta_previous)
    with pytest.raises(ValueError):
        last_layer_outlier([0.1, 0.2], layers=[0])


@pytest.mark.parametrize(
    "values",
    [[float("nan")] * 4, [float("nan"), math.inf, -math.inf, float("nan")], {}, []],
    ids=["all-nan", "nan-and-inf", "empty-mapping", "empty-sequence"],
)
def test_last_layer_outlier_without_a_finite_value_is_undefined(values):
    res = last_layer_outlier(values)
    numbers = (res.last_value, res.preceding_mean, res.preceding_std, res.z, res.delta_previous, res.trend_rho)
    assert all(math.isnan(x) for x in (*numbers, res.trend_p))
    assert res.last_layer is None and res.n_preceding == 0
    assert res.note.startswith("undefined") and "\n" not in res.note


def test_last_layer_outlier_drops_infinite_values_like_nan():
    with_inf = last_layer_outlier([0.4, math.inf, 0.3, 0.2, 0.6])
    without = last_layer_outlier({0: 0.4, 2: 0.3, 3: 0.2, 4: 0.6})
    assert with_inf == without and with_inf.note == ""


def test_per_layer_summary_of_no_maps_has_the_columns():
    df = per_layer_summary({})
    assert df.empty and list(df.columns) == ["layer", "mean_offdiag", "min_offdiag", "max_offdiag"]
