"""The layout of an experts module's tensors and its activation, found by calling the module.

Every token is sent to one expert, and candidate layouts (gate/up concatenated or interleaved,
transposed, biases, gate-less, per-expert Linear layers) and activations are tried until one
rebuilds the module's own output for every expert.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_utils.arch.activations import activation, plain_activations
from moe_utils.arch.spec import ExpertTensors, WeightFormat
from moe_utils.core.errors import DerivationError
from moe_utils.engine.canonical import MoELayerWeights
from moe_utils.engine.expert_math import _expert_out
from moe_utils.models.introspect import Block, linear_mlp
from moe_utils.models.weights import ModelSource, _experts

Tensor = torch.Tensor
_FALLBACK_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu2", "relu")


def expert_params(experts: nn.Module) -> dict[str, Tensor]:
    """The experts module's own (not nested) parameters."""
    return {n: p for n, p in experts.named_parameters() if "." not in n}


def _per_expert_layout(experts: nn.Module, prefix: str) -> ExpertTensors:
    """The layout of experts held as a list of gate/up/down Linear MLPs."""
    first = experts[0] if isinstance(experts, nn.ModuleList) else getattr(experts, "0", None)
    mlp = linear_mlp(first) if first is not None else None
    if mlp is None:
        raise DerivationError(
            f"the experts module {type(experts).__name__} holds neither fused "
            "3-D tensors nor per-expert gate/up/down Linear layers"
        )
    act, up, down = mlp
    return ExpertTensors(
        "per_expert",
        act=None if act is None else f"{prefix}.{{e}}.{act}.weight",
        up=f"{prefix}.{{e}}.{up}.weight",
        down=f"{prefix}.{{e}}.{down}.weight",
    )


def _fused_names(params: dict[str, Tensor], num_experts: int) -> tuple[str, str, str | None, str | None]:
    """(input projection, down projection, input bias, down bias) among fused expert tensors."""
    leading = {n: p.shape[0] for n, p in params.items() if p.dim() == 3}
    if len(set(leading.values())) > 1:
        raise DerivationError(
            f"the expert tensors hold different numbers of experts ({leading}): the extra ones "
            "are zero-computation (null) experts the router can pick, which have no weights to "
            "analyse; such families are refused"
        )
    three_d = {n: p for n, p in params.items() if p.dim() == 3 and p.shape[0] == num_experts}
    down_name = next((n for n in three_d if "down" in n or n in ("w2", "output_linear", "fc2")), None)
    in_names = [n for n in three_d if n != down_name]
    if down_name is None or len(in_names) != 1:
        raise DerivationError(
            f"could not tell the input and output projections apart among the expert tensors {sorted(params)}"
        )
    in_name = in_names[0]
    bias = {n: p for n, p in params.items() if p.dim() == 2 and p.shape[0] == num_experts}
    gate_up_bias = next((n for n in bias if n.startswith(in_name)), None)
    down_bias = next((n for n in bias if n.startswith(down_name)), None)
    return in_name, down_name, gate_up_bias, down_bias


def layout_candidates(experts: nn.Module, prefix: str, num_experts: int) -> list[ExpertTensors]:
    """Every layout the experts module's tensors could be stored in (one for per-expert MLPs)."""
    params = expert_params(experts)
    if isinstance(experts, nn.ModuleList) or not params:
        return [_per_expert_layout(experts, prefix)]
    in_name, down_name, gate_up_bias, down_bias = _fused_names(params, num_experts)
    has_gate = getattr(experts, "has_gate", True)
    out = []
    for in_t, down_t in ((False, False), (True, True), (False, True), (True, False)):
        for order in ("concat", "interleaved"):
            kwargs: dict[str, Any] = dict(
                down=f"{prefix}.{down_name}",
                in_transposed=in_t,
                down_transposed=down_t,
                gate_up_bias=None if gate_up_bias is None else f"{prefix}.{gate_up_bias}",
                down_bias=None if down_bias is None else f"{prefix}.{down_bias}",
            )
            if has_gate:
                out.append(ExpertTensors("fused", gate_up=f"{prefix}.{in_name}", order=order, **kwargs))
            elif order == "concat":
                out.append(ExpertTensors("fused", up=f"{prefix}.{in_name}", **kwargs))
    return out


def _known_activation(name: str) -> bool:
    try:
        activation(name)
        return True
    except ValueError:
        return False


