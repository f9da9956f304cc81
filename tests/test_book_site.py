"""End to end: `moe-book run` + `moe-book build` on a tiny model, then the page in Chromium.

The observation notebook is the real ``notebooks/obs2_router_norms.ipynb`` when it exists,
otherwise a stand-in fixture with one Altair chart and a layer slider (``MOE_BOOK_E2E_NOTEBOOK=
fixture`` forces the stand-in, to check the publishing pipeline apart from the analysis code). Everything is written to
a temporary book folder (a copy of the repository's config and text pages), never to the
repository itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import chromium
import nbformat
import pytest

MODEL = "random:mixtral"
SLUG = "random-mixtral"
REAL_NOTEBOOK = "obs2_router_norms"
FIXTURE_NOTEBOOK = "obs0_altair_slider"


def _moe_book(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_utils.publish.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def built_book(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run one observation notebook on a random tiny Mixtral and build the book around it."""
    root = tmp_path_factory.mktemp("book")
    shutil.copy(repo_root / "_config.yml", root)
    shutil.copy(repo_root / "_toc.yml", root)
    (root / "book").mkdir()
    for page in [*(repo_root / "book").glob("*.md"), repo_root / "book" / "references.bib"]:
        shutil.copy(page, root / "book")
    shutil.copytree(repo_root / "book" / "_static", root / "book" / "_static")  # favicon and chart CSS
    vendor = repo_root / "book" / "_extra" / "vendor"
    if vendor.is_dir():
        (root / "book" / "_extra").mkdir()
        (root / "book" / "_extra" / "vendor").symlink_to(vendor, target_is_directory=True)

    use_real = os.environ.get("MOE_BOOK_E2E_NOTEBOOK", "real") != "fixture"
    if use_real and (repo_root / "notebooks" / f"{REAL_NOTEBOOK}.ipynb").exists():
        notebooks_dir, name = repo_root / "notebooks", REAL_NOTEBOOK
    else:
        notebooks_dir, name = repo_root / "tests" / "fixtures" / "notebooks", FIXTURE_NOTEBOOK
    run = _moe_book(
        "run",
        "--model",
        MODEL,
        "--notebooks-dir",
        str(notebooks_dir),
        "--notebooks",
        name,
        "--out",
        "book/runs",
        cwd=root,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    build = _moe_book("build", cwd=root)
    assert build.returncode == 0, build.stdout + build.stderr
    return {"root": root, "name": name, "run": run, "build": build, "html": root / "_build" / "html"}


@pytest.mark.slow
def test_run_writes_tidied_notebook_with_offline_chart(built_book: dict) -> None:
    root, name = built_book["root"], built_book["name"]
    out = root / "book" / "runs" / SLUG / f"{name}.ipynb"
    assert out.exists()
    assert (out.parent / "results").is_dir()
    nb = nbformat.read(out, as_version=4)
    assert nb.metadata.papermill.parameters["model"] == MODEL
    assert nb.metadata.papermill.exception in (None, False)
    tags = [cell.metadata.get("tags", []) for cell in nb.cells]
    assert any("parameters" in t and "remove-cell" in t for t in tags)
    assert any("injected-parameters" in t and "hide-input" in t for t in tags)
    html_outputs = [
        out_.data["text/html"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out_ in cell.outputs
        if "data" in out_ and "text/html" in out_.data
    ]
    charts = [h for h in html_outputs if "vegaEmbed" in h]
    assert charts, "no chart drawn with the book renderer (was BOOK_BUILD=1 in the kernel?)"
    assert not any("cdn.jsdelivr" in h for h in charts)
    assert f"[1/1] {SLUG}/{name}" in built_book["run"].stdout


@pytest.mark.slow
def test_build_makes_offline_site_from_runs(built_book: dict) -> None:
    root, html, name = built_book["root"], built_book["html"], built_book["name"]
    page = html / "book" / "runs" / SLUG / f"{name}.html"
    assert (html / "index.html").exists() and page.exists()
    assert (html / "_static" / "vega-bundle.js").stat().st_size > 100_000
    text = page.read_text(encoding="utf-8")
    assert "_static/vega-bundle.js" in text and "moe-book-chart" in text
    toc = (root / "book" / "generated" / "_toc.yml").read_text(encoding="utf-8")
    assert f"Model: {MODEL}" in toc and f"book/runs/{SLUG}/{name}" in toc
    for file in html.rglob("*.html"):
        body = file.read_text(encoding="utf-8")
        for bad in ('src="http', "src='http", 'src="//'):
            assert bad not in body, f"{file} loads an external script or image ({bad})"


# --------------------------------------------------------------------------- browser


def test_missing_chromium_skips_locally_but_fails_in_ci(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(chromium, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing in CI"):
        chromium.require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        chromium.require_chromium()


@pytest.fixture()
def served_site(built_book: dict):
    """The built site on a free 127.0.0.1 port, served from a background thread."""
    with chromium.serve(built_book["html"]) as url:
        yield url


@pytest.fixture()
def browser(tmp_path: Path):
    """Headless Debian Chromium that can reach no host but 127.0.0.1; yields a CDP page client."""
    with chromium.open_browser(tmp_path / "chromium-profile") as cdp:
        yield cdp


@pytest.mark.slow
@pytest.mark.browser
def test_page_renders_chart_and_slider_offline(built_book: dict, served_site: str, browser: chromium.Cdp) -> None:
    name = built_book["name"]
    chromium.open_chart_page(browser, f"{served_site}/book/runs/{SLUG}/{name}.html")

    assert browser.wait_for(chromium.MARK_SLIDER_CHART, timeout=30), "no chart with a range slider"
    assert browser.evaluate(chromium.REMEMBER_SVG) > 0
    assert not browser.evaluate(chromium.SVG_CHANGED)
    moved_to = browser.evaluate(chromium.MOVE_SLIDER)
    browser.wait_for(chromium.SVG_CHANGED, timeout=30)
    assert browser.evaluate("document.querySelector('[data-under-test] input[type=range]').value") == moved_to

    requested = chromium.requested_urls(browser)
    assert any(u.endswith(f"{name}.html") for u in requested)
    assert any("vega-bundle.js" in u for u in requested)
    elsewhere = chromium.requests_elsewhere(browser)
    assert not elsewhere, f"the page tried to reach other hosts: {elsewhere}"


def test_rebuild_drops_pages_of_runs_that_are_gone(built_book: dict) -> None:
    root, html = built_book["root"], built_book["html"]
    ghost = html / "book" / "runs" / "removed-model" / "obs2_router_norms.html"
    ghost.parent.mkdir(parents=True)
    ghost.write_text("<html>a page from an earlier build</html>", encoding="utf-8")
    refused = _moe_book("build", cwd=root)
    assert refused.returncode == 2 and "book/runs/removed-model/obs2_router_norms" in refused.stderr
    assert ghost.exists()  # nothing was touched
    build = _moe_book("build", "--allow-fewer-pages", cwd=root)
    assert build.returncode == 0, build.stdout + build.stderr
    assert not ghost.exists()
    assert (html / "book" / "runs" / SLUG / f"{built_book['name']}.html").exists()
