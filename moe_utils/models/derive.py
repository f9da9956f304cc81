"""Derive a :class:`FamilySpec` for a transformers MoE family from the model transformers builds.

For a family without a hand-written spec, the spec is found by looking at models, not by reading
their code:

1. **Structure** -- a tiny random instance of the family (its config class, every size shrunk,
   the routing switches of the real config kept) is searched for the decoder layers, the MoE
   block of each layer (the parent of a module named ``experts``), the router (the block child
   holding an ``[E, H]`` weight), shared experts and their sigmoid gate, correction-bias
   buffers, dense MLPs. Which layers are MoE is read from the meta-device skeleton of the real
   config (no memory is allocated), so the layer pattern is the real model's.
2. **Experts** -- the layout of the fused tensors (gate/up concatenated or interleaved,
   transposed, biases, gate-less) and the activation are chosen by calling the experts module
   itself with every token sent to one expert and matching candidate formulas to its output.
3. **Routing** -- one forward pass records the router logits and the ``(top_k_index,
   top_k_weights)`` handed to the experts; candidate routing functions (softmax then top-k,
   top-k then softmax, sigmoid with correction bias, group-limited top-k, renormalised or not,
   scaling factors from the config) are tried until one gives the same top-k sets and weights.
4. **On-disk names** -- the tiny model is saved with ``save_pretrained`` (original per-expert
   naming) and each saved tensor is matched by value to the canonical weights, giving the disk
   naming scheme the weight analyses stream without building the model.
5. **Acceptance** -- the single-pass trace of the tiny model must rebuild every MoE block's
   output with relative error at most 1e-5 and identical top-k sets, and the weights streamed
   from the saved folder must equal the model's. Otherwise :class:`DerivationError` says what
   could not be matched.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from moe_utils.arch import Derivation
from moe_utils.arch.activations import _PLAIN, activation
from moe_utils.arch.catalogue import multimodal_parent
from moe_utils.arch.config import config_dict
from moe_utils.arch.spec import (
    ConfigKeys,
    ExpertTensors,
    FamilySpec,
    LayerRule,
    MLPTensors,
    ModulePaths,
    MoETensors,
    RouterCapture,
    RoutingSpec,
    WeightFormat,
)
from moe_utils.arch.tiny import tiny_config, tiny_config_dict
from moe_utils.core import paths
from moe_utils.core.errors import DerivationError, UnknownFamilyError
from moe_utils.engine.canonical import MoELayerWeights
from moe_utils.engine.expert_math import _expert_out, apply_experts, shared_expert_output
from moe_utils.engine.routing import RouteParams, route
from moe_utils.models.loading import LoadedModel
from moe_utils.models.random_models import build_model, byte_tokenizer, config_class_for
from moe_utils.models.trace import _recompute_routing, trace, verify_trace
from moe_utils.models.weights import ModelSource, _experts, layer_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Tensor = torch.Tensor
TOLERANCE = 1e-5
_LOCAL_LAYERS = "_derived_moe_layers"
_E_KEY, _K_KEY, _N_KEY = "_derived_num_experts", "_derived_top_k", "_derived_num_layers"
_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _skeleton(config) -> nn.Module:
    """The model of ``config`` on the meta device (structure only, nothing allocated)."""
    with torch.device("meta"):
        return build_model(config)


# ---- structure ---------------------------------------------------------------------------------
def _layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
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


def _experts_in(layer: nn.Module) -> tuple[str, nn.Module] | None:
    for name, mod in layer.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last == "experts" and "shared" not in name:
            return name, mod
    return None


def _experts_of(layer: nn.Module) -> tuple[str, nn.Module]:
    """:func:`_experts_in` for a layer known to hold experts (raises otherwise)."""
    found = _experts_in(layer)
    if found is None:
        raise DerivationError(f"no experts module in the decoder layer {type(layer).__name__}")
    return found


def moe_layer_indices(model: nn.Module, num_layers: int) -> tuple[str, list[int]]:
    """Path of the decoder layers and the indices of layers holding an experts module."""
    path, layers = _layers(model, num_layers)
    return path, [i for i, layer in enumerate(layers) if _experts_in(layer) is not None]


@dataclass
class _Block:
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


def _linear_mlp(mod: nn.Module) -> tuple[str | None, str, str] | None:
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


def _weight_names(prefix: str, mlp: tuple[str | None, str, str]) -> MLPTensors:
    act, up, down = mlp
    return MLPTensors(
        None if act is None else f"{prefix}.{act}.weight", f"{prefix}.{up}.weight", f"{prefix}.{down}.weight"
    )


def _block(layer: nn.Module, num_experts: int, hidden: int) -> _Block:
    experts_path, experts = _experts_of(layer)
    block_path = experts_path.rsplit(".", 1)[0] if "." in experts_path else ""
    if not block_path:
        raise DerivationError(
            "the experts module sits directly in the decoder layer; the MoE block cannot be told apart from the layer"
        )
    block = layer.get_submodule(block_path)
    router = router_weight = router_bias = shared = shared_gate = None
    shared_names = None
    for name, child in block.named_children():
        if name == "experts":
            continue
        mlp = _linear_mlp(child)
        if mlp is not None and "shared" in name:
            shared = name
            shared_names = _weight_names(f"{block_path}.{name}", mlp)
            continue
        if isinstance(child, nn.Linear) and child.out_features == 1 and "shared" in name:
            shared_gate = name
            continue
        for pname, param in child.named_parameters():
            if (
                router is None
                and param.dim() == 2
                and param.shape[1] == hidden
                and param.shape[0] >= num_experts
                and pname.endswith("weight")
            ):
                router, router_weight = name, pname
                owner = child.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else child
                if isinstance(owner, nn.Linear) and owner.bias is not None:
                    router_bias = f"{block_path}.{name}.{pname[: -len('weight')]}bias"
    if router is None or router_weight is None:
        raise DerivationError(
            f"no router (a weight of shape [{num_experts}, {hidden}]) found next to the experts in '{block_path}'"
        )
    candidates = []
    skip = {router_bias}
    for pname, t in itertools.chain(block.named_parameters(), block.named_buffers()):
        full = f"{block_path}.{pname}"
        if pname.startswith("experts.") or full in skip or "bias" not in pname.rsplit(".", 1)[-1]:
            continue
        if t.numel() == num_experts or t.numel() == num_experts + 0:
            candidates.append(full)
    return _Block(
        block_path,
        experts,
        router,
        router_weight,
        router_bias,
        candidates,
        shared,
        shared_names,
        None if shared_gate is None else f"{block_path}.{shared_gate}.weight",
    )


# ---- experts layout ----------------------------------------------------------------------------
def _expert_params(experts: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in experts.named_parameters() if "." not in n}


def _layout_candidates(experts: nn.Module, prefix: str, num_experts: int) -> list[ExpertTensors]:
    params = _expert_params(experts)
    if isinstance(experts, nn.ModuleList) or not params:
        first = experts[0] if isinstance(experts, nn.ModuleList) else getattr(experts, "0", None)
        mlp = _linear_mlp(first) if first is not None else None
        if mlp is None:
            raise DerivationError(
                f"the experts module {type(experts).__name__} holds neither fused "
                "3-D tensors nor per-expert gate/up/down Linear layers"
            )
        act, up, down = mlp
        return [
            ExpertTensors(
                "per_expert",
                act=None if act is None else f"{prefix}.{{e}}.{act}.weight",
                up=f"{prefix}.{{e}}.{up}.weight",
                down=f"{prefix}.{{e}}.{down}.weight",
            )
        ]
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
            else:
                if order == "interleaved":
                    continue
                out.append(ExpertTensors("fused", up=f"{prefix}.{in_name}", **kwargs))
    return out


def _activation_candidates(experts: nn.Module, config) -> list[str]:
    names = []
    hidden_act = getattr(config, "hidden_act", None)
    if isinstance(hidden_act, str):
        names.append(hidden_act)
    act_fn = getattr(experts, "act_fn", None)
    probe = torch.linspace(-6, 6, 97)
    if act_fn is not None:
        with torch.no_grad():
            ref = act_fn(probe)
        names += [n for n, f in _PLAIN.items() if torch.allclose(f(probe), ref, atol=1e-6)]
    alpha, limit = getattr(config, "swiglu_alpha", None), getattr(config, "swiglu_limit", None)
    if alpha is not None or limit is not None:
        names.append(f"gpt_oss_swiglu(alpha={alpha or 1.702},limit={limit or 7.0})")
    names += [n for n in ("silu", "gelu", "gelu_pytorch_tanh", "relu2", "relu") if n not in names]
    return list(dict.fromkeys(n.lower() for n in names if _known_activation(n)))


def _known_activation(name: str) -> bool:
    try:
        activation(name)
        return True
    except ValueError:
        return False


def _fit_experts(
    model: nn.Module, layer_prefix: str, blk: _Block, layer: int, config, num_experts: int, top_k: int, hidden: int
) -> tuple[ExpertTensors, str]:
    """Expert tensor layout and activation that reproduce the experts module's own output."""
    src = ModelSource(model)
    x = torch.randn(11, hidden, generator=torch.Generator().manual_seed(1))
    index = torch.zeros(11, top_k, dtype=torch.long)
    weight = torch.zeros(11, top_k)
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
    if getattr(blk.experts, "has_post_expert_norm", False):
        raise DerivationError(
            "each expert's output passes through its own norm "
            "(has_post_expert_norm); expert outputs cannot be computed from the "
            "gate/up/down weights alone"
        )
    fmt = WeightFormat("memory", layer_prefix=layer_prefix)
    tried = []
    for layout in _layout_candidates(blk.experts, f"{blk.block}.experts", num_experts):
        try:
            tensors = _experts(src, fmt, layer, layout, torch.float32, num_experts)
        except Exception:
            continue
        w_up, w_down = tensors["w_up"], tensors["w_down"]
        if w_up is None or w_down is None:  # every layout names both; no candidate without them
            continue
        for act in _activation_candidates(blk.experts, config):
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
            try:
                with torch.no_grad():
                    ok = all(
                        torch.allclose(_expert_out(w, x, e), refs[e], rtol=1e-4, atol=1e-6) for e in range(num_experts)
                    )
            except RuntimeError:
                ok = False
            tried.append(act)
            if ok:
                return layout, act
    raise DerivationError(
        f"no expert formula down(act(gate)*up) reproduces the output of "
        f"{type(blk.experts).__name__} (tried layouts of "
        f"{sorted(_expert_params(blk.experts))} with activations "
        f"{sorted(set(tried))})"
    )


