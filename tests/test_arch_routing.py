"""Routing functions against naive per-token loops and against the models' own router code."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import NATIVE_MOE, tiny

from moe_utils.arch import get_spec
from moe_utils.engine.routing import RouteParams, route, route_params


def _naive_softmax_topk(logits, k, renorm, scale=1.0, n_group=1, topk_group=1):
    out_w, out_i = [], []
    for row in logits.tolist():
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        p = [v / sum(ex) for v in ex]
        size = len(p) // n_group
        best_groups = sorted(range(n_group), key=lambda g: -max(p[g * size : (g + 1) * size]))[:topk_group]
        allowed = [e for e in range(len(p)) if e // size in best_groups]
        chosen = sorted(allowed, key=lambda e: -p[e])[:k]
        w = [p[e] for e in chosen]
        if renorm:
            w = [v / sum(w) for v in w]
        out_w.append([v * scale for v in w])
        out_i.append(chosen)
    return torch.tensor(out_w), torch.tensor(out_i)


def test_softmax_topk_renormalised_and_grouped():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 8, generator=g)
    for renorm, groups in ((True, (1, 1)), (False, (1, 1)), (False, (4, 2))):
        p = RouteParams(
            "softmax_topk",
            8,
            3,
            renormalize=renorm,
            scale=1.5,
            group="max" if groups[0] > 1 else None,
            n_group=groups[0],
            topk_group=groups[1],
        )
        w, i = route(logits, p)
        nw, ni = _naive_softmax_topk(logits, 3, renorm, 1.5, *groups)
        assert torch.equal(i, ni)
        torch.testing.assert_close(w, nw.float(), rtol=1e-5, atol=1e-6)


def test_sigmoid_correction_bias_chooses_but_does_not_weigh():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    p = RouteParams("sigmoid_topk", 4, 2, renormalize=False, scale=2.0)
    w, i = route(logits, p, correction_bias=bias)
    assert i.tolist() == [[3, 0]]  # bias pulls expert 3 in
    torch.testing.assert_close(w, 2.0 * torch.sigmoid(torch.tensor([[-1.0, 2.0]])))
    w2, i2 = route(logits, p)
    assert i2.tolist() == [[0, 1]]


def test_pnorm_normalisation():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    w, _ = route(logits, RouteParams("softmax_topk", 4, 2, renormalize=True, norm_p=2.0))
    probs = torch.softmax(logits, -1)[0, :2]
    torch.testing.assert_close(w[0], probs / probs.norm(p=2))


def test_topk_then_softmax_and_llama4_sigmoid():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    w, i = route(logits, RouteParams("topk_softmax", 4, 2))
    assert i.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))
    w, i = route(logits, RouteParams("topk_sigmoid_input", 4, 1))
    assert i.tolist() == [[1]] and torch.allclose(w, torch.sigmoid(torch.tensor([[3.0]])))


def test_sparsemixer_matches_phimoe_code():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    ref_w, ref_i = sparsemixer(logits, jitter_eps=0.3, training=False)
    w, i = route(logits, RouteParams("sparsemixer", 6, 2, jitter_eps=0.3))
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w)


@pytest.mark.parametrize("family", [f for f in NATIVE_MOE if get_spec(f).capture.output == "logits_weights_index"])
def test_route_equals_model_router(family):
    """Independent truth: call the model's own router on random inputs."""
    lm = tiny(family)
    spec = lm.spec
    layer = lm.moe_layers[0]
    block = lm.model.get_submodule(f"{spec.modules.layers}.{layer}.{spec.modules.block}")
    router = block.get_submodule(spec.modules.router)
    x = torch.randn(40, spec.hidden_size(lm.config.to_dict()), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, ref_w, ref_i = router(x)
    bias = getattr(router, "e_score_correction_bias", None)
    w, i = route(logits, route_params(spec, lm.config), bias)
    order_r, order = ref_i.argsort(-1), i.argsort(-1)
    assert torch.equal(ref_i.gather(1, order_r), i.gather(1, order))
    torch.testing.assert_close(ref_w.float().gather(1, order_r), w.gather(1, order), rtol=1e-5, atol=1e-7)


def test_route_params_from_config_keys():
    v2 = get_spec("deepseek_v2")
    cfg = {
        "model_type": "deepseek_v2",
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "topk_method": "greedy",
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 16.0,
    }
    p = route_params(v2, cfg)
    assert p.group is None and p.scale == 16.0 and not p.renormalize
    p = route_params(v2, {**cfg, "topk_method": "group_limited_greedy"})
    assert (p.group, p.n_group, p.topk_group) == ("max", 4, 2)
    dbrx = get_spec("dbrx")
    cfg = {"ffn_config": {"moe_num_experts": 4, "moe_top_k": 2, "moe_normalize_expert_weights": None}}
    assert not route_params(dbrx, cfg).renormalize
    cfg["ffn_config"]["moe_normalize_expert_weights"] = 2
    assert route_params(dbrx, cfg).renormalize and route_params(dbrx, cfg).norm_p == 2.0


def _naive_biased_choice(logits, bias, k, score, bias_on_logits=False, renorm=True):
    """Per-token loop: choose by (score or logit) + bias, weigh by the unbiased score."""
    out_w, out_i = [], []
    for row in logits.tolist():
        s = [score(v) for v in row]
        base = row if bias_on_logits else s
        chosen = sorted(range(len(row)), key=lambda e: -(base[e] + float(bias[e])))[:k]
        w = [s[e] for e in chosen]
        if renorm:
            w = [v / sum(w) for v in w]
        out_w.append(w)
        out_i.append(chosen)
    return torch.tensor(out_w), torch.tensor(out_i)


@pytest.mark.parametrize(
    "method,bias_on_logits", [("softmax_topk", False), ("sigmoid_topk", True), ("sqrtsoftplus_topk", False)]
)
def test_choice_only_bias_variants_against_naive_loop(method, bias_on_logits):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(12, 8, generator=g)
    bias = torch.randn(8, generator=g) * 0.3
    if method == "softmax_topk":
        probs = torch.softmax(logits, -1)
        want_w, want_i = _naive_biased_choice(torch.log(probs), bias, 2, math.exp)
    else:
        score = (
            (lambda v: 1 / (1 + math.exp(-v)))
            if method == "sigmoid_topk"
            else (lambda v: math.sqrt(math.log1p(math.exp(v))))
        )
        want_w, want_i = _naive_biased_choice(logits, bias, 2, score, bias_on_logits)
    params = RouteParams(method, num_experts=8, top_k=2, renormalize=True, bias_on_logits=bias_on_logits)
    w, i = route(logits, params, bias)
    order, want_order = i.argsort(-1), want_i.argsort(-1)
    assert torch.equal(i.gather(1, order), want_i.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.float().gather(1, want_order), rtol=1e-5, atol=1e-6)
