"""moe_utils.publish.render: the offline "book" Altair renderer and the vega bundle."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import altair as alt
import pandas as pd
import pytest

from moe_utils.publish.render import (
    BOOK_RENDERER,
    DEFAULT_EMBED_OPTIONS,
    MISSING_LIBRARY_MESSAGE,
    book_build_enabled,
    book_chart_html,
    book_renderer,
    setup_altair,
    write_vega_bundle,
)

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (needed to run the JavaScript)")


@pytest.fixture()
def restore_renderer():
    """Leave Altair's renderer as the test found it."""
    active = alt.renderers.active
    options = dict(alt.renderers.options)
    yield
    alt.renderers.enable(active, **options)


def _chart() -> alt.Chart:
    df = pd.DataFrame({"expert": list(range(4)), "value": [0.5, 1.5, 1.0, 2.0]})
    return alt.Chart(df, title="demo").mark_bar().encode(x="expert:O", y="value:Q")


def _script_of(html: str) -> str:
    match = re.search(r"<script[^>]*>(.*)</script>", html, re.S)
    assert match, html
    return match.group(1)


def test_chart_html_embeds_spec_safely() -> None:
    spec = {"title": "a </script><script>alert(1)</script> <!-- b", "mark": "point", "data": {"values": [{"x": 1}]}}
    html = book_chart_html(spec, {"renderer": "canvas"}, div_id="chart-1")
    assert html.count("</script>") == 1, "a title must not close the script element"
    assert html.startswith('<div id="chart-1" class="moe-book-chart"></div>')
    assert "<script src" not in html and "cdn" not in html
    spec_text = re.search(r"var spec = (.*);\n  var opt", html).group(1)
    opt_text = re.search(r"var opt = (.*);\n  function fail", html).group(1)
    assert json.loads(spec_text) == spec
    assert json.loads(opt_text) == {**DEFAULT_EMBED_OPTIONS, "renderer": "canvas"}


def test_book_renderer_mimebundle() -> None:
    bundle = book_renderer({"mark": "bar", "title": "norms"})
    assert set(bundle) == {"text/html", "text/plain"}
    assert "vegaEmbed" in bundle["text/html"] and "norms" in bundle["text/plain"]


@pytest.mark.parametrize(
    ("env", "enabled"),
    [({"BOOK_BUILD": "1"}, True), ({"BOOK_BUILD": "true"}, True), ({"BOOK_BUILD": "0"}, False), ({}, False)],
)
def test_book_build_enabled(env: dict, enabled: bool) -> None:
    assert book_build_enabled(env) is enabled


def test_setup_altair_uses_book_renderer_only_for_book_builds(restore_renderer) -> None:
    alt.renderers.enable("default")
    assert setup_altair({}) == "default"
    assert "moe-book-chart" not in json.dumps(_chart()._repr_mimebundle_(), default=str)

    assert setup_altair({"BOOK_BUILD": "1"}) == BOOK_RENDERER
    bundle = _chart()._repr_mimebundle_()
    html = bundle[0]["text/html"] if isinstance(bundle, tuple) else bundle["text/html"]
    assert "moe-book-chart" in html and "cdn.jsdelivr" not in html
    spec = json.loads(re.search(r"var spec = (.*);\n  var opt", html).group(1))
    assert spec["title"] == "demo" and spec["mark"]["type"] == "bar"


NODE_HARNESS = r"""
const vm = require('vm');
const script = require('fs').readFileSync(0, 'utf8');
const withLibrary = process.argv[1] === 'yes';
const el = {style: {}, children: [], replaceChildren(...c) { this.children = c; }};
const calls = [];
const ctx = {
  document: {readyState: 'complete', getElementById: (id) => (id === 'c1' ? el : null),
             createElement: () => ({style: {}, textContent: ''})},
  addEventListener: () => { throw new Error('should not wait: the page is loaded'); },
};
ctx.window = ctx;
if (withLibrary) { ctx.vegaEmbed = (target, spec, opt) => { calls.push({target, spec, opt}); return Promise.resolve(); }; }
vm.runInNewContext(script, ctx);
setTimeout(() => console.log(JSON.stringify({calls, shown: el.children.map((p) => ({text: p.textContent, color: p.style.color}))})), 10);
"""


@needs_node
@pytest.mark.parametrize("with_library", [True, False])
def test_chart_script_calls_vega_embed_or_shows_red_message(with_library: bool) -> None:
    spec = {"mark": "point", "title": "x"}
    script = _script_of(book_chart_html(spec, div_id="c1"))
    proc = subprocess.run(
        [NODE, "-e", NODE_HARNESS, "yes" if with_library else "no"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    if with_library:
        assert result["calls"] == [{"target": "#c1", "spec": spec, "opt": DEFAULT_EMBED_OPTIONS}]
        assert result["shown"] == []
    else:
        assert result["calls"] == []
        assert result["shown"] == [{"text": MISSING_LIBRARY_MESSAGE, "color": "red"}]


BUNDLE_HARNESS = r"""
const vm = require('vm');
const code = require('fs').readFileSync(process.argv[1], 'utf8');
globalThis.window = globalThis;
vm.runInThisContext(code);
vm.runInThisContext(code);  // a second copy on the page must not clash with the first
console.log(JSON.stringify({embed: typeof window.vegaEmbed, leaked: typeof n}));
"""


@needs_node
def test_vega_bundle_defines_vega_embed_without_leaking_names(tmp_path: Path) -> None:
    path = write_vega_bundle(tmp_path / "static" / "vega-bundle.js")
    text = path.read_text(encoding="utf-8")
    assert (
        text.startswith("/* vega ") and f"vega-lite {'.'.join(alt.SCHEMA_VERSION.lstrip('v').split('.')[:2])}" in text
    )
    assert not (tmp_path / "static" / "vega-bundle.js.tmp").exists()
    proc = subprocess.run([NODE, "-e", BUNDLE_HARNESS, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The unwrapped bundle declares a top-level `const n`; wrapped, nothing but window.* leaks.
    assert json.loads(proc.stdout) == {"embed": "function", "leaked": "undefined"}
