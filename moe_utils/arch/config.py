"""Read model configs as plain dicts, whatever their origin, with key aliases.

Checkpoints spell the same hyper-parameter differently (``num_local_experts`` vs ``num_experts``,
``num_experts_per_tok`` vs ``num_experts_per_token``; DBRX nests its MoE keys under
``ffn_config``). Family specs list the spellings they accept; this module resolves them against a
``config.json`` dict or a ``PretrainedConfig``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moe_utils.core.errors import CheckpointError

_MISSING = object()


def config_dict(config: Any) -> dict:
    """Return ``config`` as a nested plain dict (accepts dict, PretrainedConfig or a folder path)."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, Path)):
        return read_config_json(Path(config))
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and isinstance(d := to_dict(), dict):
        return d
    raise TypeError(
        f"cannot read a model config from {type(config).__name__}; pass a dict, a "
        "transformers PretrainedConfig or a checkpoint folder"
    )


def read_config_json(folder: Path) -> dict:
    """Parse ``folder/config.json``; raise CheckpointError if it is missing or not JSON."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json; a model folder needs config.json next to "
            "its weight files (save a model with save_pretrained to get one)"
        )
    try:
        return json.loads(path.read_text(), object_hook=_decode_special)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or re-download the file") from exc


def _decode_special(obj: dict) -> Any:
    """transformers writes non-finite floats as ``{"__float__": "Infinity"}``; read them back."""
    if len(obj) == 1 and "__float__" in obj:
        return float(obj["__float__"])
    return obj


def get_path(cfg: Mapping, key: str, default: Any = _MISSING) -> Any:
    """Look up a possibly dotted key (``"ffn_config.moe_top_k"``); None counts as absent."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif not isinstance(node, Mapping) and hasattr(node, part):
            node = getattr(node, part)
        else:
            return default
    if node is None:
        return default
    return node


def first_of(cfg: Mapping, keys: Iterable[str], default: Any = _MISSING) -> Any:
    """Value of the first key in ``keys`` present in ``cfg`` (aliases in priority order)."""
    for key in keys:
        value = get_path(cfg, key)
        if value is not _MISSING:
            return value
    return default


def is_missing(value: Any) -> bool:
    """True for the sentinel returned by lookups that found nothing."""
    return value is _MISSING
