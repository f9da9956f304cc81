"""One decoder layer of a model built without weights, filled from its checkpoint and emptied again.

The layer stream (:mod:`moe_utils.models.stream`) runs transformers' own decoder-layer module, so
the attention, norms, rotary embeddings and the MoE block compute exactly what the loaded model
computes. Only the tensors of one layer are read: the MoE block's through the family spec's
on-disk formats into canonical weights (:func:`~moe_utils.models.weights.layer_weights`' reader,
which decodes FP8 / MXFP4 / INT4 experts), then laid out as the module holds them in memory
(:func:`memory_tensors`, the inverse of the reader's layouts); every other tensor of the layer
(attention, norms, a dense MLP) under the name the module gives it, which is the name on disk
for the families transformers loads without renaming them.

A block too large to decode whole is computed expert by expert (:class:`ExpertSweep`): the stream
runs the layer's sequences twice, and between the two passes each routed expert is read, decoded
and used once, for the block's output and for every per-expert quantity the analyses need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from moe_utils.arch import FamilySpec
from moe_utils.arch.facts import ModelFacts
from moe_utils.arch.spec import ExpertTensors, MoETensors
from moe_utils.core.errors import MoEUtilsError
from moe_utils.core.memory import shedding_file_pages
from moe_utils.engine.canonical import MoELayerWeights
from moe_utils.engine.expert_math import expert_intermediates, expert_outputs
from moe_utils.models.sources import FolderSource
from moe_utils.models.weights import read_layer, read_layer_by_expert

Tensor = torch.Tensor


class StreamUnsupportedError(MoEUtilsError):
    """A model whose decoder layers the layer stream cannot fill from its checkpoint."""


def _combine(a: Tensor, b: Tensor, order: str, axis: int) -> Tensor:
    """The fused gate/up tensor of two halves along ``axis`` (concatenated or interleaved)."""
    if order == "interleaved":
        return torch.stack([a, b], dim=axis + 1).flatten(axis, axis + 1)
    return torch.cat([a, b], dim=axis)


def _stored(t: Tensor, transposed: bool, flat: bool) -> Tensor:
    """A canonical ``[E, out, in]`` tensor as a fused layout stores it (transposed, flattened)."""
    if transposed:
        t = t.transpose(1, 2)
    return t.reshape(-1, t.shape[-1]) if flat else t


def _expert_tensors(w: MoELayerWeights, ex: ExpertTensors) -> dict[str, Tensor]:
    """The routed experts of ``w`` under the names and in the layout of ``ex``."""
    out: dict[str, Tensor] = {}
    if ex.layout == "per_expert":
        for e in range(w.num_experts):
            for name, t in ((ex.act, w.w_act), (ex.up, w.w_up), (ex.down, w.w_down)):
                if name is not None and t is not None:
                    out[name.format(e=e)] = t[e]
        return out
    if ex.gate_up is not None:
        if w.w_act is None:
            raise StreamUnsupportedError(
                f"layer {w.layer}: the layout names a fused gate/up tensor but the experts have no gate"
            )
        out[ex.gate_up] = _stored(_combine(w.w_act, w.w_up, ex.order, 1), ex.in_transposed, ex.flat)
        if ex.gate_up_bias is not None and w.b_act is not None and w.b_up is not None:
            out[ex.gate_up_bias] = _combine(w.b_act, w.b_up, ex.order, 1)
    else:
        if ex.act is not None and w.w_act is not None:
            out[ex.act] = _stored(w.w_act, ex.in_transposed, ex.flat)
        if ex.up is not None:
            out[ex.up] = _stored(w.w_up, ex.in_transposed, ex.flat)
    out[ex.down] = _stored(w.w_down, ex.down_transposed, ex.flat)
    if ex.down_bias is not None and w.b_down is not None:
        out[ex.down_bias] = w.b_down
    return out


def memory_tensors(w: MoELayerWeights, moe: MoETensors, experts: bool = True) -> dict[str, Tensor]:
    """The MoE block of ``w`` as the loaded model holds it: ``{name relative to the layer: tensor}``
    for the router, its biases, the experts (unless ``experts`` is False) and the shared experts
    (views where the layout allows)."""
    out = {moe.router: w.router}
    for name, t in ((moe.router_bias, w.router_bias), (moe.correction_bias, w.score_correction_bias)):
        if name is not None and t is not None:
            out[name] = t
    if moe.shared is not None and w.shared is not None:
        for name, t in (
            (moe.shared.act, w.shared.w_act),
            (moe.shared.up, w.shared.w_up),
            (moe.shared.down, w.shared.w_down),
        ):
            if name is not None and t is not None:
                out[name] = t
    if moe.shared_gate is not None and w.shared_gate is not None:
        out[moe.shared_gate] = w.shared_gate
    if experts:
        out.update(_expert_tensors(w, moe.experts))
    return out


def _disk_prefixes(spec: FamilySpec, layer: int) -> list[str]:
    prefixes = []
    for fmt in spec.weight_formats(True):
        p = fmt.layer_prefix.format(layer=layer)
        if p not in prefixes:
            prefixes.append(p)
    return prefixes


@dataclass(frozen=True)
class Joined:
    """A model tensor that transformers builds at load time from checkpoint tensors: the
    concatenation of ``sources`` along ``dim`` (its ``Concatenate``), or piece ``piece`` of the one
    source split into ``sizes`` along ``dim`` (its ``Split`` and ``Chunk``)."""

    sources: tuple[str, ...]
    dim: int
    piece: int | None = None
    sizes: tuple[int, ...] = ()


DiskRef = str | Joined  # where a model tensor is on disk: one name, or tensors transformers joins


def has_disk(src: FolderSource, ref: DiskRef) -> bool:
    """Whether every checkpoint tensor ``ref`` needs is in ``src``."""
    return all(src.has(n) for n in ((ref,) if isinstance(ref, str) else ref.sources))


def read_disk(src: FolderSource, ref: DiskRef) -> Tensor:
    """The model tensor ``ref`` stands for, read (and joined or split) from ``src``."""
    if isinstance(ref, str):
        return src.get(ref)
    if ref.piece is None:
        return torch.cat([src.get(n) for n in ref.sources], dim=ref.dim)
    return torch.split(src.get(ref.sources[0]), list(ref.sizes), dim=ref.dim)[ref.piece].contiguous()


def _joins(converter: Any) -> str | None:
    """ "cat" or "split" for a converter made of one plain Concatenate, Split or Chunk (the
    non-expert conversions the stream reproduces); None for any other (experts: the family spec)."""
    from transformers.core_model_loading import Chunk, Concatenate, Split

    ops = list(getattr(converter, "operations", []) or [])
    if len(ops) != 1 or getattr(ops[0], "num_shards_attribute", None) is not None:
        return None
    if isinstance(ops[0], Concatenate):
        return "cat"
    return "split" if isinstance(ops[0], Split | Chunk) else None


def _op_dim(converter: Any) -> int:
    """The axis of a converter's single Concatenate, Split or Chunk."""
    return int(converter.operations[0].dim)


