"""End to end: `moe-book run` + `moe-book build` on a tiny model, then the page in Chromium.

The observation notebook is the real ``notebooks/obs2_router_norms.ipynb`` when it exists,
otherwise a stand-in fixture with one Altair chart and a layer slider (``MOE_BOOK_E2E_NOTEBOOK=
fixture`` forces the stand-in, to check the publishing pipeline apart from the analysis code). Everything is written to
a temporary book folder (a copy of the repository's config and text pages), never to the
repository itself.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest

from moe_utils.publish.render import MISSING_LIBRARY_MESSAGE

MODEL = "random:mixtral"
SLUG = "random-mixtral"
REAL_NOTEBOOK = "obs2_router_norms"
FIXTURE_NOTEBOOK = "obs0_altair_slider"
CHROMIUM = Path("/usr/bin/chromium")


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


class Cdp:
    """Minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        msg_id = self.next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for: {expression}")

    def close(self) -> None:
        self.ws.close()


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{CHROMIUM} is missing in CI; .ci/run should install Debian's chromium")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); browser check skipped")


def test_missing_chromium_skips_locally_but_fails_in_ci(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing in CI"):
        _require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        _require_chromium()


@pytest.fixture()
def served_site(built_book: dict):
    """The built site on a free 127.0.0.1 port, served from a background thread."""
    handler = functools.partial(_QuietHandler, directory=str(built_book["html"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture()
def browser(tmp_path: Path):
    """Headless Debian Chromium that can reach no host but 127.0.0.1; yields a CDP page client."""
    _require_chromium()
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "--remote-allow-origins=*",
        "about:blank",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            if "DevTools listening on ws://" in line:
                port = urlparse(line.split("listening on ", 1)[1].strip()).port
        assert port, "Chromium did not report its DevTools port"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t.get("type") == "page")
        cdp = Cdp(page["webSocketDebuggerUrl"])
        try:
            yield cdp
        finally:
            cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHART_DRAWN = (
    "Array.from(document.querySelectorAll('.moe-book-chart')).some(c => c.querySelector('svg, canvas') !== null)"
)
MARK_SLIDER_CHART = """(() => {
  const chart = Array.from(document.querySelectorAll('.moe-book-chart'))
    .find(c => c.querySelector('input[type=range]') && c.querySelector('svg'));
  if (!chart) { return false; }
  chart.setAttribute('data-under-test', '1');
  return true;
})()"""
SVG_OF_CHART = "document.querySelector('[data-under-test] svg').outerHTML"
REMEMBER_SVG = f"(window.__svgBefore = {SVG_OF_CHART}).length"
SVG_CHANGED = f"{SVG_OF_CHART} !== window.__svgBefore"
MOVE_SLIDER = """(() => {
  const s = document.querySelector('[data-under-test] input[type=range]');
  const target = Number(s.value) === Number(s.max) ? s.min : s.max;
  s.value = target;
  s.dispatchEvent(new Event('input', {bubbles: true}));
  return String(s.value);
})()"""


@pytest.mark.slow
@pytest.mark.browser
def test_page_renders_chart_and_slider_offline(built_book: dict, served_site: str, browser: Cdp) -> None:
    name = built_book["name"]
    browser.send("Network.enable")
    browser.send("Page.enable")
    url = f"{served_site}/book/runs/{SLUG}/{name}.html"
    browser.send("Page.navigate", url=url)
    browser.wait_for("document.readyState === 'complete'")

    # Either a chart is drawn or the renderer has put its red error text in the chart area.
    browser.wait_for(f"({CHART_DRAWN}) || document.querySelector('.moe-book-chart p') !== null")
    text = browser.evaluate("document.body.innerText")
    assert "Error loading script" not in text
    assert MISSING_LIBRARY_MESSAGE not in text and "Chart error" not in text
    assert browser.evaluate(CHART_DRAWN)

    assert browser.wait_for(MARK_SLIDER_CHART, timeout=30), "no chart with a range slider"
    assert browser.evaluate(REMEMBER_SVG) > 0
    assert not browser.evaluate(SVG_CHANGED)
    moved_to = browser.evaluate(MOVE_SLIDER)
    browser.wait_for(SVG_CHANGED, timeout=30)
    assert browser.evaluate("document.querySelector('[data-under-test] input[type=range]').value") == moved_to

    requested = [
        e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"
    ]
    assert any(u.endswith(f"{name}.html") for u in requested)
    assert any("vega-bundle.js" in u for u in requested)
    elsewhere = [
        u
        for u in requested
        if urlparse(u).scheme not in ("data", "blob", "about") and urlparse(u).hostname != "127.0.0.1"
    ]
    assert not elsewhere, f"the page tried to reach other hosts: {elsewhere}"


def test_rebuild_drops_pages_of_runs_that_are_gone(built_book: dict) -> None:
    root, html = built_book["root"], built_book["html"]
    ghost = html / "book" / "runs" / "removed-model" / "obs2_router_norms.html"
    ghost.parent.mkdir(parents=True)
    ghost.write_text("<html>a page from an earlier build</html>", encoding="utf-8")
    build = _moe_book("build", cwd=root)
    assert build.returncode == 0, build.stdout + build.stderr
    assert not ghost.exists()
    assert (html / "book" / "runs" / SLUG / f"{built_book['name']}.html").exists()
