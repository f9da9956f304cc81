"""Headless Debian Chromium for the browser tests: serve a built site on 127.0.0.1, open its pages
over the Chrome DevTools Protocol, and check that the charts draw with nothing fetched from
elsewhere. Shared by ``test_book_site.py`` (the repository's book) and ``test_wheel.py`` (a
user's book from the installed wheel).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from moe_utils.publish.render import MISSING_LIBRARY_MESSAGE

CHROMIUM = Path("/usr/bin/chromium")

# Chromium may resolve no host but 127.0.0.1: a page that needs a CDN fails visibly.
FLAGS = (
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
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
)

CHART_DRAWN = (
    "Array.from(document.querySelectorAll('.moe-book-chart')).some(c => c.querySelector('svg, canvas') !== null)"
)
CHART_ERROR_SHOWN = "document.querySelector('.moe-book-chart p') !== null"
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


def require_chromium() -> None:
    """Skip without Debian's chromium, except in CI, where its absence is a failure."""
    if CHROMIUM.exists():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{CHROMIUM} is missing in CI; .ci/run should install Debian's chromium")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); browser check skipped")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """``directory`` on a free 127.0.0.1 port, served from a background thread; yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def open_browser(profile: Path) -> Iterator[Cdp]:
    """Headless Chromium (profile in ``profile``) that can reach no host but 127.0.0.1; yields a
    CDP client of its page. Skips (or fails in CI) without chromium."""
    require_chromium()
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"]
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


def open_chart_page(browser: Cdp, url: str) -> None:
    """Load ``url`` and wait until its charts are drawn; fail on the renderer's error texts."""
    browser.send("Network.enable")
    browser.send("Page.enable")
    browser.send("Page.navigate", url=url)
    browser.wait_for("document.readyState === 'complete'")
    # Either a chart is drawn or the renderer has put its red error text in the chart area.
    browser.wait_for(f"({CHART_DRAWN}) || {CHART_ERROR_SHOWN}")
    text = browser.evaluate("document.body.innerText")
    assert "Error loading script" not in text
    assert MISSING_LIBRARY_MESSAGE not in text and "Chart error" not in text
    assert browser.evaluate(CHART_DRAWN)


def requested_urls(browser: Cdp) -> list[str]:
    """Every URL the page has requested so far (``Network.enable`` first)."""
    return [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]


def requests_elsewhere(browser: Cdp) -> list[str]:
    """The requested URLs that went to a host other than 127.0.0.1 (inline data excepted)."""
    return [
        u
        for u in requested_urls(browser)
        if urlparse(u).scheme not in ("data", "blob", "about") and urlparse(u).hostname != "127.0.0.1"
    ]


# --------------------------------------------------------------------------- whole-site checks

WINDOW = (1400, 900)
"""The reader's window for the layout checks: charts must fit the text column at this width."""

MIN_TEXT_PX = 12
MAX_PAGE_BYTES = 3_000_000

# What the layout checks read from a loaded page: the text column's width, every chart's width,
# the smallest chart text, and output cells that show nothing.
PAGE_FACTS = """(() => {
  const column = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const style = getComputedStyle(column);
  const colWidth = column.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const charts = Array.from(document.querySelectorAll('.moe-book-chart')).map((c, i) => {
    const svg = c.querySelector('svg');
    const sizes = svg ? Array.from(svg.querySelectorAll('text'))
      .filter(t => t.textContent.trim() !== '')
      .map(t => parseFloat(getComputedStyle(t).fontSize)) : [];
    return {index: i, width: svg ? svg.getBoundingClientRect().width : 0,
            minText: sizes.length ? Math.min(...sizes) : null};
  });
  const empty = Array.from(document.querySelectorAll('.cell_output')).filter(o => {
    const shown = o.innerText.trim() !== '' || o.querySelector('svg, img, canvas, table, input, select');
    return !shown;
  }).length;
  return {title: document.title, column: colWidth, charts: charts, emptyOutputs: empty};
})()"""


def set_window(browser: Cdp, width: int = WINDOW[0], height: int = WINDOW[1]) -> None:
    """Lay the page out as in a ``width`` x ``height`` browser window."""
    browser.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)


def open_page(browser: Cdp, url: str, timeout: float = 60.0) -> None:
    """Load ``url`` (console and network recorded) and wait until every chart on it has drawn."""
    browser.events.clear()
    for domain in ("Network", "Page", "Runtime", "Log"):
        browser.send(f"{domain}.enable")
    browser.send("Page.navigate", url=url)
    browser.wait_for("document.readyState === 'complete'", timeout=timeout)
    browser.wait_for(
        "Array.from(document.querySelectorAll('.moe-book-chart')).every(c => c.querySelector('svg, canvas, p'))",
        timeout=timeout,
    )
    time.sleep(0.3)  # let a chart's last signal updates and any late console message arrive


def console_errors(browser: Cdp) -> list[str]:
    """Uncaught exceptions, console.error calls and browser log errors recorded since ``open_page``."""
    errors = []
    for e in browser.events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())
    return errors


def screenshot(browser: Cdp, path: Path) -> Path:
    """The whole page (not only the window) as a PNG at ``path``."""
    import base64

    size = browser.send("Page.getLayoutMetrics")["cssContentSize"]
    height = int(min(size["height"], 16000))
    # A window as tall as the page, so that the whole page is laid out and painted at once.
    set_window(browser, WINDOW[0], height)
    time.sleep(1.0)
    shot = browser.send("Page.captureScreenshot", format="png")
    set_window(browser)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
