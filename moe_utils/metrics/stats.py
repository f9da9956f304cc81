"""Confidence intervals: Wilson score interval for proportions, seeded (cluster) bootstrap for means.

Tokens of one sequence are not independent, so shares computed over tokens should be given a
*cluster* bootstrap interval that resamples whole sequences (``groups``) rather than tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from ..core.errors import ArgumentError, ShapeError
from ._arrays import ArrayLike, to_numpy


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile for a ``confidence`` level in (0, 1)."""
    if not 0.0 < confidence < 1.0:
        raise ArgumentError(f"confidence must be in (0, 1); got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2.0))


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``; ``(nan, nan)`` when n = 0.

    low/high = (p + z^2/(2n) -/+ z sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ArgumentError(f"need 0 <= successes <= n; got successes={successes}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    z = z_value(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = p + z * z / (2.0 * n)
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    return (max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom))


@dataclass(frozen=True)
class MeanCI:
    """A mean with a percentile bootstrap interval; ``n_groups`` is the number of resampled units."""

    estimate: float
    low: float
    high: float
    n: int
    n_groups: int
    method: str


def _group_codes(groups: ArrayLike | None, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    g = to_numpy(groups, None).reshape(-1)
    if g.shape[0] != n:
        raise ShapeError(f"groups has {g.shape[0]} entries for {n} values; pass one group label per value")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def bootstrap_mean_ci(
    values: ArrayLike,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> MeanCI:
    """Percentile bootstrap interval for the mean of ``values``, reproducible through ``seed``.

    With ``groups`` (e.g. the sequence id of each token) whole groups are resampled with replacement
    and each replicate's estimate is ``sum(values) / count`` over the drawn groups (cluster
    bootstrap). With fewer than two groups no interval can be estimated and low/high are NaN.
    """
    v = to_numpy(values).reshape(-1)
    n = int(v.size)
    nan = float("nan")
    if n == 0:
        return MeanCI(nan, nan, nan, 0, 0, "bootstrap")
    codes = _group_codes(groups, n)
    n_groups = int(codes.max()) + 1
    sums = np.bincount(codes, weights=v, minlength=n_groups)
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    method = "cluster-bootstrap" if groups is not None else "bootstrap"
    est = float(v.mean())
    if n_groups < 2:
        return MeanCI(est, nan, nan, n, n_groups, method)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    step = max(1, (4 * 1024 * 1024) // n_groups)
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        idx = rng.integers(0, n_groups, size=(stop - start, n_groups))
        reps[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return MeanCI(est, float(low), float(high), n, n_groups, method)


def bootstrap_ratio_ci(
    numerators: ArrayLike, denominators: ArrayLike, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> MeanCI:
    """Percentile bootstrap interval of ``sum(numerators) / sum(denominators)`` resampling units.

    For a loss pooled over tokens of many windows: the numerators are each window's summed loss,
    the denominators its token count, and windows are resampled with replacement.
    """
    a = to_numpy(numerators).reshape(-1).astype(np.float64)
    b = to_numpy(denominators).reshape(-1).astype(np.float64)
    if a.shape != b.shape:
        raise ShapeError(f"numerators ({a.size}) and denominators ({b.size}) differ in length")
    nan = float("nan")
    if a.size == 0 or b.sum() == 0:
        return MeanCI(nan, nan, nan, int(a.size), int(a.size), "bootstrap")
    est = float(a.sum() / b.sum())
    if a.size < 2:
        return MeanCI(est, nan, nan, 1, 1, "bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    reps = a[idx].sum(axis=1) / b[idx].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return MeanCI(est, float(low), float(high), int(a.size), int(a.size), "bootstrap")
