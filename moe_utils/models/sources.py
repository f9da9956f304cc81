"""Where a layer's tensors come from: a loaded model's modules, or a checkpoint folder streamed
from memory-mapped safetensors (quantized formats decoded on the way).

:mod:`moe_utils.models.weights` assembles the canonical per-layer weights from these sources; this
module only answers "does tensor NAME exist, and what is it", by the names of the family's
naming schemes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import torch
from torch import nn

from moe_utils.arch import FamilySpec, spec_for_config
from moe_utils.arch.config import config_dict, read_config_json
from moe_utils.arch.facts import ModelFacts, facts_for
from moe_utils.core.errors import MoEUtilsError
from moe_utils.core.finite import ScreenedSource
from moe_utils.models.checkpoint import CheckpointReader
from moe_utils.models.ids import resolve_folder
from moe_utils.models.quant_schemes import model_dtype, quant_scheme
from moe_utils.models.quantized import QuantizedTensors, ignored_layer

Tensor = torch.Tensor


class ModelWithFacts(Protocol):
    """What the readers need of a loaded model (:class:`~moe_utils.models.loading.LoadedModel`):
    its family spec and facts, its modules (None when loaded weights-only) and its folder."""

    spec: FamilySpec
    facts: ModelFacts
    model: nn.Module | None
    path: Path | None


#: What the weight readers take: a loaded model (its modules; its checkpoint when it was loaded
#: weights-only or offloaded), an ``nn.Module`` with a ``config``, a checkpoint folder or model
#: id, any of them optionally wrapped in a :class:`~moe_utils.core.finite.ScreenedSource`.
WeightSource: TypeAlias = "ModelWithFacts | nn.Module | str | Path | ScreenedSource | HeldLayer"


# ---- tensor sources ----------------------------------------------------------------------
class TensorSource(Protocol):
    config: dict
    on_disk: bool

    def has(self, name: str) -> bool: ...
    def get(self, name: str) -> Tensor: ...


class ModelSource:
    """Tensors of a loaded nn.Module by state-dict name (no copies)."""

    on_disk = False

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise MoEUtilsError(
                f"{type(model).__name__} has no .config; pass a transformers model "
                "or set model.config to its config dict"
            )
        self.config = config_dict(cfg)
        self._tensors: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
        self._tensors.update(dict(model.named_buffers(remove_duplicate=False)))

    def has(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> Tensor:
        tensor = self._tensors[name].detach()
        if tensor.device.type == "meta":
            raise MoEUtilsError(
                f"{name} is offloaded (on the meta device); read weights from the "
                "checkpoint folder instead: layer_weights(<folder>, layer)"
            )
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def part(self, name: str, index: tuple) -> Tensor:
        """``tensor[index]`` (basic slicing) without touching the rest of the tensor."""
        return self.get(name)[index]


class FolderSource:
    """Tensors streamed from a checkpoint folder (memory-mapped safetensors).

    A quantized checkpoint (:mod:`~moe_utils.models.quantized`) answers under the names of its
    unquantized twin, decoded to its config's dtype; an unsupported quantization is refused here,
    before a weight file is opened. Layers at index ``>= num_hidden_layers`` (DeepSeek-V3's
    multi-token-prediction layer), which transformers does not load, are not seen."""

    on_disk = True

    def __init__(self, folder: Path, allow_pickle: bool = False):
        self.config = read_config_json(folder)
        scheme = quant_scheme(self.config)
        self.reader = CheckpointReader(folder, allow_pickle=allow_pickle)
        self.quantized = None if scheme is None else QuantizedTensors(self.reader, scheme, model_dtype(self.config))
        layers = self.config.get("num_hidden_layers")
        self.num_layers = layers if isinstance(layers, int) else None

    def has(self, name: str) -> bool:
        if ignored_layer(name, self.num_layers):
            return False
        return self.reader.has(name) if self.quantized is None else self.quantized.has(name)

    def get(self, name: str) -> Tensor:
        """The tensor on a private memory map of its own bytes, read as it is used and unmapped
        when freed (:meth:`~moe_utils.models.checkpoint.CheckpointReader.mapped`): a layer held
        in memory costs its bytes once, and no time goes into copying it into fresh memory.
        A quantized tensor is decoded into fresh memory instead."""
        return self.reader.mapped(name) if self.quantized is None else self.quantized.get(name)

    def is_quantized(self, name: str) -> bool:
        return self.quantized is not None and self.quantized.is_quantized(name)

    def stacked(self, names: list[str]) -> Tensor | None:
        """The tensors ``names`` stacked as one view of the file when it stores them at equal
        distances; None when they must be copied (or decoded)."""
        if any(self.is_quantized(n) for n in names[:1]):
            return None
        return self.reader.mapped_stack(names)

    def expert_pieces(self, name: str) -> Iterator[Tensor] | None:
        """Expert by expert, ``name[e]`` of a fused quantized tensor, decoded; None for other tensors."""
        return None if self.quantized is None else self.quantized.expert_pieces(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name) if self.quantized is None else self.quantized.shape(name)

    def part(self, name: str, index: tuple) -> Tensor:
        """``tensor[index]`` read from disk (only the addressed bytes are copied; a quantized
        tensor is decoded whole, then indexed)."""
        if self.is_quantized(name):
            return self.get(name)[index].clone()
        return self.reader.part(name, index)

    def release(self) -> None:
        self.reader.release()


def open_source(source: WeightSource, allow_pickle: bool) -> tuple[TensorSource, FamilySpec, ModelFacts]:
    """Wrap a LoadedModel / nn.Module / folder / hub id as a tensor source, with its spec and
    facts (a LoadedModel's own; resolved here once for the other kinds)."""
    spec = getattr(source, "spec", None)
    facts = getattr(source, "facts", None)
    if isinstance(spec, FamilySpec) and isinstance(facts, ModelFacts):  # a LoadedModel
        model, folder = getattr(source, "model", None), getattr(source, "path", None)
        offloaded = isinstance(model, nn.Module) and any(p.device.type == "meta" for p in model.parameters())
        if folder is not None and (model is None or offloaded):
            # not built (weights-only) or offloaded by accelerate: read the checkpoint instead
            return FolderSource(Path(folder), allow_pickle=allow_pickle), spec, facts
        if isinstance(model, nn.Module):
            return ModelSource(model), spec, facts
        raise TypeError(
            f"{getattr(source, 'name', 'this model')} has neither a built model nor a "
            "checkpoint folder to read weights from"
        )
    if isinstance(source, nn.Module):
        src = ModelSource(source)
    elif isinstance(source, (str, Path)):
        src = FolderSource(resolve_folder(source), allow_pickle=allow_pickle)
    else:
        raise TypeError(
            f"cannot read weights from {type(source).__name__}; pass a LoadedModel, an "
            "nn.Module, or a checkpoint folder"
        )
    spec = spec_for_config(src.config)
    return src, spec, facts_for(spec, src.config)


class HeldLayer:
    """One MoE layer's canonical weights, already in memory (the layer stream holds them while it
    runs the layer), answering :func:`~moe_utils.models.weights.layer_weights` for that layer only,
    so an analysis written for a loaded model runs unchanged on the held layer without reading the
    checkpoint a second time."""

    def __init__(self, spec: FamilySpec, facts: ModelFacts, weights: Any, name: str = "") -> None:
        self.spec = spec
        self.facts = facts
        self.weights = weights
        self.name = name

    @property
    def layer(self) -> int:
        return int(self.weights.layer)

    def get(self, layer: int, dtype: torch.dtype | None) -> Any:
        """The held weights (converted to ``dtype`` when one is given)."""
        if layer != self.layer:
            raise MoEUtilsError(
                f"the layer stream holds layer {self.layer} of {self.name or 'this model'}, not layer {layer}; "
                "analyses of a streamed model read each layer while the stream holds it"
            )
        return self.weights if dtype is None else _cast(self.weights, dtype)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """A copy of a weights dataclass with every floating-point tensor (nested ones too) in ``dtype``."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor) and value.is_floating_point():
            changes[f.name] = value.to(dtype)
        elif is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _cast(value, dtype)
    return replace(obj, **changes)


class ExpertStack:
    """``[E, out, in]`` expert matrices read (and decoded) from a checkpoint one expert at a time,
    when indexed (``stack[e]``): what the engine needs of a layer too large to decode whole."""

    def __init__(self, src: FolderSource, names: list[str], device: torch.device, dtype: torch.dtype) -> None:
        self.src, self.names = src, names
        self.device, self.dtype = device, dtype
        self.shape = torch.Size((len(names), *src.shape(names[0])))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, e: int) -> Tensor:
        if not isinstance(e, int):
            raise MoEUtilsError(
                "a layer read expert by expert can only be indexed by one expert; this analysis needs the whole "
                "layer at once, which the stream does not hold for a layer this large"
            )
        return self.src.get(self.names[e]).to(device=self.device, dtype=self.dtype)
