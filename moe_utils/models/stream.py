"""Forward passes one decoder layer at a time, for models larger than memory.

The model is built without weights (accelerate's ``init_empty_weights``: parameters on the meta
device, buffers such as rotary tables computed). Each sequence runs once through the model with
every decoder layer replaced by a recorder, which keeps the first layer's input (the embeddings)
and the arguments the model passes to each layer (rotary embeddings, masks, positions: the
model's own). Then, for each decoder layer in order, its weights are read from the checkpoint
(:func:`~moe_utils.models.layer_load.fill_layer`; quantized experts decoded), every sequence goes
through transformers' own layer module with the trace's hooks on its MoE block, ``visit`` sees the
layer's captures and its weights while they are held, and the layer is emptied before the next
one is read. Each layer is read once per run; memory holds one layer, the embeddings and the
hidden states of the inputs.

Some decoder layers return more than their hidden states, and the model hands the extra values
to the next layer (DeepSeek-V3.2-style sparse attention passes its top-k key indices on as
``prev_topk_indices``). When a layer's return annotation is a tuple, its recorder returns one
marker per extra value; where the markers reappear in the next layer's recorded call says which
argument takes which value, and the stream puts the real layer's outputs there.

A block too large to decode whole (``by_expert``) keeps its routed experts on disk. Its layer
runs every sequence twice: the first pass keeps what the model hands its experts module (and the
captured block inputs), then one sweep reads and decodes each expert once
(:class:`~moe_utils.models.layer_load.ExpertSweep`), computing its share of the block's output
and its outputs and activations on the captured inputs, and the second pass runs the layer with
the block's output and records the captures. ``visit`` then gets a :class:`SweptLayer`, whose
per-expert results the analyses read instead of evaluating the experts again.

The captures are the same :class:`~moe_utils.models.trace.Trace` the whole-model path records
(``tests/test_stream.py`` checks that they are equal on tiny models of every family).
"""

from __future__ import annotations

import gc
import inspect
import tempfile
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_utils.arch import FamilySpec, require_moe
from moe_utils.arch.config import read_config_json
from moe_utils.arch.facts import ModelFacts, check_layers
from moe_utils.core.errors import UsageError
from moe_utils.core.memory import available_memory, release_file_pages
from moe_utils.core.messages import first_line
from moe_utils.engine.canonical import MoELayerWeights
from moe_utils.models.checkpoint import find_weight_files, verify_safetensors
from moe_utils.models.fingerprint import checkpoint_fingerprint
from moe_utils.models.ids import resolve_model
from moe_utils.models.layer_load import (
    DiskRef,
    ExpertSweep,
    StreamUnsupportedError,
    Swept,
    disk_names,
    empty_layer,
    fill_layer,
    has_disk,
    read_disk,
)
from moe_utils.models.loaded import LoadedModel
from moe_utils.models.loading import as_dtype, load_model, load_tokenizer
from moe_utils.models.random_models import decoder_classes
from moe_utils.models.sources import FolderSource, HeldLayer
from moe_utils.models.specs import spec_for_config
from moe_utils.models.trace import (
    LayerCheck,
    LayerTrace,
    Trace,
    _as_sequences,
    _check_lengths,
    _LayerHooks,
    _recompute_routing,
    assemble_trace,
    check_one_call,
    check_trace_finite,
    compare_rebuilt,
    shared_expert_output,
    trace,
)
from moe_utils.models.weights import module_layer_weights

Tensor = torch.Tensor

#: Share of the available memory a whole model may take before the stream is used instead.
FIT_SHARE = 0.8


@dataclass
class StreamedLayer:
    """What ``visit`` sees for one MoE layer: one-layer traces per input set, and the layer's
    weights as a source for :func:`~moe_utils.models.weights.layer_weights`."""

    layer: int
    traces: dict[str, Trace]
    held: HeldLayer