# ---- routing -----------------------------------------------------------------------------------
def _scale_values(cfg: dict) -> list[float]:
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


def _group_key(cfg: dict) -> str | None:
    for key in ("n_group", "num_expert_group", "moe_n_group"):
        value = cfg.get(key)
        if isinstance(value, int) and value > 1:
            return key
    return None


def _routing_candidates(cfg: dict, num_experts: int, top_k: int):
    group_key = _group_key(cfg)
    groups: list[Literal["max", "top2_sum"] | None] = [None, "top2_sum", "max"] if group_key else [None]
    n_group = int(cfg[group_key]) if group_key else 1
    topk_group = int(cfg.get("topk_group") or n_group) if group_key else 1
    for method in ("softmax_topk", "topk_softmax", "sigmoid_topk", "sqrtsoftplus_topk"):
        for group in groups if method != "topk_softmax" else [None]:
            for renorm in (False, True) if method != "topk_softmax" else (False,):
                for scale in _scale_values(cfg):
                    yield (
                        RouteParams(
                            method=method,
                            num_experts=num_experts,
                            top_k=top_k,
                            renormalize=renorm,
                            scale=scale,
                            group=group,
                            n_group=n_group if group else 1,
                            topk_group=topk_group if group else 1,
                            renorm_eps=1e-20 if renorm else 0.0,
                        ),
                        group_key,
                    )