def disk_names(model: nn.Module, src: FolderSource) -> dict[str, DiskRef]:
    """``{name in the model: where it is on disk}`` for the checkpoint's tensors that transformers
    renames when it loads them (its own conversion mapping, e.g. ``model.embeddings`` on disk for
    ``model.embed_tokens`` in memory), and for those it joins from several tensors or splits from
    one (:class:`Joined`: e.g. ``q_conv1d``, ``k_conv1d`` and ``v_conv1d`` concatenated into
    ``conv1d``); the experts' conversions are left to the family spec."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    try:
        transforms = get_model_conversion_mapping(model)  # pyright: ignore[reportArgumentType]  # a PreTrainedModel
    except Exception:  # a model class without a conversion mapping renames nothing
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return {}
    prefix = getattr(model, "base_model_prefix", None)
    meta = model.state_dict()
    out: dict[str, DiskRef] = {}
    parts: dict[tuple[str, int], dict[int, str]] = {}
    for name in src.reader.names():
        memory, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if pattern is None:
            if memory != name:
                out[memory] = name
            continue
        k = next((i for i, c in enumerate(converters) if pattern in c.source_patterns), None)
        if k is None or (how := _joins(converters[k])) is None:
            continue
        conv = converters[k]
        dim = _op_dim(conv)
        if how == "cat":
            parts.setdefault((memory, k), {})[conv.source_patterns.index(pattern)] = name
            continue
        first = conv.target_patterns[0]
        targets = [memory.replace(first, t) for t in conv.target_patterns]
        if all(t in meta for t in targets):
            sizes = tuple(int(meta[t].shape[dim]) for t in targets)
            for j, t in enumerate(targets):
                out[t] = Joined((name,), dim, j, sizes)
    for (memory, k), found in parts.items():
        conv = converters[k]
        if len(found) == len(conv.source_patterns):
            out[memory] = Joined(tuple(found[i] for i in sorted(found)), _op_dim(conv))
    return out


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` of ``module``."""
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


@dataclass
class Swept:
    """What one pass over a layer's routed experts computed on each input set's captured block
    inputs ``inputs[name]`` ``[N, H]`` (float32, CPU): ``outputs[name]`` ``[N, E, H]``, every
    expert's output on every token (as :func:`~moe_utils.engine.expert_math.expert_outputs` gives
    it), and ``activations[name]`` ``[N, E, I]``, act(W_act x) (as
    :func:`~moe_utils.engine.expert_math.expert_intermediates` gives it; no entry when the experts
    have no W_act)."""

    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    activations: dict[str, Tensor]


