"""Canonical per-layer weights of MoE blocks and dense MLPs.

Whatever the family stores (fused ``gate_up_proj [E,2I,H]``, transposed, interleaved with
biases, DBRX's 2-D ``[E*I,H]``, or one nn.Linear per expert on disk), a layer comes out as a
:class:`MoELayerWeights` with ``w_act/w_up [E,I,H]``, ``w_down [E,H,I]`` and router ``[E,H]``.

Sources (:mod:`moe_utils.models.sources`) are either a loaded model (tensors are read from the
module state on their own device) or a checkpoint folder (tensors are streamed from memory-mapped
safetensors one layer at a time, without building the model). Both go through the same family
spec, so a checkpoint and the model loaded from it give identical weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import cast

import torch
from torch import nn

from moe_utils.arch import FamilySpec, require_moe
from moe_utils.arch.facts import ModelFacts, check_layers
from moe_utils.arch.spec import ExpertTensors, MLPTensors, MoETensors, WeightFormat
from moe_utils.core.errors import CheckpointError
from moe_utils.core.finite import unwrap
from moe_utils.engine.canonical import DenseMLPWeights, MoELayerWeights
from moe_utils.models.lazy_experts import LazyExperts, LazyMatrix
from moe_utils.models.quant_codecs import EncodedMatrix
from moe_utils.models.quantized import QuantizedTensors
from moe_utils.models.screening import (
    EXPERT_MATRICES,
    check_dense,
    nonfinite_experts,
    screen_layer,
    without_experts,
)
from moe_utils.models.sources import (
    ExpertStack,
    FolderSource,
    HeldLayer,
    ModelSource,
    ModelWithFacts,
    TensorSource,
    WeightSource,
    open_source,
)

Tensor = torch.Tensor


# ---- assembling canonical tensors ----------------------------------------------------------
def tensor_name(fmt: WeightFormat, layer: int, rel: str) -> str:
    return fmt.layer_prefix.format(layer=layer) + rel


def _first_expert_tensor(ex: ExpertTensors) -> str:
    """Name of one expert tensor, so a scheme sharing its router name with another (fused vs
    per-expert on disk) is told apart by its experts."""
    name = ex.down if ex.layout == "fused" else ex.down.format(e=0)
    return name


def _probe_names(moe: MoETensors) -> list[str]:
    """The tensors whose presence identifies a naming scheme of an MoE block: the router, one
    expert tensor and every optional part (shared expert, its gate, biases), so that two schemes
    sharing router and expert names (fused vs original on-disk spellings) are told apart by the
    parts they name differently."""
    shared = () if moe.shared is None else (moe.shared.act, moe.shared.up, moe.shared.down)
    return [
        n
        for n in (
            moe.router,
            _first_expert_tensor(moe.experts),
            moe.router_bias,
            moe.correction_bias,
            moe.shared_gate,
            *shared,
        )
        if n
    ]


def pick_format(src: TensorSource, spec: FamilySpec, layer: int, want: str) -> WeightFormat:
    """The first naming scheme of ``spec`` whose router (or dense MLP) tensor exists."""
    tried = []
    for fmt in spec.weight_formats(src.on_disk):
        if want == "moe":
            if fmt.moe is None:
                continue
            probes = _probe_names(fmt.moe)
        else:
            if fmt.dense is None:
                continue
            probes = [fmt.dense.up]
        names = [tensor_name(fmt, layer, p) for p in probes]
        if all(src.has(name) for name in names):
            return fmt
        tried.append(" + ".join(names))
    raise CheckpointError(
        f"layer {layer} of this {spec.name} {spec_kind(src)} has none of the expected tensors "
        f"({', '.join(tried) or 'no naming scheme for this part'}); the weights are partial or "
        "use a naming the family spec does not know (add it to the spec's disk formats)"
    )


def _get(src: TensorSource, fmt: WeightFormat, layer: int, rel: str | None, dtype) -> Tensor | None:
    """The tensor ``rel`` of ``layer`` (None when the spec names none: an optional part)."""
    return None if rel is None else _need(src, fmt, layer, rel, dtype)


def _need(src: TensorSource, fmt: WeightFormat, layer: int, rel: str, dtype) -> Tensor:
    """The tensor ``rel`` of ``layer``; a clear error when the checkpoint lacks it."""
    name = tensor_name(fmt, layer, rel)
    if not src.has(name):
        raise CheckpointError(
            f"tensor {name!r} is missing from the {spec_kind(src)}; the "
            "checkpoint is partial (a shard or tensor is absent)"
        )
    return _convert(src.get(name), dtype, src.on_disk)


def spec_kind(src: TensorSource) -> str:
    return "checkpoint" if src.on_disk else "model"


def _convert(t: Tensor, dtype, on_disk: bool) -> Tensor:
    """``t`` in ``dtype`` (``None``: as stored). Streamed tensors are private (copy-on-write) maps,
    and a loaded model's tensors are returned as they are when no conversion is asked for."""
    return t if dtype is None or t.dtype == dtype else t.to(dtype=dtype)


