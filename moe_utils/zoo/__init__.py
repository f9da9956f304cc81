"""Model organisms: tiny dense / upcycled MoE / from-scratch MoE trained on CPython's own text.

They ship as package data (Hugging Face folders) so the book runs anywhere without a download.
"""

from __future__ import annotations

from pathlib import Path

ZOO_MODELS: tuple[str, ...] = ("tiny-dense", "tiny-moe-upcycled", "tiny-moe-scratch", "tiny-moe-fine")
DEFAULT_MOE_MODELS: tuple[str, ...] = ("tiny-moe-upcycled", "tiny-moe-scratch", "tiny-moe-fine")
DEFAULT_DENSE_BASELINE = "tiny-dense"
PAPER_COUNTERPART = {
    "tiny-dense": "Mistral 7B (dense)",
    "tiny-moe-upcycled": "Mixtral 8x7B (believed upcycled from Mistral 7B)",
    "tiny-moe-scratch": "Grok-1 (trained from scratch, experts as wide as the dense FFN)",
    "tiny-moe-fine": "DeepSeekMoE 16B (fine-grained experts, shared experts, dense first layer)",
}


def zoo_dir() -> Path:
    """Package folder holding the shipped models."""
    return Path(__file__).resolve().parent / "models"


def zoo_path(name: str) -> Path:
    """Folder of a shipped model (config.json, model.safetensors, tokenizer files, README.md).

    Accepts ``"tiny-dense"`` or ``"zoo:tiny-dense"``. Raises ``CheckpointError`` (a
    ``FileNotFoundError``) listing the known names when the name is unknown or the files are missing.
    """
    from moe_utils.core.errors import CheckpointError

    key = name[4:] if name.startswith("zoo:") else name
    if key not in ZOO_MODELS:
        raise CheckpointError(
            f"unknown zoo model {name!r}; the zoo holds: {', '.join(ZOO_MODELS)} "
            f"(use e.g. 'zoo:{ZOO_MODELS[1]}')"
        )
    path = zoo_dir() / key
    if not (path / "model.safetensors").exists():
        raise CheckpointError(
            f"zoo model {key!r} is not installed in {path}; rebuild it with "
            f"'moe-book zoo train --models {key} --install' or reinstall the package"
        )
    return path


__all__ = ["ZOO_MODELS", "DEFAULT_MOE_MODELS", "DEFAULT_DENSE_BASELINE", "PAPER_COUNTERPART", "zoo_path", "zoo_dir"]
