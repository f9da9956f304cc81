"""Routing patterns: repeat rates, baselines and runs against naive loops and enumerations."""

import itertools

import numpy as np
import pytest

from moe_utils.metrics import (
    expert_frequencies,
    expert_runs,
    random_overlap_probability,
    repeat_rate,
    routing_table,
    top1_experts,
)
from moe_utils.metrics.routing import _frequency_overlap


def random_routing(seed, n=60, e=6, k=2, n_seq=3):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(e, size=k, replace=False) for _ in range(n)])
    seq = np.sort(rng.integers(0, n_seq, size=n))
    return idx, seq


def test_repeat_rate_matches_naive_loop():
    idx, seq = random_routing(0)
    res = repeat_rate(idx, seq, num_experts=6)
    same = overlap = pairs = 0
    for i in range(len(seq) - 1):
        if seq[i] != seq[i + 1]:
            continue
        pairs += 1
        same += idx[i][0] == idx[i + 1][0]
        overlap += len(set(idx[i]) & set(idx[i + 1])) > 0
    assert res.n_pairs == pairs
    assert res.top1_rate == pytest.approx(same / pairs)
    assert res.overlap_rate == pytest.approx(overlap / pairs)
    assert res.top1_low <= res.top1_rate <= res.top1_high
    assert res.baseline_top1 == pytest.approx(1 / 6)


@pytest.mark.parametrize("e, k", [(6, 2), (8, 2), (5, 3), (2, 2), (4, 1)])
def test_random_overlap_probability_by_enumeration(e, k):
    subsets = list(itertools.combinations(range(e), k))
    hits = sum(bool(set(a) & set(b)) for a in subsets for b in subsets)
    assert random_overlap_probability(e, k) == pytest.approx(hits / len(subsets) ** 2)


def test_frequency_baselines_match_naive():
    idx, seq = random_routing(1, n=40)
    res = repeat_rate(idx, seq, num_experts=6)
    counts = [0] * 6
    for row in idx:
        counts[row[0]] += 1
    assert res.freq_baseline_top1 == pytest.approx(sum((c / 40) ** 2 for c in counts))
    naive = sum(bool(set(a) & set(b)) for a in idx for b in idx) / 40**2
    assert res.freq_baseline_overlap == pytest.approx(naive)
    # Monte Carlo route (used when there are many distinct sets) agrees approximately
    assert _frequency_overlap(idx, 6, seed=0, max_exact=0) == pytest.approx(naive, abs=0.01)


def test_top1_uses_weights_when_given():
    idx = np.array([[0, 1], [2, 3]])
    w = np.array([[0.2, 0.8], [0.9, 0.1]])
    assert top1_experts(idx, w).tolist() == [1, 2]
    table = routing_table(idx, w, seq_index=[0, 0], tokens=["a", "b"], layer=5)
    assert table["expert"].tolist() == [1, 0, 2, 3] and table["slot"].tolist() == [0, 1, 0, 1]
    assert table["token"].tolist() == ["a", "a", "b", "b"] and (table["layer"] == 5).all()


def test_expert_frequencies_with_unused_experts():
    idx = np.array([[0, 1], [1, 0], [0, 2]])
    f = expert_frequencies(idx, num_experts=5)
    assert f.tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6, 0, 0])
    assert expert_frequencies(idx, num_experts=5, top1_only=True).tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0, 0])
    with pytest.raises(ValueError):
        expert_frequencies(idx, num_experts=2)


def naive_runs(idx, seq, min_length):
    runs = []
    n = len(seq)
    for e in sorted(set(idx.ravel().tolist())):
        i = 0
        while i < n:
            if e in idx[i]:
                j = i
                while j + 1 < n and seq[j + 1] == seq[i] and e in idx[j + 1]:
                    j += 1
                if j - i + 1 >= min_length:
                    runs.append((i, e, j - i + 1))
                i = j + 1
            else:
                i += 1
    return sorted(runs)


def test_expert_runs_match_naive():
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 3, size=(80, 2))
    seq = np.repeat([0, 1, 2, 3], 20)
    df = expert_runs(idx, seq, min_length=3)
    got = sorted(zip(df.start, df.expert, df.length))
    assert got == naive_runs(idx, seq, 3)
    assert len(got) > 0
    first = df.iloc[0]
    assert first.position == first.start - 20 * first.seq


def test_runs_do_not_cross_sequences_and_single_expert():
    idx = np.zeros((10, 1), dtype=int)
    seq = np.array([0] * 4 + [1] * 6)
    df = expert_runs(idx, seq, min_length=5)
    assert df[["seq", "length"]].values.tolist() == [[1, 6]]
    r = repeat_rate(idx, seq)
    assert r.num_experts == 1 and r.top1_rate == 1.0 and r.n_pairs == 8 and r.baseline_overlap == 1.0