def _matches(weight: Tensor, index: Tensor, want_w: Tensor, want_i: Tensor) -> bool:
    oi, oj = index.argsort(-1), want_i.argsort(-1)
    if not torch.equal(index.gather(1, oi), want_i.gather(1, oj)):
        return False
    a, b = weight.float().gather(1, oi), want_w.float().gather(1, oj)
    return bool((a - b).abs().max() <= TOLERANCE * max(1.0, float(b.abs().max())))


def _fit_routing(
    cap: dict, cfg: dict, num_experts: int, top_k: int, biases: dict[str, Tensor]
) -> tuple[RoutingSpec, str | None]:
    logits, index, weight = cap["logits"], cap["index"], cap["weight"]
    if logits.shape[-1] != num_experts:
        raise DerivationError(
            f"the router scores {logits.shape[-1]} choices for {num_experts} "
            "experts (zero-computation or null experts); the extra choices "
            "have no weights to analyse"
        )
    bias_options = [(None, None)] + list(biases.items())
    for (params, group_key), (bias_name, bias) in itertools.product(
        _routing_candidates(cfg, num_experts, top_k), bias_options
    ):
        if bias is not None and params.method == "topk_softmax":
            continue
        on_logits = (False, True) if bias is not None and params.method == "sigmoid_topk" else (False,)
        for bias_on_logits in on_logits:
            params = replace(params, bias_on_logits=bias_on_logits)
            w, i = route(logits, params, bias)
            if _matches(w, i, weight, index):
                spec = RoutingSpec(
                    params.method,
                    renormalize=params.renormalize,
                    scale=params.scale,
                    group=params.group,
                    n_group_key=group_key or "n_group",
                    renorm_eps=params.renorm_eps,
                    bias_on_logits=bias_on_logits,
                )
                return spec, bias_name
    raise DerivationError(
        "no candidate routing function (softmax/sigmoid/sqrt-softplus scores, top-k before or "
        "after normalisation, group-limited top-k, renormalised or not, scaling factors "
        f"{_scale_values(cfg)}, correction biases {sorted(biases) or 'none'}) reproduces the "
        "top-k experts and weights the router handed to the experts"
    )


