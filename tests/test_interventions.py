"""Routing interventions: policies against naive per-token choices, and faithfulness of the
patched forward (the learned policy must reproduce the model's own loss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_utils.analysis import interventions as I
from moe_utils.metrics import bootstrap_ratio_ci
from tests.tiny_models import sequences, tiny


def _probs_norms(n: int = 7, e: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, e, generator=g), -1), torch.rand(n, e, generator=g)


def test_learned_and_norm_choose_what_a_per_token_loop_chooses() -> None:
    probs, norms = _probs_norms()
    for renorm in (True, False):
        idx, w = I.select(I.Policy("learned"), probs, norms, top_k=2, renormalize=renorm)
        for t in range(probs.shape[0]):
            want = sorted(range(5), key=lambda e: -float(probs[t, e]))[:2]
            assert idx[t].tolist() == want
            raw = probs[t, want]
            np.testing.assert_allclose(w[t].numpy(), (raw / raw.sum() if renorm else raw).numpy(), rtol=1e-6)
    idx, w = I.select(I.Policy("norm"), probs, norms, top_k=2, renormalize=True)
    for t in range(probs.shape[0]):
        want = sorted(range(5), key=lambda e: -float(norms[t, e]))[:2]
        assert sorted(idx[t].tolist()) == sorted(want)
        raw = probs[t, idx[t]]
        np.testing.assert_allclose(w[t].numpy(), (raw / raw.sum()).numpy(), rtol=1e-6)


def test_random_policy_is_seeded_distinct_and_uniform() -> None:
    probs, norms = _probs_norms(n=4000, e=4)
    a = I.select(I.Policy("random"), probs, norms, 2, True, torch.Generator().manual_seed(1))[0]
    b = I.select(I.Policy("random"), probs, norms, 2, True, torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b)
    assert (a[:, 0] != a[:, 1]).all()
    share = np.bincount(a.reshape(-1).numpy(), minlength=4) / a.numel()
    np.testing.assert_allclose(share, 0.25, atol=0.02)


def test_ablation_removes_the_named_expert_and_keeps_the_weight_sum() -> None:
    probs, norms = _probs_norms(e=6)
    full_i, full_w = I.select(I.Policy("learned", k=3), probs, norms, 3, False)
    for remove in ("top_score", "top_norm"):
        idx, w = I.select(I.Policy("ablate", remove=remove), probs, norms, 3, False)
        for t in range(probs.shape[0]):
            chosen = full_i[t].tolist()
            gone = chosen[0] if remove == "top_score" else max(chosen, key=lambda e: float(norms[t, e]))
            assert sorted(idx[t].tolist()) == sorted(e for e in chosen if e != gone)
            assert float(w[t].sum()) == pytest.approx(float(full_w[t].sum()), rel=1e-6)
    with pytest.raises(ValueError, match="top-k >= 2"):
        I.select(I.Policy("ablate", remove="random"), probs, norms, 1, False)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_learned_policy_reproduces_the_models_own_loss(family: str) -> None:
    lm = tiny(family)
    windows = sequences(seed=3, lengths=(12, 9, 12))
    own, counts = I.window_nll(lm.model, windows)
    with I.routed(lm, I.Policy("learned")):
        sums, c2 = I.window_nll(lm.model, windows)
    assert (counts == c2).all() and counts.tolist() == [11, 8, 11]
    np.testing.assert_allclose(sums, own, rtol=1e-5)
    # the patch is undone on exit
    again, _ = I.window_nll(lm.model, windows)
    np.testing.assert_allclose(again, own, rtol=0, atol=0)
    # and a different policy changes the loss
    with I.routed(lm, I.Policy("norm")):
        other, _ = I.window_nll(lm.model, windows)
    assert not np.allclose(other, own)


def test_window_nll_matches_a_per_window_loop() -> None:
    lm = tiny("mixtral")
    windows = sequences(seed=5, lengths=(7, 4, 7))
    sums, counts = I.window_nll(lm.model, windows, batch_size=2)
    for i, w in enumerate(windows):
        ids = torch.tensor([w])
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        assert sums[i] == pytest.approx(float(nll), rel=1e-5)
        assert counts[i] == len(w) - 1


def test_ratio_bootstrap_brackets_the_pooled_ratio() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(50, 100, size=40)
    sums = counts * rng.normal(4.0, 0.3, size=40)
    ci = bootstrap_ratio_ci(sums, counts, seed=1)
    assert ci.estimate == pytest.approx(sums.sum() / counts.sum())
    assert ci.low < ci.estimate < ci.high
    assert ci.high - ci.low < 0.3
    assert np.isnan(bootstrap_ratio_ci([1.0], [2]).low)
