"""The spec of a model family: hand-written where :mod:`moe_utils.arch` has one, else derived.

This is the one place a family spec is resolved for a model. :func:`get_spec` takes a family
name, :func:`spec_for_config` a config (dict, PretrainedConfig or model folder); both return the
hand-written spec of :mod:`moe_utils.arch.families` when one matches and otherwise derive one
from the model transformers builds (:mod:`moe_utils.models.derive`), from the config's own values,
so a checkpoint without shared experts gets a spec without them.
"""

from __future__ import annotations

from typing import Any

from moe_utils.arch import (
    SPECS,
    FamilySpec,
    derivable_family,
    hand_written_spec,
    unmatched_config_error,
)
from moe_utils.arch.catalogue import multimodal_parent
from moe_utils.arch.config import config_dict
from moe_utils.core.errors import UnknownFamilyError
from moe_utils.models.derive import derive_family, derive_spec


def get_spec(name: str) -> FamilySpec:
    """The spec of family ``name``: hand-written (e.g. ``"mixtral"``), else derived from the tiny
    config of the transformers MoE family of that model_type (e.g. ``"glm4_moe"``)."""
    if name in SPECS:
        return SPECS[name]
    return derive_family(derivable_family(name))


def _derived_for_config(cfg: dict) -> FamilySpec:
    """Derive a spec for a config no hand-written spec matches, or explain why not."""
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UnknownFamilyError(f"model_type {model_type!r} is not part of the installed transformers")
    parent = multimodal_parent(model_type)
    if parent is not None:
        raise UnknownFamilyError(
            f"{model_type!r} is a multimodal model; the analyses run on its text decoder "
            f"({parent.model_type!r}, config class {parent.config_class}). Pass a checkpoint of "
            f"the text decoder alone, or try random:{parent.model_type}"
        )
    return derive_spec(cfg)


def spec_for_config(config: Any) -> FamilySpec:
    """The spec of a config dict / PretrainedConfig / model folder: the hand-written one that
    matches, else one derived from this config's values (its optional parts included)."""
    spec = hand_written_spec(config)
    if spec is not None:
        return spec
    cfg = config_dict(config)
    if not cfg.get("model_type"):
        raise unmatched_config_error(cfg, "it has no model_type")
    try:
        return _derived_for_config(cfg)
    except UnknownFamilyError as exc:
        raise unmatched_config_error(cfg, f"deriving one from transformers failed: {exc}") from exc


def spec_for_tiny_config(config: Any) -> FamilySpec:
    """The derived spec of an already tiny config (built directly, its sizes not shrunk again)."""
    return derive_spec(config, tiny=True)


__all__ = ["get_spec", "spec_for_config", "spec_for_tiny_config"]
