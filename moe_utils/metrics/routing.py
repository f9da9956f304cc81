"""Routing patterns (paper App. I, Fig. 14): chosen experts per token, repeats and runs.

``topk_index`` is ``[N, k]`` (the experts chosen for each token, as the model's router returns
them) over the tokens of all sequences in order, and ``seq_index`` ``[N]`` says which sequence
each token belongs to; consecutive entries with the same ``seq_index`` are adjacent tokens. The
top-1 expert of a token is the one with the largest routing weight when ``topk_weight`` is given,
otherwise column 0 (routers return their choices sorted by score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np
import pandas as pd

from ..core.errors import ArgumentError, ShapeError
from ._arrays import ArrayLike, to_numpy
from .nulls import cluster_jackknife
from .stats import wilson_interval


def _index(topk_index: ArrayLike) -> np.ndarray:
    idx = to_numpy(topk_index, np.int64)
    if idx.ndim == 1:
        idx = idx[:, None]
    if idx.ndim != 2:
        raise ShapeError(f"expected topk_index of shape [N, k]; got {idx.shape}")
    return idx


def _seq(seq_index: ArrayLike | None, n: int) -> np.ndarray:
    if seq_index is None:
        return np.zeros(n, dtype=np.int64)
    s = to_numpy(seq_index, None).reshape(-1)
    if s.shape[0] != n:
        raise ShapeError(f"seq_index has {s.shape[0]} entries for {n} tokens; pass one sequence index per token")
    return s


def _num_experts(idx: np.ndarray, num_experts: int | None) -> int:
    e = int(idx.max()) + 1 if num_experts is None and idx.size else int(num_experts or 0)
    if idx.size and (idx.min() < 0 or idx.max() >= e):
        raise ArgumentError(f"expert indices must lie in [0, {e}); got {idx.min()}..{idx.max()}")
    return e


def top1_experts(topk_index: ArrayLike, topk_weight: ArrayLike | None = None) -> np.ndarray:
    """The top-1 expert of each token: largest weight if weights are given, else column 0."""
    idx = _index(topk_index)
    if topk_weight is None:
        return idx[:, 0]
    w = to_numpy(topk_weight).reshape(idx.shape)
    return idx[np.arange(idx.shape[0]), np.argmax(w, axis=1)]


def _breaks(seq: np.ndarray) -> np.ndarray:
    """True where a token starts a new sequence (array order)."""
    b = np.ones(seq.shape[0], dtype=bool)
    b[1:] = seq[1:] != seq[:-1]
    return b


def positions_in_sequence(seq_index: ArrayLike) -> np.ndarray:
    """Position of each token within its sequence, counting from 0 in array order."""
    s = to_numpy(seq_index, None).reshape(-1)
    if s.size == 0:
        return np.zeros(0, dtype=np.int64)
    ar = np.arange(s.shape[0])
    return ar - np.maximum.accumulate(np.where(_breaks(s), ar, 0))


def routing_table(
    topk_index: ArrayLike,
    topk_weight: ArrayLike | None = None,
    seq_index: ArrayLike | None = None,
    tokens: Sequence[str] | None = None,
    layer: int | None = None,
) -> pd.DataFrame:
    """One tidy row per (token, choice): ``layer, token_index, seq, position, token, slot, expert,
    weight``; ``slot`` 0 is the top-1 choice (choices sorted by weight when weights are given)."""
    idx = _index(topk_index)
    n, k = idx.shape
    seq = _seq(seq_index, n)
    pos = positions_in_sequence(seq)
    if topk_weight is not None:
        w = to_numpy(topk_weight).reshape(n, k)
        order = np.argsort(-w, axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=1)
        w = np.take_along_axis(w, order, axis=1)
    else:
        w = np.full((n, k), np.nan)
    if tokens is not None and len(tokens) != n:
        raise ShapeError(f"{len(tokens)} token strings for {n} tokens; pass one string per token")
    return pd.DataFrame(
        {
            "layer": pd.array([layer] * (n * k), dtype="Int64"),
            "token_index": np.repeat(np.arange(n), k),
            "seq": np.repeat(seq, k),
            "position": np.repeat(pos, k),
            "token": np.repeat(np.asarray(tokens, dtype=object), k) if tokens is not None else None,
            "slot": np.tile(np.arange(k), n),
            "expert": idx.reshape(-1),
            "weight": w.reshape(-1),
        }
    )


def expert_frequencies(
    topk_index: ArrayLike,
    num_experts: int | None = None,
    top1_only: bool = False,
    topk_weight: ArrayLike | None = None,
) -> np.ndarray:
    """Share of routing choices that went to each expert, ``[E]`` summing to 1.

    With ``top1_only`` only each token's top-1 choice counts. Experts never chosen get 0 (pass
    ``num_experts`` so that unused high-index experts are counted too).
    """
    idx = _index(topk_index)
    e = _num_experts(idx, num_experts)
    chosen = top1_experts(idx, topk_weight) if top1_only else idx.reshape(-1)
    counts = np.bincount(chosen, minlength=e).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def random_overlap_probability(num_experts: int, k: int) -> float:
    """P(two independent uniformly random k-subsets of E experts share an expert) = 1 - C(E-k,k)/C(E,k)."""
    if not 1 <= k <= num_experts:
        raise ArgumentError(f"need 1 <= k <= E; got k={k}, E={num_experts}")
    return 1.0 - comb(num_experts - k, k) / comb(num_experts, k)


def _frequency_overlap(idx: np.ndarray, e: int, seed: int, max_exact: int = 2000) -> float:
    """P(two tokens drawn independently, with replacement, from the observed top-k sets overlap)."""
    n = idx.shape[0]
    inc = np.zeros((n, e), dtype=np.float64)
    inc[np.repeat(np.arange(n), idx.shape[1]), idx.reshape(-1)] = 1.0
    sets, counts = np.unique(inc, axis=0, return_counts=True)
    if sets.shape[0] <= max_exact:
        w = counts / n
        overlap = (sets @ sets.T) > 0
        return float(w @ overlap @ w)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, 200_000)
    b = rng.integers(0, n, 200_000)
    return float(((inc[a] * inc[b]).sum(axis=1) > 0).mean())


@dataclass(frozen=True)
class RepeatRate:
    """How often adjacent tokens of a sequence are routed alike, against two baselines.

    * ``top1_rate``: share of adjacent pairs with the same top-1 expert; ``overlap_rate``: share
      sharing at least one of their top-k experts. ``*_low``/``*_high`` are 95% intervals (cluster
      bootstrap over sequences when there are at least 2, else Wilson).
    * ``baseline_top1`` = 1/E and ``baseline_overlap`` = 1 - C(E-k,k)/C(E,k): uniform random routing.
    * ``freq_baseline_top1`` = sum_e p_e^2 with p_e the model's own top-1 frequencies, and
      ``freq_baseline_overlap`` the same idea for top-k sets: what independent tokens with the
      model's own routing distribution would give, i.e. what remains once load imbalance is
      accounted for.
    """

    top1_rate: float
    top1_low: float
    top1_high: float
    overlap_rate: float
    overlap_low: float
    overlap_high: float
    n_pairs: int
    n_sequences: int
    k: int
    num_experts: int
    baseline_top1: float
    baseline_overlap: float
    freq_baseline_top1: float
    freq_baseline_overlap: float


def adjacent_pairs(seq_index: ArrayLike) -> np.ndarray:
    """Indices ``i`` such that tokens ``i`` and ``i + 1`` are adjacent in the same sequence."""
    s = to_numpy(seq_index, None).reshape(-1)
    return np.flatnonzero(s[1:] == s[:-1])


def repeat_rate(
    topk_index: ArrayLike,
    seq_index: ArrayLike | None = None,
    num_experts: int | None = None,
    topk_weight: ArrayLike | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    cluster_index: ArrayLike | None = None,
) -> RepeatRate:
    """Consecutive-token routing repeat rates with random and frequency baselines (see ``RepeatRate``).

    ``seq_index`` says which tokens are adjacent; ``cluster_index`` (default: ``seq_index``) says
    which pairs are resampled together, so that one sequence seen in several layers stays one
    cluster. The interval is the delete-one-cluster jackknife with a Student-t quantile (a
    percentile bootstrap over about ten clusters undercovers); one cluster gives Wilson's."""
    idx = _index(topk_index)
    n, k = idx.shape
    e = _num_experts(idx, num_experts)
    seq = _seq(seq_index, n)
    pairs = adjacent_pairs(seq)
    top1 = top1_experts(idx, topk_weight)
    same = (top1[pairs] == top1[pairs + 1]).astype(np.float64)
    a, b = idx[pairs], idx[pairs + 1]
    overlap = (a[:, :, None] == b[:, None, :]).any(axis=(1, 2)).astype(np.float64)
    clusters = seq if cluster_index is None else to_numpy(cluster_index).reshape(-1)
    groups = clusters[pairs]
    n_seq = int(np.unique(seq[pairs]).size)
    n_clusters = int(np.unique(groups).size)

    def interval(x: np.ndarray) -> tuple[float, float]:
        if x.size == 0:
            return (float("nan"), float("nan"))
        if n_clusters >= 3:
            r = cluster_jackknife(lambda keep: float(x[keep].mean()), groups, confidence)
            return (r.low, r.high)
        return wilson_interval(float(x.sum()), float(x.size), confidence)

    p = expert_frequencies(idx, e, top1_only=True, topk_weight=topk_weight)
    nan = float("nan")
    return RepeatRate(
        top1_rate=float(same.mean()) if same.size else nan,
        top1_low=interval(same)[0],
        top1_high=interval(same)[1],
        overlap_rate=float(overlap.mean()) if overlap.size else nan,
        overlap_low=interval(overlap)[0],
        overlap_high=interval(overlap)[1],
        n_pairs=int(pairs.size),
        n_sequences=n_seq,
        k=k,
        num_experts=e,
        baseline_top1=1.0 / e,
        baseline_overlap=random_overlap_probability(e, k),
        freq_baseline_top1=float((p**2).sum()),
        freq_baseline_overlap=_frequency_overlap(idx, e, seed) if n else nan,
    )


