"""Routing functions, written to match what each family's router computes.

``route(logits, params)`` recomputes ``(top_k_weight, top_k_index)`` from captured router
logits, given a model's concrete :class:`~moe_utils.arch.facts.RouteParams` (resolved once with
its other facts: ``LoadedModel.facts.routing``). Everything runs in float32 (the routers of
every supported family compute their softmax/sigmoid in float32 or are fp32 models in the tests).
"""

from __future__ import annotations

import torch

from moe_utils.arch.facts import RouteParams, route_params
from moe_utils.core.errors import ArgumentError

Tensor = torch.Tensor


def _group_mask(choice: Tensor, p: RouteParams) -> Tensor:
    """Boolean [N,E] mask of experts inside the ``topk_group`` best groups."""
    n, e = choice.shape
    grouped = choice.view(n, p.n_group, e // p.n_group)
    if p.group == "max":
        group_scores = grouped.max(dim=-1).values
    else:  # "top2_sum"
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    group_idx = torch.topk(group_scores, k=p.topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return mask.unsqueeze(-1).expand(n, p.n_group, e // p.n_group).reshape(n, e)


def _sparsemixer(logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """PhiMoE's eval-mode sparsemixer: two sequential picks, each a masked softmax."""
    top1, idx1 = logits.max(dim=-1, keepdim=True)
    factor = logits.abs().clamp(min=top1)
    masked = logits.masked_fill(((top1 - logits) / factor) > 2 * eps, float("-inf"))
    w1 = torch.softmax(masked, dim=-1).gather(-1, idx1)
    rest = torch.scatter(logits, -1, idx1, float("-inf"))
    top2, idx2 = rest.max(dim=-1, keepdim=True)
    factor = logits.abs().clamp(min=top2)
    masked2 = rest.masked_fill(((top2 - logits) / factor) > 2 * eps, float("-inf"))
    w2 = torch.softmax(masked2, dim=-1).gather(-1, idx2)
    return torch.cat([w1, w2], dim=-1), torch.cat([idx1, idx2], dim=-1)


def route(logits: Tensor, params: RouteParams, correction_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k weights [N,k] and expert indices [N,k] that the model computes from ``logits`` [N,E].

    ``correction_bias`` [E] (DeepSeek-V3-style) shifts the scores used for the choice only.
    """
    logits = logits.float()
    k = params.top_k
    if params.method == "softmax_topk":
        scores = torch.softmax(logits, dim=-1)
        if params.group:
            scores = scores.masked_fill(~_group_mask(scores, params), 0.0)
        if correction_bias is not None:  # ERNIE-4.5: the bias shifts the choice only
            choice = scores + correction_bias.float().reshape(-1).to(scores.device)
            index = torch.topk(choice, k, dim=-1).indices
            weight = scores.gather(1, index)
        else:
            weight, index = torch.topk(scores, k, dim=-1)
        if params.renormalize:
            denom = (
                weight.norm(p=params.norm_p, dim=-1, keepdim=True)
                if params.norm_p != 1.0
                else weight.sum(dim=-1, keepdim=True)
            )
            weight = weight / (denom + params.renorm_eps)
        return weight * params.scale, index
    if params.method == "topk_softmax":
        top, index = torch.topk(logits, k, dim=-1)
        return torch.softmax(top, dim=-1), index
    if params.method in ("sigmoid_topk", "sqrtsoftplus_topk"):
        scores = (
            torch.sigmoid(logits)
            if params.method == "sigmoid_topk"
            else torch.sqrt(torch.nn.functional.softplus(logits))
        )
        base = logits if params.bias_on_logits else scores  # Kolibri adds it to the logits
        choice = scores if correction_bias is None else base + correction_bias.float().reshape(-1).to(scores.device)
        if params.group:
            choice = choice.masked_fill(~_group_mask(choice, params), float("-inf"))
        index = torch.topk(choice, k, dim=-1).indices
        weight = scores.gather(1, index)
        if params.renormalize:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + params.renorm_eps)
        return weight * params.scale, index
    if params.method == "topk_sigmoid_input":
        top, index = torch.topk(logits, k, dim=-1)
        return torch.sigmoid(top), index
    if params.method == "sparsemixer":
        return _sparsemixer(logits, params.jitter_eps)
    raise ArgumentError(f"unknown routing method {params.method!r}")


__all__ = ["RouteParams", "route", "route_params"]
