"""Config against tensors: config.json's numbers checked against the checkpoint's tensor shapes.

Before a local checkpoint is built, :func:`check_config_against_tensors` reads the shapes of the
first MoE layer's router and expert tensors from the safetensors headers (no weight is read) and
compares them with the expert count, the expert width and the hidden size the config states. A
mismatch raises :class:`ConfigMismatchError` on one line naming the config key, its value, the
tensor and its shape. Tensors the family spec does not name, and packed (integer) tensors of
quantized checkpoints, are not checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from safetensors import safe_open

from moe_utils.arch import FamilySpec
from moe_utils.arch.config import get_path
from moe_utils.arch.facts import facts_for
from moe_utils.arch.spec import ExpertTensors, WeightFormat
from moe_utils.core.errors import CheckpointError, MoEUtilsError
from moe_utils.models.checkpoint import WeightFiles

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
"""Stored dtypes whose shapes are the logical ones (packed integer tensors are not checked)."""


class ConfigMismatchError(MoEUtilsError, ValueError):
    """config.json states a size the checkpoint's tensors do not have."""


@dataclass(frozen=True)
class TensorHeader:
    """A tensor as a safetensors header describes it."""

    shape: tuple[int, ...]
    dtype: str


def header_tensors(files: WeightFiles) -> dict[str, TensorHeader]:
    """Shape and dtype of every tensor of ``files``, from the safetensors headers only."""
    out: dict[str, TensorHeader] = {}
    if files.kind != "safetensors":
        return out
    for path in files.files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    part = fh.get_slice(name)
                    out[name] = TensorHeader(tuple(int(d) for d in part.get_shape()), str(part.get_dtype()))
        except Exception as exc:  # the Rust reader raises its own exception types
            raise CheckpointError(
                f"cannot read the header of weight file {path.name} in {files.folder} ({exc}); download it again"
            ) from exc
    return out


@dataclass(frozen=True)
class _Stated:
    """One number of config.json and the key it was read from."""

    key: str
    value: int
    label: str = ""  # how the message shows it, when not ``key=value``

    def __str__(self) -> str:
        return self.label or f"{self.key}={self.value}"


def _stated(cfg: Mapping, keys: tuple[str, ...], value: int | None) -> _Stated | None:
    """``value`` with the first of ``keys`` the config sets (None when the config sets none)."""
    if value is None:
        return None
    key = next((k for k in keys if get_path(cfg, k, None) is not None), None)
    return None if key is None else _Stated(key, int(value))


def _format(spec: FamilySpec, tensors: Mapping[str, TensorHeader], layer: int) -> WeightFormat | None:
    """The first naming scheme of ``spec`` whose router and first expert tensor are in ``tensors``."""
    for fmt in spec.weight_formats(on_disk=True):
        if fmt.moe is None:
            continue
        ex = fmt.moe.experts
        first = ex.down if ex.layout == "fused" else ex.down.format(e=0)
        prefix = fmt.layer_prefix.format(layer=layer)
        if prefix + fmt.moe.router in tensors and prefix + first in tensors:
            return fmt
    return None


def _mismatch(stated: _Stated, name: str, what: str, found: int, shape: tuple[int, ...]) -> ConfigMismatchError:
    return ConfigMismatchError(
        f"config {stated} but {name} has {found} {what} {list(shape)}; fix config.json "
        "(or the weights are from another model)"
    )


@dataclass(frozen=True)
class _Expected:
    """The sizes config.json states, each with its key (None when the config has none)."""

    experts: _Stated | None
    width: _Stated | None
    hidden: _Stated | None