def expert_runs(
    topk_index: ArrayLike,
    seq_index: ArrayLike | None = None,
    min_length: int = 5,
    top1_only: bool = False,
    topk_weight: ArrayLike | None = None,
) -> pd.DataFrame:
    """Runs of at least ``min_length`` consecutive tokens of one sequence routed to the same expert.

    A run of expert e is a maximal stretch of adjacent tokens that all have e among their chosen
    experts (only the top-1 choice with ``top1_only``). The default ``min_length=5`` matches the
    paper's "more than 4 consecutive tokens". Columns: ``seq, expert, start, position, length``
    (``start`` = array index of the first token, ``position`` = its position in the sequence).
    """
    idx = _index(topk_index)
    n = idx.shape[0]
    seq = _seq(seq_index, n)
    pos = positions_in_sequence(seq)
    chosen = top1_experts(idx, topk_weight)[:, None] if top1_only else idx
    brk = _breaks(seq)
    nxt_brk = np.append(brk[1:], True)
    rows = []
    for e in np.unique(chosen):
        m = (chosen == e).any(axis=1)
        prev_m = np.insert(m[:-1], 0, False)
        next_m = np.append(m[1:], False)
        starts = np.flatnonzero(m & (brk | ~prev_m))
        ends = np.flatnonzero(m & (nxt_brk | ~next_m))
        for st, en in zip(starts, ends, strict=True):
            if en - st + 1 >= min_length:
                rows.append(
                    {
                        "seq": seq[st],
                        "expert": int(e),
                        "start": int(st),
                        "position": int(pos[st]),
                        "length": int(en - st + 1),
                    }
                )
    df = pd.DataFrame(rows, columns=["seq", "expert", "start", "position", "length"])
    return df.sort_values(["start", "expert"], ignore_index=True)
