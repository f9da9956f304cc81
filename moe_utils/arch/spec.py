"""Declarative description of one model family (frozen dataclasses, no behaviour per family).

A :class:`FamilySpec` says everything the engine needs to know about a family:

* which config keys hold E, top-k, sizes (with aliases), and which layers are MoE
  (:class:`LayerRule`);
* where the MoE block, router, experts and shared experts live in a loaded model
  (:class:`ModulePaths`, used for hooks) and how their output is laid out (:class:`RouterCapture`);
* the tensor names and layouts of the expert weights, in memory and on disk
  (:class:`WeightFormat`, :class:`ExpertTensors`, :class:`MLPTensors`);
* the activation and the routing function (:class:`RoutingSpec`);
* a tiny config for ``random:FAMILY`` test models.

Adding a family means writing one ``FamilySpec`` in ``moe_utils/arch/families.py``. The numbers
of one model are read from its config once, by :func:`moe_utils.arch.facts.facts_for`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from moe_utils.arch.config import config_dict, first_of, get_path, is_missing
from moe_utils.core.errors import ArgumentError, CheckpointError, UnknownFamilyError


def _scalar(value: Any, what: str) -> int:
    """An int from a config value; per-layer lists are accepted when all entries agree."""
    if isinstance(value, (list, tuple)):
        distinct = set(value)
        if len(distinct) != 1:
            raise UnknownFamilyError(
                f"the config gives a different {what} per layer ({value}); per-layer values are not supported yet"
            )
        value = distinct.pop()
    return int(value)


@dataclass(frozen=True)
class ConfigKeys:
    """Config keys (aliases, highest priority first) for the numbers every family has."""

    num_experts: tuple[str, ...] = (
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        "moe_num_experts",
        "ffn_config.moe_num_experts",
    )
    top_k: tuple[str, ...] = (
        "num_experts_per_tok",
        "num_experts_per_token",
        "moe_top_k",
        "moe_k",
        "ffn_config.moe_top_k",
    )
    num_layers: tuple[str, ...] = ("num_hidden_layers", "n_layers", "num_layers")
    hidden_size: tuple[str, ...] = ("hidden_size", "d_model", "n_embd")
    expert_intermediate: tuple[str, ...] = ("moe_intermediate_size", "intermediate_size", "ffn_config.ffn_hidden_size")
    dense_intermediate: tuple[str, ...] = ("intermediate_size",)
    shared_intermediate: tuple[str, ...] = ("shared_expert_intermediate_size",)
    num_shared: tuple[str, ...] = ("n_shared_experts", "num_shared_experts", "num_shared_expert")
    max_positions: tuple[str, ...] = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length")


@dataclass(frozen=True)
class LayerRule:
    """Which decoder layers hold a MoE block.

    kinds:
      ``all``            every layer;
      ``first_k_dense``  MoE iff ``i >= cfg[first_k_key]`` and ``i % cfg[freq_key] == 0`` (freq optional);
      ``sparse_step``    MoE iff ``i not in cfg[only_dense_key]`` and ``(i+1) % cfg[step_key] == 0``;
      ``period``         MoE iff ``i % cfg[period_key] == cfg[offset_key]``;
      ``listed``         ``cfg[list_key]`` if present, else every ``cfg[step_key]``-th layer
                         (indices ``step-1, 2*step-1, ...``);
      ``none``           dense model.
    """

    kind: Literal["all", "first_k_dense", "sparse_step", "period", "listed", "none"] = "all"
    first_k_key: str = "first_k_dense_replace"
    freq_key: str | None = None
    only_dense_key: str = "mlp_only_layers"
    step_key: str = "decoder_sparse_step"
    period_key: str = "expert_layer_period"
    offset_key: str = "expert_layer_offset"
    list_key: str = "moe_layers"

    @staticmethod
    def _value(cfg: Mapping, key: str, fallback: Any) -> Any:
        value = get_path(cfg, key)
        return fallback if is_missing(value) else value

    def moe_layers(self, cfg: Mapping, num_layers: int) -> list[int]:
        """Indices of MoE layers for a config with ``num_layers`` decoder layers."""
        idx = range(num_layers)
        if self.kind == "none":
            return []
        if self.kind == "all":
            return list(idx)
        if self.kind == "first_k_dense":
            first = int(self._value(cfg, self.first_k_key, 0))
            freq = int(self._value(cfg, self.freq_key, 1)) if self.freq_key else 1
            return [i for i in idx if i >= first and i % max(freq, 1) == 0]
        if self.kind == "sparse_step":
            dense = set(self._value(cfg, self.only_dense_key, []) or [])
            step = int(self._value(cfg, self.step_key, 1))
            return [i for i in idx if i not in dense and (i + 1) % max(step, 1) == 0]
        if self.kind == "period":
            period = int(self._value(cfg, self.period_key, 1))
            offset = int(self._value(cfg, self.offset_key, 0))
            return [i for i in idx if i % period == offset]
        if self.kind == "listed":
            listed = self._value(cfg, self.list_key, None)
            if listed is not None:
                return sorted(int(i) for i in listed if 0 <= int(i) < num_layers)
            step = int(self._value(cfg, self.step_key, 1))
            return list(range(step - 1, num_layers, max(step, 1)))
        raise ArgumentError(
            f"unknown layer rule kind {self.kind!r}; use all, first_k_dense, sparse_step, period, listed or none"
        )


@dataclass(frozen=True)
class MLPTensors:
    """Names (relative to the layer prefix) of a gated MLP stored as nn.Linear weights.

    ``act`` [I,H] (None for gate-less MLPs), ``up`` [I,H], ``down`` [H,I]. Used for dense MLPs
    and shared experts.
    """

    act: str | None
    up: str
    down: str


@dataclass(frozen=True)
class ExpertTensors:
    """Names and layout of the routed experts' weights inside one layer.

    ``layout="per_expert"``: ``act``/``up``/``down`` are templates with ``{e}`` naming one
    nn.Linear weight per expert ([I,H], [I,H], [H,I]).

    ``layout="fused"``: one tensor per projection with a leading expert axis. Either ``gate_up``
    (``[E,2I,H]``, gate then up when ``order="concat"``, alternating when ``"interleaved"``) or
    separate ``act``/``up``. ``in_transposed`` means gate/up are stored ``[E,H,*]``;
    ``down_transposed`` means down is stored ``[E,I,H]``; ``flat`` means the expert axis is merged
    into the first axis (``[E*I,H]``, DBRX).
    """

    layout: Literal["fused", "per_expert"]
    down: str
    gate_up: str | None = None
    act: str | None = None
    up: str | None = None
    order: Literal["concat", "interleaved"] = "concat"
    in_transposed: bool = False
    down_transposed: bool = False
    flat: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None


@dataclass(frozen=True)
class MoETensors:
    """Tensor names of one MoE block (relative to the layer prefix)."""

    router: str
    experts: ExpertTensors
    router_bias: str | None = None
    correction_bias: str | None = None
    shared: MLPTensors | None = None
    shared_gate: str | None = None


@dataclass(frozen=True)
class WeightFormat:
    """One naming scheme of a family's weights (in memory, or one of its on-disk variants)."""

    name: str
    layer_prefix: str = "model.layers.{layer}."
    moe: MoETensors | None = None
    dense: MLPTensors | None = None


