"""Model-family specs: a registry of declarative :class:`FamilySpec` objects.

``spec_for_config(config)`` finds the family of a config (by ``architectures``, then
``model_type``, then characteristic keys for configs without a model_type such as Grok-1).

A family of the installed transformers without a hand-written spec gets a derived one. Deriving
runs the engine on a tiny model of the family (:mod:`moe_utils.models.derive`), which sits above
this layer, so this module does not import it: importing :mod:`moe_utils.models` registers it here
(:func:`register_derivation`), and the lookups below call what was registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_utils.arch.activations import Activation, activation
from moe_utils.arch.catalogue import entry_for
from moe_utils.arch.config import config_dict, first_of, get_path
from moe_utils.arch.families import FAMILIES
from moe_utils.arch.spec import (
    ConfigKeys,
    ExpertTensors,
    FamilySpec,
    LayerRule,
    MLPTensors,
    ModulePaths,
    MoETensors,
    RouterCapture,
    RoutingSpec,
    WeightFormat,
)
from moe_utils.core.errors import NotMoEModelError, UnknownFamilyError

SPECS: dict[str, FamilySpec] = {spec.name: spec for spec in FAMILIES}


@dataclass(frozen=True)
class Derivation:
    """How specs are derived for families without a hand-written one."""

    family: Callable[[str], FamilySpec]  # model_type -> the spec of its tiny config
    config: Callable[[dict], FamilySpec]  # a config no hand-written spec matches -> its spec
    tiny_config: Callable[[Any], FamilySpec]  # an already tiny config (built directly) -> its spec


_registered: list[Derivation] = []


def register_derivation(derivation: Derivation) -> None:
    """Use ``derivation`` for families without a hand-written spec (done by moe_utils.models)."""
    _registered[:] = [derivation]


def derivation() -> Derivation:
    """The registered :class:`Derivation`; raises UnknownFamilyError when none is."""
    if not _registered:
        raise UnknownFamilyError(
            "specs of families without a hand-written spec are derived by "
            "moe_utils.models, which is not imported yet; import it first"
        )
    return _registered[0]


_HOW_TO_ADD = (
    "To add a family, write a FamilySpec in moe_utils/arch/families.py (copy the closest "
    "one, e.g. MIXTRAL), append it to FAMILIES at the end of that file, and add its "
    "expected MoE layers to tests/test_arch_families.py."
)


def supported_families(moe_only: bool = False) -> list[str]:
    """Names of the registered families (optionally only the MoE ones)."""
    return [name for name, spec in SPECS.items() if spec.is_moe or not moe_only]


def get_spec(name: str) -> FamilySpec:
    """The spec registered under ``name`` (e.g. ``"mixtral"``), else one derived for the
    transformers MoE family of that model_type (e.g. ``"glm4_moe"``)."""
    if name in SPECS:
        return SPECS[name]
    entry = entry_for(name)
    if entry is None or entry.excluded:
        why = f" ({entry.excluded})" if entry is not None and entry.excluded else ""
        raise UnknownFamilyError(
            f"no family spec named {name!r}{why}; known families (hand-written): "
            f"{', '.join(SPECS)}; specs are also derived for the MoE families "
            "of the installed transformers (see the coverage page). "
            f"{_HOW_TO_ADD}"
        )
    return derivation().family(entry.model_type)


def spec_for_config(config: Any) -> FamilySpec:
    """Find the family of a config dict / PretrainedConfig / model folder."""
    cfg = config_dict(config)
    architectures = tuple(cfg.get("architectures") or ())
    for spec in FAMILIES:
        if any(arch in spec.architectures for arch in architectures):
            return spec
    model_type = cfg.get("model_type")
    for spec in FAMILIES:
        if model_type and model_type in spec.model_types:
            return spec
    for spec in FAMILIES:
        if spec.detect_keys and all(get_path(cfg, key, None) is not None for key in spec.detect_keys):
            return spec
    described = f"model_type {model_type!r}" if model_type else "no model_type"
    if architectures:
        described += f", architectures {list(architectures)}"
    why = "it has no model_type"
    if model_type:
        try:
            return derivation().config(cfg)
        except UnknownFamilyError as exc:
            why = f"deriving one from transformers failed: {exc}"
    raise UnknownFamilyError(
        f"no hand-written family spec matches this config ({described}) and "
        f"{why}. Hand-written: {', '.join(SPECS)}. {_HOW_TO_ADD}"
    )


def require_moe(spec: FamilySpec, what: str = "this analysis") -> FamilySpec:
    """Raise NotMoEModelError for dense families."""
    if not spec.is_moe:
        raise NotMoEModelError(
            f"{what} needs a Mixture-of-Experts model, but this is a dense {spec.name} model "
            f"(usable only as the dense baseline). MoE families: "
            f"{', '.join(supported_families(moe_only=True))}."
        )
    return spec


__all__ = [
    "SPECS",
    "Activation",
    "ConfigKeys",
    "Derivation",
    "ExpertTensors",
    "FamilySpec",
    "LayerRule",
    "MLPTensors",
    "MoETensors",
    "ModulePaths",
    "RouterCapture",
    "RoutingSpec",
    "WeightFormat",
    "activation",
    "config_dict",
    "derivation",
    "first_of",
    "get_spec",
    "register_derivation",
    "require_moe",
    "spec_for_config",
    "supported_families",
]