def _capture(
    model: nn.Module, layer_mod: nn.Module, blk: _Block, hidden: int, top_k: int, ids: Tensor
) -> dict[str, Tensor]:
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


# ---- on-disk names -----------------------------------------------------------------------------
def _required(t: Tensor | None, what: str) -> Tensor:
    if t is None:
        raise DerivationError(f"the in-memory experts have no {what} tensor")
    return t


def _disk_format(
    model: nn.Module, memory: WeightFormat, layer: int, num_experts: int, folder: Path
) -> WeightFormat | None:
    """The naming ``save_pretrained`` writes, matched by value to the in-memory tensors."""
    from safetensors import safe_open

    saved: dict[str, Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                saved[name] = f.get_tensor(name)
    src = ModelSource(model)
    mem_names = set(dict(model.state_dict()))
    moe = memory.moe
    if moe is None:
        raise DerivationError(f"the in-memory weight format of layer {layer} names no MoE tensors")
    rel_names = [
        moe.router,
        moe.correction_bias,
        moe.router_bias,
        moe.shared_gate,
        *(() if moe.shared is None else (moe.shared.act, moe.shared.up, moe.shared.down)),
    ]
    prefix = memory.layer_prefix.format(layer=layer)
    if all(prefix + r in saved for r in rel_names if r) and all(prefix + r in saved for r in _fused_names(moe.experts)):
        return None  # saved with the in-memory names
    canon = _experts(src, memory, layer, moe.experts, torch.float32, num_experts)
    layer_saved = {n: t for n, t in saved.items() if re.search(rf"\.{layer}\.", n)}

    def find(t: Tensor, what: str) -> str:
        hits = [n for n, s in layer_saved.items() if s.shape == t.shape and torch.equal(s.float(), t.float())]
        if not hits:
            raise DerivationError(f"save_pretrained wrote no tensor equal to the {what} of layer {layer}")
        return hits[0]

    def rel(name: str) -> tuple[str, str]:
        match = re.match(rf"^(.*?\.){layer}\.(.*)$", name)
        if match is None:
            raise DerivationError(f"the saved tensor {name} has no layer index {layer} in its name")
        return match[1] + "{layer}.", match[2]

    def template(t_all: Tensor, what: str) -> str:
        name0 = find(t_all[0], f"{what} of expert 0")
        _pre, r = rel(name0)
        tmpl = re.sub(r"\.0\.", ".{e}.", r, count=1)
        if tmpl == r:
            raise DerivationError(f"the saved {what} of expert 0 ({name0}) has no expert index")
        return tmpl

    def optional_template(t_all: Tensor | None, what: str) -> str | None:
        return None if t_all is None else template(t_all, what)

    router_name = find(src.get(prefix + moe.router), "router weight")
    layer_prefix, router_rel = rel(router_name)
    try:
        experts = ExpertTensors(
            "per_expert",
            act=optional_template(canon["w_act"], "gate projection"),
            up=optional_template(canon["w_up"], "up projection"),
            down=template(_required(canon["w_down"], "down projection"), "down projection"),
        )
    except DerivationError as per_expert_error:
        # fused on disk too, under other names (e.g. Granite's input_linear/output_linear)
        ex = moe.experts
        if ex.layout != "fused":
            raise
        names = {}
        for attr in ("gate_up", "act", "up", "down", "gate_up_bias", "down_bias"):
            value = getattr(ex, attr)
            if value is not None:
                try:
                    names[attr] = rel(find(src.get(prefix + value), f"fused {attr} tensor"))[1]
                except DerivationError:
                    raise per_expert_error from None
        experts = replace(ex, **names)
    optional = {}
    for key in ("correction_bias", "router_bias", "shared_gate"):
        value = getattr(moe, key)
        optional[key] = None if value is None else rel(find(src.get(prefix + value), key))[1]
    shared = None
    if moe.shared is not None:
        s = moe.shared

        def saved_rel(name: str) -> str:
            return rel(find(src.get(prefix + name), "shared expert"))[1]

        shared = MLPTensors(None if s.act is None else saved_rel(s.act), saved_rel(s.up), saved_rel(s.down))
    dense = memory.dense
    _ = mem_names
    return WeightFormat(
        "original",
        layer_prefix=layer_prefix,
        moe=MoETensors(router_rel, experts, shared=shared, **optional),
        dense=dense,
    )


def _fused_names(ex: ExpertTensors) -> list[str]:
    if ex.layout == "per_expert":
        return [n.format(e=0) for n in (ex.act, ex.up, ex.down) if n]
    return [n for n in (ex.gate_up, ex.act, ex.up, ex.down, ex.gate_up_bias, ex.down_bias) if n]


# ---- the derivation ----------------------------------------------------------------------------
def _randomise_biases(
    model: nn.Module, layer_path: str, moe_layers: list[int], names: list[str], seed: int = 0
) -> None:
    """Correction-bias buffers start at zero; give them small random values so that a routing
    function that ignores them can be told apart from one that uses them."""
    for layer in moe_layers:
        for rel in names:
            t = (
                model.get_parameter(f"{layer_path}.{layer}.{rel}")
                if _is_param(model, f"{layer_path}.{layer}.{rel}")
                else model.get_buffer(f"{layer_path}.{layer}.{rel}")
            )
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed + layer)) * 0.05)