def activation_candidates(experts: nn.Module, config: Any) -> list[str]:
    """Activation names to try: the config's, those equal to the module's ``act_fn``, then common ones."""
    names = []
    hidden_act = getattr(config, "hidden_act", None)
    if isinstance(hidden_act, str):
        names.append(hidden_act)
    act_fn = getattr(experts, "act_fn", None)
    probe = torch.linspace(-6, 6, 97)
    if act_fn is not None:
        with torch.no_grad():
            ref = act_fn(probe)
        names += [n for n, f in plain_activations().items() if torch.allclose(f(probe), ref, atol=1e-6)]
    alpha, limit = getattr(config, "swiglu_alpha", None), getattr(config, "swiglu_limit", None)
    if alpha is not None or limit is not None:
        names.append(f"gpt_oss_swiglu(alpha={alpha or 1.702},limit={limit or 7.0})")
    names += [n for n in _FALLBACK_ACTIVATIONS if n not in names]
    return list(dict.fromkeys(n.lower() for n in names if _known_activation(n)))


def _expert_references(blk: Block, x: Tensor, num_experts: int, top_k: int) -> list[Tensor]:
    """The experts module's output when every token goes to expert ``e`` alone, for each ``e``."""
    tokens = x.shape[0]
    index = torch.zeros(tokens, top_k, dtype=torch.long)
    weight = torch.zeros(tokens, top_k)
    weight[:, 0] = 1.0
    refs = []
    with torch.no_grad():
        for e in range(num_experts):
            idx = index.clone()
            idx[:, 0] = e
            idx[:, 1:] = (e + 1 + torch.arange(top_k - 1)) % num_experts
            try:
                out = blk.experts(x, idx, weight)
            except TypeError as exc:
                raise DerivationError(
                    f"{type(blk.experts).__name__} is not called as experts(hidden_states, "
                    f"top_k_index, top_k_weights) ({exc}); its experts cannot be evaluated one by "
                    "one from outside the block"
                ) from exc
            if not isinstance(out, Tensor):
                raise DerivationError(
                    f"{type(blk.experts).__name__} returns {type(out).__name__}, not the combined expert output"
                )
            refs.append(out.float())
    return refs


def _reproduces(w: MoELayerWeights, x: Tensor, refs: list[Tensor]) -> bool:
    """Whether the canonical weights ``w`` give every expert's reference output."""
    try:
        with torch.no_grad():
            return all(torch.allclose(_expert_out(w, x, e), ref, rtol=1e-4, atol=1e-6) for e, ref in enumerate(refs))
    except RuntimeError:
        return False


def fit_experts(
    model: nn.Module, layer_prefix: str, blk: Block, layer: int, config: Any, num_experts: int, top_k: int, hidden: int
) -> tuple[ExpertTensors, str]:
    """Expert tensor layout and activation that reproduce the experts module's own output."""
    x = torch.randn(11, hidden, generator=torch.Generator().manual_seed(1))
    refs = _expert_references(blk, x, num_experts, top_k)
    if getattr(blk.experts, "has_post_expert_norm", False):
        raise DerivationError(
            "each expert's output passes through its own norm "
            "(has_post_expert_norm); expert outputs cannot be computed from the "
            "gate/up/down weights alone"
        )
    src = ModelSource(model)
    fmt = WeightFormat("memory", layer_prefix=layer_prefix)
    tried = []
    for layout in layout_candidates(blk.experts, f"{blk.block}.experts", num_experts):
        try:
            tensors = _experts(src, fmt, layer, layout, torch.float32, num_experts)
        except Exception:
            continue
        w_up, w_down = tensors["w_up"], tensors["w_down"]
        if w_up is None or w_down is None:  # every layout names both; no candidate without them
            continue
        for act in activation_candidates(blk.experts, config):
            w = MoELayerWeights(
                layer=layer,
                router=torch.zeros(num_experts, hidden),
                activation=act,
                w_act=tensors["w_act"],
                w_up=w_up,
                w_down=w_down,
                b_act=tensors["b_act"],
                b_up=tensors["b_up"],
                b_down=tensors["b_down"],
            )
            tried.append(act)
            if _reproduces(w, x, refs):
                return layout, act
    raise DerivationError(
        f"no expert formula down(act(gate)*up) reproduces the output of "
        f"{type(blk.experts).__name__} (tried layouts of "
        f"{sorted(expert_params(blk.experts))} with activations "
        f"{sorted(set(tried))})"
    )
