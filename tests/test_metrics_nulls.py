"""The verdicts' nulls, intervals and outcomes against closed forms, naive loops and simulation:
a planted effect must come out "holds", and with no effect the rate of false "holds" stays near
the nominal 5% (2.5% one-sided for an interval's lower bound)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from moe_utils import metrics as M
from moe_utils.metrics import nulls as N


def _sym(rng: np.random.Generator, e: int) -> np.ndarray:
    a = rng.normal(size=(e, e))
    s = (a + a.T) / 2
    np.fill_diagonal(s, 1.0)
    return s


def test_outcome_table():
    f = 0.1
    assert M.outcome(0.15, 0.3, f) == N.HOLDS
    assert M.outcome(0.01, 0.05, f) == N.BELOW_FLOOR
    assert M.outcome(-0.05, 0.05, f) == N.FAILS
    assert M.outcome(-0.05, 0.2, f) == N.INCONCLUSIVE
    assert M.outcome(0.05, 0.2, f) == N.INCONCLUSIVE  # above the null, size not settled
    assert M.outcome(float("nan"), 0.2, f) == N.UNDEFINED
    assert M.noninferior_outcome(-0.001, 0.02, 0.005) == N.HOLDS
    assert M.noninferior_outcome(-0.03, -0.01, 0.005) == N.FAILS
    assert M.noninferior_outcome(-0.03, 0.01, 0.005) == N.INCONCLUSIVE
    assert M.combine_outcomes(N.HOLDS, N.HOLDS) == N.HOLDS
    assert M.combine_outcomes(N.HOLDS, N.FAILS) == N.FAILS
    assert M.combine_outcomes(N.HOLDS, N.INCONCLUSIVE) == N.INCONCLUSIVE
    assert M.combine_outcomes(N.BELOW_FLOOR, N.HOLDS) == N.BELOW_FLOOR
    with pytest.raises(ValueError):
        M.outcome(0.1, 0.2, 0.0)


def test_signed_r2_keeps_the_sign():
    np.testing.assert_allclose(M.signed_r2([-0.5, 0.0, 0.3]), [-0.25, 0.0, 0.09])


def test_gate_statistic_matches_scipy_pearson():
    rng = np.random.default_rng(0)
    x, ya, yu = rng.normal(size=28), rng.normal(size=28), rng.normal(size=28)
    ra, ru = stats.pearsonr(x, ya)[0], stats.pearsonr(x, yu)[0]
    got = N.gate_statistic_rows(x[None, :], {"W_act": ya, "W_up": yu})[0]
    assert got == pytest.approx(np.sign(ra) * ra**2 - np.sign(ru) * ru**2)


def test_gate_null_permutes_router_labels_only():
    """A permutation of the router's labels applied to X equals relabelling the gate rows: the
    null draws of a router that is itself a relabelled copy have the same distribution."""
    rng = np.random.default_rng(1)
    e = 6
    x, ya, yu = _sym(rng, e), _sym(rng, e), _sym(rng, e)
    a = M.gate_permutation_null(x, {"W_act": ya, "W_up": yu}, n_perm=4000, seed=3)
    p = rng.permutation(e)
    b = M.gate_permutation_null(x[np.ix_(p, p)], {"W_act": ya, "W_up": yu}, n_perm=4000, seed=4)
    assert a.null_mean == pytest.approx(b.null_mean, abs=0.02)
    # exact null mean by enumerating all 720 relabellings
    i, j = np.tril_indices(e, -1)
    vals = [
        N.gate_statistic_rows(x[np.ix_(q, q)][i, j][None, :], {"W_act": ya[i, j], "W_up": yu[i, j]})[0]
        for q in map(np.array, itertools.permutations(range(e)))
    ]
    assert a.null_mean == pytest.approx(float(np.mean(vals)), abs=0.02)


def test_gate_null_planted_effect_holds_and_no_effect_is_calibrated():
    rng = np.random.default_rng(2)
    e = 8
    # planted: W_act similarity tracks the router's, W_up / W_down do not
    x = _sym(rng, e)
    planted = M.gate_permutation_null(x, {"W_act": x + 0.3 * _sym(rng, e), "W_up": _sym(rng, e)}, n_perm=500)
    assert planted.effect > 0.3 and planted.p_greater < 0.01
    # no effect: 200 layers with independent maps; one-sided p < 0.05 about 5% of the time
    ps = [
        M.gate_permutation_null(
            _sym(rng, e), {"W_act": _sym(rng, e), "W_up": _sym(rng, e), "W_down": _sym(rng, e)}, n_perm=99, seed=k
        ).p_greater
        for k in range(200)
    ]
    rate = float(np.mean(np.array(ps) < 0.05))
    assert 0.015 < rate < 0.10, rate


def test_independence_agreement_closed_form_and_naive():
    rng = np.random.default_rng(3)
    e = 5
    a, b = rng.integers(0, e, 1000), rng.integers(0, e, 1000)
    naive = sum(np.mean(a == k) * np.mean(b == k) for k in range(e))
    assert M.independence_agreement(a, b, e) == pytest.approx(naive)
    assert M.independence_agreement(np.zeros(10, int), np.zeros(10, int), 4) == 1.0


def _skewed_choices(rng, n_seq, per_seq, e, planted):
    p = np.array([0.45, 0.25, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0])[:e]
    p = p / p.sum()
    groups = np.repeat(np.arange(n_seq), per_seq)
    ts, tn = {}, {}
    for layer in range(4):
        a = rng.choice(e, size=groups.size, p=p)
        b = rng.choice(e, size=groups.size, p=p[::-1] / p.sum())
        copy = rng.random(groups.size) < planted
        b = np.where(copy, a, b)
        ts[layer], tn[layer] = a, b
    return ts, tn, groups


def test_agreement_effect_planted_holds_and_null_is_calibrated():
    rng = np.random.default_rng(4)
    ts, tn, g = _skewed_choices(rng, 10, 120, 8, planted=0.4)
    obs, null, iv = M.agreement_effect(ts, tn, 8, g)
    assert M.outcome(iv.low, iv.high, 0.14) == N.HOLDS
    assert iv.df == 9
    # no preference: the lower bound clears 0 about 2.5% of the time, never far more
    false = 0
    for _ in range(200):
        ts, tn, g = _skewed_choices(rng, 10, 120, 8, planted=0.0)
        false += M.agreement_effect(ts, tn, 8, g)[2].low > 0
    assert false / 200 < 0.08


def test_shuffle_null_mean_is_the_independence_null():
    rng = np.random.default_rng(5)
    ts, tn, _ = _skewed_choices(rng, 10, 100, 8, planted=0.0)
    sh = M.shuffle_agreement_null(ts, tn, n_perm=2000)
    ind = np.mean([M.independence_agreement(ts[l], tn[l], 8) for l in ts])
    # a permutation without replacement has mean (n * sum p_a p_b) / n exactly in expectation
    assert sh.null_mean == pytest.approx(ind, abs=0.003)


def test_depth_contrasts_closed_form():
    t = np.arange(8) / 7
    prof = 0.6 - 0.07 * t
    prof[-1] += 0.03  # the last layer sits 0.03 above the line of the others
    c = M.depth_contrasts(prof)
    assert c["slope"] == pytest.approx(-0.07)
    assert c["last_residual"] == pytest.approx(0.03)
    assert c["last_minus_penultimate"] == pytest.approx(prof[-1] - prof[-2])
    assert c["last_minus_early"] == pytest.approx(prof[-1] - prof[:2].mean())
    assert math.isnan(M.depth_contrasts([0.5, 0.6])["slope"])
    assert math.isnan(M.depth_contrasts([np.nan, 0.5, 0.6, 0.7])["slope"])


def test_jackknife_of_a_mean_is_the_t_interval():
    rng = np.random.default_rng(6)
    x = rng.normal(size=12)
    g = np.arange(12)
    iv = M.cluster_jackknife(lambda keep: float(x[keep].mean()), g)
    ref = M.t_mean_interval(x)
    assert (iv.low, iv.high) == pytest.approx((ref.low, ref.high))


def test_depth_contrast_intervals_planted_and_null():
    rng = np.random.default_rng(7)
    layers, seqs, tokens = 8, 10, 100
    t = np.arange(layers) / (layers - 1)

    def sums(bump: float, slope: float) -> np.ndarray:
        base = 0.6 + slope * t
        base[-1] += bump
        return (base[None, :] + rng.normal(0, 0.01, size=(seqs, layers))) * tokens

    iv = M.depth_contrast_intervals(sums(0.03, -0.06), np.full(seqs, tokens))
    assert M.outcome(-iv["slope"].high, -iv["slope"].low, 0.01) == N.HOLDS
    assert M.outcome(iv["last_residual"].low, iv["last_residual"].high, 0.005) == N.HOLDS
    hits = sum(
        M.depth_contrast_intervals(sums(0.0, -0.06), np.full(seqs, tokens))["last_residual"].low > 0 for _ in range(100)
    )
    assert hits / 100 < 0.08


def test_exact_spearman_small_n():
    rho, p = M.exact_spearman([0, 1, 2], [3, 2, 1])
    assert rho == -1.0 and p == pytest.approx(2 / 6)  # two of the six orderings are as extreme
    rho, p = M.exact_spearman(range(5), [1, 2, 3, 4, 5])
    assert p == pytest.approx(2 / 120)


def test_random_effects_against_statsmodels_and_floors():
    from statsmodels.stats.meta_analysis import combine_effects

    e, s = np.array([0.1, 0.3, 0.2]), np.array([0.05, 0.05, 0.05])
    comb = M.random_effects(e, s)
    ref = combine_effects(e, s**2, method_re="chi2")
    assert comb.estimate == pytest.approx(float(ref.mean_effect_re))
    assert comb.tau > 0 and comb.low < comb.estimate < comb.high
    # three seeds that happen to agree closely cannot give an interval narrower than their own errors allow
    tight = M.random_effects([0.031, 0.032, 0.030], [0.03, 0.03, 0.03])
    assert tight.low < 0 < tight.high
    assert M.random_effects([0.1], [0.01]).seeds == 1 and math.isnan(M.random_effects([0.1], [0.01]).low)


def test_random_effects_coverage_with_three_seeds():
    rng = np.random.default_rng(8)
    covered = 0
    for _ in range(400):
        se = rng.uniform(0.02, 0.05, 3)
        est = 0.1 + rng.normal(0, 0.03, 3) + rng.normal(0, se)
        c = M.random_effects(est, se)
        covered += c.low <= 0.1 <= c.high
    assert covered / 400 > 0.92


def test_holm_matches_definition():
    p = [0.01, 0.04, 0.03, float("nan")]
    out = M.holm(p)
    np.testing.assert_allclose(out[:3], [0.03, 0.06, 0.06])
    assert math.isnan(out[3])


def test_power_rises_with_the_effect():
    lo = M.power_to_hold(0.1, 0.065, 0.05, 7)
    hi = M.power_to_hold(0.4, 0.065, 0.05, 7)
    assert 0 < lo < hi <= 1 and hi > 0.99
