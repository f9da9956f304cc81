"""Model-family specs: a registry of declarative :class:`FamilySpec` objects.

``get_spec(name)`` and ``spec_for_config(config)`` find a hand-written spec (by name; for a config
by ``architectures``, then ``model_type``, then characteristic keys for configs without a
model_type such as Grok-1). They never derive one, whatever has been imported.

A family of the installed transformers without a hand-written spec gets a derived one from
:mod:`moe_utils.models.specs` (``get_spec``, ``spec_for_config``): deriving runs the engine on a
tiny model of the family, which needs the layers above this one.
"""

from __future__ import annotations

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


_HOW_TO_ADD = (
    "To add a family, write a FamilySpec in moe_utils/arch/families.py (copy the closest "
    "one, e.g. MIXTRAL), append it to FAMILIES at the end of that file, and add its "
    "expected MoE layers to tests/test_arch_families.py."
)


def supported_families(moe_only: bool = False) -> list[str]:
    """Names of the registered families (optionally only the MoE ones)."""
    return [name for name, spec in SPECS.items() if spec.is_moe or not moe_only]


def derivable_family(name: str) -> str:
    """The model_type whose spec is derived for ``name``; UnknownFamilyError (with the known
    families and how to add one) when transformers has no MoE family of that name."""
    entry = entry_for(name)
    if entry is None or entry.excluded:
        why = f" ({entry.excluded})" if entry is not None and entry.excluded else ""
        raise UnknownFamilyError(
            f"no family spec named {name!r}{why}; known families (hand-written): "
            f"{', '.join(SPECS)}; specs are also derived for the MoE families "
            "of the installed transformers (see the coverage page). "
            f"{_HOW_TO_ADD}"
        )
    return entry.model_type


def get_spec(name: str) -> FamilySpec:
    """The hand-written spec registered under ``name`` (e.g. ``"mixtral"``).

    A transformers MoE family without one (e.g. ``"glm4_moe"``) raises UnknownFamilyError naming
    :func:`moe_utils.models.specs.get_spec`, which derives its spec."""
    if name in SPECS:
        return SPECS[name]
    model_type = derivable_family(name)
    raise UnknownFamilyError(
        f"{name!r} has no hand-written spec; its spec is derived from the model transformers "
        f"builds by moe_utils.models.specs.get_spec({model_type!r})"
    )


def hand_written_spec(config: Any) -> FamilySpec | None:
    """The hand-written spec matching a config dict / PretrainedConfig / model folder, else None."""
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
    return None


def unmatched_config_error(config: Any, why: str) -> UnknownFamilyError:
    """The error for a config no hand-written spec matches, saying ``why`` none was derived."""
    cfg = config_dict(config)
    model_type = cfg.get("model_type")
    described = f"model_type {model_type!r}" if model_type else "no model_type"
    architectures = list(cfg.get("architectures") or ())
    if architectures:
        described += f", architectures {architectures}"
    return UnknownFamilyError(
        f"no hand-written family spec matches this config ({described}) and "
        f"{why}. Hand-written: {', '.join(SPECS)}. {_HOW_TO_ADD}"
    )


def spec_for_config(config: Any) -> FamilySpec:
    """The hand-written spec of a config dict / PretrainedConfig / model folder.

    A config of a transformers family without one raises UnknownFamilyError naming
    :func:`moe_utils.models.specs.spec_for_config`, which derives its spec."""
    spec = hand_written_spec(config)
    if spec is not None:
        return spec
    model_type = config_dict(config).get("model_type")
    why = (
        f"its spec is derived by moe_utils.models.specs.spec_for_config, not by {__name__}.spec_for_config"
        if model_type
        else "it has no model_type"
    )
    raise unmatched_config_error(config, why)


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
    "derivable_family",
    "first_of",
    "get_spec",
    "hand_written_spec",
    "require_moe",
    "spec_for_config",
    "supported_families",
    "unmatched_config_error",
]
