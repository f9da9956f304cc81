"""Norms vs gate scores: ranks, rank counts and agreement shares (paper §5.2, App. G)."""

import math

import numpy as np
import pytest
import torch

from moe_utils.metrics import (
    agreement_by_layer,
    ascending_ranks,
    output_norms,
    rank_counts,
    top1_agreement,
    topk_norm_agreement,
    wilson_interval,
)


def naive_ranks(row):
    """Ascending ranks 1..E; ties broken by expert index (stable order)."""
    order = sorted(range(len(row)), key=lambda e: (row[e], e))
    ranks = [0] * len(row)
    for r, e in enumerate(order):
        ranks[e] = r + 1
    return ranks


def naive_rank_counts(norms, scores):
    n_tok, n_exp = norms.shape
    counts = [[0] * n_exp for _ in range(n_exp)]
    for t in range(n_tok):
        nr = naive_ranks(list(norms[t]))
        sr = naive_ranks(list(scores[t]))
        for e in range(n_exp):
            counts[sr[e] - 1][nr[e] - 1] += 1
    return np.array(counts)


def tied_data(seed, n=50, e=6):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, size=(n, e)).astype(float), rng.integers(0, 3, size=(n, e)).astype(float)


def test_ranks_match_naive_with_ties():
    norms, _ = tied_data(0)
    r = ascending_ranks(norms)
    for t in range(norms.shape[0]):
        assert r[t].tolist() == naive_ranks(list(norms[t]))


@pytest.mark.parametrize("seed", [1, 2])
def test_rank_counts_match_naive_loop(seed):
    norms, scores = tied_data(seed)
    counts = rank_counts(norms, scores)
    np.testing.assert_array_equal(counts, naive_rank_counts(norms, scores))
    assert (counts.sum(axis=0) == norms.shape[0]).all()
    assert (counts.sum(axis=1) == norms.shape[0]).all()


def test_rank_counts_continuous_and_torch():
    torch.manual_seed(0)
    norms, logits = torch.rand(40, 8), torch.randn(40, 8)
    counts = rank_counts(norms, logits.softmax(-1))
    np.testing.assert_array_equal(counts, naive_rank_counts(norms.numpy(), logits.numpy()))  # softmax keeps ranks


def test_identical_orderings_fill_the_diagonal():
    rng = np.random.default_rng(3)
    x = rng.random((30, 5))
    assert np.array_equal(rank_counts(x, x * 2), np.diag([30] * 5))


def naive_top(row):
    return max(range(len(row)), key=lambda e: (row[e], e))


def test_top1_agreement_share_and_wilson():
    norms, scores = tied_data(4, n=80)
    hits = sum(naive_top(list(scores[t])) == naive_top(list(norms[t])) for t in range(80))
    ag = top1_agreement(norms, scores)
    assert ag.successes == hits and ag.share == pytest.approx(hits / 80)
    assert ag.share == pytest.approx(rank_counts(norms, scores)[-1, -1] / 80)
    assert (ag.low, ag.high) == pytest.approx(wilson_interval(hits, 80))
    assert ag.baseline == pytest.approx(1 / 6) and ag.method == "wilson"


def test_topk_norm_agreement_matches_naive():
    norms, scores = tied_data(5, n=60)
    k = 2
    hits = 0
    for t in range(60):
        top = naive_top(list(scores[t]))
        ranks = naive_ranks(list(norms[t]))
        hits += ranks[top] > 6 - k
    ag = topk_norm_agreement(norms, scores, k=2)
    assert ag.successes == hits and ag.baseline == pytest.approx(2 / 6) and ag.k == 2


def test_cluster_bootstrap_is_seeded_and_brackets_share():
    rng = np.random.default_rng(6)
    norms, scores = rng.random((200, 4)), rng.random((200, 4))
    scores[:120] = norms[:120]  # agreement in the first sequences only
    groups = np.repeat(np.arange(10), 20)
    a = top1_agreement(norms, scores, groups=groups, seed=3)
    b = top1_agreement(norms, scores, groups=groups, seed=3)
    assert a == b and a.method == "cluster-bootstrap" and a.n_groups == 10
    assert a.low <= a.share <= a.high
    # clustered data: the cluster interval is wider than the token-level Wilson interval
    w = top1_agreement(norms, scores, ci="wilson")
    assert (a.high - a.low) > (w.high - w.low)


def test_single_expert_and_two_experts():
    one = top1_agreement(np.ones((5, 1)), np.ones((5, 1)))
    assert one.share == 1.0 and one.baseline == 1.0
    assert rank_counts(np.ones((5, 1)), np.zeros((5, 1))).tolist() == [[5]]
    two = top1_agreement(np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([[0.0, 1.0], [0.0, 1.0]]))
    assert two.share == 0.5 and two.baseline == 0.5


def test_bad_inputs():
    with pytest.raises(ValueError):
        rank_counts(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError):
        topk_norm_agreement(np.ones((3, 4)), np.ones((3, 4)), k=5)


def test_agreement_by_layer_pooled_row():
    rng = np.random.default_rng(7)
    norms = {0: rng.random((30, 4)), 2: rng.random((30, 4))}
    scores = {0: norms[0].copy(), 2: rng.random((30, 4))}
    groups = np.repeat([0, 1, 2], 10)
    df = agreement_by_layer(norms, scores, groups=groups, n_boot=200)
    assert df["scope"].tolist() == ["layer", "layer", "all"]
    assert df["share"].iloc[0] == 1.0
    pooled = top1_agreement(np.vstack([norms[0], norms[2]]), np.vstack([scores[0], scores[2]]))
    assert df["share"].iloc[2] == pytest.approx(pooled.share)
    assert df["n"].iloc[2] == 60 and pd_isna(df["layer"].iloc[2])


def pd_isna(x):
    import pandas as pd

    return bool(pd.isna(x))


def test_output_norms_naive():
    rng = np.random.default_rng(8)
    out = rng.normal(size=(7, 3, 5))
    n = output_norms(out, chunk_tokens=3)
    for t in range(7):
        for e in range(3):
            assert n[t, e] == pytest.approx(math.sqrt(sum(v * v for v in out[t, e])))