def _check_axes(name: str, info: TensorHeader, axes: dict[str, int], want: _Expected, factor: int = 1) -> None:
    """Compare the axes of one tensor (``{"experts": 0, "width": 1, "hidden": 2}``) with ``want``;
    ``factor`` multiplies the width (2 for a fused gate and up projection)."""
    if info.dtype not in FLOAT_DTYPES:
        return
    order = (("experts", want.experts, 1, "experts"), ("hidden", want.hidden, 1, "as hidden size"))
    order += (("width", want.width, factor, f"as {factor} x the expert width" if factor > 1 else "as expert width"),)
    for axis_name, stated, mult, what in order:
        axis = axes.get(axis_name)
        if stated is None or axis is None or axis >= len(info.shape):
            continue
        if info.shape[axis] != stated.value * mult:
            raise _mismatch(stated, name, what, info.shape[axis], info.shape)


def _check_experts(ex: ExpertTensors, prefix: str, tensors: Mapping[str, TensorHeader], want: _Expected) -> None:
    """The routed experts' tensors of one layer against the stated sizes."""
    if ex.layout == "per_expert":
        count = 0
        while prefix + ex.down.format(e=count) in tensors:
            count += 1
        down = prefix + ex.down.format(e=0)
        if want.experts is not None and count != want.experts.value:
            raise ConfigMismatchError(
                f"config {want.experts} but {prefix}{ex.down.format(e='*')} names {count} experts "
                f"(expert 0: {list(tensors[down].shape)}); fix config.json (or the weights are from another model)"
            )
        for rel in (ex.act, ex.up):
            if rel and prefix + rel.format(e=0) in tensors:
                _check_axes(
                    prefix + rel.format(e=0), tensors[prefix + rel.format(e=0)], {"width": 0, "hidden": 1}, want
                )
        _check_axes(down, tensors[down], {"hidden": 0, "width": 1}, want)
        return
    if ex.flat:  # [E*I, H]: the expert count and the width are merged into the first axis
        merged = None
        if want.experts is not None and want.width is not None:
            product = want.experts.value * want.width.value
            merged = _Stated(want.width.key, product, f"{want.experts} x {want.width} (= {product})")
        flat = _Expected(None, merged, want.hidden)
        for rel in (ex.act, ex.up, ex.down):
            if rel and prefix + rel in tensors:
                _check_axes(prefix + rel, tensors[prefix + rel], {"width": 0, "hidden": 1}, flat)
        return
    inputs = {"experts": 0, "hidden": 1, "width": 2} if ex.in_transposed else {"experts": 0, "width": 1, "hidden": 2}
    if ex.gate_up and prefix + ex.gate_up in tensors:
        _check_axes(prefix + ex.gate_up, tensors[prefix + ex.gate_up], inputs, want, factor=2)
    for rel in (ex.act, ex.up):
        if rel and prefix + rel in tensors:
            _check_axes(prefix + rel, tensors[prefix + rel], inputs, want)
    down = {"experts": 0, "width": 1, "hidden": 2} if ex.down_transposed else {"experts": 0, "hidden": 1, "width": 2}
    _check_axes(prefix + ex.down, tensors[prefix + ex.down], down, want)


def check_config_against_tensors(cfg: Mapping, spec: FamilySpec, files: WeightFiles) -> None:
    """Raise :class:`ConfigMismatchError` when config.json's expert count, expert width or hidden
    size disagrees with the shapes of the first MoE layer's router and expert tensors."""
    if not spec.is_moe or files.kind != "safetensors":
        return
    facts = facts_for(spec, dict(cfg))
    if not facts.moe_layers:
        return
    tensors = header_tensors(files)
    layer = facts.moe_layers[0]
    fmt = _format(spec, tensors, layer)
    if fmt is None or fmt.moe is None:
        return  # the weight reader names the missing tensors when they are needed
    want = _Expected(
        experts=_stated(cfg, spec.keys.num_experts, facts.num_experts),
        width=_stated(cfg, spec.keys.expert_intermediate, facts.expert_intermediate_size),
        hidden=_stated(cfg, spec.keys.hidden_size, facts.hidden_size),
    )
    prefix = fmt.layer_prefix.format(layer=layer)
    router = prefix + fmt.moe.router
    _check_axes(router, tensors[router], {"experts": 0, "hidden": 1}, want)
    _check_experts(fmt.moe.experts, prefix, tensors, want)
