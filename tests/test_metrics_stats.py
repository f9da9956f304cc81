"""Confidence intervals against closed forms and a naive bootstrap loop."""

import math

import numpy as np
import pytest

from moe_utils.metrics import bootstrap_mean_ci, wilson_interval, z_value


def test_wilson_known_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_zero_successes_closed_form():
    z = z_value(0.95)
    low, high = wilson_interval(0, 20)
    assert low == 0.0
    assert high == pytest.approx(z * z / (20 + z * z))


def test_wilson_edge_cases():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        z_value(1.5)


def test_bootstrap_matches_naive_loop():
    rng = np.random.default_rng(0)
    values = rng.normal(size=30)
    groups = np.repeat(np.arange(6), 5)
    res = bootstrap_mean_ci(values, n_boot=500, seed=11, groups=groups)
    # naive: resample groups with replacement one replicate at a time
    r = np.random.default_rng(11)
    draws = r.integers(0, 6, size=(500, 6))
    reps = []
    for b in range(500):
        num = den = 0.0
        for g in draws[b]:
            members = [v for v, gg in zip(values, groups) if gg == g]
            num += sum(members)
            den += len(members)
        reps.append(num / den)
    assert res.low == pytest.approx(np.quantile(reps, 0.025))
    assert res.high == pytest.approx(np.quantile(reps, 0.975))
    assert res.estimate == pytest.approx(values.mean()) and res.n_groups == 6


def test_bootstrap_is_reproducible_and_single_group_has_no_interval():
    v = np.arange(10.0)
    assert bootstrap_mean_ci(v, seed=1) == bootstrap_mean_ci(v, seed=1)
    one = bootstrap_mean_ci(v, groups=np.zeros(10))
    assert one.estimate == 4.5 and math.isnan(one.low) and math.isnan(one.high)