def _is_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def _quirks(
    cfg: dict, routing: RoutingSpec, dense_layers: list[int], layer_types: set[str], mla: bool, bias: bool, shared: bool
) -> tuple[str, ...]:
    out = []
    kinds = layer_types - {"full_attention", "sliding_attention", "attention", "chunked_attention"}
    if kinds:
        out.append(
            f"hybrid stack: some layers are {', '.join(sorted(kinds))} instead of attention "
            "(only the MoE feed-forward blocks are analysed)"
        )
    if dense_layers:
        out.append(f"dense feed-forward layers {dense_layers} have no experts and are skipped")
    if mla:
        out.append("multi-head latent attention (MLA); it does not change the MoE analyses")
    if routing.method in ("sigmoid_topk", "sqrtsoftplus_topk"):
        out.append(
            "router scores are sigmoid-like, not a softmax: the paper's 'gate score' "
            "columns are a softmax over the router logits, which is not what picks experts"
        )
    if bias:
        out.append(
            "a bias-based balancing term shifts which experts are chosen, but not their "
            "weights; chosen experts are not always the highest-scoring ones"
        )
    if routing.group:
        out.append("group-limited routing: experts are first restricted to the best groups")
    if not routing.renormalize or routing.scale != 1.0:
        out.append(
            "the chosen experts' weights do not sum to 1" + (f" (x {routing.scale:g})" if routing.scale != 1.0 else "")
        )
    if shared:
        out.append("shared experts run on every token and are added to the routed output")
    return tuple(out)


