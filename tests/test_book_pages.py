"""The repository's built book (``make book``, in ``_build/html``), page by page: what a reader
gets. Skipped when the site has not been built.

Without a browser: every page is at most 3 MB of HTML, no two pages share a title, an executed
notebook offered for download is under 5 MB, and the site ships no JavaScript that no page uses.
In headless Chromium, on a 1,400 px window: no chart is wider than the text column, no chart text
is under 12 px, no page logs a console error, and no output cell is empty.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import chromium
import pytest

MAX_DOWNLOAD_BYTES = 5_000_000
UNUSED_JS = ("vendor/require.js", "vendor/ipywidgets")


@pytest.fixture(scope="module")
def site(repo_root: Path) -> Path:
    """The built site: ``_build/html``, or the folder named by ``MOE_BOOK_SITE``."""
    html = Path(os.environ.get("MOE_BOOK_SITE") or repo_root / "_build" / "html")
    if not (html / "index.html").is_file():
        pytest.skip("the book is not built (make book)")
    return html


def pages(site: Path) -> list[Path]:
    """Every reader-facing page: the book's pages, not Sphinx's index and search pages."""
    skip = {"genindex.html", "search.html"}
    return sorted(
        p for p in site.rglob("*.html") if p.name not in skip and not p.relative_to(site).parts[0].startswith("_")
    )


def _title(page: Path) -> str:
    match = re.search(r"<title>(.*?)</title>", page.read_text(encoding="utf-8"), re.S)
    return match.group(1).strip() if match else ""


def test_pages_weigh_at_most_3_mb(site: Path) -> None:
    heavy = {
        str(p.relative_to(site)): p.stat().st_size for p in pages(site) if p.stat().st_size > chromium.MAX_PAGE_BYTES
    }
    assert not heavy, f"pages over {chromium.MAX_PAGE_BYTES:,} bytes: {heavy}"


def test_no_two_pages_share_a_title(site: Path) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for page in pages(site):
        title, name = _title(page), str(page.relative_to(site))
        if title in seen:
            clashes.append(f"{name} and {seen[title]}: {title!r}")
        seen.setdefault(title, name)
    assert not clashes, clashes


def test_downloadable_notebooks_are_under_5_mb(site: Path) -> None:
    heavy = {
        str(p.relative_to(site)): p.stat().st_size
        for p in (site / "_sources").rglob("*.ipynb")
        if p.stat().st_size > MAX_DOWNLOAD_BYTES
    }
    assert not heavy, f"executed notebooks over {MAX_DOWNLOAD_BYTES:,} bytes: {heavy}"


def test_site_ships_only_javascript_its_pages_use(site: Path) -> None:
    shipped = [name for name in UNUSED_JS if (site / name).exists()]
    assert not shipped, f"the site ships JavaScript no page loads: {shipped}"
    for page in pages(site):
        text = page.read_text(encoding="utf-8")
        assert "require.js" not in text and "embed-amd.js" not in text, page


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    with chromium.open_browser(tmp_path_factory.mktemp("chromium-profile")) as cdp:
        chromium.set_window(cdp)
        yield cdp


@pytest.mark.slow
@pytest.mark.browser
def test_every_page_reads_in_the_browser(site: Path, browser: chromium.Cdp) -> None:
    problems = []
    with chromium.serve(site) as url:
        for page in pages(site):
            name = str(page.relative_to(site))
            chromium.open_page(browser, f"{url}/{name}")
            facts = browser.evaluate(chromium.PAGE_FACTS)
            column = facts["column"]
            for chart in facts["charts"]:
                if chart["width"] > column + 1:
                    problems.append(
                        f"{name}: chart {chart['index']} is {chart['width']:.0f} px, column {column:.0f} px"
                    )
                if chart["minText"] is not None and chart["minText"] < chromium.MIN_TEXT_PX:
                    problems.append(f"{name}: chart {chart['index']} has {chart['minText']} px text")
            if facts["emptyOutputs"]:
                problems.append(f"{name}: {facts['emptyOutputs']} empty output cell(s)")
            problems += [f"{name}: console error: {e}" for e in chromium.console_errors(browser)]
            elsewhere = chromium.requests_elsewhere(browser)
            if elsewhere:
                problems.append(f"{name}: requests to other hosts: {elsewhere}")
    assert not problems, "\n".join(problems)
