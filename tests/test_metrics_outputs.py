"""Expert output similarity (paper §5.1) against naive per-token loops."""

import math

import numpy as np
import pytest

from moe_utils.metrics import mean_token_similarity, stack_with_reference, token_similarity


def naive_cos(u, v):
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
    return float("nan") if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv)


def test_token_similarity_matches_naive():
    rng = np.random.default_rng(0)
    out = rng.normal(size=(4, 3, 6))
    out[2, 1] = 0.0
    sim = token_similarity(out, chunk_tokens=3)
    for t in range(4):
        for i in range(3):
            for j in range(3):
                expected = naive_cos(out[t, i], out[t, j])
                assert sim[t, i, j] == pytest.approx(expected, abs=1e-12, nan_ok=True)
    assert np.isnan(sim[2, 1]).all() and np.isnan(sim[2, :, 1]).all()
    assert not np.isnan(sim[[0, 1, 3]]).any()


def test_mean_angular_similarity_matches_naive_sum_over_tokens():
    rng = np.random.default_rng(1)
    out = rng.normal(size=(7, 3, 5))
    f = rng.normal(size=(7, 5))
    full = stack_with_reference(out, f, axis=1)
    avg = mean_token_similarity(full, chunk_tokens=2)
    total = np.zeros((4, 4))
    for t in range(7):
        for i in range(4):
            for j in range(4):
                total[i, j] += 1.0 if i == j else 1 - math.acos(naive_cos(full[t, i], full[t, j])) / math.pi
    np.testing.assert_allclose(avg, total / 7, atol=1e-12)
    cos_avg = mean_token_similarity(full, angular=False)
    np.testing.assert_allclose(cos_avg, token_similarity(full).mean(axis=0), atol=1e-12)


def test_token_mean_similarity_against_a_naive_loop():
    """Per token, the mean of 1 - arccos(cos)/pi over distinct expert pairs; NaN where an output is 0."""
    import math

    import torch

    from moe_utils.metrics import token_mean_similarity

    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 4, 7, generator=g)
    y[3, 2] = 0.0
    got = token_mean_similarity(y)
    for n in range(5):
        vals = []
        for i in range(4):
            for j in range(4):
                if i != j:
                    a, b = y[n, i].double(), y[n, j].double()
                    na, nb = float(a.norm()), float(b.norm())
                    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")
                    vals.append(1 - math.acos(max(-1.0, min(1.0, cos))) / math.pi if cos == cos else float("nan"))
        want = sum(vals) / len(vals)
        if n == 3:
            assert math.isnan(got[n]) and math.isnan(want)
        else:
            assert abs(got[n] - want) < 1e-5
