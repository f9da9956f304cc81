"""Whether a family spec describes a checkpoint's tensors, checked before the spec is used on it.

A spec names the tensors of each MoE block (router, experts, optional shared experts, their gate,
router and correction biases). Applied to a checkpoint it does not describe, it would either fail
half-way through an analysis or, worse, ignore tensors the model uses (shared experts a derived
spec did not expect). :func:`spec_mismatch` says why a spec does not fit, before anything runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from moe_utils.arch.facts import ModelFacts
from moe_utils.arch.spec import FamilySpec, MoETensors, WeightFormat
from moe_utils.core.errors import CheckpointError
from moe_utils.models.weights import FolderSource, pick_format, tensor_name


def _named(moe: MoETensors, num_experts: int) -> list[str]:
    """Every tensor (relative to the layer) the MoE part of a format names."""
    ex = moe.experts
    if ex.layout == "per_expert":
        experts = [t.format(e=e) for t in (ex.act, ex.up, ex.down) if t for e in range(num_experts)]
    else:
        experts = [t for t in (ex.gate_up, ex.act, ex.up, ex.down, ex.gate_up_bias, ex.down_bias) if t]
    shared = () if moe.shared is None else (moe.shared.act, moe.shared.up, moe.shared.down)
    optional = (moe.router_bias, moe.correction_bias, moe.shared_gate, *shared)
    return [moe.router, *experts, *(t for t in optional if t)]


def _is_weight(name: str) -> bool:
    """A weight or bias of the model (not a quantisation scale or other side tensor)."""
    last = name.rsplit(".", 1)[-1]
    return last in ("weight", "bias") or last.endswith("_bias")


def unnamed_block_tensors(
    names: list[str], fmt: WeightFormat, layer: int, num_experts: int, numel: Callable[[str], int]
) -> list[str]:
    """Weights (of ``numel`` > 0 elements) inside the MoE block of ``layer`` that ``fmt`` does not
    name (e.g. shared experts a spec without them would silently leave out)."""
    if fmt.moe is None:
        return []
    named = {tensor_name(fmt, layer, rel) for rel in _named(fmt.moe, num_experts)}
    block = os.path.commonprefix(sorted(named))  # noqa: RUF071 - names, not paths
    block = block[: block.rfind(".") + 1]
    if block == fmt.layer_prefix.format(layer=layer):
        return []  # the named tensors share no block path: nothing to compare with
    return sorted(n for n in names if n.startswith(block) and n not in named and _is_weight(n) and numel(n) > 0)


def spec_mismatch(spec: FamilySpec, facts: ModelFacts, folder: Path) -> str:
    """Why ``spec`` does not describe the safetensors of ``folder`` ('' when it does, when the
    model has no MoE layer, or when the folder holds no safetensors to read names from)."""
    if not facts.moe_layers or not any(Path(folder).glob("*.safetensors")):
        return ""
    layer = facts.moe_layers[0]
    src = FolderSource(Path(folder))
    try:
        fmt = pick_format(src, spec, layer, "moe")
        names = src.reader.names() if spec.derived else []
        extra = unnamed_block_tensors(names, fmt, layer, facts.num_experts, lambda n: math.prod(src.shape(n)))
    except CheckpointError as exc:
        return str(exc)
    finally:
        src.release()
    if not extra:
        return ""
    shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
    return (
        f"the {spec.name} spec derived from this config does not name {shown} in MoE layer {layer}; "
        "the checkpoint holds parts (e.g. shared experts) its config.json does not declare"
    )


def check_spec_matches(spec: FamilySpec, facts: ModelFacts, folder: Path, name: str) -> None:
    """Refuse (CheckpointError, with the reason) a spec that does not describe ``folder``'s tensors."""
    why = spec_mismatch(spec, facts, folder)
    if why:
        raise CheckpointError(
            f"{name}: the family spec does not match the checkpoint's tensors, so it is not used: {why}. "
            "Check that config.json belongs to these weights (num_shared_experts, first_k_dense_replace, ...)."
        )
