"""Neuron averaging and reordering against naive loops and known permutations."""

import itertools
import math

import numpy as np
import pytest
import torch

from moe_utils.metrics import (
    neuron_average,
    neuron_cosine_matrix,
    neuron_level_similarity,
    reorder_layer,
    reorder_neurons,
)


def naive_cos(u, v):
    u, v = np.ravel(u).tolist(), np.ravel(v).tolist()
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
    return 0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv)


def naive_cos_matrix(rows):
    return np.array([[naive_cos(r, s) for s in rows] for r in rows])


def naive_kendall_tau_vs_identity(perm):
    n = len(perm)
    conc = disc = 0
    for i in range(n):
        for j in range(i + 1, n):
            if perm[i] < perm[j]:
                conc += 1
            else:
                disc += 1
    return (conc - disc) / (n * (n - 1) / 2)


def test_neuron_average_up_and_down():
    rng = np.random.default_rng(0)
    up = rng.normal(size=(3, 5, 4))  # [E, I, H]
    down = rng.normal(size=(3, 4, 5))  # [E, H, I]
    avg_up = neuron_average(up, "up")
    avg_down = neuron_average(down, "down")
    for e in range(3):
        for h in range(4):
            assert avg_up[e, h] == pytest.approx(sum(up[e, i, h] for i in range(5)) / 5)
            assert avg_down[e, h] == pytest.approx(sum(down[e, h, i] for i in range(5)) / 5)
    np.testing.assert_allclose(neuron_average(up, 1), avg_up)
    np.testing.assert_allclose(neuron_average(torch.tensor(down), "w_down"), avg_down)


def test_neuron_level_similarity_with_reference():
    rng = np.random.default_rng(1)
    act = rng.normal(size=(4, 6, 3))
    f = rng.normal(size=(10, 3))  # a reference with a different neuron count is allowed
    sim = neuron_level_similarity(act, "act", extra=f)
    rows = [act[e].mean(axis=0) for e in range(4)] + [f.mean(axis=0)]
    np.testing.assert_allclose(sim, naive_cos_matrix(rows), atol=1e-12)


def test_averaging_toy_example_from_the_paper():
    # f = (0,0), e1 = (1,0), e2 = (0,1) as neurons: averaging makes e1 and e2 identical
    e1 = np.array([[1.0, 0.0], [0.0, 1.0]])
    e2 = np.array([[0.0, 1.0], [1.0, 0.0]])
    sim = neuron_level_similarity(np.stack([e1, e2]), "up")
    assert sim[0, 1] == pytest.approx(1.0)


def test_neuron_cosine_matrix_down_uses_columns():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))  # [H, I]
    m = neuron_cosine_matrix(a, b, "down")
    assert m.shape == (6, 6)
    for i in range(6):
        for j in range(6):
            assert m[i, j] == pytest.approx(naive_cos(a[:, i], b[:, j]))


@pytest.mark.parametrize("kind", ["up", "down"])
def test_reordering_recovers_a_known_permutation(kind):
    rng = np.random.default_rng(3)
    n_neurons, hidden = 40, 16
    a = rng.normal(size=(n_neurons, hidden)) if kind == "up" else rng.normal(size=(hidden, n_neurons))
    q = rng.permutation(n_neurons)
    b = a[q] if kind == "up" else a[:, q]
    res = reorder_neurons(a, b, kind)
    np.testing.assert_array_equal(res.perm, np.argsort(q))
    assert res.sim_after == pytest.approx(1.0, abs=1e-12)
    assert res.sim_before == pytest.approx(naive_cos(a, b))
    assert res.tau == pytest.approx(naive_kendall_tau_vs_identity(np.argsort(q)))


def test_reordering_identity_and_reverse_tau():
    a = np.diag(np.arange(1.0, 6.0))
    assert reorder_neurons(a, a, "up").tau == pytest.approx(1.0)
    rev = reorder_neurons(a, a[::-1], "up")
    assert rev.tau == pytest.approx(-1.0)
    assert rev.sim_after == pytest.approx(1.0)


def test_assignment_is_optimal_by_brute_force():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    res = reorder_neurons(a, b, "act")
    sims = [[naive_cos(a[i], b[j]) for j in range(5)] for i in range(5)]
    best = max(sum(sims[i][p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    assert sum(sims[i][res.perm[i]] for i in range(5)) == pytest.approx(best)
    assert res.sim_after == pytest.approx(naive_cos(a, b[res.perm]))


def test_reorder_layer_table():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(3, 6, 4))
    f = rng.normal(size=(6, 4))
    df = reorder_layer(w, "up", extra=f)
    assert len(df) == math.comb(4, 2)
    assert set(df["expert_b"]) >= {"F"}
    row = df[(df.index_a == 0) & (df.index_b == 3)].iloc[0]
    direct = reorder_neurons(w[0], f, "up")
    assert row.sim_after == pytest.approx(direct.sim_after)
    assert row.gain == pytest.approx(direct.sim_after - direct.sim_before)
    one = reorder_layer(w, "up", pairs=[(2, 1)])
    assert len(one) == 1 and one.expert_a[0] == "2"


def test_single_neuron_gives_nan_tau():
    res = reorder_neurons(np.ones((1, 3)), np.ones((1, 3)), "up")
    assert math.isnan(res.tau) and res.sim_after == pytest.approx(1.0)
