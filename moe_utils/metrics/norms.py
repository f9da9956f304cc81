"""Expert output norms vs gate scores (paper §5.2, Fig. 4, App. G rank counting).

Ranks are ascending, 1 = smallest ... E = largest, and ties are broken by a **stable** argsort (the
lower expert index gets the lower rank), i.e. ``np.argsort(x, kind="stable")``. The "top" expert of
a row is the one holding rank E (for ties: the highest index among the tied maxima), so
``rank_counts(...)[E-1, E-1] / N`` always equals ``top1_agreement(...).share``.

Gate scores are the softmax over all E router logits; ranks are the same for raw logits, so either
may be passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from ..core.errors import ArgumentError, ShapeError
from ._arrays import ArrayLike, to_numpy
from .stats import bootstrap_mean_ci, wilson_interval

CIMethod = Literal["auto", "wilson", "bootstrap"]


def output_norms(outputs: ArrayLike, chunk_tokens: int = 4096) -> np.ndarray:
    """L2 norm of every expert's raw output: ``[N, E, H]`` -> ``[N, E]`` (float64)."""
    n = int(outputs.shape[0])
    parts = [np.linalg.norm(to_numpy(outputs[s : s + chunk_tokens]), axis=-1) for s in range(0, n, chunk_tokens)]
    return np.concatenate(parts, axis=0) if parts else np.zeros((0,) + tuple(outputs.shape[1:-1]))


def _check_pair(norms: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = to_numpy(norms)
    b = to_numpy(scores)
    if a.ndim != 2 or a.shape != b.shape:
        raise ShapeError(f"norms and scores must both be [N, E]; got {a.shape} and {b.shape}")
    return a, b


def ascending_ranks(x: ArrayLike) -> np.ndarray:
    """Per-row ranks 1..E in ascending order with stable tie-breaking -> int64 ``[N, E]``."""
    a = to_numpy(x)
    if a.ndim != 2:
        raise ShapeError(f"expected [N, E]; got shape {a.shape}")
    order = np.argsort(a, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, a.shape[1] + 1)[None, :].repeat(a.shape[0], 0), axis=1)
    return ranks


def top_expert(x: ArrayLike) -> np.ndarray:
    """Index of the rank-E expert of each row (ties -> the highest tied index)."""
    a = to_numpy(x)
    return np.argsort(a, axis=1, kind="stable")[:, -1]


def rank_counts(norms: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """``[E, E]`` counts: entry ``[s-1, n-1]`` = how often an expert had score rank s and norm rank n.

    Every token adds one count per expert, so each row and each column sums to the number of tokens.
    Sum the result over layers to get the paper's Fig. 10.
    """
    a, b = _check_pair(norms, scores)
    e = a.shape[1]
    flat = (ascending_ranks(b) - 1) * e + (ascending_ranks(a) - 1)
    return np.bincount(flat.reshape(-1), minlength=e * e).reshape(e, e).astype(np.int64)


@dataclass(frozen=True)
class Agreement:
    """Share of tokens where the top-scored expert is among the ``k`` largest-norm experts.

    ``baseline`` = k / E is the share expected if scores ignored norms. ``low``/``high`` is the
    interval given by ``method`` ("wilson", "bootstrap" or "cluster-bootstrap").
    """

    share: float
    low: float
    high: float
    n: int
    baseline: float
    successes: int
    k: int
    method: str
    n_groups: int
    confidence: float


def _agreement(
    hits: np.ndarray,
    e: int,
    k: int,
    groups: ArrayLike | None,
    ci: CIMethod,
    confidence: float,
    n_boot: int,
    seed: int,
) -> Agreement:
    n = int(hits.size)
    succ = int(hits.sum())
    share = succ / n if n else float("nan")
    use_boot = ci == "bootstrap" or (ci == "auto" and groups is not None)
    if ci not in ("auto", "wilson", "bootstrap"):
        raise ArgumentError(f"ci must be 'auto', 'wilson' or 'bootstrap'; got {ci!r}")
    if use_boot:
        res = bootstrap_mean_ci(hits.astype(np.float64), n_boot, confidence, seed, groups)
        low, high, method, ng = res.low, res.high, res.method, res.n_groups
    else:
        low, high = wilson_interval(succ, n, confidence)
        method, ng = "wilson", n
    return Agreement(share, low, high, n, min(1.0, k / e), succ, k, method, ng, confidence)


def topk_norm_agreement(
    norms: ArrayLike,
    scores: ArrayLike,
    k: int = 2,
    groups: ArrayLike | None = None,
    ci: CIMethod = "auto",
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Agreement:
    """Share of rows whose top-scored expert is among the ``k`` largest norms, with an interval.

    ``groups`` (the sequence id of each row) switches the default interval to a cluster bootstrap
    over sequences; without it a Wilson interval is used. Swapping the arguments answers the other
    question: is the largest-norm expert among the ``k`` highest scores (the paper's ≈84% for k=2).
    """
    a, b = _check_pair(norms, scores)
    e = a.shape[1]
    if not 1 <= k <= e:
        raise ArgumentError(f"k must be between 1 and the number of experts ({e}); got {k}")
    top = top_expert(b)
    norm_rank_of_top = np.take_along_axis(ascending_ranks(a), top[:, None], axis=1)[:, 0]
    hits = norm_rank_of_top > e - k
    return _agreement(hits, e, k, groups, ci, confidence, n_boot, seed)


def top1_agreement(
    norms: ArrayLike,
    scores: ArrayLike,
    groups: ArrayLike | None = None,
    ci: CIMethod = "auto",
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Agreement:
    """Share of rows where the top-scored expert is also the largest-norm expert (baseline 1/E)."""
    return topk_norm_agreement(norms, scores, 1, groups, ci, confidence, n_boot, seed)


def agreement_by_layer(
    norms: Mapping[int, ArrayLike],
    scores: Mapping[int, ArrayLike],
    groups: ArrayLike | None = None,
    k: int = 1,
    ci: CIMethod = "auto",
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-layer top-k agreement plus one pooled row (``scope == "all"``, ``layer`` missing).

    ``norms``/``scores`` map a layer index to ``[N, E]`` arrays over the same N tokens; ``groups``
    gives each token's sequence, and the pooled interval resamples sequences across all layers at
    once (a sequence's tokens in every layer form one cluster).
    """
    if set(norms) != set(scores):
        raise ShapeError(f"norms and scores must cover the same layers; got {sorted(norms)} and {sorted(scores)}")
    rows = []
    all_n, all_s, all_g = [], [], []
    for layer in sorted(norms):
        a, b = _check_pair(norms[layer], scores[layer])
        ag = topk_norm_agreement(a, b, k, groups, ci, confidence, n_boot, seed)
        rows.append({"scope": "layer", "layer": layer, **ag.__dict__})
        all_n.append(a)
        all_s.append(b)
        if groups is not None:
            all_g.append(to_numpy(groups, None).reshape(-1))
    if rows:
        pooled_groups = np.concatenate(all_g) if groups is not None else None
        ag = topk_norm_agreement(
            np.concatenate(all_n), np.concatenate(all_s), k, pooled_groups, ci, confidence, n_boot, seed
        )
        rows.append({"scope": "all", "layer": None, **ag.__dict__})
    df = pd.DataFrame(rows)
    if not df.empty:
        df["layer"] = df["layer"].astype("Int64")
    return df
