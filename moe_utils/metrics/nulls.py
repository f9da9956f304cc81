"""Nulls, small-sample intervals and effect sizes behind the book's verdicts (pure functions).

Every claim is judged as an *effect*: the observed statistic minus what its null gives, with an
interval that keeps its coverage at the sizes the book has (7-8 layers, 10 sequences, 3 seeds):

* observation 1: a within-layer permutation of the router's expert labels
  (:func:`gate_permutation_null`);
* observation 2: the independence null of the top-score and top-norm choices
  (:func:`independence_agreement`) and a within-layer token shuffle (:func:`shuffle_agreement_null`);
* observation 3: contrasts of the per-layer similarity profile (:func:`depth_contrasts`);
* intervals: Student-t over units (:func:`t_mean_interval`), the delete-one-cluster jackknife with
  a Student-t quantile (:func:`jackknife_interval`), random-effects meta-analysis across seeds
  (:func:`random_effects`, statsmodels' ``combine_effects`` with the Hartung-Knapp interval);
* :func:`outcome` turns an interval and a floor into one of four words.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
from scipy import stats

from ..core.errors import ArgumentError
from ._arrays import ArrayLike, to_numpy

HOLDS = "holds"
BELOW_FLOOR = "detectable but below the floor"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"
UNDEFINED = "undefined"
OUTCOMES = (HOLDS, BELOW_FLOOR, INCONCLUSIVE, FAILS, UNDEFINED)
NAN = float("nan")


@dataclass(frozen=True)
class Interval:
    """An estimate with its standard error and a two-sided interval (``df`` = inf for normal)."""

    estimate: float
    se: float
    low: float
    high: float
    df: float
    method: str

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def undefined_interval(method: str, estimate: float = NAN) -> Interval:
    return Interval(float(estimate), NAN, NAN, NAN, NAN, method)


def outcome(low: float, high: float, floor: float) -> str:
    """The four-word verdict of an effect whose claim predicts a positive value (see the module).

    holds: the whole interval lies above the floor; detectable but below the floor: the interval
    excludes 0 but lies below the floor; does not hold: the interval lies below the floor and does
    not exclude 0; inconclusive: anything else. A non-finite bound gives "undefined".
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return UNDEFINED
    if floor <= 0:
        raise ArgumentError(f"an effect floor must be positive; got {floor}")
    if low > floor:
        return HOLDS
    if high < floor:
        return BELOW_FLOOR if low > 0 else FAILS
    return INCONCLUSIVE


def t_mean_interval(values: ArrayLike, level: float = 0.95) -> Interval:
    """Mean of independent units with a Student-t interval (n - 1 degrees of freedom)."""
    v = to_numpy(values).astype(float).ravel()
    v = v[np.isfinite(v)]
    n = v.size
    if n < 2:
        return undefined_interval("t over units", float(v.mean()) if n else NAN)
    m = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return Interval(m, se, m - half, m + half, float(n - 1), "t over units")


def jackknife_interval(full: float, leave_one_out: ArrayLike, level: float = 0.95) -> Interval:
    """Delete-one-cluster jackknife: the full-sample estimate with the jackknife standard error and
    a Student-t quantile with G - 1 degrees of freedom (G clusters)."""
    loo = to_numpy(leave_one_out).astype(float).ravel()
    g = loo.size
    if g < 3 or not math.isfinite(full) or not np.isfinite(loo).all():
        return undefined_interval("cluster jackknife, t", full)
    se = float(math.sqrt((g - 1) / g * float(((loo - loo.mean()) ** 2).sum())))
    half = float(stats.t.ppf(0.5 + level / 2, g - 1)) * se
    return Interval(float(full), se, float(full) - half, float(full) + half, float(g - 1), "cluster jackknife, t")


def cluster_jackknife(statistic: Callable[[np.ndarray], float], groups: ArrayLike, level: float = 0.95) -> Interval:
    """``statistic(keep)`` over a boolean mask of observations, with each group left out in turn."""
    g = to_numpy(groups).ravel()
    labels = np.unique(g)
    full = float(statistic(np.ones(g.shape, dtype=bool)))
    loo = np.array([statistic(g != lab) for lab in labels], dtype=float)
    return jackknife_interval(full, loo, level)


# ---- observation 1 ------------------------------------------------------------------------------


def signed_r2(r: ArrayLike) -> np.ndarray:
    """sign(r) * r^2: r^2 in the paper's units, negative where the correlation is negative."""
    a = to_numpy(r).astype(float)
    return np.sign(a) * a * a


