"""Activation ratio (paper App. H) against a naive count."""

import numpy as np
import pytest
import torch

from moe_utils.metrics import activation_ratio


def test_activation_ratio_matches_naive_count():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=2e-3, size=(5, 3, 40))
    res = activation_ratio(x, chunk_tokens=2)
    for t in range(5):
        for e in range(3):
            active = sum(1 for v in x[t, e] if abs(v) > 1e-3)
            assert res.per_token_expert[t, e] == pytest.approx(active / 40)
    assert res.per_expert == pytest.approx(res.per_token_expert.mean(axis=0))
    total = sum(1 for v in x.ravel() if abs(v) > 1e-3)
    assert res.overall == pytest.approx(total / x.size)


def test_threshold_is_strict_and_dense_input():
    x = np.array([[1e-3, -1e-3, 2e-3, 0.0]])
    res = activation_ratio(x)
    assert res.per_expert.tolist() == [0.25] and res.overall == 0.25


def test_torch_bfloat16_input():
    t = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]], dtype=torch.bfloat16)
    res = activation_ratio(t)
    assert res.per_expert.tolist() == [0.5, 0.0] and res.per_token.tolist() == [0.25]


def test_no_tokens_raises():
    with pytest.raises(ValueError, match="no tokens"):
        activation_ratio(np.zeros((0, 2, 3)))