@dataclass(frozen=True)
class ModulePaths:
    """Where things live in a loaded model (dotted attribute paths), for forward hooks."""

    layers: str = "model.layers"
    block: str = "mlp"
    router: str = "gate"
    router_weight: str = "weight"
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    dense_mlp: str = "mlp"


@dataclass(frozen=True)
class RouterCapture:
    """How to read routing decisions from the router module's output.

    ``output``:
      ``logits_weights_index``  router returns ``(logits, top_k_weights, top_k_index)``;
      ``logits``                router returns logits only (weights/index are taken from the
                                experts call when ``experts_args`` is set, else recomputed);
      ``scores_logits``         router returns ``(dense scores [N,E], logits)`` with zeros for
                                unselected experts (Llama4);
      ``index_weights_aux``     router returns ``(top_k_index, top_k_weights, aux)``; logits are
                                recomputed from the router's input and weight (remote DeepSeekMoE).
    ``experts_args``: the experts module is called as ``experts(x, top_k_index, top_k_weights)``.
    """

    output: Literal["logits_weights_index", "logits", "scores_logits", "index_weights_aux"] = "logits_weights_index"
    experts_args: bool = False


@dataclass(frozen=True)
class RoutingSpec:
    """The routing function, with config keys for its parameters (resolved by moe_utils.engine.routing).

    ``method``:
      ``softmax_topk``      softmax over E -> top-k (optionally group-limited) -> optional
                            renormalisation -> x scale;
      ``topk_softmax``      top-k of the logits -> softmax over the k;
      ``sigmoid_topk``      sigmoid -> (+ correction bias for the choice only) -> optional group
                            limit (sum of top-2 per group) -> top-k -> unbiased weights ->
                            optional renormalisation -> x scale;
      ``topk_sigmoid_input`` top-k of the logits, weight = sigmoid(logit), applied to the expert
                            *input* (Llama4);
      ``sparsemixer``       PhiMoE's eval-mode sparsemixer (top-2);
      ``sqrtsoftplus_topk`` like ``sigmoid_topk`` with sqrt(softplus(logit)) scores (DeepSeek-V4).

    With ``softmax_topk`` a correction bias, when the layer has one, shifts the choice only
    (ERNIE-4.5). ``scale`` is the constant factor used when ``scale_key`` is absent.
    ``routed_output_scale``/``shared_output_scale`` multiply the block's routed and shared parts
    after the experts ran (Cohere2-MoE's "average" of routed and shared output is 0.5/0.5).
    ``bias_on_logits``: the correction bias is added to the logits, not to the sigmoid scores.
    """

    method: Literal[
        "softmax_topk", "topk_softmax", "sigmoid_topk", "topk_sigmoid_input", "sparsemixer", "sqrtsoftplus_topk"
    ]
    renormalize: bool = False
    renormalize_key: str | None = None
    norm_p_key: str | None = None
    scale_key: str | None = None
    group: Literal["max", "top2_sum"] | None = None
    group_when: tuple[str, str] | None = None
    n_group_key: str = "n_group"
    topk_group_key: str = "topk_group"
    jitter_key: str | None = None
    renorm_eps: float = 0.0
    scale: float = 1.0
    routed_output_scale: float = 1.0
    shared_output_scale: float = 1.0
    bias_on_logits: bool = False