def _masked_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row of ``x`` [B, P] with ``y`` [P], over the pairs finite in both."""
    ok = np.isfinite(x) & np.isfinite(y)[None, :]
    w = ok.astype(float)
    n = w.sum(axis=1)
    xs, ys = np.where(ok, x, 0.0), np.where(ok, y[None, :], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = xs.sum(1) / n, ys.sum(1) / n
        dx, dy = (xs - mx[:, None]) * w, (ys - my[:, None]) * w
        r = (dx * dy).sum(1) / np.sqrt((dx * dx).sum(1) * (dy * dy).sum(1))
    r[n < 3] = NAN
    return r


def gate_statistic_rows(x_tri: np.ndarray, y_tri: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per row of ``x_tri`` (gate similarities of the pairs): signed r^2 for W_act minus the larger
    signed r^2 of the other matrices."""
    s = {m: signed_r2(_masked_pearson(x_tri, y)) for m, y in y_tri.items()}
    others = [s[m] for m in s if m != "W_act"]
    return s["W_act"] - np.max(np.stack(others), axis=0)


@dataclass(frozen=True)
class PermutationNull:
    """An observed statistic against its permutation distribution."""

    observed: float
    null_mean: float
    null_sd: float
    null_q025: float
    null_q975: float
    p_greater: float  # one-sided (1 + #{null >= observed}) / (1 + draws)
    draws: int

    @property
    def effect(self) -> float:
        return self.observed - self.null_mean

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "effect": self.effect}


def _summarise(observed: float, null: np.ndarray) -> PermutationNull:
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or null.size == 0:
        return PermutationNull(observed, NAN, NAN, NAN, NAN, NAN, int(null.size))
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + null.size)
    q = np.quantile(null, [0.025, 0.975])
    return PermutationNull(
        float(observed), float(null.mean()), float(null.std(ddof=1)), float(q[0]), float(q[1]), p, int(null.size)
    )


def gate_permutation_null(
    gate_sim: ArrayLike,
    expert_sims: Mapping[str, ArrayLike],
    n_perm: int = 2000,
    seed: int = 0,
    chunk: int = 64,
) -> PermutationNull:
    """Observation 1's within-layer null: the router's expert labels permuted (one permutation
    shared by every expert matrix), the statistic of :func:`gate_statistic_rows` recomputed.

    ``gate_sim`` is the E x E cosine map of the router rows; ``expert_sims`` maps "W_act", "W_up",
    "W_down" to the E x E neuron-averaged similarity maps. Needs W_act and one other matrix.
    """
    x = to_numpy(gate_sim).astype(float)
    e = x.shape[0]
    if "W_act" not in expert_sims or len(expert_sims) < 2 or e < 3:
        return PermutationNull(NAN, NAN, NAN, NAN, NAN, NAN, 0)
    i, j = np.tril_indices(e, k=-1)
    y_tri = {m: to_numpy(s).astype(float)[i, j] for m, s in expert_sims.items()}
    observed = float(gate_statistic_rows(x[i, j][None, :], y_tri)[0])
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_perm, chunk):
        b = min(chunk, n_perm - start)
        perm = np.argsort(rng.random((b, e)), axis=1)
        xp = x[perm[:, i], perm[:, j]]
        draws.append(gate_statistic_rows(xp, y_tri))
    return _summarise(observed, np.concatenate(draws))


# ---- observation 2 ------------------------------------------------------------------------------


def independence_agreement(top_score: ArrayLike, top_norm: ArrayLike, n_experts: int) -> float:
    """Expected share of tokens whose top-score expert is their largest-norm expert if the two
    choices were independent with their observed marginals: sum_e p_score(e) p_norm(e)."""
    a, b = to_numpy(top_score).astype(int).ravel(), to_numpy(top_norm).astype(int).ravel()
    if a.size == 0:
        return NAN
    pa = np.bincount(a, minlength=n_experts) / a.size
    pb = np.bincount(b, minlength=n_experts) / b.size
    return float((pa * pb).sum())


def pooled_agreement(
    top_score: Mapping[int, np.ndarray], top_norm: Mapping[int, np.ndarray], n_experts: int, keep: np.ndarray | None
) -> tuple[float, float]:
    """Pooled over layers: (observed agreement share, independence null), tokens kept by ``keep``."""
    hits = total = null = 0.0
    for layer, s in top_score.items():
        a, b = np.asarray(s), np.asarray(top_norm[layer])
        if keep is not None:
            a, b = a[keep], b[keep]
        if a.size == 0:
            continue
        hits += float((a == b).sum())
        null += independence_agreement(a, b, n_experts) * a.size
        total += a.size
    if total == 0:
        return NAN, NAN
    return hits / total, null / total


