"""Routing functions, written to match what each family's router computes.

``route_params(spec, config)`` turns a family's declarative :class:`RoutingSpec` into concrete
numbers; ``route(logits, params)`` recomputes ``(top_k_weight, top_k_index)`` from captured router
logits. Everything runs in float32 (the routers of every supported family compute their
softmax/sigmoid in float32 or are fp32 models in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from moe_utils.arch.config import config_dict, get_path, is_missing
from moe_utils.arch.spec import FamilySpec

Tensor = torch.Tensor


@dataclass(frozen=True)
class RouteParams:
    """Concrete routing parameters of one model (see RoutingSpec for the methods)."""

    method: Literal["softmax_topk", "topk_softmax", "sigmoid_topk", "topk_sigmoid_input",
                    "sparsemixer", "sqrtsoftplus_topk"]
    num_experts: int
    top_k: int
    renormalize: bool = False
    norm_p: float = 1.0
    scale: float = 1.0
    group: Literal["max", "top2_sum"] | None = None
    n_group: int = 1
    topk_group: int = 1
    jitter_eps: float = 0.0
    renorm_eps: float = 0.0
    routed_output_scale: float = 1.0
    shared_output_scale: float = 1.0
    bias_on_logits: bool = False

    @property
    def scales_input(self) -> bool:
        """True when the routing weight multiplies the expert input, not its output (Llama4)."""
        return self.method == "topk_sigmoid_input"


def route_params(spec: FamilySpec, config: Any) -> RouteParams:
    """Resolve a family's RoutingSpec against a config (dict or PretrainedConfig)."""
    cfg = config_dict(config)
    rs = spec.routing
    if rs is None:
        raise ValueError(f"{spec.name} is a dense family; it has no routing function")

    def value(key: str | None, fallback: Any) -> Any:
        if key is None:
            return fallback
        got = get_path(cfg, key)
        if is_missing(got):
            return spec.defaults.get(key, fallback)
        return got

    renormalize = bool(value(rs.renormalize_key, rs.renormalize))
    norm_p = 1.0
    if rs.norm_p_key:
        raw_p = value(rs.norm_p_key, 1.0)
        # DBRX: an explicit null disables the normalisation entirely.
        explicit_null = _explicit_null(cfg, rs.norm_p_key)
        renormalize = renormalize and not explicit_null
        norm_p = float(raw_p)
    group = rs.group
    if group and rs.group_when is not None:
        key, wanted = rs.group_when
        if value(key, None) != wanted:
            group = None
    n_group = int(value(rs.n_group_key, 1)) if group else 1
    topk_group = int(value(rs.topk_group_key, n_group)) if group else 1
    return RouteParams(
        method=rs.method,
        num_experts=spec.num_experts(cfg),
        top_k=spec.top_k(cfg),
        renormalize=renormalize,
        norm_p=norm_p,
        scale=float(value(rs.scale_key, rs.scale)),
        group=group,
        n_group=n_group,
        topk_group=topk_group,
        jitter_eps=float(value(rs.jitter_key, 0.0)),
        renorm_eps=rs.renorm_eps,
        routed_output_scale=rs.routed_output_scale,
        shared_output_scale=rs.shared_output_scale,
        bias_on_logits=rs.bias_on_logits,
    )


def _explicit_null(cfg: dict, dotted: str) -> bool:
    node: Any = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict) and parts[-1] in node and node[parts[-1]] is None


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


def route(logits: Tensor, params: RouteParams,
          correction_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k weights [N,k] and expert indices [N,k] that the model computes from ``logits`` [N,E].

    ``correction_bias`` [E] (DeepSeek-V3-style) shifts the scores used for the choice only.
    """
    logits = logits.float()
    k = params.top_k
    if params.method == "softmax_topk":
        scores = torch.softmax(logits, dim=-1)
        if params.group:
            scores = scores.masked_fill(~_group_mask(scores, params), 0.0)
        if correction_bias is not None:   # ERNIE-4.5: the bias shifts the choice only
            choice = scores + correction_bias.float().reshape(-1).to(scores.device)
            index = torch.topk(choice, k, dim=-1).indices
            weight = scores.gather(1, index)
        else:
            weight, index = torch.topk(scores, k, dim=-1)
        if params.renormalize:
            denom = weight.norm(p=params.norm_p, dim=-1, keepdim=True) if params.norm_p != 1.0 \
                else weight.sum(dim=-1, keepdim=True)
            weight = weight / (denom + params.renorm_eps)
        return weight * params.scale, index
    if params.method == "topk_softmax":
        top, index = torch.topk(logits, k, dim=-1)
        return torch.softmax(top, dim=-1), index
    if params.method in ("sigmoid_topk", "sqrtsoftplus_topk"):
        scores = (torch.sigmoid(logits) if params.method == "sigmoid_topk"
                  else torch.sqrt(torch.nn.functional.softplus(logits)))
        base = logits if params.bias_on_logits else scores   # Kolibri adds it to the logits
        choice = scores if correction_bias is None else \
            base + correction_bias.float().reshape(-1).to(scores.device)
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
    raise ValueError(f"unknown routing method {params.method!r}")