def _one_expert(w: MoELayerWeights, e: int) -> MoELayerWeights:
    """Expert ``e`` of ``w`` as a layer of one expert, its matrices read (and decoded) now and
    widened to float32 once (the engine computes in float32 and would widen them at every use)."""

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[e][None].float()

    w_up, w_down = pick(w.w_up), pick(w.w_down)
    assert w_up is not None and w_down is not None
    return replace(
        w,
        w_act=pick(w.w_act),
        w_up=w_up,
        w_down=w_down,
        b_act=pick(w.b_act),
        b_up=pick(w.b_up),
        b_down=pick(w.b_down),
        expert_ids=[w.ids[e]],
    )


class ExpertSweep:
    """The experts module of a block too large to decode whole, computed expert by expert.

    The stream runs the layer's sequences through it twice. On the first pass each call's inputs
    (hidden states, the model's own top-k indices and weights) are kept and zeros returned;
    :meth:`sweep` then reads and decodes each routed expert once and, with it, computes its share
    of every kept call and its outputs on the captured block inputs; on the second pass each call
    is answered with its output, so the layer's output and the block's captures are the model's.
    """

    def __init__(self, weights: MoELayerWeights) -> None:
        self.weights = weights
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []
        self.answers: list[Tensor] | None = None
        self.answered = 0

    def __call__(
        self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *args: object, **kwargs: object
    ) -> Tensor:
        if self.answers is None:
            self.calls.append((hidden_states, top_k_index, top_k_weights))
            return torch.zeros_like(hidden_states)
        k = self.answered
        if k >= len(self.answers) or not torch.equal(top_k_index, self.calls[k][1]):
            raise StreamUnsupportedError(
                f"layer {self.weights.layer}: the second pass through the layer routed its tokens differently "
                "from the first, so the experts cannot be computed expert by expert (run on a machine that "
                "holds one decoded layer)"
            )
        self.answered += 1
        out = self.answers[k]
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype).reshape(hidden_states.shape)

    def sweep(self, inputs: Mapping[str, Tensor]) -> Swept:
        """Read and decode each routed expert once: its share of every kept call (the answers of
        the second pass) and, for each named ``[N, H]`` block input, its outputs and act(W_act x)."""
        w = self.weights
        E, H, inner = w.num_experts, w.hidden_size, w.intermediate_size
        calls = [(h.reshape(-1, H), index, weight) for h, index, weight in self.calls]
        answers = [torch.zeros(h.shape[0], H, dtype=torch.float32) for h, _, _ in calls]
        outputs = {name: torch.empty(x.shape[0], E, H, dtype=torch.float32) for name, x in inputs.items()}
        gated = w.w_act is not None
        acts = {name: torch.empty(x.shape[0], E, inner, dtype=torch.float32) for name, x in inputs.items() if gated}
        for e in range(E):
            one = _one_expert(w, e)
            for out, (h, index, weight) in zip(answers, calls, strict=True):
                tok, pos = torch.where(index == e)
                if tok.numel():
                    y = expert_outputs(one, h[tok], chunk_tokens=tok.numel())[:, 0]
                    out.index_add_(0, tok, y * weight[tok, pos].float().unsqueeze(-1))
            for name, x in inputs.items():
                outputs[name][:, e] = expert_outputs(one, x)[:, 0]
                if gated:
                    acts[name][:, e] = expert_intermediates(one, x)[:, 0]
            del one
        self.answers, self.answered = answers, 0
        return Swept(dict(inputs), outputs, acts)


def _by_expert(
    module: nn.Module, layer: int, src: FolderSource, spec: FamilySpec, facts: ModelFacts, device: torch.device
) -> tuple[ExpertSweep, dict[str, Tensor], str]:
    """The MoE block of ``layer`` computed expert by expert: its experts module's forward replaced
    by an :class:`ExpertSweep` over the layer's weights (experts left on disk). Returns the sweep,
    the block's other tensors by their names in the layer, and the experts module's name prefix
    (whose tensors stay empty)."""
    moe = spec.memory.moe
    assert moe is not None
    paths = spec.modules
    experts = module.get_submodule(f"{paths.block}.{paths.experts}")
    dtype = next((t.dtype for t in experts.parameters() if t.is_floating_point()), torch.bfloat16)
    w = read_layer_by_expert(src, spec, facts, layer, device, dtype)
    sweep = ExpertSweep(w)
    experts.forward = sweep  # this instance only; the layer is emptied after its passes
    block = memory_tensors(w, moe, experts=False)
    return sweep, block, f"{paths.block}.{paths.experts}."