class SweptLayer(HeldLayer):
    """The held layer of a block computed expert by expert: its weights (the routed experts left on
    disk: indexing them reads them again) and what the one pass over its experts computed on each
    input set's captured block inputs, ``outputs[name]`` ``[N, E, H]`` and ``activations[name]``
    ``[N, E, I]`` (:class:`~moe_utils.models.layer_load.Swept`)."""

    def __init__(self, spec: FamilySpec, facts: ModelFacts, weights: MoELayerWeights, name: str, swept: Swept) -> None:
        super().__init__(spec, facts, weights, name)
        self.outputs = swept.outputs
        self.activations = swept.activations

    def check(self, lt: LayerTrace, name: str) -> LayerCheck:
        """:func:`~moe_utils.models.trace.check_layer_trace` of this layer's captures from input set
        ``name``, the routed experts' outputs taken from the sweep: the block output rebuilt from
        the routing recomputed from the captured logits and the shared experts, against the model's."""
        w = self.weights
        params, weight, index = _recompute_routing(lt, w, None)
        y = self.outputs[name]
        recon = torch.zeros_like(lt.x)
        for e in range(w.num_experts):
            tok, pos = torch.where(index == e)
            recon.index_add_(0, tok, y[tok, e] * weight[tok, pos].float().unsqueeze(-1))
        recon = recon * params.routed_output_scale
        shared = shared_expert_output(w, lt.x)
        if shared is not None:
            recon = recon + shared * params.shared_output_scale
        return compare_rebuilt(lt, recon, index, weight)


class _Stop(Exception):
    """Ends the recording pass after the last decoder layer (the head never runs)."""


@dataclass(frozen=True)
class _Carried:
    """Marks, in the recording pass, value ``position`` of the previous decoder layer's output."""

    position: int


def output_arity(layer: nn.Module) -> int:
    """How many values a decoder layer returns, from its forward's return annotation: a tuple of
    fixed length gives its length; anything else (a tensor, no annotation) gives 1."""
    forward = type(layer).forward
    hint = inspect.signature(forward).return_annotation
    if isinstance(hint, str):
        try:
            hint = typing.get_type_hints(forward).get("return")
        except Exception:  # an annotation that does not resolve says nothing about the arity
            return 1
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if args and Ellipsis not in args:
            return len(args)
    return 1


class _Recorder(nn.Module):
    """Stands in for a decoder layer during the recording pass: keeps its call's arguments and
    returns what the layer would, with a marker for each value beyond the hidden states."""

    def __init__(self, original: nn.Module, index: int, store: dict[Any, Any], last: bool) -> None:
        super().__init__()
        for key, value in vars(original).items():  # attention_type, layer_idx...: what the model reads
            if not key.startswith("_") and key != "training":
                self.__dict__[key] = value
        self.index, self.store, self.last = index, store, last
        self.arity = output_arity(original)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.store[self.index] = (args, kwargs)
        if self.index == 0:
            self.store["input"] = hidden_states
        if self.last:
            raise _Stop
        if self.arity == 1:
            return hidden_states
        return (hidden_states, *(_Carried(j) for j in range(1, self.arity)))


