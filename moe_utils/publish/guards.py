"""Checks that keep ``moe-book build`` from publishing less than the current site by accident.

Before the build touches anything, :func:`check_runs_folder` refuses a runs folder that does not
exist, and :func:`check_build` refuses one that holds no executed notebook, or that would drop
model pages the current site has (its ``_build/html`` or the generated table of contents) unless
the caller allows fewer pages (``moe-book build --allow-fewer-pages``). Each refusal is a
:class:`UsageError` on one line, so the command exits with code 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from moe_utils.core.errors import UsageError
from moe_utils.core.paths import BOOK_FOLDER

ALLOW_FLAG = "--allow-fewer-pages"
MODEL_CAPTION = "Model: "  # how bookbuild.make_toc begins the caption of a model's part
SHOWN = 3  # lost pages named in the message; the rest are counted


def check_runs_folder(runs: Path) -> None:
    """Refuse a runs folder that does not exist (or is a file)."""
    if not runs.is_dir():
        what = "is not a folder" if runs.exists() else "does not exist"
        raise UsageError(
            f"runs folder {runs} {what}; run the notebooks first (moe-book run) or pass the folder "
            "they were written to with --out"
        )


def _model_page(doc: str, runs_rel: str) -> bool:
    """True for a document of a model's folder under the runs folder (not a book-level page)."""
    parts = doc.split("/")
    prefix = [] if runs_rel in ("", ".") else runs_rel.split("/")
    rest = parts[len(prefix) :]
    return (
        parts[: len(prefix)] == prefix
        and len(rest) == 2
        and rest[0] != BOOK_FOLDER
        and not any(p.startswith((".", "_")) for p in rest)
    )


def _toc_files(node: object) -> Iterable[str]:
    """Every ``file`` entry of a parsed table of contents, at any depth."""
    if isinstance(node, dict):
        if isinstance(node.get("file"), str):
            yield node["file"]
        for value in node.values():
            yield from _toc_files(value)
    elif isinstance(node, list):
        for item in node:
            yield from _toc_files(item)


def _toc_model_pages(toc: Path) -> set[str]:
    """The files of the model parts of a generated table of contents (none if it is unreadable)."""
    try:
        parsed = yaml.safe_load(toc.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set()  # an unreadable generated file is rewritten by the build
    parts = parsed.get("parts", []) if isinstance(parsed, dict) else []
    return {
        Path(f).with_suffix("").as_posix()
        for part in parts
        if isinstance(part, dict) and str(part.get("caption", "")).startswith(MODEL_CAPTION)
        for f in _toc_files(part.get("chapters", []))
    }


def current_model_pages(root: Path, runs: Path, html: Path, toc: Path) -> set[str]:
    """Model pages (document names relative to ``root``) of the current site: the HTML pages of
    model folders under ``html``'s copy of ``runs``, and the model parts of the generated table of
    contents ``toc`` (whatever runs folder the previous build read)."""
    runs_rel = runs.resolve().relative_to(root.resolve()).as_posix()
    site_runs = html / runs_rel
    docs: set[str] = set()
    if site_runs.is_dir():
        pages = (page.relative_to(html).with_suffix("").as_posix() for page in site_runs.glob("*/*.html"))
        docs.update(doc for doc in pages if _model_page(doc, runs_rel))
    if toc.is_file():
        docs.update(_toc_model_pages(toc))
    return docs


def check_build(
    runs: Path, executed: int, failed: int, new_pages: set[str], old_pages: set[str], allow_fewer_pages: bool
) -> None:
    """Refuse a build with no executed notebook, or one that loses pages of ``old_pages``.

    ``executed``/``failed`` count the notebooks found in ``runs``; ``new_pages`` are the model
    pages the new book will have, ``old_pages`` those of the current site.
    """
    if executed == 0:
        left_out = f" ({failed} failed or unfinished, left out)" if failed else ""
        raise UsageError(
            f"runs folder {runs} holds no executed notebook{left_out}; run them first (moe-book run) "
            "or pass the folder they were written to with --out"
        )
    lost = sorted(old_pages - new_pages)
    if lost and not allow_fewer_pages:
        named = ", ".join(lost[:SHOWN]) + (f" and {len(lost) - SHOWN} more" if len(lost) > SHOWN else "")
        raise UsageError(
            f"the new site would lose {len(lost)} model page(s) the current one has ({named}): their "
            f"notebooks are missing from {runs} or failed. Rerun them with moe-book run, or pass "
            f"{ALLOW_FLAG} to publish without them"
        )
