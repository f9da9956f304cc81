"""Altair output that works in a static, offline Jupyter Book.

Altair's default renderer loads vega, vega-lite and vega-embed from a CDN, which a site read
without network cannot reach. During a book build (``BOOK_BUILD=1`` in the kernel's
environment) :func:`setup_altair` switches to a small "book" renderer: each chart becomes a
``<div>`` plus one ``vegaEmbed(...)`` call, and the libraries come from ``_static/vega-bundle.js``,
a file written once per build by :func:`write_vega_bundle` from the vl-convert package (so the
JavaScript always matches the installed Altair's Vega-Lite version). Outside a book build,
JupyterLab keeps Altair's own renderer.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from moe_utils.core.files import atomic_write_text

BOOK_RENDERER = "book"
"""Name under which the offline renderer is registered with ``alt.renderers``."""

BOOK_BUILD_ENV = "BOOK_BUILD"
"""Environment variable that ``moe-book run`` sets to ``1`` in the notebook kernel."""

DEFAULT_EMBED_OPTIONS: dict[str, Any] = {
    "renderer": "svg",
    # Export buttons only: "open in editor" and "view source" links point at external sites.
    "actions": {"export": True, "source": False, "compiled": False, "editor": False},
}

DARK_EMBED_OPTIONS: dict[str, Any] = {
    # vega-themes' dark theme, on the page's own background, when pydata-sphinx-theme has put
    # data-theme="dark" on <html> (the chart is drawn again when the reader switches).
    "theme": "dark",
    "config": {"background": "transparent"},
}

MIN_FONT_SIZE = 12
"""Smallest text size, in pixels, of any chart text (axis labels, legends, titles, marks)."""

BOOK_THEME = "moe-book"
"""Name of the Altair theme that :func:`setup_altair` enables: text sizes and a transparent
background, set once for every chart of the book."""


def book_theme_config() -> dict[str, Any]:
    """The Vega-Lite ``config`` of the book's charts: no text under :data:`MIN_FONT_SIZE` px,
    a transparent background (the page's own, light or dark), the default view size."""
    small, large = MIN_FONT_SIZE, MIN_FONT_SIZE + 2
    return {
        "config": {
            "background": "transparent",
            "view": {"continuousWidth": 300, "continuousHeight": 300},
            "axis": {"labelFontSize": small, "titleFontSize": small},
            "legend": {"labelFontSize": small, "titleFontSize": small},
            "header": {"labelFontSize": small, "titleFontSize": small},
            "title": {"fontSize": large, "subtitleFontSize": small},
            "text": {"fontSize": small},
            "mark": {"fontSize": small},
        }
    }


MISSING_LIBRARY_MESSAGE = (
    "This chart needs _static/vega-bundle.js, which was not loaded. "
    "Rebuild the book with `moe-book build`, which writes that file."
)

_SCRIPT = """<div id="{div_id}" class="moe-book-chart"></div>
<script type="text/javascript">
(function () {{
  var spec = {spec};
  var opt = {opt};
  function fail(text) {{
    var el = document.getElementById("{div_id}");
    if (!el) {{ return; }}
    var p = document.createElement("p");
    p.style.color = "red";
    p.textContent = text;
    el.replaceChildren(p);
  }}
  var drawn = null;
  function dark() {{
    var root = document.documentElement;
    return !!(root && root.getAttribute && root.getAttribute("data-theme") === "dark");
  }}
  function draw() {{
    if (typeof window.vegaEmbed !== "function") {{
      fail({missing});
      return;
    }}
    var o = opt;
    if (dark()) {{
      o = Object.assign({{}}, opt, {dark});
    }}
    if (drawn && drawn.finalize) {{ drawn.finalize(); }}
    window.vegaEmbed("#{div_id}", spec, o).then(function (result) {{
      drawn = result;
    }}).catch(function (err) {{
      fail("Chart error: " + err);
    }});
  }}
  if (typeof MutationObserver === "function" && document.documentElement) {{
    var mode = dark();
    new MutationObserver(function () {{
      if (dark() !== mode) {{ mode = dark(); draw(); }}
    }}).observe(document.documentElement, {{attributes: true, attributeFilter: ["data-theme"]}});
  }}
  if (typeof window.vegaEmbed === "function" || document.readyState === "complete") {{
    draw();
  }} else {{
    window.addEventListener("load", draw);
  }}
}})();
</script>"""


def _script_json(value: Any) -> str:
    """JSON text that is safe inside an HTML ``<script>`` element (no ``</script>`` breakout)."""
    return json.dumps(value).replace("</", "<\\/").replace("<!--", "\\u003c!--")


def book_chart_html(spec: dict, embed_options: dict | None = None, div_id: str | None = None) -> str:
    """HTML for one Vega-Lite ``spec``: a ``<div>`` and a ``vegaEmbed`` call, no library code.

    ``embed_options`` are merged over :data:`DEFAULT_EMBED_OPTIONS`. If ``window.vegaEmbed``
    is missing when the page has loaded, the chart area shows a red explanation instead of
    staying blank.
    """
    opt = {**DEFAULT_EMBED_OPTIONS, **(embed_options or {})}
    div_id = div_id or f"moe-vega-{uuid.uuid4().hex}"
    return _SCRIPT.format(
        div_id=div_id,
        spec=_script_json(spec),
        opt=_script_json(opt),
        missing=_script_json(MISSING_LIBRARY_MESSAGE),
        dark=_script_json(DARK_EMBED_OPTIONS),
    )


def book_renderer(spec: dict, embed_options: dict | None = None, **_: Any) -> dict[str, str]:
    """Altair renderer function: returns a MIME bundle with the offline HTML and a text label."""
    title = spec.get("title") if isinstance(spec.get("title"), str) else None
    label = f"<Altair chart{': ' + title if title else ''}>"
    return {"text/html": book_chart_html(spec, embed_options), "text/plain": label}


def book_build_enabled(environ: dict[str, str] | None = None) -> bool:
    """True when the environment asks for book output (``BOOK_BUILD`` set to 1/true/yes)."""
    value = (os.environ if environ is None else environ).get(BOOK_BUILD_ENV, "")
    return value.strip().lower() in {"1", "true", "yes"}


def format_warning_without_path(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """``warnings.formatwarning`` for published pages: ``UserWarning: text``, without the file
    name and line that Python puts first (an absolute path of this machine)."""
    return f"{category.__name__}: {message}\n"


def setup_altair(environ: dict[str, str] | None = None) -> str:
    """Choose the Altair renderer for this kernel and return its name.

    Also enables the book's chart theme (:func:`book_theme_config`: text sizes, background) and
    sets pandas' display options once, so that no table is cut short with "...".

    Registers the "book" renderer and enables it when ``BOOK_BUILD=1``; otherwise leaves
    Altair's current renderer (the default one in a fresh kernel) untouched, so JupyterLab
    works as usual. In a book build, warnings are also printed without the source file's path
    (:func:`format_warning_without_path`), so the published pages name no local folder. Call it
    once at the top of every notebook.
    """
    import warnings

    import altair as alt

    alt.renderers.register(BOOK_RENDERER, book_renderer)
    alt.theme.register(BOOK_THEME, enable=True)(book_theme_config)  # pyright: ignore[reportArgumentType]  # altair types the theme as its ThemeConfig TypedDict; ours is the same JSON as a plain dict
    _set_display_options()
    if book_build_enabled(environ):
        _register_table_formatter()
        alt.renderers.enable(BOOK_RENDERER)
        warnings.formatwarning = format_warning_without_path
    return alt.renderers.active


_SNAKE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")


def humanize(label: Any) -> Any:
    """A snake_case column name in words (``sim_before`` -> ``sim before``); any other label,
    including names such as ``W_act`` or ``S_ee``, unchanged."""
    return label.replace("_", " ") if isinstance(label, str) and _SNAKE.match(label) else label


def readable_frame(df: Any) -> Any:
    """``df`` with its column and index names in words (:func:`humanize`); values untouched."""
    out = df.rename(columns=humanize)
    out.columns.names = [humanize(n) for n in out.columns.names]
    out.index.names = [humanize(n) for n in out.index.names]
    return out


def _register_table_formatter() -> None:
    """In a kernel, tables are shown with :func:`readable_frame`'s names (a no-op elsewhere)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with the kernel
        return
    import pandas as pd

    shell = get_ipython()
    if shell is None:
        return
    html = shell.display_formatter.formatters["text/html"]  # pyright: ignore[reportAttributeAccessIssue]
    plain = shell.display_formatter.formatters["text/plain"]  # pyright: ignore[reportAttributeAccessIssue]
    html.for_type(pd.DataFrame, lambda df: readable_frame(df).to_html(max_rows=500, max_cols=None))
    plain.for_type(pd.DataFrame, lambda df, p, cycle: p.text(readable_frame(df).to_string()))


def _set_display_options() -> None:
    """pandas shows every row, column and character of a table (a page never shows "...")."""
    import pandas as pd

    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.max_columns", None)
    pd.set_option("display.max_rows", 500)
    pd.set_option("display.width", 200)


def _vegalite_minor(schema_version: str) -> str:
    """'v6.4.1' -> '6.4' (the form vl-convert uses for its bundled Vega-Lite versions)."""
    parts = schema_version.lstrip("v").split(".")
    return ".".join(parts[:2])


def vega_bundle_source() -> str:
    """The vega/vega-lite/vega-embed bundle as one script that defines only ``window.vega*``.

    vl-convert's bundle declares top-level ``const`` names that clash with Sphinx's own
    scripts; wrapping it in a function keeps those names private. The Vega-Lite version
    matches the installed Altair when vl-convert ships it.
    """
    import altair as alt
    import vl_convert

    wanted = _vegalite_minor(alt.SCHEMA_VERSION)
    version = wanted if wanted in vl_convert.get_vegalite_versions() else None
    # vl-convert's stub is stricter than the module: `snippet` defaults to None at runtime (the
    # whole bundle), and `__version__` exists though the stub leaves it out.
    bundle = vl_convert.javascript_bundle(vl_version=version)  # pyright: ignore[reportCallIssue]
    release = vl_convert.__version__  # pyright: ignore[reportAttributeAccessIssue]
    return (
        f"/* vega {vl_convert.get_vega_version()}, vega-embed {vl_convert.get_vega_embed_version()},"
        f" vega-lite {version or 'latest'}; from vl-convert-python"
        f" {release} */\n(function () {{\n{bundle}\n}})();\n"
    )


def write_vega_bundle(path: str | Path) -> Path:
    """Write :func:`vega_bundle_source` to ``path`` (parents created, atomic replace)."""
    path = Path(path)
    atomic_write_text(path, vega_bundle_source())
    return path
