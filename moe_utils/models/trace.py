"""Single-pass tracing of MoE blocks, and all-expert outputs computed from the captured inputs.

**Why one ordinary forward pass is enough.** The paper's code obtains every expert's output at
layer *i* by re-running the model with top-k forced to "all experts" at that layer. Here the
model runs once per sequence with its own top-k, forward (pre-)hooks record each MoE block's
input ``x_i`` and router output, and every expert is then evaluated on ``x_i`` from the layer's
weights (:func:`expert_outputs`). Both give the same numbers because

1. ``x_i`` depends only on layers ``< i``, which run with the normal top-k in both methods
   (changing top-k *at* layer *i* cannot change what flows *into* layer *i*); and
2. an expert's output is a function of its input and its own weights only: top-k decides which
   outputs are *combined*, not what each expert computes.

So evaluating all E experts on the captured ``x_i`` reproduces the re-run's per-expert outputs
(``benchmarks/trace_vs_rerun.py`` checks this numerically), at the cost of one forward pass
instead of one per layer. :func:`verify_trace` closes the loop: it rebuilds each block's output
from per-expert outputs, the routing recomputed from the captured logits by the family's routing
function, and the shared experts, and compares it with the block output the model produced.

All captures are stored as float32 on the CPU (bf16 models are captured and then computed in
float32; accelerate-dispatched models have their captures moved to the CPU by the hooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moe_utils.arch import FamilySpec, require_moe
from moe_utils.arch.facts import check_layers
from moe_utils.core.cpus import small_model_threads
from moe_utils.core.errors import ArgumentError, InputTooLongError, LayerIndexError, MoEUtilsError, NonFiniteError
from moe_utils.core.finite import is_finite, nonfinite_counts
from moe_utils.engine.expert_math import (
    apply_experts,
    dense_intermediates,
    dense_outputs,
    expert_intermediates,
    expert_outputs,
    shared_expert_output,
)
from moe_utils.engine.routing import RouteParams, route
from moe_utils.models.loaded import LoadedModel
from moe_utils.models.weights import MoELayerWeights, layer_weights

Tensor = torch.Tensor


@dataclass
class LayerTrace:
    """Captures of one layer over all traced tokens (float32, CPU).

    ``router_logits`` [N,E] are the raw logits (GPT-OSS: including its router bias);
    ``topk_index``/``topk_weight`` [N,k] are what the model used; ``shared_output`` is the shared
    experts' contribution as added to the block output (after the sigmoid gate for Qwen2-MoE).
    For dense traces the router fields are None and ``block_output`` is the MLP output.
    """

    layer: int
    x: Tensor
    router_logits: Tensor | None
    topk_index: Tensor | None
    topk_weight: Tensor | None
    block_output: Tensor
    shared_output: Tensor | None = None
    routing: RouteParams | None = None
    routing_source: str = "router"

    @property
    def routed_index(self) -> Tensor:
        """``topk_index``, for a trace that has one (a dense trace has none: raises)."""
        if self.topk_index is None:
            raise MoEUtilsError(f"layer {self.layer} trace has no top-k indices (dense trace)")
        return self.topk_index

    @property
    def routed_weight(self) -> Tensor:
        """``topk_weight``, for a trace that has one (a dense trace has none: raises)."""
        if self.topk_weight is None:
            raise MoEUtilsError(f"layer {self.layer} trace has no top-k weights (dense trace)")
        return self.topk_weight


@dataclass
class Trace:
    """Per-token bookkeeping plus one :class:`LayerTrace` per traced layer."""

    token_ids: Tensor
    seq_index: Tensor
    position: Tensor
    layers: list[int]
    per_layer: dict[int, LayerTrace]
    model_name: str
    fingerprint: str
    tokens: list[str] = field(default_factory=list)
    kind: str = "moe"

    def __getitem__(self, layer: int) -> LayerTrace:
        try:
            return self.per_layer[layer]
        except KeyError:
            raise LayerIndexError(f"layer {layer} was not traced; traced layers: {self.layers}") from None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def router_scores(lt: LayerTrace) -> Tensor:
    """Softmax over all E router logits (the paper's "gate scores"): [N,E]."""
    if lt.router_logits is None:
        raise MoEUtilsError(f"layer {lt.layer} trace has no router logits (dense trace)")
    return torch.softmax(lt.router_logits.float(), dim=-1)


# ---- input handling --------------------------------------------------------------------------
def _as_sequences(lm: LoadedModel, sequences: Any) -> list[Tensor]:
    if isinstance(sequences, Tensor):
        seqs = [sequences] if sequences.dim() == 1 else list(sequences)
    elif isinstance(sequences, str):
        seqs = [sequences]
    else:
        seqs = list(sequences)
    out = []
    for seq in seqs:
        if isinstance(seq, str):
            if lm.tokenizer is None:
                raise MoEUtilsError(f"{lm.name} has no tokenizer; pass token ids instead of text")
            seq = lm.tokenizer(seq)["input_ids"]
        ids = torch.as_tensor(seq, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ArgumentError("cannot trace an empty sequence; drop it from the inputs")
        out.append(ids)
    if not out:
        raise ArgumentError("no sequences to trace; pass at least one list of token ids")
    return out


def _check_lengths(lm: LoadedModel, seqs: list[Tensor]) -> None:
    limit = lm.facts.max_positions
    if limit is None:
        return
    for i, ids in enumerate(seqs):
        if ids.numel() > limit:
            raise InputTooLongError(
                f"sequence {i} has {ids.numel()} tokens but {lm.name} handles at most {limit} "
                f"(its context length); split the text into windows of at most {limit} tokens or "
                "lower max_tokens"
            )


# ---- hooks -----------------------------------------------------------------------------------
def _cpu32(t: Tensor, width: int | None = None) -> Tensor:
    t = t.detach()
    if width is not None:
        t = t.reshape(-1, width)
    return t.to(device="cpu", dtype=torch.float32, copy=True)


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    raise MoEUtilsError("could not find the hidden states passed to a hooked module")


def _output_tensor(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


class _LayerHooks:
    """Registers the hooks of one MoE layer and collects its captures per forward pass."""

    def __init__(self, lm: LoadedModel, layer: int, params: RouteParams, hidden: int):
        self.spec: FamilySpec = lm.spec
        self.params = params
        self.hidden = hidden
        self.store: dict[str, list[Tensor]] = {}
        paths = self.spec.modules
        layer_mod = lm.built().get_submodule(f"{paths.layers}.{layer}")
        self.block = layer_mod.get_submodule(paths.block)
        self.handles = [
            self.block.register_forward_pre_hook(self._block_in, with_kwargs=True),
            self.block.register_forward_hook(self._block_out),
            self.block.get_submodule(paths.router).register_forward_hook(self._router, with_kwargs=True),
        ]
        if self.spec.capture.experts_args:
            experts = self.block.get_submodule(paths.experts)
            self.handles.append(experts.register_forward_pre_hook(self._experts_in, with_kwargs=True))
        if paths.shared:
            self.handles.append(
                self.block.get_submodule(paths.shared).register_forward_hook(
                    lambda m, a, o: self._put("shared_raw", _cpu32(_output_tensor(o), hidden))
                )
            )
        if paths.shared_gate:
            self.handles.append(
                self.block.get_submodule(paths.shared_gate).register_forward_hook(
                    lambda m, a, o: self._put("shared_gate", _cpu32(_output_tensor(o), 1))
                )
            )

    def _put(self, key: str, value: Tensor) -> None:
        self.store.setdefault(key, []).append(value)

    def _block_in(self, module, args, kwargs):
        self._put("x", _cpu32(_first_tensor(args, kwargs), self.hidden))

    def _block_out(self, module, args, out):
        self._put("y", _cpu32(_output_tensor(out), self.hidden))

    def _router(self, module, args, kwargs, out):
        kind = self.spec.capture.output
        if kind == "logits_weights_index":
            self._put("logits", _cpu32(out[0], out[0].shape[-1]))
            self._put("weight", _cpu32(out[1], self.params.top_k))
            self._put("index", out[2].detach().reshape(-1, self.params.top_k).cpu())
        elif kind == "logits":
            logits = _output_tensor(out)
            self._put("logits", _cpu32(logits, logits.shape[-1]))
        elif kind == "scores_logits":
            scores = out[0].detach().reshape(-1, out[0].shape[-1])
            weight, index = torch.topk(scores.float(), self.params.top_k, dim=-1)
            self._put("logits", _cpu32(out[1], out[1].shape[-1]))
            self._put("weight", weight.cpu())
            self._put("index", index.cpu())
        elif kind == "index_weights_aux":
            inp = _first_tensor(args, kwargs).detach().reshape(-1, self.hidden)
            w = module.get_parameter(self.spec.modules.router_weight)
            self._put("logits", _cpu32(F.linear(inp, w)))
            self._put("index", out[0].detach().reshape(-1, self.params.top_k).cpu())
            self._put("weight", _cpu32(out[1], self.params.top_k))
        else:
            raise MoEUtilsError(f"unknown router capture kind {kind!r}")

    def _experts_in(self, module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        weight = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        self._put("index", index.detach().reshape(-1, self.params.top_k).cpu())
        self._put("weight", _cpu32(weight, self.params.top_k))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def layer_trace(self, layer: int) -> LayerTrace:
        cat = {k: torch.cat(v) for k, v in self.store.items()}
        logits = cat.get("logits")
        index, weight, source = cat.get("index"), cat.get("weight"), "router"
        if self.spec.capture.experts_args:
            source = "experts call"
        if index is None and logits is not None:
            weight, index = route(logits, self.params)
            source = "recomputed"
        shared = cat.get("shared_raw")
        if shared is not None and "shared_gate" in cat:
            shared = torch.sigmoid(cat["shared_gate"]) * shared
        return LayerTrace(
            layer=layer,
            x=cat["x"],
            router_logits=logits,
            topk_index=index,
            topk_weight=weight,
            block_output=cat["y"],
            shared_output=shared,
            routing=self.params,
            routing_source=source,
        )


class _DenseHooks:
    """Captures input and output of one dense MLP."""

    def __init__(self, lm: LoadedModel, layer: int, hidden: int):
        paths = lm.spec.modules
        mlp = lm.built().get_submodule(f"{paths.layers}.{layer}.{paths.dense_mlp}")
        self.store: dict[str, list[Tensor]] = {"x": [], "y": []}
        self.handles = [
            mlp.register_forward_pre_hook(
                lambda m, a, k: self.store["x"].append(_cpu32(_first_tensor(a, k), hidden)), with_kwargs=True
            ),
            mlp.register_forward_hook(lambda m, a, o: self.store["y"].append(_cpu32(_output_tensor(o), hidden))),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def layer_trace(self, layer: int) -> LayerTrace:
        return LayerTrace(
            layer=layer,
            x=torch.cat(self.store["x"]),
            router_logits=None,
            topk_index=None,
            topk_weight=None,
            block_output=torch.cat(self.store["y"]),
            routing=None,
            routing_source="none",
        )


# ---- running ---------------------------------------------------------------------------------
def _input_device(model: torch.nn.Module) -> torch.device:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    emb = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def _decode(tokenizer, ids: Tensor) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    cache: dict[int, str] = {}
    out = []
    for i in ids.tolist():
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        out.append(cache[i])
    return out


def _run(lm: LoadedModel, seqs: list[Tensor], hooks: dict[int, Any], kind: str) -> Trace:
    model = lm.built()
    device = _input_device(model)
    try:
        with torch.inference_mode(), small_model_threads(lm.facts.hidden_size):
            for s, ids in enumerate(seqs):
                before = {layer: len(h.store.get("x", [])) for layer, h in hooks.items()}
                model(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
                for layer, h in hooks.items():
                    check_one_call(layer, s, h.store.get("x", [])[before[layer] :], ids.numel())
    finally:
        for h in hooks.values():
            h.remove()
    return assemble_trace(lm, seqs, {layer: h.layer_trace(layer) for layer, h in hooks.items()}, kind)


def check_one_call(layer: int, seq: int, new: list[Tensor], n_tokens: int) -> None:
    """Raise unless a hooked block ran exactly once, on all ``n_tokens`` tokens of sequence ``seq``."""
    if len(new) != 1 or new[0].shape[0] != n_tokens:
        raise MoEUtilsError(
            f"layer {layer}: expected one call of the block with {n_tokens} "
            f"tokens for sequence {seq}, saw {len(new)} call(s) with "
            f"{[t.shape[0] for t in new]} tokens; the model does not run each "
            "block once per forward pass, so it cannot be traced this way"
        )


def assemble_trace(lm: LoadedModel, seqs: list[Tensor], per_layer: dict[int, LayerTrace], kind: str) -> Trace:
    """A :class:`Trace` of ``seqs`` (concatenated in order) from per-layer captures."""
    token_ids = torch.cat(seqs)
    seq_index = torch.cat([torch.full((ids.numel(),), i, dtype=torch.long) for i, ids in enumerate(seqs)])
    position = torch.cat([torch.arange(ids.numel()) for ids in seqs])
    return Trace(
        token_ids=token_ids,
        seq_index=seq_index,
        position=position,
        layers=list(per_layer),
        per_layer=per_layer,
        model_name=lm.name,
        fingerprint=lm.fingerprint,
        tokens=_decode(lm.tokenizer, token_ids),
        kind=kind,
    )


def check_trace_finite(lm: LoadedModel, tr: Trace) -> Trace:
    """Raise :class:`NonFiniteError` at the first traced layer whose captures hold NaN/inf.

    Layers are checked in depth order (input, router logits, output); when the first bad one is
    an MoE block, its weights are read first, so a non-finite expert is named as the cause.
    """
    for layer in sorted(tr.layers):
        lt = tr.per_layer[layer]
        block = "MoE block" if tr.kind == "moe" else "dense MLP"
        for name, t in (
            (f"{block} input (hidden states)", lt.x),
            ("router logits", lt.router_logits),
            (f"{block} output", lt.block_output),
            ("shared-expert output", lt.shared_output),
        ):
            if t is None or is_finite(t):
                continue
            if tr.kind == "moe" and "input" not in name:
                layer_weights(lm, layer)  # names the expert when its weights are the cause
            expert = None
            if name == "router logits":
                expert = int((~torch.isfinite(t)).any(dim=0).nonzero()[0, 0])
            raise NonFiniteError(
                layer,
                expert,
                name,
                *nonfinite_counts(t),
                hint="; values that are not finite at a layer's input come from an earlier layer or the embeddings",
            )
    return tr


def trace(lm: LoadedModel, sequences: Any, layers: Sequence[int] | None = None) -> Trace:
    """Capture every MoE layer (or ``layers``) over ``sequences``, one forward pass per sequence.

    ``sequences``: a list of token-id lists/tensors (different lengths allowed), a [B,T] tensor,
    or texts (tokenised with the model's tokenizer).
    """
    require_moe(lm.spec, "trace()")
    chosen = check_layers(layers, lm.facts, "moe")
    seqs = _as_sequences(lm, sequences)
    _check_lengths(lm, seqs)
    params = lm.facts.routing
    if params is None:
        raise MoEUtilsError(f"{lm.name} ({lm.facts.family}) has no routing function to trace")
    hidden = lm.facts.hidden_size
    hooks = {}
    try:
        for layer in chosen:
            hooks[layer] = _LayerHooks(lm, layer, params, hidden)
    except Exception:
        for h in hooks.values():
            h.remove()
        raise
    return check_trace_finite(lm, _run(lm, seqs, hooks, "moe"))


def trace_dense(lm: LoadedModel, sequences: Any, layers: Sequence[int] | None = None) -> Trace:
    """Capture the input/output of dense MLPs (a dense model, or dense layers of an MoE model)."""
    chosen = check_layers(layers, lm.facts, "dense")
    seqs = _as_sequences(lm, sequences)
    _check_lengths(lm, seqs)
    hidden = lm.facts.hidden_size
    hooks = {layer: _DenseHooks(lm, layer, hidden) for layer in chosen}
    return check_trace_finite(lm, _run(lm, seqs, hooks, "dense"))


# ---- reconstruction and verification -----------------------------------------------------------
@dataclass
class LayerCheck:
    """Result of :func:`verify_trace` for one layer."""

    layer: int
    max_rel_error: float
    indices_equal: bool
    max_weight_error: float
    routing_source: str


def _recompute_routing(
    lt: LayerTrace, weights: MoELayerWeights, routing: RouteParams | None
) -> tuple[RouteParams, Tensor, Tensor]:
    """``(params, top_k_weight, top_k_index)`` recomputed from the captured logits."""
    params = routing or lt.routing
    if params is None or lt.router_logits is None:
        raise MoEUtilsError(f"layer {lt.layer} trace has no routing information")
    weight, index = route(lt.router_logits, params, weights.score_correction_bias)
    return params, weight, index


def _rebuild(lt: LayerTrace, weights: MoELayerWeights, params: RouteParams, weight: Tensor, index: Tensor) -> Tensor:
    out = apply_experts(weights, lt.x, index, weight, scale_input=params.scales_input)
    if params.routed_output_scale != 1.0:
        out = out * params.routed_output_scale
    shared = shared_expert_output(weights, lt.x)
    if shared is not None and params.shared_output_scale != 1.0:
        shared = shared * params.shared_output_scale
    return out if shared is None else out + shared


def reconstruct_block_output(lt: LayerTrace, weights: MoELayerWeights, routing: RouteParams | None = None) -> Tensor:
    """Block output rebuilt from the experts, the routing recomputed from the captured logits,
    and the shared experts: [N,H] float32."""
    return _rebuild(lt, weights, *_recompute_routing(lt, weights, routing))


def _sorted_pairs(index: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    order = index.argsort(dim=-1)
    return index.gather(1, order), weight.float().gather(1, order)


def verify_trace(
    lm: LoadedModel, tr: Trace, layers: Sequence[int] | None = None, source: Any = None
) -> list[LayerCheck]:
    """Rebuild each traced block output and compare with the captured one.

    Returns, per layer, the max absolute error divided by the max absolute block output, whether
    the recomputed top-k expert sets equal the captured ones, and the max routing-weight error.
    ``source`` (default: the loaded model) is where the weights come from, e.g. the checkpoint.
    """
    return [
        check_layer_trace(tr[layer], layer_weights(source if source is not None else lm, layer, dtype=None))
        for layer in (layers if layers is not None else tr.layers)
    ]


def check_layer_trace(lt: LayerTrace, weights: MoELayerWeights) -> LayerCheck:
    """:func:`verify_trace` for one captured layer and its weights."""
    params, weight, index = _recompute_routing(lt, weights, None)
    return compare_rebuilt(lt, _rebuild(lt, weights, params, weight, index), index, weight)


def compare_rebuilt(lt: LayerTrace, recon: Tensor, index: Tensor, weight: Tensor) -> LayerCheck:
    """A layer's check from its block output rebuilt as ``recon`` with the recomputed routing
    (``index``, ``weight``), against the captured output and routing."""
    scale = lt.block_output.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    rel = float((recon - lt.block_output).abs().max() / scale)
    idx_r, w_r = _sorted_pairs(index, weight)
    idx_c, w_c = _sorted_pairs(lt.routed_index, lt.routed_weight)
    equal = bool(torch.equal(idx_r, idx_c))
    werr = float((w_r - w_c).abs().max()) if equal else float("inf")
    return LayerCheck(lt.layer, rel, equal, werr, lt.routing_source)


__all__ = [
    "LayerCheck",
    "LayerTrace",
    "Trace",
    "assemble_trace",
    "check_layer_trace",
    "check_one_call",
    "compare_rebuilt",
    "dense_intermediates",
    "dense_outputs",
    "expert_intermediates",
    "expert_outputs",
    "reconstruct_block_output",
    "router_scores",
    "trace",
    "trace_dense",
    "verify_trace",
]
