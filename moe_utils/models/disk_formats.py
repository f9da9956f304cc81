"""The on-disk naming of a family's weights, found by saving a tiny model and matching by value.

The tiny model is saved with ``save_pretrained`` (which writes the original per-expert naming of
families whose in-memory experts are fused), and each saved tensor is matched by value to the
canonical weights, giving the naming scheme the weight analyses stream without building the model.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import safe_open
from torch import nn

from moe_utils.arch.spec import ExpertTensors, MLPTensors, MoETensors, WeightFormat
from moe_utils.core.errors import DerivationError
from moe_utils.models.weights import ModelSource, _experts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Tensor = torch.Tensor


def _required(t: Tensor | None, what: str) -> Tensor:
    if t is None:
        raise DerivationError(f"the in-memory experts have no {what} tensor")
    return t


def _memory_names(ex: ExpertTensors) -> list[str]:
    """The expert tensor names of a layout (expert 0 for per-expert layouts)."""
    if ex.layout == "per_expert":
        return [n.format(e=0) for n in (ex.act, ex.up, ex.down) if n]
    return [n for n in (ex.gate_up, ex.act, ex.up, ex.down, ex.gate_up_bias, ex.down_bias) if n]


def _saved_tensors(folder: Path) -> dict[str, Tensor]:
    saved: dict[str, Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                saved[name] = f.get_tensor(name)
    return saved


class _Matcher:
    """Finds, among the tensors saved for one layer, the one equal to an in-memory tensor."""

    def __init__(self, saved: dict[str, Tensor], layer: int):
        self.layer = layer
        self.saved = {n: t for n, t in saved.items() if re.search(rf"\.{layer}\.", n)}

    def find(self, t: Tensor, what: str) -> str:
        hits = [n for n, s in self.saved.items() if s.shape == t.shape and torch.equal(s.float(), t.float())]
        if not hits:
            raise DerivationError(f"save_pretrained wrote no tensor equal to the {what} of layer {self.layer}")
        return hits[0]

    def split(self, name: str) -> tuple[str, str]:
        """(layer prefix with ``{layer}``, name relative to the layer) of a saved name."""
        match = re.match(rf"^(.*?\.){self.layer}\.(.*)$", name)
        if match is None:
            raise DerivationError(f"the saved tensor {name} has no layer index {self.layer} in its name")
        return match[1] + "{layer}.", match[2]

    def rel(self, t: Tensor, what: str) -> str:
        """The saved name (relative to the layer) of the tensor equal to ``t``."""
        return self.split(self.find(t, what))[1]

    def template(self, t_all: Tensor | None, what: str) -> str | None:
        """The per-expert name template (``{e}``) of the stacked expert tensor ``t_all``."""
        if t_all is None:
            return None
        name0 = self.find(t_all[0], f"{what} of expert 0")
        r = self.split(name0)[1]
        tmpl = re.sub(r"\.0\.", ".{e}.", r, count=1)
        if tmpl == r:
            raise DerivationError(f"the saved {what} of expert 0 ({name0}) has no expert index")
        return tmpl


def _saved_experts(
    match: _Matcher, src: ModelSource, memory: WeightFormat, layer: int, num_experts: int
) -> ExpertTensors:
    """The experts' saved naming: per expert, else fused under other names (Granite's input_linear)."""
    moe = cast("MoETensors", memory.moe)
    prefix = memory.layer_prefix.format(layer=layer)
    canon = _experts(src, memory, layer, moe.experts, torch.float32, num_experts)
    try:
        act = match.template(canon["w_act"], "gate projection")
        up = match.template(canon["w_up"], "up projection")
        down = match.template(_required(canon["w_down"], "down projection"), "down projection")
        return ExpertTensors("per_expert", act=act, up=up, down=cast("str", down))
    except DerivationError as per_expert_error:
        ex = moe.experts
        if ex.layout != "fused":
            raise
        names = {}
        for attr in ("gate_up", "act", "up", "down", "gate_up_bias", "down_bias"):
            value = getattr(ex, attr)
            if value is not None:
                try:
                    names[attr] = match.rel(src.get(prefix + value), f"fused {attr} tensor")
                except DerivationError:
                    raise per_expert_error from None
        return replace(ex, **names)


def _match_disk_format(
    model: nn.Module, memory: WeightFormat, layer: int, num_experts: int, folder: Path
) -> WeightFormat | None:
    """The naming ``save_pretrained`` wrote to ``folder``, matched by value to the in-memory tensors
    (None when it is the in-memory naming)."""
    saved = _saved_tensors(folder)
    src = ModelSource(model)
    moe = memory.moe
    if moe is None:
        raise DerivationError(f"the in-memory weight format of layer {layer} names no MoE tensors")
    shared_names = () if moe.shared is None else (moe.shared.act, moe.shared.up, moe.shared.down)
    rel_names = [moe.router, moe.correction_bias, moe.router_bias, moe.shared_gate, *shared_names]
    prefix = memory.layer_prefix.format(layer=layer)
    if all(prefix + r in saved for r in rel_names if r) and all(
        prefix + r in saved for r in _memory_names(moe.experts)
    ):
        return None
    match = _Matcher(saved, layer)
    layer_prefix, router_rel = match.split(match.find(src.get(prefix + moe.router), "router weight"))
    experts = _saved_experts(match, src, memory, layer, num_experts)
    optional = {}
    for key in ("correction_bias", "router_bias", "shared_gate"):
        value = getattr(moe, key)
        optional[key] = None if value is None else match.rel(src.get(prefix + value), key)
    shared = None
    if moe.shared is not None:
        s = moe.shared

        def saved_rel(name: str) -> str:
            return match.rel(src.get(prefix + name), "shared expert")

        shared = MLPTensors(None if s.act is None else saved_rel(s.act), saved_rel(s.up), saved_rel(s.down))
    return WeightFormat(
        "original",
        layer_prefix=layer_prefix,
        moe=MoETensors(router_rel, experts, shared=shared, **optional),
        dense=memory.dense,
    )


def disk_format(model: nn.Module, memory: WeightFormat, layer: int, num_experts: int) -> WeightFormat | None:
    """The naming ``save_pretrained`` writes for ``model`` (None when it is the in-memory naming)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cast("PreTrainedModel", model).save_pretrained(tmp)  # build_model makes transformers models
            return _match_disk_format(model, memory, layer, num_experts, Path(tmp))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
