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


# ---- the model's own weight convention (norm_topk_prob) -----------------------------------------


def test_norm_and_random_keep_the_weight_convention_of_a_per_token_loop() -> None:
    probs, norms = _probs_norms(n=9, e=6, seed=2)
    for renorm in (True, False):
        idx, w = I.select(I.Policy("norm"), probs, norms, top_k=3, renormalize=renorm)
        ridx, rw = I.select(I.Policy("random"), probs, norms, 3, renorm, torch.Generator().manual_seed(4))
        for t in range(probs.shape[0]):
            want = sorted(range(6), key=lambda e: -float(norms[t, e]))[:3]
            assert sorted(idx[t].tolist()) == sorted(want)
            for chosen, weight in ((idx[t].tolist(), w[t]), (ridx[t].tolist(), rw[t])):
                raw = [float(probs[t, e]) for e in chosen]
                expect = [p / sum(raw) for p in raw] if renorm else raw
                np.testing.assert_allclose(weight.numpy(), expect, rtol=1e-6)


def _naive_expert(w, e: int, x: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert on one token, from its canonical matrices."""
    h = torch.nn.functional.silu(w.w_act[e].float() @ x) * (w.w_up[e].float() @ x)
    return w.w_down[e].float() @ h


def _block(lm, layer: int) -> torch.nn.Module:
    m = lm.spec.modules
    return lm.model.get_submodule(f"{m.layers}.{layer}.{m.block}")


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_norm_routing_block_matches_a_naive_reference_in_the_models_convention(family: str) -> None:
    """qwen2_moe's tiny config does not renormalise its top-k weights, qwen3_moe's does: the patched
    block must mix the norm-chosen experts with raw probabilities in the first, renormalised in the
    second, exactly as the model's own config says."""
    from moe_utils.models.weights import layer_weights

    lm = tiny(family)
    renorm = bool(lm.model.config.norm_topk_prob)
    assert renorm == (family == "qwen3_moe")
    k = lm.model.config.num_experts_per_tok
    layer = lm.moe_layers[0]
    block, w = _block(lm, layer), layer_weights(lm, layer)
    seen = {}

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen["x"], seen["y"] = x.detach(), out.detach()

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        with I.routed(lm, I.Policy("norm")):
            I.window_nll(lm.model, sequences(seed=7, lengths=(10,)))
    finally:
        handle.remove()
    xs, ys = seen["x"].reshape(-1, seen["x"].shape[-1]).float(), seen["y"].reshape(-1, seen["y"].shape[-1]).float()
    for x, y in zip(xs, ys, strict=True):
        probs = torch.softmax(w.router.float() @ x, dim=-1)
        outs = [_naive_expert(w, e, x) for e in range(w.router.shape[0])]
        chosen = sorted(range(len(outs)), key=lambda e: -float(outs[e].norm()))[:k]
        raw = [float(probs[e]) for e in chosen]
        mix = [p / sum(raw) for p in raw] if renorm else raw
        want = sum(m * outs[e] for m, e in zip(mix, chosen, strict=True))
        if lm.spec.modules.shared:
            shared = block.get_submodule(lm.spec.modules.shared)(x[None])[0].float()
            gate = torch.sigmoid(block.get_submodule(lm.spec.modules.shared_gate)(x[None])[0].float())
            want = want + gate * shared
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


# ---- where removing the top-scored and the top-norm expert differ -------------------------------


def test_disagreement_share_matches_a_naive_count() -> None:
    """Recorded in a padded batch during the top-norm ablation pass, against a per-token count of each
    window run alone (no padding) with the block inputs captured by hooks."""
    from moe_utils.models.weights import layer_weights

    lm = tiny("mixtral")
    k = lm.facts.routing.top_k
    windows = sequences(seed=11, lengths=(12, 5, 9, 12, 3))
    policy = I.Policy("ablate", remove="top_norm")
    rec = I.Disagreement(len(windows))
    with I.routed(lm, policy, rec):
        I.window_nll(lm.model, windows, batch_size=3, recorder=rec)
    weights = {layer: layer_weights(lm, layer) for layer in lm.moe_layers}
    for i, win in enumerate(windows):
        inputs = {}
        handles = [
            _block(lm, layer).register_forward_pre_hook(
                lambda mod, args, kwargs, layer=layer, inputs=inputs: inputs.__setitem__(
                    layer, (args[0] if args else kwargs["hidden_states"]).detach()
                ),
                with_kwargs=True,
            )
            for layer in lm.moe_layers
        ]
        try:
            with I.routed(lm, policy):
                I.window_nll(lm.model, [win])
        finally:
            for h in handles:
                h.remove()
        pairs = disagree = 0
        for layer, x_all in inputs.items():
            w = weights[layer]
            for x in x_all.reshape(-1, x_all.shape[-1]).float():
                probs = (w.router.float() @ x).softmax(-1)
                chosen = sorted(range(w.router.shape[0]), key=lambda e: -float(probs[e]))[:k]
                top_norm = max(chosen, key=lambda e: float(_naive_expert(w, e, x).norm()))
                pairs += 1
                disagree += int(top_norm != chosen[0])
        assert rec.pairs[i] == pairs == len(win) * len(lm.moe_layers)
        assert rec.disagree[i] == disagree
    assert 0 < rec.disagree.sum() < rec.pairs.sum()
    with pytest.raises(ValueError, match="top_norm"), I.routed(lm, I.Policy("norm"), I.Disagreement(1)):
        pass


# ---- windows and their documents ----------------------------------------------------------------


def test_window_documents_follow_make_windows() -> None:
    from moe_utils.zoo.evaluate import make_windows, window_documents

    docs = [list(range(10, 30)), [7], list(range(40, 44)), [], list(range(50, 60))]
    windows, labels = make_windows(docs, seq_len=5), window_documents(docs, seq_len=5)
    assert len(labels) == len(windows)
    naive = []
    for d, ids in enumerate(docs):
        for start in range(0, len(ids), 4):
            if len(ids[start : start + 4]) >= 2:
                naive.append(d)
    assert labels.tolist() == naive
    for w, d in zip(windows, labels, strict=True):
        assert set(w[1:]) <= set(docs[d])


def test_saved_documents_come_back_for_the_same_subset(tmp_path) -> None:
    from moe_utils.core.errors import MoEUtilsError
    from moe_utils.zoo.evaluate import load_window_documents, load_windows, save_windows

    windows = [[1, 100 + d, 5 + i] for d in range(7) for i in range(d + 1)]
    docs = [d for d in range(7) for _ in range(d + 1)]
    save_windows(tmp_path / "w.npz", windows, docs)
    for m in (None, 5, 11, 100):
        ws, ds = load_windows(tmp_path / "w.npz", m), load_window_documents(tmp_path / "w.npz", m)
        assert len(ws) == len(ds) and [w[1] - 100 for w in ws] == ds.tolist()
    save_windows(tmp_path / "old.npz", windows)
    with pytest.raises(MoEUtilsError, match="documents"):
        load_window_documents(tmp_path / "old.npz")


def test_shipped_window_documents_are_consecutive_and_complete() -> None:
    import json

    from moe_utils.core.paths import ZOO_MODELS_DIR
    from moe_utils.zoo import configs
    from moe_utils.zoo.evaluate import load_window_documents, load_windows

    windows, docs = load_windows(), load_window_documents()
    corpus = json.loads((ZOO_MODELS_DIR / "corpus.json").read_text())
    assert len(docs) == len(windows) == corpus["heldout_windows"]
    assert docs.tolist() == sorted(docs.tolist()) and len(np.unique(docs)) == corpus["heldout"]["total"]["documents"]
    last_of_doc = np.r_[docs[1:] != docs[:-1], True]
    assert all(len(w) == configs.SEQ_LEN for w, last in zip(windows, last_of_doc, strict=True) if not last)
    assert sum(len(w) - 1 for w in windows) == corpus["heldout_tokens"]


@pytest.mark.slow
def test_shipped_window_documents_match_a_rebuild_of_the_heldout_documents() -> None:
    """The held-out documents rebuilt exactly as prepare() builds them (this Python's standard
    library, the shipped tokenizer) give the shipped windows, token for token, and their documents."""
    import json
    import sys

    from moe_utils.core.paths import ZOO_MODELS_DIR
    from moe_utils.zoo.corpus import build_corpus
    from moe_utils.zoo.evaluate import load_window_documents, load_windows
    from moe_utils.zoo.tokenizer import load_zoo_tokenizer
    from moe_utils.zoo.train import heldout_windows

    shipped = json.loads((ZOO_MODELS_DIR / "corpus.json").read_text())
    if sys.version.split()[0] != shipped["python_version"]:
        pytest.skip(f"the corpus was built with Python {shipped['python_version']}; the stdlib differs here")
    corpus = build_corpus()
    if corpus.meta["sha256_heldout"] != shipped["sha256_heldout"]:
        pytest.skip("same Python version but a different standard library build")
    windows, docs = heldout_windows(corpus, load_zoo_tokenizer(ZOO_MODELS_DIR / "tiny-dense"))
    assert windows == load_windows()
    assert docs.tolist() == load_window_documents().tolist()
    assert load_window_documents(max_windows=120).tolist() == [docs[int(i * len(docs) / 120)] for i in range(120)]


# ---- intervals over documents -------------------------------------------------------------------


def _naive_jackknife_t(stat, docs: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    labels = sorted(set(docs.tolist()))
    full = stat(np.ones(len(docs), dtype=bool))
    loo = []
    for d in labels:
        loo.append(stat(docs != d))
    g = len(labels)
    mean = sum(loo) / g
    se = ((g - 1) / g * sum((v - mean) ** 2 for v in loo)) ** 0.5
    q = stats.t.ppf(0.975, g - 1)
    return full, full - q * se, full + q * se


def _per_window(seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    docs = np.repeat(np.arange(9), rng.integers(1, 6, size=9))
    n = len(docs)
    counts = rng.integers(20, 255, size=n)
    base = {
        "learned": 3.0,
        "norm": 3.3,
        "random": 3.9,
        "ablate top_score": 3.4,
        "ablate top_norm": 3.45,
        "ablate random": 3.3,
    }
    frames = []
    for policy, mu in base.items():
        sums = counts * (mu + rng.normal(0, 0.2, size=n) + 0.1 * docs / 9)
        pairs = counts * 2 if policy == "ablate top_norm" else np.full(n, np.nan)
        dis = np.floor(pairs * rng.uniform(0.1, 0.4, size=n)) if policy == "ablate top_norm" else np.full(n, np.nan)
        frames.append(
            pd.DataFrame(
                {
                    "policy": policy,
                    "window": np.arange(n),
                    "document": docs,
                    "nll_sum": sums,
                    "tokens": counts,
                    "pairs": pairs,
                    "disagreeing_pairs": dis,
                }
            )
        )
    return pd.concat(frames, ignore_index=True), docs


def test_document_jackknife_intervals_match_a_naive_loop() -> None:
    pw, docs = _per_window()

    def col(policy: str, c: str) -> np.ndarray:
        return pw[pw.policy == policy].sort_values("window")[c].to_numpy(dtype=float)

    c = col("learned", "tokens")
    s_l, s_n, s_r = col("learned", "nll_sum"), col("norm", "nll_sum"), col("random", "nll_sum")
    checks = [
        (I.pooled_loss(s_l, c, docs), lambda k: s_l[k].sum() / c[k].sum()),
        (I.contrast(pw, "norm", "learned"), lambda k: (s_n[k] - s_l[k]).sum() / c[k].sum()),
    ]
    for got, stat in checks:
        est, lo, hi = _naive_jackknife_t(stat, docs)
        assert (got.nll, got.ci_low, got.ci_high) == pytest.approx((est, lo, hi), rel=1e-9)
        assert got.documents == 9 and got.df == 8
    rec = I.recovery(pw)
    est, lo, hi = _naive_jackknife_t(lambda k: (s_r[k].sum() - s_n[k].sum()) / (s_r[k].sum() - s_l[k].sum()), docs)
    assert (rec.estimate, rec.low, rec.high) == pytest.approx((est, lo, hi), rel=1e-9)
    p, d = col("ablate top_norm", "pairs"), col("ablate top_norm", "disagreeing_pairs")
    share = I.disagreement_share(pw)
    est, lo, hi = _naive_jackknife_t(lambda k: d[k].sum() / p[k].sum(), docs)
    assert (share.estimate, share.low, share.high) == pytest.approx((est, lo, hi), rel=1e-9)
    # windows as their own documents give a different (narrower here) interval than documents
    per_window_iv = I.pooled_loss(s_l, c)
    assert per_window_iv.documents == len(docs) and per_window_iv.df == len(docs) - 1


def test_advice_verdicts_carry_effect_null_floor_and_outcome() -> None:
    from moe_utils.metrics.nulls import OUTCOMES

    pw, _ = _per_window(1)
    for v, floor in (
        (I.norm_routing_verdict(pw), I.NORM_RECOVERY_THRESHOLD),
        (I.norm_causal_verdict(pw), I.NORM_CAUSAL_FLOOR),
    ):
        assert v["verdict"] in OUTCOMES and v["floor"] == floor and v["null"] == 0.0
        assert all(np.isfinite(v[f]) for f in ("value", "ci_low", "ci_high", "se", "df"))
        assert v["ci_low"] < v["value"] < v["ci_high"]
    assert "of (token, layer) pairs" in I.norm_causal_verdict(pw)["note"]
    assert I.norm_routing_verdict(pw)["note"].startswith("post-hoc norm selection recovers")


# ---- dense-layer placement ----------------------------------------------------------------------


def _placement(slopes: list[float], noise: float, layers: int = 6, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for s, b in enumerate(slopes):
        for pos in [None, *range(layers)]:
            depth = 0.0 if pos is None else pos / (layers - 1)
            rows.append({"dense_layer": pos, "seed": s, "nll": 5.0 + b * depth + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_placement_slopes_match_a_per_seed_fit_and_the_verdict_uses_every_position_but_the_last() -> None:
    from scipy import stats as scipy_stats

    from moe_utils.zoo import study_results as S

    table = _placement([0.05, 0.07, 0.06], noise=0.002)
    slopes = S.placement_slopes(table, 6)
    for s, row in slopes.set_index("seed").iterrows():
        g = table[(table.seed == s) & table.dense_layer.notna() & (table.dense_layer < 5)]
        assert row.positions == 5 and 0 in set(g.dense_layer)
        fit = scipy_stats.linregress(g.dense_layer.astype(float) / 5, g.nll)
        assert (row.slope, row.se) == pytest.approx((fit.slope, fit.stderr))
    v = S.placement_verdict(table, 6)
    assert v["verdict"] == "holds" and v["df"] == 2 and v["floor"] == I.PLACEMENT_TREND_FLOOR
    assert 0 <= v["power"] <= 1
    flat = S.placement_verdict(_placement([0.0, 0.0, 0.0], noise=1e-4, seed=1), 6)
    assert flat["verdict"] == "does not hold"
    one = S.placement_verdict(_placement([0.05], noise=0.002), 6)
    assert one["verdict"] == "undefined" and "no trend verdict" in one["note"]
    assert S.paper_placement_trend() == pytest.approx(I.PLACEMENT_TREND_FLOOR * 4, rel=0.01)