def _missing_up(ex: ExpertTensors) -> CheckpointError:
    return CheckpointError(
        f"the family spec names no up projection for these experts ({ex}); it needs `up` or `gate_up`"
    )


def _lazy_source(src: TensorSource, dtype, lazy: bool) -> QuantizedTensors | None:
    """The quantized tensors of ``src`` when its expert matrices are to stay encoded (``lazy``, a
    quantized checkpoint, the stored dtype asked for); None otherwise."""
    if not lazy or not isinstance(src, FolderSource) or src.quantized is None:
        return None
    return src.quantized if dtype is None or dtype == src.quantized.dtype else None


def _lazy_stack(src: FolderSource, quantized: QuantizedTensors, names: list[str]) -> Tensor | None:
    """The per-expert quantized matrices ``names`` as one :class:`LazyExperts` stack (indexed like a
    tensor by the weight passes); None when one is missing or stored plainly."""
    if not all(src.has(n) for n in names):
        return None
    encoded = [quantized.encoded(n) for n in names]
    if not all(isinstance(m, EncodedMatrix) for m in encoded):
        return None
    return cast(Tensor, LazyExperts([LazyMatrix(m) for m in encoded if isinstance(m, EncodedMatrix)]))


def _experts(
    src: TensorSource,
    fmt: WeightFormat,
    layer: int,
    ex: ExpertTensors,
    dtype,
    num_experts: int,
    tidy: bool = True,
    lazy: bool = False,
) -> dict[str, Tensor | None]:
    """Canonical expert tensors, whatever the stored layout: ``w_act`` (None when gate-less),
    ``w_up`` and ``w_down`` (always present) and the biases ``b_act``/``b_up``/``b_down``
    (None when absent), as the keyword arguments of :class:`MoELayerWeights`. With ``lazy``, the
    quantized expert matrices of a checkpoint stay encoded (:class:`LazyExperts`)."""
    quantized = _lazy_source(src, dtype, lazy)
    if ex.layout == "per_expert":

        def stack(template: str) -> Tensor:
            names = [tensor_name(fmt, layer, template.format(e=e)) for e in range(num_experts)]
            if quantized is not None and isinstance(src, FolderSource):
                encoded = _lazy_stack(src, quantized, names)
                if encoded is not None:
                    return encoded
            view = src.stacked(names) if isinstance(src, FolderSource) else None
            if view is not None:
                if dtype is None or view.dtype == dtype:
                    return view
                converted = torch.empty(view.shape, dtype=dtype)
                for e in range(num_experts):  # expert by expert: torch converts a gapped view slowly
                    converted[e].copy_(view[e])
                return converted
            first = _need(src, fmt, layer, template.format(e=0), dtype)
            out = torch.empty((num_experts, *first.shape), dtype=first.dtype, device=first.device)
            out[0] = first
            del first
            for e in range(1, num_experts):
                out[e] = _need(src, fmt, layer, template.format(e=e), dtype)
            return out

        if ex.up is None:
            raise _missing_up(ex)
        return _parts(None if ex.act is None else stack(ex.act), stack(ex.up), stack(ex.down))

    b_act = b_up = None
    w_act: Tensor | None
    decoded = _fused_by_expert(src, fmt, layer, ex, dtype, quantized)
    if decoded is not None:
        return decoded
    if ex.gate_up is not None:
        gate_up = _need(src, fmt, layer, ex.gate_up, dtype)
        if ex.flat:
            gate_up = gate_up.reshape(num_experts, -1, gate_up.shape[-1])
        if ex.in_transposed:  # [E,H,2I] -> [E,2I,H]
            gate_up = gate_up.transpose(1, 2)
        if ex.order == "interleaved":
            w_act, w_up = gate_up[:, 0::2], gate_up[:, 1::2]
        else:
            half = gate_up.shape[1] // 2
            w_act, w_up = gate_up[:, :half], gate_up[:, half:]
        bias = _get(src, fmt, layer, ex.gate_up_bias, dtype)
        if bias is not None:
            b_act, b_up = (
                (bias[:, 0::2], bias[:, 1::2])
                if ex.order == "interleaved"
                else (bias[:, : bias.shape[1] // 2], bias[:, bias.shape[1] // 2 :])
            )
    else:
        if ex.up is None:
            raise _missing_up(ex)
        w_act = _get(src, fmt, layer, ex.act, dtype)
        w_up = _need(src, fmt, layer, ex.up, dtype)
        if ex.flat:
            w_act = None if w_act is None else w_act.reshape(num_experts, -1, w_act.shape[-1])
            w_up = w_up.reshape(num_experts, -1, w_up.shape[-1])
        if ex.in_transposed:
            w_act = None if w_act is None else w_act.transpose(1, 2)
            w_up = w_up.transpose(1, 2)
    w_down = _need(src, fmt, layer, ex.down, dtype)
    if ex.flat:
        w_down = w_down.reshape(num_experts, -1, w_down.shape[-1])
    if ex.down_transposed:  # [E,I,H] -> [E,H,I]
        w_down = w_down.transpose(1, 2)
    b_down = _get(src, fmt, layer, ex.down_bias, dtype)
    if not tidy:  # views of the stored tensors as they are (the engine reads them expert by expert)
        return _parts(w_act, w_up, w_down, b_act, b_up, b_down)
    return _parts(_tidy_opt(w_act), _tidy(w_up), _tidy(w_down), _tidy_opt(b_act), _tidy_opt(b_up), _tidy_opt(b_down))


def _split_gate_up(t: Tensor, order: str, axis: int) -> tuple[Tensor, Tensor]:
    """The act and up halves of a fused gate/up tensor along ``axis`` (interleaved or concatenated)."""
    if order == "interleaved":
        pairs = t.unflatten(axis, (-1, 2))
        return pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
    half = t.shape[axis] // 2
    return t.narrow(axis, 0, half), t.narrow(axis, half, half)


def _decode_experts(src: FolderSource, name: str, split: Callable[[Tensor], tuple[Tensor, ...]], dtype) -> list[Tensor]:
    """``split(name[e])`` for every expert ``e`` of a fused quantized tensor, decoded one expert at
    a time into contiguous stacks, so the decoded tensor is never held whole."""
    pieces = src.expert_pieces(name)
    assert pieces is not None  # only called for quantized fused tensors
    num = src.shape(name)[0]
    outs: list[Tensor] = []
    for e, piece in enumerate(pieces):
        views = split(piece)
        if not outs:
            outs = [torch.empty((num, *v.shape), dtype=dtype or v.dtype) for v in views]
        for out, view in zip(outs, views, strict=True):
            out[e].copy_(view)
        del piece, views
    return outs


def _lazy_fused(
    quantized: QuantizedTensors, name: str, transposed: bool, order: str | None = None
) -> tuple[Tensor, ...]:
    """The fused quantized tensor ``name`` as :class:`LazyExperts` stacks in the canonical
    orientation (the stored ``[out, in]`` of each expert, ``transposed`` when the canonical matrix
    is ``[in, out]``), split into its act and up halves along the canonical rows when ``order``
    names the fused gate/up layout."""
    encoded = quantized.encoded(name)
    assert isinstance(encoded, list)  # only called for fused quantized tensors
    if order is None:
        return (cast(Tensor, LazyExperts([LazyMatrix(m, transposed) for m in encoded])),)
    rows = encoded[0].shape[1 if transposed else 0]
    if order == "interleaved":
        halves = [(0, 2, rows // 2), (1, 2, rows // 2)]
    else:
        halves = [(0, 1, rows // 2), (rows // 2, 1, rows // 2)]
    return tuple(
        cast(Tensor, LazyExperts([LazyMatrix(m, transposed, first, step, count) for m in encoded]))
        for first, step, count in halves
    )


def _fused_by_expert(
    src: TensorSource,
    fmt: WeightFormat,
    layer: int,
    ex: ExpertTensors,
    dtype,
    quantized: QuantizedTensors | None = None,
) -> dict[str, Tensor | None] | None:
    """Canonical expert tensors of a fused layout whose matrices are stored quantized (gpt-oss's
    MXFP4), decoded expert by expert, or kept encoded when ``quantized`` is given
    (:class:`LazyExperts`); None for any other source or layout."""
    if not isinstance(src, FolderSource) or ex.layout != "fused" or ex.flat:
        return None
    rels = [r for r in (ex.gate_up, ex.act, ex.up, ex.down) if r is not None]
    names = {rel: tensor_name(fmt, layer, rel) for rel in rels}
    if not all(src.has(n) and src.expert_pieces(n) is not None for n in names.values()):
        return None

    def read(rel: str, transposed: bool, order: str | None = None) -> tuple[Tensor, ...]:
        """The experts of ``rel`` in the canonical orientation (``transposed``: the spec's flag for
        the [in, out] layout transformers gives), split into act and up along their rows when
        ``order`` is the fused gate/up's; kept encoded when ``quantized`` is given."""
        if quantized is not None:  # the stored [out, in] is canonical when transformers' layout is transposed
            return _lazy_fused(quantized, names[rel], not transposed, order)
        into = (lambda piece: piece.t()) if transposed else (lambda piece: piece)
        if order is None:
            return tuple(_decode_experts(src, names[rel], lambda p: (into(p),), dtype))
        return tuple(_decode_experts(src, names[rel], lambda p: _split_gate_up(into(p), order, 0), dtype))

    b_act = b_up = None
    w_act: Tensor | None
    if ex.gate_up is not None:
        w_act, w_up = read(ex.gate_up, ex.in_transposed, ex.order)
        bias = _get(src, fmt, layer, ex.gate_up_bias, dtype)
        if bias is not None:
            b_act, b_up = (_tidy(b) for b in _split_gate_up(bias, ex.order, 1))
    else:
        if ex.up is None:
            raise _missing_up(ex)
        w_act = None if ex.act is None else read(ex.act, ex.in_transposed)[0]
        (w_up,) = read(ex.up, ex.in_transposed)
    (w_down,) = read(ex.down, ex.down_transposed)
    return _parts(w_act, w_up, w_down, b_act, b_up, _get(src, fmt, layer, ex.down_bias, dtype))


def _parts(
    w_act: Tensor | None,
    w_up: Tensor,
    w_down: Tensor,
    b_act: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
) -> dict[str, Tensor | None]:
    return {"w_act": w_act, "w_up": w_up, "w_down": w_down, "b_act": b_act, "b_up": b_up, "b_down": b_down}


def _tidy(t: Tensor) -> Tensor:
    """Each expert's matrix as one dense block; a half of a fused [E, 2I, H] tensor already is,
    so it stays a view (no copy of two thirds of the layer)."""
    return t if t.dim() < 2 or t[0].is_contiguous() else t.contiguous()


def _tidy_opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else _tidy(t)


def _mlp(
    src: TensorSource, fmt: WeightFormat, layer: int, names: MLPTensors, dtype, activation: str
) -> DenseMLPWeights:
    return DenseMLPWeights(
        layer=layer,
        w_act=_get(src, fmt, layer, names.act, dtype),
        w_up=_need(src, fmt, layer, names.up, dtype),
        w_down=_need(src, fmt, layer, names.down, dtype),
        activation=activation,
    )


def _layer_weights(
    src: TensorSource, spec: FamilySpec, facts: ModelFacts, layer: int, dtype, tidy: bool = True, lazy: bool = False
) -> MoELayerWeights:
    require_moe(spec, "reading expert weights")
    check_layers([layer], facts, "moe")
    fmt = pick_format(src, spec, layer, "moe")
    moe = fmt.moe
    assert moe is not None  # pick_format(..., "moe") only returns schemes with an MoE part
    act = facts.activation
    ex = _experts(src, fmt, layer, moe.experts, dtype, facts.num_experts, tidy=tidy, lazy=lazy)
    w_up, w_down = ex["w_up"], ex["w_down"]
    assert w_up is not None and w_down is not None  # _experts always reads both
    shared = _mlp(src, fmt, layer, moe.shared, dtype, act) if moe.shared else None
    return MoELayerWeights(
        layer=layer,
        router=_need(src, fmt, layer, moe.router, dtype),
        w_act=ex["w_act"],
        w_up=w_up,
        w_down=w_down,
        activation=act,
        router_bias=_get(src, fmt, layer, moe.router_bias, dtype),
        score_correction_bias=_get(src, fmt, layer, moe.correction_bias, dtype),
        b_act=ex["b_act"],
        b_up=ex["b_up"],
        b_down=ex["b_down"],
        shared=shared,
        shared_gate=_get(src, fmt, layer, moe.shared_gate, dtype),
    )


def layer_weights(
    source: WeightSource, layer: int, dtype: torch.dtype | None = torch.float32, allow_pickle: bool = False
) -> MoELayerWeights:
    """Canonical weights of MoE layer ``layer`` from a loaded model or a checkpoint folder.

    ``dtype=None`` keeps the stored dtype (no copy of a loaded model's tensors, and one bf16 copy
    of a streamed layer instead of a float32 one).

    Non-finite weights raise :class:`NonFiniteError`, unless ``source`` is a
    :class:`~moe_utils.core.finite.ScreenedSource` (the offending experts are then left out).
    """
    source, screen = unwrap(source)
    if isinstance(source, HeldLayer):  # the layer stream's layer, already screened when it was read
        return source.get(layer, dtype)
    src, spec, facts = open_source(source, allow_pickle)
    try:
        return screen_layer(_layer_weights(src, spec, facts, layer, dtype), screen)
    finally:
        if isinstance(src, FolderSource):
            src.release()


def iter_layer_weights(
    source: WeightSource,
    layers: Iterable[int] | None = None,
    dtype: torch.dtype | None = torch.float32,
    allow_pickle: bool = False,
    deferred: frozenset[str] = frozenset(),
    lazy: bool = False,
) -> Iterator[MoELayerWeights]:
    """Yield MoE layers one at a time (default: all MoE layers), releasing file maps in between.
    Non-finite weights are handled as in :func:`layer_weights`, except the ``deferred`` tensors,
    which the caller screens itself (:func:`screen_layer`).

    With ``lazy`` (and ``dtype`` None), the quantized expert matrices of a checkpoint stay encoded
    on their memory maps: ``w_act``/``w_up``/``w_down`` are :class:`LazyExperts` whose experts
    decode the blocks a weight pass reads when it reads them (the same values as the eager
    decode), so the decoded layer is never held whole."""
    source, screen = unwrap(source)
    if isinstance(source, HeldLayer):  # the layer stream's one layer
        for layer in [source.layer] if layers is None else list(layers):
            yield source.get(layer, dtype)
        return
    src, spec, facts = open_source(source, allow_pickle)
    require_moe(spec, "reading expert weights")
    chosen = list(facts.moe_layers) if layers is None else list(layers)
    for layer in chosen:
        try:
            yield screen_layer(_layer_weights(src, spec, facts, layer, dtype, lazy=lazy), screen, deferred)
        finally:
            if isinstance(src, FolderSource):
                src.release()


def dense_mlp_weights(
    source: WeightSource, layer: int, dtype: torch.dtype | None = torch.float32, allow_pickle: bool = False
) -> DenseMLPWeights:
    """Weights of the dense MLP of ``layer`` (a dense model, or a dense layer of an MoE model).
    Non-finite weights raise :class:`NonFiniteError`."""
    src, spec, facts = open_source(unwrap(source)[0], allow_pickle)
    try:
        check_layers([layer], facts, "dense")
        fmt = pick_format(src, spec, layer, "dense")
        assert fmt.dense is not None  # pick_format(..., "dense") only returns schemes with a dense part
        return check_dense(_mlp(src, fmt, layer, fmt.dense, dtype, facts.activation))
    finally:
        if isinstance(src, FolderSource):
            src.release()


def read_layer(src: TensorSource, spec: FamilySpec, facts: ModelFacts, layer: int) -> MoELayerWeights:
    """Canonical weights of MoE layer ``layer`` from an open source, in the stored dtype, with
    ``spec`` and ``facts`` given (the layer stream's: its spec may be a derived one). Non-finite
    weights raise :class:`NonFiniteError`."""
    return screen_layer(_layer_weights(src, spec, facts, layer, None), None)


def read_layer_by_expert(
    src: FolderSource, spec: FamilySpec, facts: ModelFacts, layer: int, device: torch.device, dtype: torch.dtype
) -> MoELayerWeights:
    """MoE layer ``layer`` with its routed experts left on disk: ``w_act``/``w_up``/``w_down`` are
    :class:`~moe_utils.models.sources.ExpertStack` objects that read and decode one expert when
    indexed (the router, biases and shared experts are read, in ``dtype`` on ``device``). For
    checkpoints storing one tensor per expert (DeepSeek-V3, Kimi K2, Qwen3); finiteness is checked
    on each expert's outputs by the engine rather than on the weights."""
    check_layers([layer], facts, "moe")
    fmt = pick_format(src, spec, layer, "moe")
    moe = fmt.moe
    assert moe is not None  # pick_format(..., "moe") only returns schemes with an MoE part
    ex = moe.experts
    if ex.layout != "per_expert" or ex.up is None:
        raise CheckpointError(
            f"layer {layer}: the experts of this {spec.name} checkpoint are stored fused, not one tensor per "
            "expert, so they cannot be read expert by expert; run with a machine that holds one decoded layer"
        )

    def stack(template: str | None) -> Tensor | None:
        if template is None:
            return None
        names = [tensor_name(fmt, layer, template.format(e=e)) for e in range(facts.num_experts)]
        return cast(Tensor, ExpertStack(src, names, device, dtype))  # indexed like a tensor by the engine

    def small(rel: str | None) -> Tensor | None:
        t = _get(src, fmt, layer, rel, None)
        return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    shared = _mlp(src, fmt, layer, moe.shared, dtype, facts.activation) if moe.shared else None
    if shared is not None:
        shared = DenseMLPWeights(
            layer,
            None if shared.w_act is None else shared.w_act.to(device),
            shared.w_up.to(device),
            shared.w_down.to(device),
            shared.activation,
        )
    router = small(moe.router)
    w_up, w_down = stack(ex.up), stack(ex.down)
    assert router is not None and w_up is not None and w_down is not None
    bias = _get(src, fmt, layer, moe.correction_bias, None)
    return MoELayerWeights(
        layer=layer,
        router=router,
        w_act=stack(ex.act),
        w_up=w_up,
        w_down=w_down,
        activation=facts.activation,
        router_bias=small(moe.router_bias),
        score_correction_bias=None if bias is None else bias.to(device),
        shared=shared,
        shared_gate=small(moe.shared_gate),
    )


def module_layer_weights(model: nn.Module, spec: FamilySpec, facts: ModelFacts, layer: int) -> MoELayerWeights:
    """Canonical weights of MoE layer ``layer`` of ``model`` (views of its tensors, their dtype, never
    copied, even where an expert's matrix is strided: gpt-oss's interleaved, transposed layout):
    the layer stream's model has only this layer filled, from weights :func:`read_layer` screened."""
    return _layer_weights(ModelSource(model), spec, facts, layer, None, tidy=False)


__all__ = [
    "EXPERT_MATRICES",
    "DenseMLPWeights",
    "ExpertStack",
    "FolderSource",
    "HeldLayer",
    "LazyExperts",
    "MoELayerWeights",
    "ModelSource",
    "ModelWithFacts",
    "TensorSource",
    "WeightSource",
    "check_dense",
    "dense_mlp_weights",
    "iter_layer_weights",
    "layer_weights",
    "module_layer_weights",
    "nonfinite_experts",
    "open_source",
    "pick_format",
    "read_layer",
    "read_layer_by_expert",
    "screen_layer",
    "tensor_name",
    "without_experts",
]
