"""The Mixture-of-Experts families of the installed transformers, found from its source.

A family is a ``transformers/models/<name>/`` package whose modelling code defines an experts
class (``class ...Experts(``). For multimodal packages the family is run on its text decoder
(the ``*_text`` config), since the paper's analyses concern the language model's MoE layers.
Encoder-decoder and non-language-model MoEs are listed with the reason they are left out.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

_EXPERTS_CLASS = re.compile(r"^class \w*Experts\w*\(", re.M)

# Packages with an experts class that are not decoder language models (reason shown on the page).
EXCLUDED: dict[str, str] = {
    "switch_transformers": "encoder-decoder (T5-style) model, not a decoder language model",
    "nllb_moe": "encoder-decoder translation model, not a decoder language model",
    "openai_privacy_filter": "token classifier (bidirectional encoder), not a decoder language model",
    "qwen3_omni_moe": "speech/vision 'thinker-talker' model; its text decoder has no stand-alone "
    "config class that builds a model",
}


@dataclass(frozen=True)
class CatalogueEntry:
    """One MoE family: its package, the config class used to build its decoder, and notes."""

    package: str
    model_type: str
    config_class: str
    multimodal: bool = False
    excluded: str | None = None

    @property
    def family(self) -> str:
        """The name used in ``random:FAMILY`` ids (the decoder's model_type)."""
        return self.model_type


def _transformers_models() -> Path:
    import transformers

    return Path(transformers.__file__).parent / "models"


@functools.lru_cache(maxsize=1)
def moe_packages() -> tuple[str, ...]:
    """transformers model packages whose modelling code defines an experts class."""
    found = set()
    for path in _transformers_models().glob("*/modeling_*.py"):
        if _EXPERTS_CLASS.search(path.read_text(encoding="utf-8")):
            found.add(path.parent.name)
    return tuple(sorted(found))


@functools.lru_cache(maxsize=1)
def catalogue() -> tuple[CatalogueEntry, ...]:
    """Every MoE family of the installed transformers (excluded ones carry their reason)."""
    from transformers.models.auto.configuration_auto import (
        CONFIG_MAPPING_NAMES,  # pyright: ignore[reportPrivateImportUsage]  # not in the module's __all__, yet transformers' one table of config classes
        model_type_to_module_name,
    )

    by_package: dict[str, list[tuple[str, str]]] = {}
    for model_type, cls in CONFIG_MAPPING_NAMES.items():
        by_package.setdefault(model_type_to_module_name(model_type), []).append((model_type, cls))
    entries = []
    for package in moe_packages():
        types = by_package.get(package, [])
        if not types:
            continue
        if package in EXCLUDED:
            entries.append(CatalogueEntry(package, types[0][0], types[0][1], excluded=EXCLUDED[package]))
            continue
        text = [(t, c) for t, c in types if t.endswith("_text") or c.endswith("TextConfig")]
        text = [(t, c) for t, c in text if "talker" not in t]
        if text:
            model_type, cls = text[0]
            entries.append(CatalogueEntry(package, model_type, cls, multimodal=len(types) > 1))
        else:
            model_type, cls = next(((t, c) for t, c in types if t.replace("-", "_") == package), types[0])
            entries.append(CatalogueEntry(package, model_type, cls))
    return tuple(entries)


def entry_for(model_type: str) -> CatalogueEntry | None:
    """The catalogue entry whose decoder model_type or package is ``model_type``."""
    for entry in catalogue():
        if model_type in (entry.model_type, entry.package):
            return entry
    return None


def multimodal_parent(model_type: str) -> CatalogueEntry | None:
    """For a multimodal model_type (e.g. ``qwen3_vl_moe``), the entry of its text decoder."""
    entry = entry_for(model_type)
    if entry is not None and entry.multimodal and entry.model_type != model_type:
        return entry
    return None
