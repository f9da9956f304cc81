"""Where the parts of an MoE model sit, found by walking the modules transformers builds.

Used by the spec derivation (:mod:`moe_utils.models.derive`): the decoder layers, the MoE block of
each layer (the parent of a module named ``experts``), its router (the block child holding an
``[E, H]`` weight), shared experts and their gate, correction-bias candidates, dense MLPs, and the
config values (experts, top-k) under their aliases.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_utils.arch.spec import MLPTensors
from moe_utils.core.errors import DerivationError
from moe_utils.models.random_models import build_model

_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "moe_top_k", "top_k_experts")
_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def skeleton(config: Any) -> nn.Module:
    """The model of ``config`` on the meta device (structure only, nothing allocated)."""
    with torch.device("meta"):
        return build_model(config)


def decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the ModuleList of ``num_layers`` entries, else the longest list
    named ``layers``/``blocks`` (LongCat-Flash counts two sub-layers per decoder layer)."""
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and name]
    exact = [(n, m) for n, m in lists if len(m) == num_layers]
    exact.sort(key=lambda item: (not item[0].endswith(("layers", "blocks", "h")), item[0].count(".")))
    if exact:
        return exact[0]
    named = sorted(
        ((n, m) for n, m in lists if n.endswith(("layers", "blocks"))),
        key=lambda item: (-len(item[1]), item[0].count(".")),
    )
    if not named:
        raise DerivationError(f"no list of {num_layers} decoder layers found in {type(model).__name__}")
    return named[0]


