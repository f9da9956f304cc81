"""Reading a notebook file's top-level metadata (the runner's ``moe_book`` keys, papermill's record)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_utils.core.errors import MoEUtilsError


def read_notebook_metadata(path: Path, remedy: str) -> dict[str, Any]:
    """Top-level metadata of the notebook file ``path``; MoEUtilsError naming the file, what is
    wrong with it and ``remedy`` (what to do) when it cannot be read as a notebook."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("cells"), list):
            raise ValueError("it is not a notebook (no list of cells)")
        return doc.get("metadata", {}) or {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MoEUtilsError(f"cannot read notebook {path} ({type(exc).__name__}: {exc}). {remedy}") from exc
