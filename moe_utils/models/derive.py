"""Derive a :class:`FamilySpec` for a transformers MoE family from the model transformers builds.

For a family without a hand-written spec, the spec is found by looking at models, not by reading
their code:

1. **Structure** (:mod:`~moe_utils.models.introspect`) -- a tiny random instance of the family
   (its config class, every size shrunk, the routing switches and optional parts of the real
   config kept) is searched for the decoder layers, the MoE block of each layer, the router,
   shared experts and their gate, correction-bias candidates, dense MLPs. Which layers are MoE is
   read from the meta-device skeleton of the real config (no memory is allocated), so the layer
   pattern is the real model's.
2. **Experts** (:mod:`~moe_utils.models.expert_layouts`) -- the layout of the fused tensors and
   the activation, chosen by calling the experts module itself.
3. **Routing** (:mod:`~moe_utils.models.routing_candidates`) -- candidate routing functions are
   matched to the router logits and top-k choices of one forward pass.
4. **On-disk names** (:mod:`~moe_utils.models.disk_formats`) -- the tiny model is saved with
   ``save_pretrained`` and each saved tensor is matched by value to the canonical weights.
5. **Acceptance** -- the single-pass trace of the tiny model must rebuild every MoE block's
   output with relative error at most 1e-5 and identical top-k sets. Otherwise
   :class:`DerivationError` says what could not be matched.

Specs are kept in memory per config content (every key of the config, so two checkpoints that
differ in an optional part get their own spec), not on disk: deriving one takes 0.4 to 3 s on two
cores with little else running (the first in a process also pays for importing the model code),
too little to justify a disk cache whose key would have to cover every module and library the
derivation runs.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from moe_utils.arch.config import config_dict
from moe_utils.arch.spec import (
    ConfigKeys,
    ExpertTensors,
    FamilySpec,
    LayerRule,
    ModulePaths,
    MoETensors,
    RouterCapture,
    RoutingSpec,
    WeightFormat,
)
from moe_utils.arch.tiny import tiny_config, tiny_config_dict
from moe_utils.core.errors import DerivationError, UnknownFamilyError
from moe_utils.core.messages import first_line
from moe_utils.engine.expert_math import apply_experts, shared_expert_output
from moe_utils.models.disk_formats import disk_format
from moe_utils.models.expert_layouts import fit_experts
from moe_utils.models.introspect import (
    Block,
    config_attr,
    count_experts,
    decoder_layers,
    dense_mlp,
    experts_of,
    find_block,
    moe_layer_indices,
    num_experts_of,
    param_or_buffer,
    skeleton,
    top_k_of,
)
from moe_utils.models.loaded import LoadedModel
from moe_utils.models.random_models import build_model, byte_tokenizer, config_class_for
from moe_utils.models.routing_candidates import TOLERANCE, capture_routing, describe_routing, fit_routing
from moe_utils.models.trace import _recompute_routing, trace, verify_trace
from moe_utils.models.weights import layer_weights

_LOCAL_LAYERS = "_derived_moe_layers"
_E_KEY, _K_KEY, _N_KEY = "_derived_num_experts", "_derived_top_k", "_derived_num_layers"
_NOT_CONFIG = ("architectures", "transformers_version", "model_type", "auto_map")


@dataclass
class _Structure:
    """What the tiny model (and the real config's skeleton) showed about the family."""

    model: nn.Module
    small: Any  # the tiny config the model was built from
    real: Any  # the real config (the tiny one when deriving from a tiny config)
    layer_path: str
    layers: nn.ModuleList
    tiny_moe: list[int]
    real_moe: list[int]
    real_layers: int
    num_experts: int
    top_k: int
    blk: Block

    @property
    def first(self) -> int:
        return self.tiny_moe[0]

    @property
    def layer_prefix(self) -> str:
        return f"{self.layer_path}.{{layer}}."


def _config_object(cfg: dict) -> tuple[type, Any]:
    """The config class of ``cfg``'s model_type and ``cfg`` as an instance of it."""
    model_type = cfg.get("model_type")
    if not model_type:
        raise UnknownFamilyError("the config has no model_type, so no spec can be derived")
    cls = config_class_for(model_type)
    clean = {k: v for k, v in cfg.items() if k not in _NOT_CONFIG}
    defaults = cls()
    for key, value in clean.items():  # JSON turns tuples into lists; validators may insist
        if isinstance(value, list) and isinstance(config_attr(defaults, key), tuple):
            clean[key] = tuple(value)
    try:
        try:  # from_dict decodes what to_dict encodes (e.g. infinities)
            return cls, cls.from_dict(clean)
        except Exception:
            return cls, cls(**clean)
    except Exception as exc:
        raise DerivationError(f"{cls.__name__} refuses this config ({first_line(exc)})") from exc


def _structure(cfg: dict, tiny: bool | None) -> _Structure:
    """Build the tiny model of ``cfg`` and find its decoder layers, MoE layers and MoE block."""
    cls, real = _config_object(cfg)
    try:
        small = real if tiny else tiny_config(cls, base=cfg)
    except Exception as exc:
        raise DerivationError(f"no tiny {cls.__name__} could be made for the checks ({first_line(exc)})") from exc
    model = build_model(small)
    layer_path, layers = decoder_layers(model, int(small.num_hidden_layers))
    _, tiny_moe = moe_layer_indices(model, len(layers))
    if not tiny_moe:
        raise DerivationError(f"{cfg['model_type']}: no decoder layer of the tiny model has an experts module")
    if tiny:
        real, real_moe, real_layers = small, tiny_moe, len(layers)
    else:
        skel = skeleton(real)
        real_layers = len(decoder_layers(skel, int(real.num_hidden_layers))[1])
        _, real_moe = moe_layer_indices(skel, real_layers)
    experts = experts_of(layers[tiny_moe[0]])[1]
    num_experts = int(getattr(experts, "num_experts", 0) or count_experts(experts))
    blk = find_block(layers[tiny_moe[0]], num_experts, int(small.hidden_size))
    for other in tiny_moe[1:]:
        if experts_of(layers[other])[0].rsplit(".", 1)[0] != blk.block:
            raise DerivationError(f"{cfg['model_type']}: MoE blocks sit at different paths in different layers")
    return _Structure(
        model, small, real, layer_path, layers, tiny_moe, real_moe, real_layers, num_experts, top_k_of(small), blk
    )


def _randomise_biases(s: _Structure, seed: int = 0) -> None:
    """Correction-bias buffers start at zero; give them small random values so that a routing
    function that ignores them can be told apart from one that uses them."""
    for layer in s.tiny_moe:
        for rel in s.blk.bias_candidates:
            t = param_or_buffer(s.model, f"{s.layer_path}.{layer}.{rel}")
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed + layer)) * 0.05)


