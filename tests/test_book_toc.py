"""moe_utils.publish.bookbuild: the table of contents generated from a runs folder."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from sphinx_external_toc.parsing import parse_toc_yaml

from moe_utils.core.errors import MoEUtilsError
from moe_utils.publish import bookbuild
from moe_utils.publish.bookbuild import GENERATED_TOC, PAGES_DIR, ROOT_PAGE, collect_runs, make_toc, write_toc


def executed(path: Path, model: str | None = None, failed: bool = False, meta: dict | None = None) -> Path:
    """A notebook as papermill leaves it: parameters and the exception flag in its metadata."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}")]
    params = {"model": model} if model else {"runs_dir": ".."}
    nb.metadata["papermill"] = {"parameters": params, "exception": True if failed else None}
    nb.metadata.update(meta or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def book(tmp_path: Path, monkeypatch) -> Path:
    """A book folder with the text pages and runs for three models and the book-level pages."""
    pages = tmp_path / "book"
    pages.mkdir()
    for name in ("intro", "method", "reproduce", "suggestions"):
        (pages / f"{name}.md").write_text(f"# {name}\n", encoding="utf-8")
    runs = pages / "runs"
    executed(runs / "zebra" / "obs1_weights.ipynb", "/data/zebra")
    executed(runs / "mistralai--Mixtral-8x7B-v0.1" / "obs1_weights.ipynb", "mistralai/Mixtral-8x7B-v0.1")
    executed(runs / "tiny-moe-upcycled" / "obs2_norms.ipynb", "zoo:tiny-moe-upcycled")
    executed(runs / "tiny-moe-upcycled" / "obs1_weights.ipynb", "zoo:tiny-moe-upcycled")
    executed(runs / "tiny-moe-upcycled" / "obs3_broken.ipynb", "zoo:tiny-moe-upcycled", failed=True)
    executed(runs / "book" / "replication.ipynb")  # a back page of the registry (publish/pages.py)
    executed(runs / "book" / "organisms.ipynb")
    executed(runs / "book" / "zoo_training.ipynb", meta={"moe_book": {"scope": "book", "place": "front"}})
    (runs / "empty-model").mkdir()
    monkeypatch.setattr(
        bookbuild, "default_models", lambda: (["zoo:tiny-moe-scratch", "zoo:tiny-moe-upcycled"], "zoo:tiny-dense")
    )
    return tmp_path


def test_collect_runs(book: Path) -> None:
    index = collect_runs(book / "book" / "runs")
    # Default models first in the zoo's order, then the others alphabetically; no empty folders.
    assert [(m.slug, m.model) for m in index.models] == [
        ("tiny-moe-upcycled", "zoo:tiny-moe-upcycled"),
        ("mistralai--Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-v0.1"),
        ("zebra", "zebra"),  # a local folder by its name: the sidebar shows no local path
    ]
    assert [p.name for p in index.models[0].notebooks] == ["obs1_weights.ipynb", "obs2_norms.ipynb"]
    assert [p.name for p in index.front] == ["organisms.ipynb", "zoo_training.ipynb"]
    assert [p.name for p in index.back] == ["replication.ipynb"]
    assert [p.name for p in index.failed] == ["obs3_broken.ipynb"]
    assert collect_runs(book / "nowhere").models == []


def test_make_toc_orders_front_models_back(book: Path) -> None:
    toc = make_toc(collect_runs(book / "book" / "runs"), book)
    assert toc["format"] == "jb-book" and toc["root"] == "book/intro"
    flat = [(part["caption"], [c["file"] for c in part["chapters"]]) for part in toc["parts"]]
    assert flat == [
        ("The paper and the method", ["book/method", "book/runs/book/organisms", "book/runs/book/zoo_training"]),
        (
            "Model: zoo:tiny-moe-upcycled",
            ["book/runs/tiny-moe-upcycled/obs1_weights", "book/runs/tiny-moe-upcycled/obs2_norms"],
        ),
        ("Model: mistralai/Mixtral-8x7B-v0.1", ["book/runs/mistralai--Mixtral-8x7B-v0.1/obs1_weights"]),
        ("Model: zebra", ["book/runs/zebra/obs1_weights"]),
        ("Summary", ["book/runs/book/replication", "book/suggestions"]),
        ("Appendix: running at scale", ["book/reproduce"]),
    ]
    # The file is a valid Jupyter Book TOC whose entries all exist.
    path = write_toc(toc, book / GENERATED_TOC)
    site_map = parse_toc_yaml(path)
    for doc in site_map:
        assert any((book / f"{doc}{suffix}").exists() for suffix in (".md", ".ipynb")), doc


def test_make_toc_needs_the_text_pages(book: Path) -> None:
    (book / "book" / "method.md").unlink()
    with pytest.raises(MoEUtilsError, match="method"):
        make_toc(collect_runs(book / "book" / "runs"), book)


def test_committed_toc_lists_existing_text_pages(repo_root: Path) -> None:
    site_map = parse_toc_yaml(repo_root / "_toc.yml")
    # Same root page as the generated TOC, and every listed page exists.
    assert site_map.root.docname == f"{PAGES_DIR}/{ROOT_PAGE}"
    for doc in site_map:
        assert (repo_root / f"{doc}.md").exists(), doc


def test_summary_comes_right_after_the_intro(tmp_path: Path):
    """The answer first: a book-level summary placed at the front opens the first part."""
    from moe_utils.publish.bookbuild import FRONT_PAGES, RunsIndex

    for name in (ROOT_PAGE, *FRONT_PAGES, "reproduce"):
        (tmp_path / PAGES_DIR / f"{name}.md").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PAGES_DIR / f"{name}.md").write_text(f"# {name}\n")
    runs = tmp_path / "book" / "runs" / "book"
    organisms, summary = executed(runs / "organisms.ipynb"), executed(runs / "summary.ipynb")
    toc = make_toc(RunsIndex(front=[organisms, summary]), tmp_path)
    files = [c["file"] for c in toc["parts"][0]["chapters"]]
    assert files[0] == "book/runs/book/summary" and files[-1] == "book/runs/book/organisms"
