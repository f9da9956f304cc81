"""Model-family specs: a registry of declarative :class:`FamilySpec` objects.

``spec_for_config(config)`` finds the family of a config (by ``architectures``, then
``model_type``, then characteristic keys for configs without a model_type such as Grok-1).
"""

from __future__ import annotations

from typing import Any

from moe_utils.arch.activations import Activation, activation
from moe_utils.arch.config import config_dict, first_of, get_path
from moe_utils.arch.families import FAMILIES
from moe_utils.arch.spec import (ConfigKeys, ExpertTensors, FamilySpec, LayerRule, MLPTensors,
                                 ModulePaths, MoETensors, RouterCapture, RoutingSpec, WeightFormat)
from moe_utils.core.errors import NotMoEModelError, UnknownFamilyError

SPECS: dict[str, FamilySpec] = {spec.name: spec for spec in FAMILIES}

_HOW_TO_ADD = ("To add a family, write a FamilySpec in moe_utils/arch/families.py (copy the closest "
               "one, e.g. MIXTRAL), append it to FAMILIES at the end of that file, and add its "
               "expected MoE layers to tests/test_arch_families.py.")


def supported_families(moe_only: bool = False) -> list[str]:
    """Names of the registered families (optionally only the MoE ones)."""
    return [name for name, spec in SPECS.items() if spec.is_moe or not moe_only]


def get_spec(name: str) -> FamilySpec:
    """The spec registered under ``name`` (e.g. ``"mixtral"``), else one derived for the
    transformers MoE family of that model_type (e.g. ``"glm4_moe"``)."""
    if name in SPECS:
        return SPECS[name]
    from moe_utils.arch.catalogue import entry_for

    entry = entry_for(name)
    if entry is None or entry.excluded:
        why = f" ({entry.excluded})" if entry is not None and entry.excluded else ""
        raise UnknownFamilyError(f"no family spec named {name!r}{why}; known families (hand-written): "
                                 f"{', '.join(SPECS)}; specs are also derived for the MoE families "
                                 "of the installed transformers (see the coverage page). "
                                 f"{_HOW_TO_ADD}")
    from moe_utils.models.derive import derive_family

    return derive_family(entry.model_type)


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
        from moe_utils.models.derive import spec_for_unknown

        try:
            return spec_for_unknown(cfg)
        except UnknownFamilyError as exc:
            why = f"deriving one from transformers failed: {exc}"
    raise UnknownFamilyError(f"no hand-written family spec matches this config ({described}) and "
                             f"{why}. Hand-written: {', '.join(SPECS)}. {_HOW_TO_ADD}")


def require_moe(spec: FamilySpec, what: str = "this analysis") -> FamilySpec:
    """Raise NotMoEModelError for dense families."""
    if not spec.is_moe:
        raise NotMoEModelError(
            f"{what} needs a Mixture-of-Experts model, but this is a dense {spec.name} model "
            f"(usable only as the dense baseline). MoE families: "
            f"{', '.join(supported_families(moe_only=True))}.")
    return spec


__all__ = [
    "Activation", "ConfigKeys", "ExpertTensors", "FamilySpec", "LayerRule", "MLPTensors",
    "ModulePaths", "MoETensors", "RouterCapture", "RoutingSpec", "SPECS", "WeightFormat",
    "activation", "config_dict", "first_of", "get_spec", "require_moe", "spec_for_config",
    "supported_families",
]
