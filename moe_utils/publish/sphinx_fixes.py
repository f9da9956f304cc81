"""A small Sphinx extension for the book's pages (listed under ``sphinx.extra_extensions`` in
``_config.yml``).

Jupyter Book 1 loads sphinx-thebe even with live code switched off, and its inline configuration
script (``const THEBE_JS_URL = ...``) reached each page twice, so every page logged
``Uncaught SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``. The book has no
live kernel, so this extension leaves sphinx-thebe's scripts out of every page, and drops any
other script included twice.
"""

from __future__ import annotations

from typing import Any

THEBE_MARKERS = ("THEBE_JS_URL", "sphinx-thebe.js", "thebe@")


def _key(script: Any) -> str:
    """What identifies a script: its file name, else its inline body."""
    name = str(script)
    body = getattr(script, "attributes", {}).get("body", "") if hasattr(script, "attributes") else ""
    return f"{name}\n{body}"


def drop_thebe_and_duplicates(scripts: list[Any]) -> list[Any]:
    """``scripts`` without sphinx-thebe's and without a second copy of any script."""
    seen: set[str] = set()
    kept = []
    for script in scripts:
        key = _key(script)
        if any(marker in key for marker in THEBE_MARKERS) or key in seen:
            continue
        seen.add(key)
        kept.append(script)
    return kept


def _page_context(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    if isinstance(context.get("script_files"), list):
        context["script_files"] = drop_thebe_and_duplicates(context["script_files"])


def setup(app: Any) -> dict[str, Any]:
    """Sphinx entry point."""
    app.connect("html-page-context", _page_context, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