def agreement_effect(
    top_score: Mapping[int, np.ndarray],
    top_norm: Mapping[int, np.ndarray],
    n_experts: int,
    groups: ArrayLike,
    level: float = 0.95,
) -> tuple[float, float, Interval]:
    """Observation 2's effect: pooled agreement minus its independence null, with a
    delete-one-sequence jackknife interval (a sequence's tokens leave together from every layer).

    Returns (agreement, independence null, interval of the effect)."""
    g = to_numpy(groups).ravel()
    obs, null = pooled_agreement(top_score, top_norm, n_experts, None)

    def effect(keep: np.ndarray) -> float:
        a, n = pooled_agreement(top_score, top_norm, n_experts, keep)
        return a - n

    if len(np.unique(g)) < 3:
        return obs, null, undefined_interval("cluster jackknife, t", obs - null)
    return obs, null, cluster_jackknife(effect, g, level)


def shuffle_agreement_null(
    top_score: Mapping[int, np.ndarray],
    top_norm: Mapping[int, np.ndarray],
    n_perm: int = 2000,
    seed: int = 0,
) -> PermutationNull:
    """Token-shuffle null: within each layer the largest-norm choices are permuted across tokens
    (marginals kept, the per-token pairing broken); pooled agreement per draw."""
    rng = np.random.default_rng(seed)
    layers = list(top_score)
    a = {l: np.asarray(top_score[l]) for l in layers}
    b = {l: np.asarray(top_norm[l]) for l in layers}
    total = sum(x.size for x in a.values())
    if total == 0:
        return PermutationNull(NAN, NAN, NAN, NAN, NAN, NAN, 0)
    observed = sum(float((a[l] == b[l]).sum()) for l in layers) / total
    draws = np.zeros(n_perm)
    for l in layers:
        n = a[l].size
        perm = np.argsort(rng.random((n_perm, n)), axis=1)
        draws += (b[l][perm] == a[l][None, :]).sum(axis=1)
    return _summarise(observed, draws / total)


# ---- observation 3 ------------------------------------------------------------------------------

CONTRASTS = ("slope", "last_residual", "last_minus_penultimate", "last_minus_early")