def _stored_as_in_memory(module: nn.Module, layer: int, src: FolderSource, spec: FamilySpec) -> bool:
    """Whether every tensor of the layer's MoE block is on disk under its in-memory name and shape
    (gpt-oss's fused experts, decoded from MXFP4 straight into the layout transformers holds), so
    the block is read as it is, without going through the canonical form and a second copy."""
    prefix = _disk_prefixes(spec, layer)
    names = [k for k in module.state_dict(keep_vars=True) if k.startswith(spec.modules.block + ".")]
    for name in names:
        disk = next((p + name for p in prefix if src.has(p + name)), None)
        if disk is None or tuple(src.shape(disk)) != tuple(
            module.get_parameter(name).shape if _is_param(module, name) else ()
        ):
            return False
    return bool(names)


def _is_param(module: nn.Module, name: str) -> bool:
    path, _, leaf = name.rpartition(".")
    return leaf in (module.get_submodule(path) if path else module)._parameters


def fill_layer(
    module: nn.Module,
    layer: int,
    src: FolderSource,
    spec: FamilySpec,
    facts: ModelFacts,
    device: torch.device,
    by_expert: bool = False,
    renamed: Mapping[str, DiskRef] | None = None,
) -> ExpertSweep | None:
    """Read decoder layer ``layer`` from ``src`` into ``module`` (built on the meta device), each
    tensor in the dtype the module gave it, on ``device``. With ``by_expert`` the routed experts
    stay on disk (a layer too large to decode whole) and the :class:`ExpertSweep` that stands in
    for the experts module is returned (None otherwise: the module holds them). Raises
    :class:`StreamUnsupportedError` when a tensor of the module has no counterpart in the
    checkpoint or a different shape. ``renamed`` maps the model's full tensor names to where they
    are on disk where transformers renames, joins or splits them (:func:`disk_names`)."""
    block: dict[str, Tensor] = {}
    sweep, skip = None, None
    if layer in facts.moe_layers:
        moe = spec.memory.moe
        if moe is None:
            raise StreamUnsupportedError(f"the {spec.name} spec names no in-memory MoE tensors; run the model whole")
        if by_expert:
            sweep, block, skip = _by_expert(module, layer, src, spec, facts, device)
        elif not _stored_as_in_memory(module, layer, src, spec):
            files = {str(src.reader.file_of(n)) for n in src.reader.names()}
            with shedding_file_pages(files):  # the file pages a layout copy reads are dropped as it goes
                block = memory_tensors(read_layer(src, spec, facts, layer), moe)
    wanted = {k: v for k, v in module.state_dict(keep_vars=True).items() if skip is None or not k.startswith(skip)}
    unused = sorted(set(block) - set(wanted))
    if unused:
        raise StreamUnsupportedError(
            f"layer {layer}: transformers' {type(module).__name__} has no tensor {unused[0]!r}, which the "
            f"{spec.name} spec names in memory; this family cannot be streamed (run it whole with stream=False)"
        )
    prefixes = _disk_prefixes(spec, layer)
    for name, empty in wanted.items():
        value = block.get(name)
        if value is None:
            disk = next((p + name for p in prefixes if src.has(p + name)), None)
            ref: DiskRef | None = disk
            if ref is None and renamed:
                alias = renamed.get(f"{spec.modules.layers}.{layer}.{name}")
                ref = alias if alias is not None and has_disk(src, alias) else None
            if ref is None:
                raise StreamUnsupportedError(
                    f"layer {layer}: the checkpoint has no tensor for {name} of transformers' "
                    f"{type(module).__name__} (tried {prefixes[0]}{name}); this family cannot be streamed "
                    "(run it whole with stream=False)"
                )
            value = read_disk(src, ref)
        if tuple(value.shape) != tuple(empty.shape):
            raise StreamUnsupportedError(
                f"layer {layer}: {name} is {tuple(value.shape)} on disk but {tuple(empty.shape)} in transformers' "
                f"{type(module).__name__}; this family cannot be streamed (run it whole with stream=False)"
            )
        _set_tensor(module, name, value.to(device=device, dtype=empty.dtype))
    block.clear()
    if skip is None:
        module.to(device)  # buffers the checkpoint does not hold (rotary tables) follow the weights
    else:
        for name, sub in module.named_modules():
            if not (name + ".").startswith(skip):
                for key, buf in list(sub._buffers.items()):
                    if buf is not None and buf.device.type != "meta":
                        sub._buffers[key] = buf.to(device)
    return sweep


def empty_layer(module: nn.Module) -> None:
    """Free a filled layer: every tensor goes back to the meta device."""
    module.to("meta")


__all__ = [
    "DiskRef",
    "ExpertSweep",
    "Joined",
    "StreamUnsupportedError",
    "Swept",
    "disk_names",
    "empty_layer",
    "fill_layer",
    "has_disk",
    "memory_tensors",
    "read_disk",
]