def experts_in(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """Path and module of the routed experts of a decoder layer (None for a dense layer)."""
    for name, mod in layer.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last == "experts" and "shared" not in name:
            return name, mod
    return None


def experts_of(layer: nn.Module) -> tuple[str, nn.Module]:
    """:func:`experts_in` for a layer known to hold experts (raises otherwise)."""
    found = experts_in(layer)
    if found is None:
        raise DerivationError(f"no experts module in the decoder layer {type(layer).__name__}")
    return found


def moe_layer_indices(model: nn.Module, num_layers: int) -> tuple[str, list[int]]:
    """Path of the decoder layers and the indices of layers holding an experts module."""
    path, layers = decoder_layers(model, num_layers)
    return path, [i for i, layer in enumerate(layers) if experts_in(layer) is not None]


@dataclass
class Block:
    """Where the parts of one MoE block live (paths relative to the decoder layer)."""

    block: str
    experts: nn.Module
    router: str
    router_weight: str
    router_bias: str | None
    bias_candidates: list[str]
    shared: str | None
    shared_names: MLPTensors | None
    shared_gate: str | None


def linear_mlp(mod: nn.Module) -> tuple[str | None, str, str] | None:
    """Names of the (gate, up, down) Linear children of an MLP; gate None for gate-less MLPs."""
    children = dict(mod.named_children())
    for act, up, down in _MLP_NAMES:
        if all(isinstance(children.get(n), nn.Linear) for n in (act, up, down)):
            return act, up, down
    for _, up, down in _MLP_NAMES:
        if (
            all(isinstance(children.get(n), nn.Linear) for n in (up, down))
            and sum(isinstance(c, nn.Linear) for c in children.values()) == 2
        ):
            return None, up, down
    return None


def weight_names(prefix: str, mlp: tuple[str | None, str, str]) -> MLPTensors:
    """The weight names of an MLP whose (gate, up, down) children are ``mlp``, under ``prefix``."""
    act, up, down = mlp
    return MLPTensors(
        None if act is None else f"{prefix}.{act}.weight", f"{prefix}.{up}.weight", f"{prefix}.{down}.weight"
    )


def _has_weights(mod: nn.Module) -> bool:
    """Whether ``mod`` holds any weight (a shared-expert MLP of width 0 holds none)."""
    return any(p.numel() for p in mod.parameters())


def _router(block: nn.Module, block_path: str, num_experts: int, hidden: int) -> tuple[str, str, str | None] | None:
    """(child, weight name, full bias name or None) of the first child holding an ``[>=E, H]`` weight."""
    for name, child in block.named_children():
        if name == "experts" or (linear_mlp(child) is not None and "shared" in name):
            continue
        if isinstance(child, nn.Linear) and child.out_features == 1 and "shared" in name:
            continue
        for pname, param in child.named_parameters():
            if (
                param.dim() == 2
                and param.shape[1] == hidden
                and param.shape[0] >= num_experts
                and pname.endswith("weight")
            ):
                owner = child.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else child
                bias = None
                if isinstance(owner, nn.Linear) and owner.bias is not None:
                    bias = f"{block_path}.{name}.{pname[: -len('weight')]}bias"
                return name, pname, bias
    return None


def _bias_candidates(block: nn.Module, block_path: str, num_experts: int, skip: str | None) -> list[str]:
    """Block parameters and buffers named like a bias with one value per expert (correction biases)."""
    candidates = []
    for pname, t in itertools.chain(block.named_parameters(), block.named_buffers()):
        full = f"{block_path}.{pname}"
        if pname.startswith("experts.") or full == skip or "bias" not in pname.rsplit(".", 1)[-1]:
            continue
        if t.numel() == num_experts:
            candidates.append(full)
    return candidates


def find_block(layer: nn.Module, num_experts: int, hidden: int) -> Block:
    """The parts of the MoE block of ``layer``: router, shared experts and gate, bias candidates."""
    experts_path, experts = experts_of(layer)
    block_path = experts_path.rsplit(".", 1)[0] if "." in experts_path else ""
    if not block_path:
        raise DerivationError(
            "the experts module sits directly in the decoder layer; the MoE block cannot be told apart from the layer"
        )
    block = layer.get_submodule(block_path)
    shared = shared_gate = None
    shared_names = None
    for name, child in block.named_children():
        mlp = linear_mlp(child) if name != "experts" else None
        if mlp is not None and "shared" in name and _has_weights(child):
            shared, shared_names = name, weight_names(f"{block_path}.{name}", mlp)
        elif isinstance(child, nn.Linear) and child.out_features == 1 and "shared" in name:
            shared_gate = name
    found = _router(block, block_path, num_experts, hidden)
    if found is None:
        raise DerivationError(
            f"no router (a weight of shape [{num_experts}, {hidden}]) found next to the experts in '{block_path}'"
        )
    router, router_weight, router_bias = found
    return Block(
        block_path,
        experts,
        router,
        router_weight,
        router_bias,
        _bias_candidates(block, block_path, num_experts, router_bias),
        shared,
        shared_names,
        None if shared_gate is None else f"{block_path}.{shared_gate}.weight",
    )


def dense_mlp(layers: nn.ModuleList, dense_layers: list[int], block: str) -> tuple[str | None, MLPTensors | None]:
    """Path and weight names of the MLP of the first dense layer that has a plain one."""
    for i in dense_layers:
        layer = layers[i]
        for name in (block, "mlp", "feed_forward", "mixer"):
            try:
                mod = layer.get_submodule(name)
            except AttributeError:
                continue
            mlp = linear_mlp(mod)
            if mlp is not None:
                return name, weight_names(name, mlp)
    return None, None


def config_attr(config: Any, name: str) -> Any:
    """A config attribute, or None (also for per-layer attributes with no global value)."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def count_experts(experts: nn.Module) -> int:
    """Number of routed experts an experts module holds."""
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    return max(p.shape[0] for p in experts.parameters() if p.dim() == 3)


def top_k_of(config: Any) -> int:
    """Experts per token, under whichever alias the config uses."""
    for key in _TOP_K_KEYS:
        value = config_attr(config, key)
        if isinstance(value, int):
            return value
    raise DerivationError("the config names no number of experts per token (num_experts_per_tok or an alias)")


def num_experts_of(config: Any, fallback: int) -> int:
    """Routed experts per layer, under whichever alias the config uses (``fallback`` if none)."""
    for key in _NUM_EXPERTS_KEYS:
        value = config_attr(config, key)
        if isinstance(value, int):
            return value
    return fallback


def is_param(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a parameter (not a buffer) of ``model``."""
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def param_or_buffer(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``model``."""
    return model.get_parameter(name) if is_param(model, name) else model.get_buffer(name)
