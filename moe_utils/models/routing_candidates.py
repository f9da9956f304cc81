"""The routing function of an MoE block, found by matching candidates to one forward pass.

One pass records the router logits and the ``(top_k_index, top_k_weights)`` handed to the
experts; candidate routing functions (softmax then top-k, top-k then softmax, sigmoid with a
correction bias, group-limited top-k, renormalised or not, scaling factors from the config) are
tried until one gives the same top-k sets and weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace
from typing import Literal

import torch
from torch import nn

from moe_utils.arch.spec import RoutingSpec
from moe_utils.core.errors import DerivationError
from moe_utils.engine.routing import RouteParams, route
from moe_utils.models.introspect import Block

Tensor = torch.Tensor
TOLERANCE = 1e-5
_METHODS = ("softmax_topk", "topk_softmax", "sigmoid_topk", "sqrtsoftplus_topk")
_METHOD_WORDS = {
    "softmax_topk": "softmax then top-k",
    "topk_softmax": "top-k of the logits then softmax",
    "sigmoid_topk": "sigmoid scores then top-k",
    "sqrtsoftplus_topk": "sqrt-softplus scores then top-k",
}


def scale_values(cfg: dict) -> list[float]:
    """1 and every positive config value named like a scaling factor (rope scaling aside)."""
    values = [1.0]
    for key, value in cfg.items():
        if (
            "scal" in key
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value > 0
            and float(value) != 1.0
            and "rope" not in key
        ):
            values.append(float(value))
    return list(dict.fromkeys(values))


def group_key(cfg: dict) -> str | None:
    """The config key giving the number of expert groups, when there is more than one group."""
    for key in ("n_group", "num_expert_group", "moe_n_group"):
        value = cfg.get(key)
        if isinstance(value, int) and value > 1:
            return key
    return None


def routing_candidates(cfg: dict, num_experts: int, top_k: int) -> Iterator[tuple[RouteParams, str | None]]:
    """Every candidate routing function of a config, with the config key of its group count."""
    gkey = group_key(cfg)
    groups: list[Literal["max", "top2_sum"] | None] = [None, "top2_sum", "max"] if gkey else [None]
    n_group = int(cfg[gkey]) if gkey else 1
    topk_group = int(cfg.get("topk_group") or n_group) if gkey else 1
    for method in _METHODS:
        for group in groups if method != "topk_softmax" else [None]:
            for renorm in (False, True) if method != "topk_softmax" else (False,):
                for scale in scale_values(cfg):
                    params = RouteParams(
                        method=method,
                        num_experts=num_experts,
                        top_k=top_k,
                        renormalize=renorm,
                        scale=scale,
                        group=group,
                        n_group=n_group if group else 1,
                        topk_group=topk_group if group else 1,
                        renorm_eps=1e-20 if renorm else 0.0,
                    )
                    yield params, gkey


def matches(weight: Tensor, index: Tensor, want_w: Tensor, want_i: Tensor) -> bool:
    """Same top-k sets per token, and weights equal within :data:`TOLERANCE` (in any order)."""
    oi, oj = index.argsort(-1), want_i.argsort(-1)
    if not torch.equal(index.gather(1, oi), want_i.gather(1, oj)):
        return False
    a, b = weight.float().gather(1, oi), want_w.float().gather(1, oj)
    return bool((a - b).abs().max() <= TOLERANCE * max(1.0, float(b.abs().max())))


def fit_routing(
    cap: dict[str, Tensor], cfg: dict, num_experts: int, top_k: int, biases: dict[str, Tensor]
) -> tuple[RoutingSpec, str | None]:
    """The routing spec (and the correction bias it uses, if any) that reproduces the capture."""
    logits, index, weight = cap["logits"], cap["index"], cap["weight"]
    if logits.shape[-1] != num_experts:
        raise DerivationError(
            f"the router scores {logits.shape[-1]} choices for {num_experts} "
            "experts (zero-computation or null experts); the extra choices "
            "have no weights to analyse"
        )
    bias_options = [(None, None), *biases.items()]
    for (params, gkey), (bias_name, bias) in itertools.product(
        routing_candidates(cfg, num_experts, top_k), bias_options
    ):
        if bias is not None and params.method == "topk_softmax":
            continue
        on_logits = (False, True) if bias is not None and params.method == "sigmoid_topk" else (False,)
        for bias_on_logits in on_logits:
            params = replace(params, bias_on_logits=bias_on_logits)
            w, i = route(logits, params, bias)
            if matches(w, i, weight, index):
                spec = RoutingSpec(
                    params.method,
                    renormalize=params.renormalize,
                    scale=params.scale,
                    group=params.group,
                    n_group_key=gkey or "n_group",
                    renorm_eps=params.renorm_eps,
                    bias_on_logits=bias_on_logits,
                )
                return spec, bias_name
    raise DerivationError(
        "no candidate routing function (softmax/sigmoid/sqrt-softplus scores, top-k before or "
        "after normalisation, group-limited top-k, renormalised or not, scaling factors "
        f"{scale_values(cfg)}, correction biases {sorted(biases) or 'none'}) reproduces the "
        "top-k experts and weights the router handed to the experts"
    )


def capture_routing(model: nn.Module, layer_mod: nn.Module, blk: Block, top_k: int, ids: Tensor) -> dict[str, Tensor]:
    """Router logits and the experts' ``(top_k_index, top_k_weights)`` of one layer, from one pass."""
    block = layer_mod.get_submodule(blk.block)
    cap: dict[str, Tensor] = {}

    def router_hook(module, args, out):
        tensors = [out] if isinstance(out, Tensor) else [t for t in out if isinstance(t, Tensor)]
        logits = next((t for t in tensors if t.is_floating_point()), None)
        if logits is not None:
            cap["logits"] = logits.detach().reshape(-1, logits.shape[-1]).float()

    def experts_hook(module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
        weight = args[2] if len(args) > 2 else kwargs.get("top_k_weights")
        if index is not None and weight is not None:
            cap["index"] = index.detach().reshape(-1, top_k)
            cap["weight"] = weight.detach().reshape(-1, top_k).float()

    handles = [
        block.get_submodule(blk.router).register_forward_hook(router_hook),
        blk.experts.register_forward_pre_hook(experts_hook, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [k for k in ("logits", "index", "weight") if k not in cap]
    if missing:
        raise DerivationError(
            f"one forward pass did not show the router's logits and the "
            f"experts' (top_k_index, top_k_weights) call (missing: {missing}); the "
            "block does not route through its experts module"
        )
    return cap


def describe_routing(routing: RoutingSpec, bias: str | None) -> str:
    """The routing function in words, for a derived spec's description."""
    parts = [_METHOD_WORDS.get(routing.method, routing.method)]
    if bias:
        parts.append("correction bias for the choice")
    if routing.group:
        parts.append("group-limited")
    parts.append("renormalised" if routing.renormalize else "not renormalised")
    if routing.scale != 1.0:
        parts.append(f"x {routing.scale:g}")
    return ", ".join(parts)
