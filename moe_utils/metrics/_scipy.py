"""Typed front ends to the few ``scipy.stats`` tests the package uses.

scipy builds their results with ``_make_tuple_bunch``, which type checkers see as a bare class
``_`` without the named fields; these functions read the fields once and return plain floats.
"""

from __future__ import annotations

from scipy.stats import kendalltau, linregress, spearmanr

from ._arrays import ArrayLike


def spearman(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Spearman's ``(rho, p value)`` (``scipy.stats.spearmanr``)."""
    res = spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)  # pyright: ignore[reportAttributeAccessIssue]  # scipy's tuple bunch is typed as a bare "_"


def kendall(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Kendall's ``(tau, p value)`` (``scipy.stats.kendalltau``)."""
    res = kendalltau(x, y)
    return float(res.statistic), float(res.pvalue)  # pyright: ignore[reportAttributeAccessIssue]  # scipy's tuple bunch is typed as a bare "_"


def linear_fit(x: ArrayLike, y: ArrayLike) -> tuple[float, float, float, float]:
    """Least-squares line of ``y`` on ``x``: ``(r, slope, intercept, p value)`` (``scipy.stats.linregress``)."""
    res = linregress(x, y)
    return float(res.rvalue), float(res.slope), float(res.intercept), float(res.pvalue)  # pyright: ignore[reportAttributeAccessIssue]  # scipy's tuple bunch is typed as a bare "_"