def depth_contrasts(profile: ArrayLike) -> dict[str, float]:
    """Contrasts of a per-layer similarity profile (MoE layers in order, the last one last).

    * slope: least-squares slope against relative depth (0 first layer, 1 last layer) over the
      non-final layers;
    * last_residual: the last layer minus a Theil-Sen line of the non-final layers extrapolated to
      relative depth 1;
    * last_minus_penultimate;
    * last_minus_early: the last layer minus the mean of the first third of the non-final layers.
    Undefined (NaN) where the profile is too short or not finite: a slope needs 3 non-final layers.
    """
    s = to_numpy(profile).astype(float).ravel()
    out: dict[str, float] = dict.fromkeys(CONTRASTS, NAN)
    n = s.size
    if n < 2 or not np.isfinite(s).all():
        return out
    t = np.arange(n) / (n - 1)
    body, tb = s[:-1], t[:-1]
    out["last_minus_penultimate"] = float(s[-1] - s[-2])
    early = max(1, (n - 1) // 3)
    out["last_minus_early"] = float(s[-1] - body[:early].mean())
    if body.size >= 3 and np.ptp(tb) > 0:
        out["slope"] = float(np.polyfit(tb, body, 1)[0])
        fit = cast(Any, stats.theilslopes(body, tb))
        ts_slope, ts_intercept = float(fit[0]), float(fit[1])
        out["last_residual"] = float(s[-1] - (ts_intercept + ts_slope * 1.0))
    return out


def profile_from_sums(sums: np.ndarray, counts: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Per-layer token-weighted mean from per-sequence sums ``[G, L]`` and token counts
    (``[G]``, or ``[G, L]`` when some tokens have no defined value in some layers)."""
    if keep is not None:
        sums, counts = sums[keep], counts[keep]
    total = counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = sums.sum(axis=0) / total
    return np.where(total > 0, out, NAN)


def depth_contrast_intervals(sums: ArrayLike, counts: ArrayLike, level: float = 0.95) -> dict[str, Interval]:
    """Each contrast of :func:`depth_contrasts` with a delete-one-sequence jackknife interval.

    ``sums[g, l]`` is the sum over sequence g's tokens of the layer-l per-token similarity and
    ``counts[g]`` the number of tokens of sequence g."""
    s, c = to_numpy(sums).astype(float), to_numpy(counts).astype(float)
    full = depth_contrasts(profile_from_sums(s, c))
    g = s.shape[0]
    loo = [depth_contrasts(profile_from_sums(s, c, np.arange(g) != k)) for k in range(g)]
    return {k: jackknife_interval(full[k], np.array([d[k] for d in loo]), level) for k in CONTRASTS}


def exact_spearman(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Spearman rho with an exact two-sided permutation p-value (every ordering for n <= 8,
    otherwise 20,000 random ones); never the asymptotic p-value, which is wrong for few points."""
    a, b = to_numpy(x).astype(float).ravel(), to_numpy(y).astype(float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return NAN, NAN
    res = stats.permutation_test(
        (b,),
        lambda v: float(cast(float, stats.spearmanr(a, v)[0])),
        permutation_type="pairings",
        n_resamples=20000 if a.size > 8 else math.factorial(a.size),
        alternative="two-sided",
        rng=np.random.default_rng(0),
    )
    return float(res.statistic), float(res.pvalue)


# ---- across seeds, families of verdicts, power ---------------------------------------------------


@dataclass(frozen=True)
class Combined:
    """A random-effects combination of per-seed effects."""

    estimate: float
    se: float
    low: float
    high: float
    tau: float  # between-seed standard deviation
    seeds: int
    p_greater: float  # one-sided p-value of the combined effect against 0 (t, seeds - 1 df)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def random_effects(effects: Sequence[float], ses: Sequence[float], level: float = 0.95) -> Combined:
    """DerSimonian-Laird random-effects estimate (between-seed variance from statsmodels'
    ``combine_effects``, method of moments, truncated at 0) with the modified Hartung-Knapp
    interval (Student-t, k - 1 df). Seeds with a non-finite effect or standard
    error are left out; fewer than 2 left gives an undefined result."""
    from statsmodels.stats.meta_analysis import combine_effects

    e, s = np.asarray(effects, dtype=float), np.asarray(ses, dtype=float)
    ok = np.isfinite(e) & np.isfinite(s) & (s > 0)
    e, s = e[ok], s[ok]
    k = int(e.size)
    if k < 2:
        return Combined(float(e[0]) if k else NAN, NAN, NAN, NAN, NAN, k, NAN)
    with warnings.catch_warnings():  # statsmodels takes the root of a negative variance estimate
        warnings.simplefilter("ignore", RuntimeWarning)
        res = combine_effects(e, s**2, method_re="chi2", alpha=1 - level)
    tau2 = max(0.0, float(cast(Any, res).tau2))
    w = 1.0 / (s**2 + tau2)
    est = float((w * e).sum() / w.sum())
    # Modified Hartung-Knapp: the weighted residual variance scales the random-effects variance,
    # never below 1, so three seeds that happen to agree closely cannot shrink the interval below
    # what their own standard errors allow; Student-t with k - 1 degrees of freedom.
    q = max(1.0, float((w * (e - est) ** 2).sum() / (k - 1)))
    se = math.sqrt(q / float(w.sum()))
    tq = float(stats.t.ppf(0.5 + level / 2, k - 1))
    p = float(stats.t.sf(est / se, k - 1)) if se > 0 else NAN
    return Combined(est, se, est - tq * se, est + tq * se, math.sqrt(tau2), k, p)


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm-adjusted p-values (statsmodels' ``multipletests``); NaN entries stay NaN."""
    from statsmodels.stats.multitest import multipletests

    p = to_numpy(p_values).astype(float)
    out = np.full(p.shape, NAN)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def power_to_hold(true_effect: float, floor: float, se: float, df: float, level: float = 0.95) -> float:
    """Probability that the interval's lower bound clears the floor when the effect is
    ``true_effect`` and the estimate is t-distributed around it with standard error ``se``."""
    if not all(math.isfinite(v) for v in (true_effect, floor, se)) or se <= 0:
        return NAN
    d = df if math.isfinite(df) and df > 0 else 1e9
    crit = float(stats.t.ppf(0.5 + level / 2, d))
    return float(stats.t.sf((floor - true_effect) / se + crit, d))


def noninferior_outcome(low: float, high: float, margin: float) -> str:
    """Verdict for "as large as the reference" within ``margin``: holds when the interval of the
    difference lies above -margin, does not hold when it lies below -margin, else inconclusive."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return UNDEFINED
    if low > -margin:
        return HOLDS
    if high < -margin:
        return FAILS
    return INCONCLUSIVE


def combine_outcomes(*parts: str) -> str:
    """A claim made of several parts: holds if every part holds; does not hold if any part does
    not; undefined if any part is undefined; detectable but below the floor if every part is at
    least that; otherwise inconclusive."""
    if all(p == HOLDS for p in parts):
        return HOLDS
    if any(p == FAILS for p in parts):
        return FAILS
    if any(p == UNDEFINED for p in parts):
        return UNDEFINED
    if all(p in (HOLDS, BELOW_FLOOR) for p in parts):
        return BELOW_FLOOR
    return INCONCLUSIVE