@dataclass(frozen=True)
class FamilySpec:
    """Everything the engine knows about one model family. See the module docstring."""

    name: str
    model_types: tuple[str, ...]
    description: str
    architectures: tuple[str, ...] = ()
    detect_keys: tuple[str, ...] = ()
    is_moe: bool = True
    native: bool = True
    keys: ConfigKeys = field(default_factory=ConfigKeys)
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    layer_rule: LayerRule = field(default_factory=LayerRule)
    modules: ModulePaths = field(default_factory=ModulePaths)
    memory: WeightFormat = field(default_factory=lambda: WeightFormat("memory"))
    disk: tuple[WeightFormat, ...] = ()
    activation: str = "silu"
    activation_keys: tuple[str, ...] = ("hidden_act",)
    routing: RoutingSpec | None = None
    capture: RouterCapture = field(default_factory=RouterCapture)
    config_class: str | None = None
    tiny_config: Mapping[str, Any] = field(default_factory=dict, hash=False)
    derived: bool = False
    quirks: tuple[str, ...] = ()

    # ---- config reading -------------------------------------------------------------------
    def value(self, cfg: Mapping, keys: tuple[str, ...], what: str, required: bool = True) -> Any:
        """First alias of ``keys`` present in ``cfg``, else the spec default, else an error."""
        value = first_of(cfg, keys)
        if is_missing(value):
            for key in keys:
                if key in self.defaults:
                    return self.defaults[key]
            if not required:
                return None
            raise CheckpointError(
                f"{self.name} config has no {what} (looked for {', '.join(keys)}); add one of these keys to config.json"
            )
        return value

    def num_layers(self, cfg: Mapping) -> int:
        return int(self.value(cfg, self.keys.num_layers, "number of layers"))

    def num_experts(self, cfg: Mapping) -> int:
        return _scalar(self.value(cfg, self.keys.num_experts, "number of experts"), "number of experts")

    def top_k(self, cfg: Mapping) -> int:
        return _scalar(self.value(cfg, self.keys.top_k, "experts per token (top-k)"), "top-k")

    def hidden_size(self, cfg: Mapping) -> int:
        return int(self.value(cfg, self.keys.hidden_size, "hidden size"))

    def max_positions(self, cfg: Mapping) -> int | None:
        value = self.value(cfg, self.keys.max_positions, "context length", required=False)
        return None if value is None else int(value)

    def activation_name(self, cfg: Mapping) -> str:
        """Activation name for this config (``{key}`` placeholders filled from the config)."""
        name = first_of(cfg, self.activation_keys) if self.activation_keys else None
        if name is None or is_missing(name) or not isinstance(name, str):
            name = self.activation
        if "{" in name:
            fields = {k: self.defaults.get(k) for k in self.defaults}
            fields.update({k: v for k, v in cfg.items() if not isinstance(v, (dict, list))})
            name = name.format(**fields)
        return name

    # ---- layer selection ------------------------------------------------------------------
    def moe_layers(self, config: Any) -> list[int]:
        """Indices of the MoE layers of a model with this config (dict or PretrainedConfig)."""
        cfg = config_dict(config)
        if not self.is_moe:
            return []
        merged = {**self.defaults, **{k: v for k, v in cfg.items() if v is not None}}
        return self.layer_rule.moe_layers(merged, self.num_layers(cfg))

    def dense_layers(self, config: Any) -> list[int]:
        """Indices of layers whose feed-forward block is a dense MLP."""
        cfg = config_dict(config)
        moe = set(self.moe_layers(cfg))
        return [i for i in range(self.num_layers(cfg)) if i not in moe]

    def weight_formats(self, on_disk: bool) -> tuple[WeightFormat, ...]:
        """Naming schemes to try: in-memory only for loaded models; disk variants then memory."""
        return (self.disk + (self.memory,)) if on_disk else (self.memory,)
