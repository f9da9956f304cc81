"""The book's pages: which notebooks run once per model and which once for the book, and where.

The registry is :data:`BOOK_PAGES`. Its per-model pages are the observations of
:data:`moe_utils.analysis.claims.OBSERVATIONS` (so an observation registered there is run on
every model without a second list) and the token explorer; its book-level pages are the model
organisms page and the summary ("front": listed before the model parts of the book) and the
replication and interventions pages ("back": after them).

A notebook the registry does not know (one a user adds to their own book) says what it is in its
metadata, ``{"moe_book": {"scope": "model"}}`` or ``{"moe_book": {"scope": "book", "place":
"front"}}``; without that key it is a book-level page at the back. A registered notebook whose
metadata says otherwise is refused, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moe_utils.analysis.claims import OBSERVATIONS
from moe_utils.core.errors import MoEUtilsError, UsageError
from moe_utils.publish.notebook_meta import read_notebook_metadata

METADATA_KEY = "moe_book"

Scope = Literal["model", "book"]
Place = Literal["front", "back"]


@dataclass(frozen=True)
class BookPage:
    """A notebook of the book: its name (file stem), scope and, for book-level pages, place."""

    notebook: str
    scope: Scope  # "model": run once per model; "book": run once
    place: Place = "back"  # book-level only: "front" (before the model parts) or "back"


BOOK_PAGES: dict[str, BookPage] = {
    page.notebook: page
    for page in (
        *(BookPage(o.notebook, "model") for o in OBSERVATIONS),
        BookPage("token_explorer", "model"),
        BookPage("organisms", "book", "front"),
        BookPage("summary", "book", "front"),
        BookPage("replication", "book"),
        BookPage("interventions", "book"),
    )
}


@dataclass(frozen=True)
class NotebookInfo:
    """A source notebook and how the book uses it."""

    path: Path
    scope: str  # "model" (run per model) or "book" (run once)
    place: str = "back"  # book-level only: "front" (before the model parts) or "back"

    @property
    def name(self) -> str:
        """File stem, e.g. ``obs2_router_norms``."""
        return self.path.stem


def notebook_info(path: str | Path, metadata: dict[str, Any] | None = None) -> NotebookInfo:
    """How the book uses the notebook at ``path``: its :data:`BOOK_PAGES` entry, else its metadata.

    ``metadata`` is the notebook's top-level metadata when the caller has already parsed the
    file (it is then not read again).
    """
    path = Path(path)
    if metadata is None:
        metadata = read_notebook_metadata(path, "Restore it (e.g. git checkout) or delete it.")
    meta = metadata.get(METADATA_KEY, {})
    page = BOOK_PAGES.get(path.stem)
    if page is not None:
        scope, place = meta.get("scope"), meta.get("place")
        if (scope and scope != page.scope) or (page.scope == "book" and place and place != page.place):
            raise MoEUtilsError(
                f"{path}: metadata {METADATA_KEY} says scope={scope!r}, place={place!r}, but the book's page registry "
                f"(moe_utils.publish.pages.BOOK_PAGES) has scope={page.scope!r}, place={page.place!r}; "
                f"remove the {METADATA_KEY} keys from the notebook or change the registry"
            )
        return NotebookInfo(path=path, scope=page.scope, place=page.place)
    scope = meta.get("scope") or "book"
    place = meta.get("place") or "back"
    if scope not in ("model", "book") or place not in ("front", "back"):
        raise MoEUtilsError(
            f"{path}: metadata {METADATA_KEY}.scope must be 'model' or 'book' and .place "
            f"'front' or 'back' (got scope={scope!r}, place={place!r})"
        )
    return NotebookInfo(path=path, scope=scope, place=place)


def discover_notebooks(notebooks_dir: str | Path) -> list[NotebookInfo]:
    """Every ``*.ipynb`` directly in ``notebooks_dir``, sorted by name."""
    folder = Path(notebooks_dir)
    if not folder.is_dir():
        raise UsageError(
            f"notebook folder {folder} does not exist; run moe-book from the repository root or pass --notebooks-dir"
        )
    return [notebook_info(p) for p in sorted(folder.glob("*.ipynb"))]


def select_notebooks(available: Sequence[NotebookInfo], names: Sequence[str] | None) -> list[NotebookInfo]:
    """The notebooks named (stem or file name), in the order given; all when ``names`` is empty."""
    if not names:
        return list(available)
    by_name = {nb.name: nb for nb in available}
    chosen = []
    for name in names:
        stem = Path(name).name.removesuffix(".ipynb")
        if stem not in by_name:
            raise UsageError(f"no notebook named {name!r}; available: {', '.join(sorted(by_name)) or '(none)'}")
        chosen.append(by_name[stem])
    return chosen