def _cfg_key(cfg: dict) -> str:
    payload = json.dumps(
        {k: v for k, v in cfg.items() if k not in ("transformers_version",)}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


_CACHE: dict[str, FamilySpec] = {}


def derive_spec(config: Any, *, tiny: bool | None = None) -> FamilySpec:
    """The derived spec of a config (dict or PretrainedConfig); cached per config content.

    ``tiny=True`` means ``config`` is already tiny (built directly); otherwise its sizes are
    shrunk for the checks and its layer pattern is read from the meta-device skeleton. Accepted
    specs are also kept as JSON in the cache folder (see :func:`cache_dir`), keyed by the config,
    the transformers version and this code, so each notebook kernel does not derive again.
    """
    cfg = config_dict(config)
    key = _cfg_key({"config": cfg, "tiny": bool(tiny), "code": _code_version()})
    if key not in _CACHE:
        spec = _read_cached(key)
        if spec is None:
            spec = _derive(cfg, tiny)
            _write_cached(key, spec)
        _CACHE[key] = spec
    return _CACHE[key]


# ---- JSON cache of accepted specs ------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    import transformers

    package = Path(__file__).resolve().parents[1]
    parts = [transformers.__version__, torch.__version__]
    for path in (
        package / "models" / "derive.py",
        package / "arch" / "tiny.py",
        package / "arch" / "spec.py",
        package / "arch" / "facts.py",
        package / "engine" / "routing.py",
    ):
        parts.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where accepted derived specs are kept (``derived_specs`` in the package cache folder)."""
    return paths.cache_dir() / "derived_specs"


def spec_to_json(spec: FamilySpec) -> str:
    """A derived spec as JSON (plain data, read back by :func:`spec_from_json`)."""
    from dataclasses import asdict

    return json.dumps(asdict(spec), sort_keys=True)


def _mlp_tensors(d: dict | None) -> MLPTensors | None:
    return None if d is None else MLPTensors(**d)


def _weight_format(d: dict) -> WeightFormat:
    moe = d.get("moe")
    if moe is not None:
        moe = MoETensors(
            **{**moe, "experts": ExpertTensors(**moe["experts"]), "shared": _mlp_tensors(moe.get("shared"))}
        )
    return WeightFormat(d["name"], d["layer_prefix"], moe, _mlp_tensors(d.get("dense")))


def spec_from_json(text: str) -> FamilySpec:
    """Inverse of :func:`spec_to_json`."""
    d = json.loads(text)
    routing = d.get("routing")
    if routing is not None:
        routing = RoutingSpec(
            **{**routing, "group_when": None if routing.get("group_when") is None else tuple(routing["group_when"])}
        )
    return FamilySpec(
        **{
            **d,
            "model_types": tuple(d["model_types"]),
            "architectures": tuple(d["architectures"]),
            "detect_keys": tuple(d["detect_keys"]),
            "activation_keys": tuple(d["activation_keys"]),
            "quirks": tuple(d["quirks"]),
            "keys": ConfigKeys(**{k: tuple(v) for k, v in d["keys"].items()}),
            "layer_rule": LayerRule(**d["layer_rule"]),
            "modules": ModulePaths(**d["modules"]),
            "memory": _weight_format(d["memory"]),
            "disk": tuple(_weight_format(f) for f in d["disk"]),
            "routing": routing,
            "capture": RouterCapture(**d["capture"]),
        }
    )


def _read_cached(key: str) -> FamilySpec | None:
    path = cache_dir() / f"{key}.json"
    try:
        return spec_from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _write_cached(key: str, spec: FamilySpec) -> None:
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{id(spec)}.tmp"
        tmp.write_text(spec_to_json(spec))
        tmp.replace(folder / f"{key}.json")
    except OSError:
        pass  # a read-only home: derive again next time


def _derive(cfg: dict, tiny: bool | None) -> FamilySpec:
    model_type = cfg.get("model_type")
    if not model_type:
        raise UnknownFamilyError("the config has no model_type, so no spec can be derived")
    cls = config_class_for(model_type)
    clean = {
        k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "model_type", "auto_map")
    }
    defaults = cls()
    for key, value in clean.items():  # JSON turns tuples into lists; validators may insist
        if isinstance(value, list) and isinstance(_attr(defaults, key), tuple):
            clean[key] = tuple(value)
    try:
        try:  # from_dict decodes what to_dict encodes (e.g. infinities)
            real = cls.from_dict(clean)
        except Exception:
            real = cls(**clean)
    except Exception as exc:
        raise DerivationError(
            f"{cls.__name__} refuses this config ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    try:
        small = real if tiny else tiny_config(cls, base=cfg)
    except Exception as exc:
        raise DerivationError(
            f"no tiny {cls.__name__} could be made for the checks "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    model = build_model(small)
    layer_path, layers = _layers(model, int(small.num_hidden_layers))
    num_layers = len(layers)
    _, tiny_moe = moe_layer_indices(model, num_layers)
    if not tiny_moe:
        raise DerivationError(f"{model_type}: no decoder layer of the tiny model has an experts module")
    if tiny:
        real, real_moe, real_layers = small, tiny_moe, num_layers
    else:
        skeleton = _skeleton(real)
        real_layers = len(_layers(skeleton, int(real.num_hidden_layers))[1])
        _, real_moe = moe_layer_indices(skeleton, real_layers)
    hidden = int(small.hidden_size)
    first = tiny_moe[0]
    experts = _experts_of(layers[first])[1]
    num_experts = int(getattr(experts, "num_experts", 0) or _count_experts(experts))
    top_k = _top_k(small, cfg)
    blk = _block(layers[first], num_experts, hidden)
    for other in tiny_moe[1:]:
        if _experts_of(layers[other])[0].rsplit(".", 1)[0] != blk.block:
            raise DerivationError(f"{model_type}: MoE blocks sit at different paths in different layers")
    _randomise_biases(model, layer_path, tiny_moe, blk.bias_candidates)
    layer_prefix = f"{layer_path}.{{layer}}."
    layout, act = _fit_experts(model, layer_prefix, blk, first, small, num_experts, top_k, hidden)
    ids = torch.randint(
        3, min(int(getattr(small, "vocab_size", 320)), 300), (1, 24), generator=torch.Generator().manual_seed(0)
    )
    cap = _capture(model, layers[first], blk, hidden, top_k, ids)
    prefix = f"{layer_path}.{first}."
    biases = {
        n: model.get_parameter(prefix + n).detach() if _is_param(model, prefix + n) else model.get_buffer(prefix + n)
        for n in blk.bias_candidates
    }
    routing, bias_name = _fit_routing(cap, small.to_dict(), num_experts, top_k, biases)
    dense_layers = [i for i in range(num_layers) if i not in tiny_moe]
    dense_path, dense_names = _dense(layers, dense_layers, blk.block)
    memory = WeightFormat(
        "memory",
        layer_prefix=layer_prefix,
        moe=MoETensors(
            f"{blk.block}.{blk.router}.{blk.router_weight}",
            layout,
            router_bias=blk.router_bias,
            correction_bias=bias_name,
            shared=blk.shared_names,
            shared_gate=blk.shared_gate,
        ),
        dense=dense_names,
    )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cast("PreTrainedModel", model).save_pretrained(tmp)  # build_model makes transformers models
            disk = _disk_format(model, memory, first, num_experts, Path(tmp))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    types = {str(t) for t in (_attr(real, "layer_types") or [])}
    quirks = _quirks(
        cfg,
        routing,
        [i for i in range(real_layers) if i not in real_moe],
        types,
        mla=_attr(real, "kv_lora_rank") is not None,
        bias=bias_name is not None,
        shared=blk.shared_names is not None,
    )
    spec = FamilySpec(
        name=model_type,
        model_types=(model_type,),
        architectures=(),
        description=f"derived from transformers' {type(model).__name__}: {_describe(routing, bias_name)}",
        keys=ConfigKeys(num_experts=(_E_KEY,), top_k=(_K_KEY,), num_layers=(_N_KEY,)),
        defaults={
            _LOCAL_LAYERS: list(real_moe),
            _E_KEY: _real_num_experts(real, cfg, num_experts),
            _K_KEY: _top_k(real, cfg),
            _N_KEY: real_layers,
        },
        layer_rule=LayerRule("listed", list_key=_LOCAL_LAYERS),
        modules=ModulePaths(
            layers=layer_path,
            block=blk.block,
            router=blk.router,
            router_weight=blk.router_weight,
            experts="experts",
            shared=None if blk.shared is None else blk.shared,
            shared_gate=None if blk.shared_gate is None else blk.shared_gate[len(blk.block) + 1 : -len(".weight")],
            dense_mlp=dense_path or blk.block,
        ),
        memory=memory,
        disk=() if disk is None else (disk,),
        activation=act,
        activation_keys=(),
        routing=routing,
        capture=RouterCapture("logits", experts_args=True),
        config_class=type(small).__name__,
        tiny_config={},
        derived=True,
        quirks=quirks,
    )
    tiny_spec = replace(
        spec, defaults={_LOCAL_LAYERS: list(tiny_moe), _E_KEY: num_experts, _K_KEY: top_k, _N_KEY: num_layers}
    )
    a, b = _fit_output_scales(tiny_spec, model, small)
    if (a, b) != (1.0, 1.0):
        routing = replace(routing, routed_output_scale=a, shared_output_scale=b)
        extra = (
            f"the block scales its routed output by {a:g}"
            + (f" and its shared-expert output by {b:g}" if blk.shared_names else "")
            + " after the experts ran",
        )
        spec = replace(spec, routing=routing, quirks=spec.quirks + extra)
        tiny_spec = replace(tiny_spec, routing=routing)
    _accept(tiny_spec, model, small)
    return spec


@functools.cache
def derive_family(model_type: str) -> FamilySpec:
    """The derived spec of ``model_type``'s tiny config (what ``random:MODEL_TYPE`` builds)."""
    cls = config_class_for(model_type)
    kwargs = tiny_config_dict(cls)
    try:
        small = cls(**kwargs)
    except Exception as exc:
        raise DerivationError(
            f"no tiny {cls.__name__} could be made ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    return replace(derive_spec(small, tiny=True), tiny_config=kwargs)


def spec_for_unknown(cfg: dict) -> FamilySpec:
    """Derive a spec for a config no hand-written spec matches, or explain why not."""
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UnknownFamilyError(f"model_type {model_type!r} is not part of the installed transformers")
    parent = multimodal_parent(model_type)
    if parent is not None:
        raise UnknownFamilyError(
            f"{model_type!r} is a multimodal model; the analyses run on its text decoder "
            f"({parent.model_type!r}, config class {parent.config_class}). Pass a checkpoint of "
            f"the text decoder alone, or try random:{parent.model_type}"
        )
    return derive_spec(cfg)


def _attr(config, name: str) -> Any:
    """A config attribute, or None (also for per-layer attributes with no global value)."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def _count_experts(experts: nn.Module) -> int:
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    return max(p.shape[0] for p in experts.parameters() if p.dim() == 3)


def _top_k(config, cfg: dict) -> int:
    for key in ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "moe_top_k", "top_k_experts"):
        value = _attr(config, key)
        if isinstance(value, int):
            return value
    raise DerivationError("the config names no number of experts per token (num_experts_per_tok or an alias)")


def _real_num_experts(real, cfg: dict, tiny_value: int) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = _attr(real, key)
        if isinstance(value, int):
            return value
    return tiny_value


def _dense(layers: nn.ModuleList, dense_layers: list[int], block: str) -> tuple[str | None, MLPTensors | None]:
    for i in dense_layers:
        layer = layers[i]
        for name in (block, "mlp", "feed_forward", "mixer"):
            try:
                mod = layer.get_submodule(name)
            except AttributeError:
                continue
            mlp = _linear_mlp(mod)
            if mlp is not None:
                return name, _weight_names(name, mlp)
    return None, None


def _describe(routing: RoutingSpec, bias: str | None) -> str:
    words = {
        "softmax_topk": "softmax then top-k",
        "topk_softmax": "top-k of the logits then softmax",
        "sigmoid_topk": "sigmoid scores then top-k",
        "sqrtsoftplus_topk": "sqrt-softplus scores then top-k",
    }
    parts = [words.get(routing.method, routing.method)]
    if bias:
        parts.append("correction bias for the choice")
    if routing.group:
        parts.append("group-limited")
    parts.append("renormalised" if routing.renormalize else "not renormalised")
    if routing.scale != 1.0:
        parts.append(f"x {routing.scale:g}")
    return ", ".join(parts)


def _tiny_lm(spec: FamilySpec, model: nn.Module, config):
    return LoadedModel(
        model=model,
        tokenizer=byte_tokenizer(),
        spec=spec,
        config=config,
        name=f"derived:{spec.name}",
        path=None,
        fingerprint="derived",
    )


def _probe_sequences(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(3, 259, (n,), generator=g).tolist() for n in (13, 6)]


def _nice(value: float) -> float:
    return float(f"{value:.6g}")


def _fit_output_scales(spec: FamilySpec, model: nn.Module, config) -> tuple[float, float]:
    """Constant factors (routed, shared) with block output = a*routed + b*shared, least squares.

    Cohere2-MoE can average routed and shared outputs (0.5, 0.5); some blocks apply the routed
    scaling factor after the experts instead of to the weights."""
    lm = _tiny_lm(spec, model, config)
    layer = lm.moe_layers[0]
    lt = trace(lm, _probe_sequences(4), layers=[layer])[layer]
    w = layer_weights(lm, layer)
    params, weight, index = _recompute_routing(lt, w, None)
    routed = apply_experts(w, lt.x, index, weight, scale_input=params.scales_input).reshape(-1)
    shared = shared_expert_output(w, lt.x)
    y = lt.block_output.reshape(-1).double()
    if shared is None:
        a = float((routed.double() @ y) / (routed.double() @ routed.double()).clamp_min(1e-30))
        return _nice(a), 1.0
    cols = torch.stack([routed.double(), shared.reshape(-1).double()], dim=1)
    a, b = torch.linalg.lstsq(cols, y.unsqueeze(1)).solution.reshape(-1).tolist()
    return _nice(a), _nice(b)


def _accept(spec: FamilySpec, model: nn.Module, config) -> None:
    """Refuse ``spec`` unless the trace rebuilds every MoE block of ``model`` (<= 1e-5)."""
    lm = _tiny_lm(spec, model, config)
    checks = verify_trace(lm, trace(lm, _probe_sequences(3), layers=lm.moe_layers))
    bad = [c for c in checks if not (c.max_rel_error <= TOLERANCE and c.indices_equal)]
    if bad:
        worst = max(bad, key=lambda c: c.max_rel_error)
        raise DerivationError(
            f"{spec.name}: the derived spec does not rebuild the MoE block output (layer "
            f"{worst.layer}: relative error {worst.max_rel_error:.2e}, top-k sets "
            f"{'equal' if worst.indices_equal else 'different'}); the block adds something the "
            "routed experts, shared experts and their gate do not explain (e.g. a norm after "
            "the experts)"
        )


def rebuild_errors(lm) -> dict[int, float]:
    """Largest relative rebuild error per MoE layer of a loaded model (for coverage reports)."""
    g = torch.Generator().manual_seed(5)
    seqs = [[0] + torch.randint(3, 259, (n,), generator=g).tolist() for n in (17, 9)]
    return {c.layer: (c.max_rel_error if c.indices_equal else float("inf")) for c in verify_trace(lm, trace(lm, seqs))}


# What moe_utils.models registers with arch, so that arch's lookups find derived specs too.
DERIVATION = Derivation(
    family=derive_family, config=spec_for_unknown, tiny_config=functools.partial(derive_spec, tiny=True)
)

__all__ = [
    "DERIVATION",
    "TOLERANCE",
    "DerivationError",
    "derive_family",
    "derive_spec",
    "moe_layer_indices",
    "rebuild_errors",
    "spec_for_unknown",
]