def _routing(s: _Structure) -> tuple[RoutingSpec, str | None]:
    """The routing spec of the first MoE layer, and the correction bias it uses."""
    vocab = min(int(getattr(s.small, "vocab_size", 320)), 300)
    ids = torch.randint(3, vocab, (1, 24), generator=torch.Generator().manual_seed(0))
    cap = capture_routing(s.model, s.layers[s.first], s.blk, s.top_k, ids)
    prefix = f"{s.layer_path}.{s.first}."
    biases = {n: param_or_buffer(s.model, prefix + n).detach() for n in s.blk.bias_candidates}
    return fit_routing(cap, s.small.to_dict(), s.num_experts, s.top_k, biases)


def _memory_format(s: _Structure, layout: ExpertTensors, bias_name: str | None) -> tuple[WeightFormat, str | None]:
    """The in-memory weight naming, and the path of the dense layers' MLP."""
    dense_layers = [i for i in range(len(s.layers)) if i not in s.tiny_moe]
    dense_path, dense_names = dense_mlp(s.layers, dense_layers, s.blk.block)
    blk = s.blk
    memory = WeightFormat(
        "memory",
        layer_prefix=s.layer_prefix,
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
    return memory, dense_path


def _quirks(s: _Structure, cfg: dict, routing: RoutingSpec, bias: bool) -> tuple[str, ...]:
    """What sets the family apart from Mixtral, in words, for the coverage page."""
    out = []
    layer_types = {str(t) for t in (config_attr(s.real, "layer_types") or [])}
    kinds = layer_types - {"full_attention", "sliding_attention", "attention", "chunked_attention"}
    if kinds:
        out.append(
            f"hybrid stack: some layers are {', '.join(sorted(kinds))} instead of attention "
            "(only the MoE feed-forward blocks are analysed)"
        )
    dense_layers = [i for i in range(s.real_layers) if i not in s.real_moe]
    if dense_layers:
        out.append(f"dense feed-forward layers {dense_layers} have no experts and are skipped")
    if config_attr(s.real, "kv_lora_rank") is not None:
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
    if s.blk.shared_names is not None:
        out.append("shared experts run on every token and are added to the routed output")
    return tuple(out)


def _assemble(
    s: _Structure,
    cfg: dict,
    memory: WeightFormat,
    dense_path: str | None,
    disk: WeightFormat | None,
    activation: str,
    routing: RoutingSpec,
    bias_name: str | None,
) -> FamilySpec:
    """The spec of the real config (its layer pattern, expert count and top-k)."""
    model_type = str(cfg["model_type"])
    blk = s.blk
    return FamilySpec(
        name=model_type,
        model_types=(model_type,),
        architectures=(),
        description=f"derived from transformers' {type(s.model).__name__}: {describe_routing(routing, bias_name)}",
        keys=ConfigKeys(num_experts=(_E_KEY,), top_k=(_K_KEY,), num_layers=(_N_KEY,)),
        defaults={
            _LOCAL_LAYERS: list(s.real_moe),
            _E_KEY: num_experts_of(s.real, s.num_experts),
            _K_KEY: top_k_of(s.real),
            _N_KEY: s.real_layers,
        },
        layer_rule=LayerRule("listed", list_key=_LOCAL_LAYERS),
        modules=ModulePaths(
            layers=s.layer_path,
            block=blk.block,
            router=blk.router,
            router_weight=blk.router_weight,
            experts="experts",
            shared=blk.shared,
            shared_gate=None if blk.shared_gate is None else blk.shared_gate[len(blk.block) + 1 : -len(".weight")],
            dense_mlp=dense_path or blk.block,
        ),
        memory=memory,
        disk=() if disk is None else (disk,),
        activation=activation,
        activation_keys=(),
        routing=routing,
        capture=RouterCapture("logits", experts_args=True),
        config_class=type(s.small).__name__,
        tiny_config={},
        derived=True,
        quirks=_quirks(s, cfg, routing, bias=bias_name is not None),
    )


def _tiny_spec(s: _Structure, spec: FamilySpec) -> FamilySpec:
    """``spec`` with the tiny model's layer pattern, expert count and top-k (for the checks)."""
    tiny_defaults = {_LOCAL_LAYERS: list(s.tiny_moe), _E_KEY: s.num_experts, _K_KEY: s.top_k, _N_KEY: len(s.layers)}
    return replace(spec, defaults=tiny_defaults)


def _tiny_lm(spec: FamilySpec, model: nn.Module, config: Any) -> LoadedModel:
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


def _fit_output_scales(spec: FamilySpec, model: nn.Module, config: Any) -> tuple[float, float]:
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


def _with_output_scales(s: _Structure, spec: FamilySpec, routing: RoutingSpec) -> FamilySpec:
    """``spec`` (whose routing is ``routing``) with the block's constant output scales, when they
    are not (1, 1)."""
    a, b = _fit_output_scales(_tiny_spec(s, spec), s.model, s.small)
    if (a, b) == (1.0, 1.0):
        return spec
    routing = replace(routing, routed_output_scale=a, shared_output_scale=b)
    extra = (
        f"the block scales its routed output by {a:g}"
        + (f" and its shared-expert output by {b:g}" if s.blk.shared_names else "")
        + " after the experts ran"
    )
    return replace(spec, routing=routing, quirks=(*spec.quirks, extra))


def _accept(spec: FamilySpec, model: nn.Module, config: Any) -> None:
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


def _derive(cfg: dict, tiny: bool | None) -> FamilySpec:
    s = _structure(cfg, tiny)
    _randomise_biases(s)
    hidden = int(s.small.hidden_size)
    layout, activation = fit_experts(s.model, s.layer_prefix, s.blk, s.first, s.small, s.num_experts, s.top_k, hidden)
    routing, bias_name = _routing(s)
    memory, dense_path = _memory_format(s, layout, bias_name)
    disk = disk_format(s.model, memory, s.first, s.num_experts)
    spec = _assemble(s, cfg, memory, dense_path, disk, activation, routing, bias_name)
    spec = _with_output_scales(s, spec, routing)
    _accept(_tiny_spec(s, spec), s.model, s.small)
    return spec


def _config_key(cfg: dict, tiny: bool) -> str:
    """Every value of the config (the transformers version aside) and whether it is already tiny."""
    kept = {k: v for k, v in cfg.items() if k != "transformers_version"}
    return json.dumps({"config": kept, "tiny": tiny}, sort_keys=True, default=str)


_DERIVED: dict[str, FamilySpec] = {}


def derive_spec(config: Any, *, tiny: bool | None = None) -> FamilySpec:
    """The derived spec of a config (dict or PretrainedConfig), kept in memory per config content.

    ``tiny=True`` means ``config`` is already tiny (built directly); otherwise its sizes are
    shrunk for the checks (its optional parts kept) and its layer pattern is read from the
    meta-device skeleton.
    """
    cfg = config_dict(config)
    key = _config_key(cfg, bool(tiny))
    if key not in _DERIVED:
        _DERIVED[key] = _derive(cfg, tiny)
    return _DERIVED[key]


@functools.cache
def derive_family(model_type: str) -> FamilySpec:
    """The derived spec of ``model_type``'s tiny config (what ``random:MODEL_TYPE`` builds)."""
    cls = config_class_for(model_type)
    kwargs = tiny_config_dict(cls)
    try:
        small = cls(**kwargs)
    except Exception as exc:
        raise DerivationError(f"no tiny {cls.__name__} could be made ({first_line(exc)})") from exc
    return replace(derive_spec(small, tiny=True), tiny_config=kwargs)


def rebuild_errors(lm: LoadedModel) -> dict[int, float]:
    """Largest relative rebuild error per MoE layer of a loaded model (for coverage reports)."""
    g = torch.Generator().manual_seed(5)
    seqs = [[0] + torch.randint(3, 259, (n,), generator=g).tolist() for n in (17, 9)]
    return {c.layer: (c.max_rel_error if c.indices_equal else float("inf")) for c in verify_trace(lm, trace(lm, seqs))}


__all__ = [
    "TOLERANCE",
    "DerivationError",
    "derive_family",
    "derive_spec",
    "moe_layer_indices",
    "rebuild_errors",
]