def _pass_on(
    call: tuple[tuple[Any, ...], dict[str, Any]], out: tuple[Any, ...]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The next layer's recorded call with each marker replaced by the output value it marks."""

    def fill(v: Any) -> Any:
        return out[v.position] if isinstance(v, _Carried) else v

    args, kwargs = call
    return tuple(fill(a) for a in args), {k: fill(v) for k, v in kwargs.items()}


def _unfilled(i: int, call: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
    """Raise when a call still holds a marker (a value the stream could not pass on)."""
    args, kwargs = call
    if any(isinstance(v, _Carried) for v in (*args, *kwargs.values())):
        raise StreamUnsupportedError(
            f"decoder layer {i} takes a value computed by an earlier layer that the stream cannot pass on; "
            "this family cannot be streamed (run it whole with stream=False)"
        )


def stream_reason(lm: LoadedModel) -> str:
    """Why ``lm`` cannot be streamed (empty when it can): the stream needs a checkpoint folder of
    safetensors and a family transformers builds."""
    return _reason(lm.spec, lm.path)


def _reason(spec: FamilySpec, path: Path | None) -> str:
    if path is None:
        return "the model has no checkpoint folder to read layers from (a random: model is built whole)"
    if not spec.native:
        return f"{spec.name} needs its publisher's modelling code, which the layer stream does not run"
    if spec.memory.moe is None:
        return f"the {spec.name} spec names no in-memory MoE tensors"
    return ""


def projected_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the whole model takes in memory in ``dtype``: every stored weight counted once, in
    ``dtype`` (quantized experts decoded: two 4-bit values a byte, eight in an int32, scales left out)."""
    src = FolderSource(folder)
    size = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for name in src.reader.names():
        if name.endswith(("_scale", "_scale_inv", "_scales", "weight_shape", "zero_point", "g_idx")):
            continue
        n = 1
        for d in src.reader.shape(name):
            n *= int(d)
        if name.endswith("_blocks"):
            n *= 2
        elif name.endswith("weight_packed"):
            n *= 8
        total += n * size
    src.release()
    return total


def stream_choice(
    model: str, stream: bool | None, dtype: str | torch.dtype, revision: str | None = None, allow_pickle: bool = False
) -> bool:
    """Whether to run ``model`` one decoder layer at a time: ``stream`` True or False decides;
    None streams when the whole model in ``dtype`` would take more than ``FIT_SHARE`` of the
    available memory (:func:`projected_bytes`) and the family can be streamed."""
    if stream is False:
        return False
    ref = resolve_model(model, revision)
    spec = spec_for_config(read_config_json(ref.path)) if ref.path is not None else None
    why = _reason(spec, ref.path) if spec is not None else "the model has no checkpoint folder to read layers from"
    if stream:
        if why:
            raise UsageError(f"{model} cannot be streamed: {why}; leave stream unset to load it whole")
        return True
    if why or ref.path is None:
        return False
    free = available_memory()
    return free is not None and projected_bytes(ref.path, as_dtype(dtype)) > FIT_SHARE * free


def streamable(model: str, revision: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """``model`` described for the layer stream: its checkpoint, spec and tokenizer, no module."""
    ref = resolve_model(model, revision)
    if ref.path is None:
        raise UsageError(f"{model} has no checkpoint folder to stream; save it with save_pretrained first")
    cfg = read_config_json(ref.path)
    files = find_weight_files(ref.path, allow_pickle=allow_pickle)
    verify_safetensors(files)
    return LoadedModel(
        model=None,
        tokenizer=load_tokenizer(ref.path),
        spec=spec_for_config(cfg),
        config=cfg,
        name=ref.name,
        path=ref.path,
        fingerprint=checkpoint_fingerprint(cfg, files),
        source=ref.source(),
    )


def _too_large(lm: LoadedModel, dtype: torch.dtype) -> bool:
    """Whether one MoE layer's routed experts, decoded to ``dtype``, exceed half of ``FIT_SHARE``
    of the available memory."""
    f = lm.facts
    free = available_memory()
    width = f.expert_intermediate_size or 0
    need = f.num_experts * 3 * f.hidden_size * width * torch.empty(0, dtype=dtype).element_size()
    return free is not None and need > FIT_SHARE * free / 2


def _build_empty(build: Callable[..., Any], config: Any, dtype: torch.dtype) -> nn.Module:
    """``build(config, dtype=dtype)`` (a ``from_config``) with parameters on the meta device and buffers real. accelerate's
    ``init_empty_weights`` allocates each parameter before moving it to the meta device, which the
    system refuses for a tensor larger than memory (DeepSeek-V3's fused experts: 30 GB); those
    models are then built on the meta device outright and their rotary tables computed again."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            return build(config, dtype=dtype)
    except RuntimeError as exc:
        if "allocate" not in str(exc):
            raise
    with torch.device("meta"):
        model = build(config, dtype=dtype)
    _real_rotary_tables(model)
    return model


def _real_rotary_tables(model: nn.Module) -> None:
    """Rotary embedding modules built on the meta device, given their tables on the CPU again."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        rope_type = getattr(module, "rope_type", None)
        if not isinstance(inv, Tensor) or inv.device.type != "meta" or rope_type is None:
            continue
        init = getattr(module, "compute_default_rope_parameters", None) if rope_type == "default" else None
        init = init or ROPE_INIT_FUNCTIONS[rope_type]
        inv_freq, scaling = init(getattr(module, "config", None))
        module.register_buffer("inv_freq", inv_freq, persistent=False)
        if getattr(module, "original_inv_freq", None) is not None:
            module.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        module.attention_scaling = scaling  # pyright: ignore[reportArgumentType]  # torch annotates Module.__setattr__ for tensors and modules only


def empty_model(lm: LoadedModel, dtype: torch.dtype) -> nn.Module:
    """The model of ``lm``'s checkpoint built without weights (parameters on the meta device,
    buffers real), in eval mode, with the experts implementation the whole-model path uses."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if lm.path is None:
        raise StreamUnsupportedError(stream_reason(lm))
    config = AutoConfig.from_pretrained(lm.path)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:  # the stream decodes the experts itself: build the unquantized twin
        delattr(config, "quantization_config")
    model = None
    for auto in (AutoModelForCausalLM, AutoModel):  # the causal LM, else the bare decoder (as built at random)
        try:
            model = _build_empty(auto.from_config, config, dtype)
            break
        except ValueError:
            continue
    if model is None and (classes := decoder_classes(config)):  # a text config the auto classes do not map
        model = _build_empty(classes[0]._from_config, config, dtype)
    if model is None:
        raise StreamUnsupportedError(f"transformers has no causal LM or decoder class for {type(config).__name__}")
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if callable(can_set) and can_set():
        model.set_experts_implementation("grouped_mm")  # pyright: ignore[reportCallIssue]  # transformers method
    return model.eval()


def _fill_outer(
    model: nn.Module, src: FolderSource, layers_path: str, device: torch.device, renamed: Mapping[str, DiskRef]
) -> None:
    """The tensors outside the decoder layers (embeddings, final norm); the head is left empty."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    for name, empty in model.state_dict(keep_vars=True).items():
        if name.startswith(layers_path + ".") or id(empty) in head_ids:
            continue
        disk = name if src.has(name) else renamed.get(name)
        if disk is None or not has_disk(src, disk):
            raise StreamUnsupportedError(
                f"the checkpoint has no tensor {name} (outside the decoder layers); "
                "this family cannot be streamed (run it whole with stream=False)"
            )
        path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(path) if path else model
        value = read_disk(src, disk).to(device=device, dtype=empty.dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value


def _record(model: nn.Module, layers: nn.ModuleList, ids: Tensor, device: torch.device) -> dict[Any, Any]:
    """One recording pass: the first layer's input and every layer's call arguments."""
    originals = list(layers)
    store: dict[Any, Any] = {}
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, i, store, last=i == len(originals) - 1)
        with torch.inference_mode():
            model(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(store) != len(originals) + 1:
        raise StreamUnsupportedError(
            f"the recording pass reached {len(store) - 1} of {len(originals)} decoder layers; "
            "this model does not call its layers in order, so it cannot be streamed (run it whole)"
        )
    return store


def _run_layer(
    module: nn.Module,
    i: int,
    seqs: list[Tensor],
    calls: list[dict[Any, Any]],
    hidden: list[Tensor],
    hooks: _LayerHooks | None,
    keep: bool,
) -> None:
    """Every sequence of one input set through decoder layer ``i`` (its recorded call arguments),
    ``hooks`` on its MoE block; the outputs replace ``hidden`` when ``keep``."""
    try:
        with torch.inference_mode():
            for k, ids in enumerate(seqs):
                _unfilled(i, calls[k][i])
                args, kwargs = calls[k][i]
                before = len(hooks.store.get("x", [])) if hooks else 0
                out = module(hidden[k], *args, **kwargs)
                if keep:
                    hidden[k] = out[0] if isinstance(out, tuple) else out
                    if isinstance(out, tuple) and i + 1 in calls[k]:
                        calls[k][i + 1] = _pass_on(calls[k][i + 1], out)
                if hooks is not None:
                    check_one_call(i, k, hooks.store.get("x", [])[before:], ids.numel())
    finally:
        if hooks is not None:
            hooks.remove()


def stream_traces(
    lm: LoadedModel,
    inputs: Mapping[str, Any],
    layers: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    visit: Callable[[StreamedLayer], None] | None = None,
    by_expert: bool | None = None,
) -> dict[str, Trace]:
    """Trace every MoE layer (or ``layers``) over each named input set, one decoder layer in memory.

    ``inputs`` maps a name to sequences as :func:`~moe_utils.models.trace.trace` takes them;
    the result maps the same names to traces equal to ``trace(lm, sequences, layers)``. ``visit``
    is called once per traced layer, in order, while the layer's weights are held. ``by_expert``
    leaves the routed experts on disk and reads each once per layer, in one sweep that also
    computes every expert's outputs on the captured block inputs for ``visit`` (:class:`SweptLayer`;
    None: when one layer's experts, decoded, would take more than half of ``FIT_SHARE`` of the
    available memory).
    """
    require_moe(lm.spec, "stream_traces()")
    why = stream_reason(lm)
    if why or lm.path is None:
        raise StreamUnsupportedError(f"{lm.name} cannot be streamed: {why}; run it whole (stream=False)")
    chosen = check_layers(layers, lm.facts, "moe")
    params = lm.facts.routing
    if params is None:
        raise StreamUnsupportedError(f"{lm.name} ({lm.facts.family}) has no routing function to trace")
    dev = torch.device(device)
    if by_expert is None:
        by_expert = _too_large(lm, dtype)
    seqs = {name: _as_sequences(lm, s) for name, s in inputs.items()}
    for s in seqs.values():
        _check_lengths(lm, s)
    model = empty_model(lm, dtype)
    skeleton = replace(lm, model=model)
    src = FolderSource(Path(lm.path))
    files = [str(f) for f in {src.reader.file_of(n) for n in src.reader.names()}]
    paths = lm.spec.modules
    decoder = model.get_submodule(paths.layers)
    if not isinstance(decoder, nn.ModuleList):
        raise StreamUnsupportedError(f"{paths.layers} of {lm.name} is not a list of decoder layers")

    def hooks(i: int, on: bool) -> _LayerHooks | None:
        return _LayerHooks(skeleton, i, params, lm.facts.hidden_size) if on else None

    try:
        renamed = disk_names(model, src)
        _fill_outer(model, src, paths.layers, dev, renamed)
        calls = {name: [_record(model, decoder, ids, dev) for ids in s] for name, s in seqs.items()}
        hidden = {name: [c.pop("input") for c in cs] for name, cs in calls.items()}
        per_layer: dict[str, dict[int, LayerTrace]] = {name: {} for name in seqs}
        last = max(chosen) if chosen else -1
        for i in range(last + 1):
            module = decoder[i]
            sweep = fill_layer(module, i, src, lm.spec, lm.facts, dev, by_expert=by_expert, renamed=renamed)
            src.release()
            release_file_pages(files)
            swept = _sweep(module, i, seqs, calls, hidden, sweep, hooks, i in chosen and visit is not None)
            for name, s in seqs.items():
                h = hooks(i, i in chosen)
                _run_layer(module, i, s, calls[name], hidden[name], h, keep=True)
                if h is not None:
                    per_layer[name][i] = h.layer_trace(i)
                    if swept is not None and name in swept.outputs:
                        _same_inputs(i, name, swept, per_layer[name][i])
            if i in chosen:
                one = {
                    name: check_trace_finite(lm, assemble_trace(lm, s, {i: per_layer[name][i]}, "moe"))
                    for name, s in seqs.items()
                }
                if visit is not None:
                    if sweep is not None and swept is not None:
                        held = SweptLayer(lm.spec, lm.facts, sweep.weights, lm.name, swept)
                    else:
                        held = HeldLayer(lm.spec, lm.facts, module_layer_weights(model, lm.spec, lm.facts, i), lm.name)
                    visit(StreamedLayer(i, one, held))
                    del held
            del sweep, swept
            empty_layer(module)
            gc.collect()
            release_file_pages(files)
    finally:
        src.release()
    return {name: assemble_trace(lm, s, per_layer[name], "moe") for name, s in seqs.items()}


def _sweep(
    module: nn.Module,
    i: int,
    seqs: Mapping[str, list[Tensor]],
    calls: Mapping[str, list[dict[Any, Any]]],
    hidden: Mapping[str, list[Tensor]],
    sweep: ExpertSweep | None,
    hooks: Callable[[int, bool], _LayerHooks | None],
    evaluate: bool,
) -> Swept | None:
    """A block computed expert by expert: the first pass of every sequence through layer ``i``
    (its experts module's calls kept, the block inputs captured when ``evaluate``), then the
    one sweep over its experts. None for a layer held whole."""
    if sweep is None:
        return None
    captured: dict[str, Tensor] = {}
    for name, s in seqs.items():
        h = hooks(i, evaluate)
        _run_layer(module, i, s, calls[name], hidden[name], h, keep=False)
        if h is not None:
            captured[name] = torch.cat(h.store["x"])
    return sweep.sweep(captured)


def _same_inputs(i: int, name: str, swept: Swept, lt: LayerTrace) -> None:
    """Raise unless the block inputs the sweep evaluated the experts on are the trace's."""
    x = swept.inputs[name]
    if not torch.equal(x, lt.x):
        raise StreamUnsupportedError(
            f"layer {i}: the two passes through the layer gave different block inputs for {name!r}, so the "
            "experts' outputs were not computed on the traced inputs (run on a machine that holds one decoded layer)"
        )


def stream_check(model: str, tolerance: float = 1e-5) -> str:
    """Empty when ``model`` (a ``random:`` family, saved to a temporary folder) streams with the
    whole-model path's captures (block outputs within ``tolerance``, identical top-k choices);
    otherwise one line saying why it cannot be streamed (the coverage page's stream column)."""
    try:
        lm = load_model(model)
        seqs = [[0, *range(3, 11)], [0, 7, 9, 11, 13]]
        ref = trace(lm, seqs)
        with tempfile.TemporaryDirectory(prefix="moe-stream-check-") as tmp:
            built = lm.built()
            built.save_pretrained(tmp)  # pyright: ignore[reportCallIssue]  # a transformers model
            if lm.tokenizer is not None:
                lm.tokenizer.save_pretrained(tmp)
            got = stream_traces(streamable(tmp), {"a": seqs})["a"]
        for layer in ref.layers:
            a, b = ref[layer], got[layer]
            err = float((a.block_output - b.block_output).abs().max() / a.block_output.abs().max().clamp_min(1e-30))
            if err > tolerance:
                return f"cannot be streamed: layer {layer}'s block output differs from the whole model's by {err:.1e}"
            if not torch.equal(a.routed_index, b.routed_index):
                return f"cannot be streamed: layer {layer}'s top-k choices differ from the whole model's"
    except Exception as exc:  # any failure is the reason, on one line
        return f"cannot be streamed: {first_line(exc)[:300]}"
    return ""


__all__ = [
    "FIT_SHARE",
    "StreamUnsupportedError",
    "StreamedLayer",
    "SweptLayer",
    "empty_model",
    "output_arity",
    "projected_bytes",
    "stream_check",
    "stream_choice",
    "stream_reason",
    "stream_traces",
    "streamable",
]
