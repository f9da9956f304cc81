"""Altair chart builders for the book's figures.

Every builder takes a tidy pandas DataFrame (one row per plotted value) and returns an Altair
chart. Per-layer figures carry a layer slider made of an ``alt.param`` bound to a range input,
so they stay interactive in the static site without a kernel. The slider moves over the
*position* of a layer in the list of analysed layers, which keeps it usable when only some
layers are analysed (for example DeepSeekMoE's MoE layers 1-27, or ``layers=[0, 5, 10]``).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import altair as alt
import pandas as pd

from .render import humanize

if TYPE_CHECKING:
    from altair.vegalite.v6.schema._typing import ColorScheme_T

LAYER_POS = "layer_pos"

COLUMN_WIDTH = 772
"""Width in pixels of the book's text column on a 1,400 px window; no chart is wider."""

MAX_PLOT = 480
"""Largest width or height of one square heat map, leaving room for its axes and legend."""

COSINE_DOMAIN = (-1.0, 1.0)
ANGULAR_DOMAIN = (0.0, 1.0)

# The builders embed their (deliberately small, tidy) data in the page; Altair's default cap of
# 5,000 rows would reject a per-token heat map of a single layer.
alt.data_transformers.disable_max_rows()


def with_layer_position(df: pd.DataFrame, layer_field: str = "layer") -> pd.DataFrame:
    """Add a ``layer_pos`` column: the rank of each row's layer among the distinct layers."""
    layers = sorted(df[layer_field].unique())
    pos = {layer: i for i, layer in enumerate(layers)}
    out = df.copy()
    out[LAYER_POS] = out[layer_field].map(pos).astype(int)
    return out


def wrap_title(title: str, width: int = 72) -> str | list[str]:
    """``title`` as one line, or as lines of at most ``width`` characters when longer (a chart's
    title would otherwise widen the chart past the text column)."""
    if len(title) <= width:
        return title
    return textwrap.wrap(title, width)


def _round(value: float, digits: int = 4) -> float | None:
    """``value`` to ``digits`` significant digits (None for NaN), which is what a chart can show."""
    if value != value:  # NaN
        return None
    return float(f"{value:.{digits}g}")


def columnar(df: pd.DataFrame, columns: Sequence[str] | None = None) -> alt.InlineData:
    """``df``'s ``columns`` as one record of arrays (numbers to 4 significant digits).

    A page embeds its charts' data as JSON; one array per column instead of one object per row
    does not repeat the field names in every row, which makes a large heat map several times
    lighter. A chart on this data starts with :func:`flat`, which turns it back into rows.
    """
    columns = list(df.columns if columns is None else dict.fromkeys(columns))
    record: dict[str, list] = {}
    for c in columns:
        col = df[c]
        if pd.api.types.is_bool_dtype(col):
            record[c] = [bool(v) for v in col]
        elif pd.api.types.is_integer_dtype(col):
            record[c] = [int(v) for v in col]
        elif pd.api.types.is_float_dtype(col):
            record[c] = [_round(float(v)) for v in col]
        else:
            record[c] = [None if v is None else str(v) for v in col]
    return alt.InlineData(values=[record])


def flat(data: alt.InlineData) -> alt.Chart:
    """A chart on :func:`columnar` data, with the transform that makes it one row per value."""
    fields = list(data.values[0])  # pyright: ignore[reportIndexIssue, reportArgumentType]
    return alt.Chart(data).transform_flatten(fields)


def matrix_source(
    df: pd.DataFrame,
    groups: Sequence[str],
    row_field: str,
    col_field: str,
    value_field: str,
    labels: Sequence[str],
) -> tuple[alt.InlineData, alt.Chart]:
    """Square matrices (one per combination of ``groups``, e.g. layer and token) stored as one
    flat list of values each, in ``labels`` order, to 3 significant digits.

    Returns the data and a chart on it that rebuilds one row per cell: ``groups``, ``row_field``
    and ``col_field`` (labels) and ``value_field``. Neither labels nor field names are repeated
    per cell, so a 30-expert map of every token and layer stays a few hundred kilobytes.
    """
    labels = [str(v) for v in labels]
    n = len(labels)
    pos = {label: i for i, label in enumerate(labels)}
    keyed = df.assign(_i=df[row_field].astype(str).map(pos), _j=df[col_field].astype(str).map(pos))
    record: dict[str, list] = {g: [] for g in groups}
    record["_v"] = []
    for key, g in keyed.groupby(list(groups), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        cells: list[float | None] = [None] * (n * n)
        for i, j, v in zip(g["_i"], g["_j"], g[value_field], strict=True):
            cells[int(i) * n + int(j)] = _round(float(v), 3)
        for name, value in zip(groups, key, strict=True):
            record[name].append(cast(Any, value).item() if hasattr(value, "item") else value)
        record["_v"].append(cells)
    data = alt.InlineData(values=[record])
    names = json.dumps(labels)
    chart = (
        alt.Chart(data)
        .transform_flatten([*groups, "_v"])
        .transform_flatten(["_v"], as_=[value_field])
        .transform_window(_cell="row_number()", groupby=list(groups))
        .transform_calculate(
            **{
                row_field: f"{names}[floor((datum._cell - 1) / {n})]",
                col_field: f"{names}[(datum._cell - 1) % {n}]",
            }
        )
    )
    return data, chart


def layer_slider(df: pd.DataFrame, name: str = "layer_slider", start: int | None = None) -> alt.Parameter:
    """A control over the layers present in ``df``, valued by the layer's own number.

    A range slider when the layers are consecutive, else a dropdown of the analysed layers (for
    example DeepSeekMoE's MoE layers 1-27, or ``layers=[0, 5, 10]``). ``start`` is the position
    among those layers to show first (default: the last layer).
    """
    layers = sorted(int(v) for v in df["layer"].unique())
    i = len(layers) - 1 if start is None else max(0, min(len(layers) - 1, start))
    if layers == list(range(layers[0], layers[-1] + 1)):
        bind = alt.binding_range(min=layers[0], max=layers[-1], step=1, name="layer ")
    else:
        bind = alt.binding_select(options=layers, name="layer ")
    return alt.param(name=name, value=layers[i], bind=bind)


def choice(values: Sequence[str], name: str, label: str) -> alt.Parameter:
    """A dropdown over ``values`` (the first one shown first)."""
    values = list(values)
    return alt.param(name=name, value=values[0], bind=alt.binding_select(options=values, name=f"{label} "))


def _caption(data: alt.InlineData, predicates: Sequence[alt.Predicate], text: str, **fields: str) -> alt.Chart:
    """A one-line bold caption naming the current selection (e.g. "layer 7").

    ``fields`` are aggregates of the filtered rows (``layer="min(layer)"``) that ``text``, a Vega
    expression, refers to as ``datum.<name>``.
    """
    chart = flat(data)
    for p in predicates:
        chart = chart.transform_filter(p)
    return (
        chart.transform_aggregate(alt.Undefined, alt.Undefined, **fields)
        .transform_calculate(text=text)
        .mark_text(align="left", fontSize=13, fontWeight="bold")
        .encode(text="text:N")
        .properties(height=16)
    )


def _layer_caption(data: alt.InlineData, *predicates: alt.Predicate) -> alt.Chart:
    return _caption(data, predicates, "'layer ' + datum.layer", layer="min(layer)")


def _selection_caption(data: alt.InlineData, preds: Sequence[alt.Predicate], facet_field: str | None) -> alt.Chart:
    """The line above a selectable chart naming the layer (and the facet value) on show."""
    if facet_field:
        return _caption(
            data,
            preds,
            f"'layer ' + datum.layer + ', ' + datum.{facet_field}",
            layer="min(layer)",
            **{facet_field: f"min({facet_field})"},
        )
    return _layer_caption(data, *preds)


def _tooltip_fields(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """Tooltip shorthands with explicit types."""
    return [f"{c}:{'Q' if pd.api.types.is_numeric_dtype(df[c]) else 'N'}" for c in columns]


def token_slider(n_tokens: int) -> alt.Parameter:
    """A range-slider parameter over token indices 0..n_tokens-1."""
    return alt.param(
        name="token_slider", value=0, bind=alt.binding_range(min=0, max=max(n_tokens - 1, 0), step=1, name="token ")
    )


def _layer_filter(param: alt.Parameter) -> alt.Predicate:
    return alt.datum["layer"] == param


def _square(n: int, cell: int) -> int:
    """Side of a heat map of ``n`` rows: ``cell`` px a row, between 120 px and :data:`MAX_PLOT`."""
    return int(min(MAX_PLOT, max(120, cell * n)))


def default_domain(value_title: str) -> tuple[float, float]:
    """The fixed colour domain of a similarity: [0, 1] for angular similarity, else [-1, 1]."""
    return ANGULAR_DOMAIN if "angular" in value_title else COSINE_DOMAIN


def similarity_heatmaps(
    df: pd.DataFrame,
    *,
    row_field: str = "expert_i",
    col_field: str = "expert_j",
    value_field: str = "similarity",
    facet_field: str | None = "matrix",
    facet_order: Sequence[str] | None = None,
    title: str = "",
    value_title: str = "cosine similarity",
    domain: tuple[float, float] | None = None,
    start_layer_pos: int | None = None,
    cell: int = 22,
    scheme: ColorScheme_T = "viridis",
) -> alt.VConcatChart:
    """An expert-by-expert heat map with a layer slider and a dropdown over ``facet_field``.

    ``df`` needs columns layer, row_field, col_field, value_field and facet_field. Labels are
    strings (for example "0".."7" and "F"); their order follows first appearance in ``df``. The
    colour scale is fixed (``domain``, by default that of the quantity: [-1, 1] for a cosine,
    [0, 1] for an angular similarity), so that maps of two layers or two models compare.
    """
    data = df.copy()
    data[row_field] = data[row_field].astype(str)
    data[col_field] = data[col_field].astype(str)
    labels = list(dict.fromkeys(list(data[row_field]) + list(data[col_field])))
    slider = layer_slider(data, start=start_layer_pos)
    size = _square(len(labels), cell)
    lo, hi = domain or default_domain(value_title)
    groups = ["layer"] + ([facet_field] if facet_field else [])
    src, base = matrix_source(data, groups, row_field, col_field, value_field, labels)
    preds = [_layer_filter(slider)]
    params = [slider]
    if facet_field:
        order = list(facet_order) if facet_order else list(dict.fromkeys(data[facet_field]))
        pick = choice(order, f"{facet_field}_choice", facet_field)
        preds.append(alt.datum[facet_field] == pick)
        params.append(pick)
    chart = base
    for p in preds:
        chart = chart.transform_filter(p)
    chart = (
        chart.mark_rect()
        .encode(
            x=alt.X(f"{col_field}:N", sort=labels, title="expert"),
            y=alt.Y(f"{row_field}:N", sort=labels, title="expert"),
            color=alt.Color(f"{value_field}:Q", scale=alt.Scale(scheme=scheme, domain=[lo, hi]), title=value_title),
            tooltip=["layer:O", f"{row_field}:N", f"{col_field}:N", alt.Tooltip(f"{value_field}:Q", format=".3f")],
        )
        .properties(width=size, height=size)
    )
    label = _selection_caption(src, preds, facet_field)
    return alt.vconcat(label.add_params(*params), chart, title=wrap_title(title))


def per_layer_lines(
    df: pd.DataFrame,
    *,
    y: str,
    color: str | None = None,
    title: str = "",
    y_title: str | None = None,
    band: tuple[str, str] | None = None,
    reference: pd.DataFrame | None = None,
) -> alt.LayerChart | alt.Chart:
    """A line per ``color`` group of ``y`` against layer index, with an optional CI band.

    ``reference`` (columns ``y`` and ``label``) draws horizontal rules, e.g. a random baseline.
    """
    enc_color = alt.Color(f"{color}:N", title=humanize(color)) if color else alt.value("#1f77b4")
    base = alt.Chart(df).encode(x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)), color=enc_color)
    tooltip = ["layer:Q", alt.Tooltip(f"{y}:Q", format=".3f")] + ([f"{color}:N"] if color else [])
    layers: list[alt.Chart] = []
    if band:
        layers.append(base.mark_area(opacity=0.2).encode(y=f"{band[0]}:Q", y2=f"{band[1]}:Q"))
    layers.append(base.mark_line(point=True).encode(y=alt.Y(f"{y}:Q", title=y_title or humanize(y)), tooltip=tooltip))
    if reference is not None and len(reference):
        layers.append(
            alt.Chart(reference)
            .mark_rule(strokeDash=[4, 4], color="gray")
            .encode(y=f"{y}:Q", tooltip=["label:N", alt.Tooltip(f"{y}:Q", format=".3f")])
        )
    return alt.layer(*layers).properties(title=wrap_title(title), width=420, height=240)


def rank_count_bars(df: pd.DataFrame, *, title: str = "") -> alt.Chart:
    """The paper's Fig. 10: for each norm rank, one bar per score rank (counts summed over layers).

    ``df`` columns: norm_rank, score_rank, count. Beyond 12 experts the bars would be too thin to
    read, so the same counts are drawn as a norm rank x score rank heat map.
    """
    n = int(df["norm_rank"].max())
    if n > 12:
        size = _square(n, 16)
        return (
            alt.Chart(df)
            .mark_rect()
            .encode(
                x=alt.X("norm_rank:O", title="rank of the expert's output norm (E = largest)"),
                y=alt.Y("score_rank:O", title="gate-score rank", sort="descending"),
                color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), title="count"),
                tooltip=["norm_rank:O", "score_rank:O", "count:Q"],
            )
            .properties(title=wrap_title(title), width=size, height=size)
        )
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("norm_rank:O", title="rank of the expert's output norm (E = largest)"),
            xOffset=alt.XOffset("score_rank:O"),
            y=alt.Y("count:Q", title="count (tokens x layers)"),
            color=alt.Color("score_rank:O", title="gate-score rank", scale=alt.Scale(scheme="viridis")),
            tooltip=["norm_rank:O", "score_rank:O", "count:Q"],
        )
        .properties(title=wrap_title(title), width=min(560, max(360, 48 * n)), height=260)
    )


def rank_count_heatmap_by_layer(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """Per-layer rank-count matrices with a layer slider. ``df``: layer, norm_rank, score_rank, count."""
    slider = layer_slider(df)
    n = int(df["norm_rank"].max())
    size = _square(n, 24)
    src = columnar(df, ["layer", "norm_rank", "score_rank", "count"])
    pred = _layer_filter(slider)
    chart = (
        flat(src)
        .transform_filter(pred)
        .mark_rect()
        .encode(
            x=alt.X("norm_rank:O", title="norm rank"),
            y=alt.Y("score_rank:O", title="score rank", sort="descending"),
            color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), title="count"),
            tooltip=["layer:O", "norm_rank:O", "score_rank:O", "count:Q"],
        )
        .properties(width=size, height=size)
    )
    label = _layer_caption(src, pred)
    return alt.vconcat(label.add_params(slider), chart, title=wrap_title(title))


def token_expert_bars(
    df: pd.DataFrame, *, value_fields: Sequence[str] = ("norm", "score"), title: str = ""
) -> alt.VConcatChart:
    """The paper's Fig. 4: per expert, output norm and gate score for one token, one layer.

    ``df`` columns: layer, token_index, token, expert, chosen and the value fields. Sliders pick
    the layer and the token.
    """
    slider = layer_slider(df)
    n_tok = int(df["token_index"].max()) + 1
    tok = token_slider(n_tok)
    src = columnar(df, ["layer", "token_index", "token", "expert", "chosen", *value_fields])
    pred = _layer_filter(slider)
    tok_pred = alt.datum.token_index == tok
    width = 300 if len(value_fields) <= 2 else 200
    panels = [
        flat(src)
        .transform_filter(pred)
        .transform_filter(tok_pred)
        .mark_bar()
        .encode(
            x=alt.X("expert:O", title="expert"),
            y=alt.Y(f"{field}:Q", title=field),
            color=alt.condition(alt.datum.chosen, alt.value("#d62728"), alt.value("#7f7f7f")),
            tooltip=["layer:O", "token:N", "expert:O", alt.Tooltip(f"{field}:Q", format=".4f"), "chosen:N"],
        )
        .properties(width=width, height=180)
        for field in value_fields
    ]
    label = _caption(
        src,
        [pred, tok_pred],
        "'layer ' + datum.layer + ', token ' + datum.token",
        layer="min(layer)",
        token="min(token)",
    )
    return alt.vconcat(label.add_params(slider, tok), alt.hconcat(*panels), title=wrap_title(title))


def token_similarity_heatmaps(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """Per-token expert-output similarity maps (the paper's Fig. 2) with layer and token sliders.

    ``df`` columns: layer, token_index, token, expert_i, expert_j, similarity (and chosen_text,
    the experts the router chose). The map's data holds numbers only; the token and the chosen
    experts come from a small table of one row per layer and token, for the caption.
    """
    data = df.copy()
    data["expert_i"] = data["expert_i"].astype(str)
    data["expert_j"] = data["expert_j"].astype(str)
    labels = list(dict.fromkeys(data["expert_i"]))
    slider = layer_slider(data)
    n_tok = int(data["token_index"].max()) + 1
    tok = token_slider(n_tok)
    size = _square(len(labels), 22)
    _, base = matrix_source(data, ["layer", "token_index"], "expert_i", "expert_j", "similarity", labels)
    per_token = data.drop_duplicates(["layer", "token_index"])
    info_cols = ["layer", "token_index", "token"] + (["chosen_text"] if "chosen_text" in data else [])
    info = columnar(per_token, info_cols)
    pred = _layer_filter(slider)
    tok_pred = alt.datum.token_index == tok
    chart = (
        base.transform_filter(pred)
        .transform_filter(tok_pred)
        .mark_rect()
        .encode(
            x=alt.X("expert_j:N", sort=labels, title="expert"),
            y=alt.Y("expert_i:N", sort=labels, title="expert"),
            color=alt.Color(
                "similarity:Q", scale=alt.Scale(scheme="viridis", domain=list(COSINE_DOMAIN)), title="cosine"
            ),
            tooltip=["layer:O", "token_index:O", "expert_i:N", "expert_j:N", alt.Tooltip("similarity:Q", format=".3f")],
        )
        .properties(width=size, height=size)
    )
    chosen = " + '  (chosen: ' + datum.chosen + ')'" if "chosen_text" in data else ""
    fields = {"layer": "min(layer)", "token": "min(token)"}
    if "chosen_text" in data:
        fields["chosen"] = "min(chosen_text)"
    label = _caption(info, [pred, tok_pred], "'layer ' + datum.layer + ', token ' + datum.token" + chosen, **fields)
    return alt.vconcat(label.add_params(slider, tok), chart, title=wrap_title(title))


def scatter_by_layer(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    color: str | None = None,
    title: str = "",
    x_title: str | None = None,
    y_title: str | None = None,
    facet_field: str | None = None,
    with_fit: bool = True,
) -> alt.VConcatChart:
    """Scatter of ``y`` against ``x`` for one layer at a time (slider), with a least-squares line;
    with ``facet_field``, a dropdown picks which of its values is shown."""
    slider = layer_slider(df)
    preds = [_layer_filter(slider)]
    params = [slider]
    cols = ["layer", x, y] + ([color] if color else []) + ([facet_field] if facet_field else [])
    src = columnar(df, cols)
    if facet_field:
        pick = choice(list(dict.fromkeys(df[facet_field].astype(str))), f"{facet_field}_choice", facet_field)
        preds.append(alt.datum[facet_field] == pick)
        params.append(pick)
    base = flat(src)
    for p in preds:
        base = base.transform_filter(p)
    pts = base.mark_circle(size=40, opacity=0.7).encode(
        x=alt.X(f"{x}:Q", title=x_title or humanize(x), scale=alt.Scale(zero=False)),
        y=alt.Y(f"{y}:Q", title=y_title or humanize(y), scale=alt.Scale(zero=False)),
        color=alt.Color(f"{color}:N") if color else alt.value("#1f77b4"),
        tooltip=_tooltip_fields(df, cols),
    )
    body = (
        alt.layer(pts, pts.transform_regression(x, y).mark_line(color="#e45756").encode(color=alt.Undefined))
        if with_fit
        else pts
    )
    body = body.properties(width=360, height=280)
    label = _selection_caption(src, preds, facet_field)
    return alt.vconcat(label.add_params(*params), body, title=wrap_title(title))


def routing_pattern(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """Chosen experts per token with their gate weights (the paper's Fig. 14), per layer (slider).

    ``df`` columns: layer, token_index, token, expert, weight (one row per chosen expert).
    """
    slider = layer_slider(df)
    pred = _layer_filter(slider)
    n_tok = int(df["token_index"].max()) + 1
    src = columnar(df, ["layer", "token_index", "token", "expert", "weight"])
    chart = (
        flat(src)
        .transform_filter(pred)
        .mark_rect()
        .encode(
            x=alt.X(
                "token_index:O", title="token position", axis=alt.Axis(labelAngle=0, values=list(range(0, n_tok, 8)))
            ),
            y=alt.Y("expert:O", title="expert"),
            color=alt.Color("weight:Q", scale=alt.Scale(scheme="oranges", domain=[0, 1]), title="gate weight"),
            tooltip=["layer:O", "token_index:O", "token:N", "expert:O", alt.Tooltip("weight:Q", format=".3f")],
        )
        .properties(
            width=min(560, max(360, 9 * n_tok)), height=max(180, min(MAX_PLOT, 10 * int(df["expert"].nunique())))
        )
    )
    label = _layer_caption(src, pred)
    return alt.vconcat(label.add_params(slider), chart, title=wrap_title(title))


def pca_scatter(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """2-D PCA projections, one layer (slider) and one matrix (dropdown) at a time.

    Columns: layer, matrix, label, pc1, pc2, kind.
    """
    slider = layer_slider(df)
    pick = choice(list(dict.fromkeys(df["matrix"].astype(str))), "matrix_choice", "matrix")
    preds = [_layer_filter(slider), alt.datum.matrix == pick]
    src = columnar(df, ["layer", "matrix", "label", "pc1", "pc2", "kind"])
    base = flat(src)
    for p in preds:
        base = base.transform_filter(p)
    pts = base.mark_point(filled=True, size=60).encode(
        x=alt.X("pc1:Q", title="PC 1"),
        y=alt.Y("pc2:Q", title="PC 2"),
        shape=alt.Shape("kind:N", title="", legend=None),
        color=alt.Color("kind:N", title=""),
        tooltip=[
            "layer:O",
            "matrix:N",
            "label:N",
            alt.Tooltip("pc1:Q", format=".2f"),
            alt.Tooltip("pc2:Q", format=".2f"),
        ],
    )
    text = pts.mark_text(dx=8, dy=-6).encode(text="label:N")
    body = alt.layer(pts, text).properties(width=360, height=280)
    label = _caption(
        src, preds, "'layer ' + datum.layer + ', ' + datum.matrix", layer="min(layer)", matrix="min(matrix)"
    )
    return alt.vconcat(label.add_params(slider, pick), body, title=wrap_title(title))


def intermediate_heatmap(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """act(W_act x) per expert (rows, plus "F") and neuron (columns) for one token at a time
    (the paper's Fig. 12). ``df`` columns: token_index, token, expert, neuron, value."""
    n_tok = int(df["token_index"].max()) + 1
    tok = token_slider(n_tok)
    pred = alt.datum.token_index == tok
    data = df.assign(expert=df["expert"].astype(str))
    experts = list(dict.fromkeys(data["expert"]))
    lim = float(df["value"].abs().quantile(0.99)) or 1.0
    src = columnar(data, ["token_index", "token", "expert", "neuron", "value"])
    chart = (
        flat(src)
        .transform_filter(pred)
        .mark_rect()
        .encode(
            x=alt.X("neuron:O", title="neuron", axis=alt.Axis(values=list(range(0, int(df["neuron"].max()) + 1, 16)))),
            y=alt.Y("expert:N", sort=experts, title="expert"),
            color=alt.Color(
                "value:Q", scale=alt.Scale(scheme="redblue", domain=[-lim, lim], reverse=True), title="act(W_act x)"
            ),
            tooltip=["token:N", "expert:N", "neuron:O", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(width=512, height=max(120, min(MAX_PLOT, 16 * len(experts))))
    )
    label = _caption(src, [pred], "'token ' + datum.token", token="min(token)")
    return alt.vconcat(label.add_params(tok), chart, title=wrap_title(title))


def expert_load_heatmap(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """Expert load (layers x experts) of one model at a time, picked from a dropdown, on one
    colour scale for every model. ``df``: model, layer, expert, share, uniform (and selections)."""
    data = df.assign(load_vs_uniform=df["share"] / df["uniform"])
    models = list(dict.fromkeys(data["model"].astype(str)))
    pick = choice(models, "model_choice", "model")
    pred = alt.datum.model == pick
    hi = float(data["load_vs_uniform"].max())
    src = columnar(data, ["model", "layer", "expert", "share", "load_vs_uniform"])
    n_exp = int(data["expert"].nunique())
    chart = (
        flat(src)
        .transform_filter(pred)
        .mark_rect()
        .encode(
            x=alt.X("expert:O", title="expert"),
            y=alt.Y("layer:O", sort="descending", title="layer"),
            color=alt.Color(
                "load_vs_uniform:Q",
                title="share / uniform",
                scale=alt.Scale(scheme="viridis", domain=[0, max(2.0, hi)], domainMid=1),
            ),
            tooltip=[
                "model:N",
                "layer:O",
                "expert:O",
                alt.Tooltip("share:Q", format=".3f"),
                alt.Tooltip("load_vs_uniform:Q", format=".2f", title="share / uniform"),
            ],
        )
        .properties(width=min(MAX_PLOT, max(200, 16 * n_exp)), height=200)
    )
    label = _caption(src, [pred], "datum.model", model="min(model)")
    return alt.vconcat(label.add_params(pick), chart, title=wrap_title(title))


def grid_heatmap(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    value: str,
    title: str = "",
    value_title: str | None = None,
    domain: tuple[float, float] | None = None,
    scheme: ColorScheme_T = "viridis",
    cell: int = 22,
) -> alt.Chart:
    """A plain heat map of ``value`` over two categorical axes (e.g. layer x expert), no slider."""
    xs = list(dict.fromkeys(df[x].astype(str)))
    ys = list(dict.fromkeys(df[y].astype(str)))
    data = df.assign(**{x: df[x].astype(str), y: df[y].astype(str)})
    scale = alt.Scale(scheme=scheme, domain=list(domain)) if domain else alt.Scale(scheme=scheme)
    return (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X(f"{x}:N", sort=xs, title=x),
            y=alt.Y(f"{y}:N", sort=ys, title=y),
            color=alt.Color(f"{value}:Q", scale=scale, title=value_title or value),
            tooltip=[f"{x}:N", f"{y}:N", alt.Tooltip(f"{value}:Q", format=".4f")],
        )
        .properties(
            title=wrap_title(title),
            width=min(MAX_PLOT, max(160, cell * len(xs))),
            height=min(MAX_PLOT, max(100, cell * len(ys))),
        )
    )


def interval_points(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    low: str,
    high: str,
    color: str | None = None,
    x_title: str | None = None,
    title: str = "",
    zero_rule: bool = True,
) -> alt.LayerChart:
    """A point per row at ``x`` with its interval [``low``, ``high``], one row of the y axis per
    ``y`` category, offset by ``color`` (e.g. one line per model); a rule marks x = 0."""
    enc_color = alt.Color(f"{color}:N", title=humanize(color)) if color else alt.value("#1f77b4")
    offset = alt.YOffset(f"{color}:N") if color else alt.Undefined
    base = alt.Chart(df).encode(y=alt.Y(f"{y}:N", title=None), color=enc_color, yOffset=offset)
    tooltip = (
        [f"{y}:N"] + ([f"{color}:N"] if color else []) + [alt.Tooltip(f"{c}:Q", format=".4f") for c in (x, low, high)]
    )
    layers = [
        base.mark_rule().encode(
            x=alt.X(f"{low}:Q", title=x_title or humanize(x), scale=alt.Scale(zero=False)), x2=f"{high}:Q"
        ),
        base.mark_point(filled=True, size=60).encode(x=f"{x}:Q", tooltip=tooltip),
    ]
    if zero_rule and (df[low].min() < 0 < df[high].max() or df[x].min() <= 0):
        layers.append(
            alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(strokeDash=[4, 4], color="gray").encode(x="zero:Q")
        )
    return alt.layer(*layers).properties(title=wrap_title(title), width=420, height=alt.Step(22))


def interval_lines(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    low: str,
    high: str,
    color: str | None = None,
    mark: str | None = None,
    x_title: str | None = None,
    y_title: str | None = None,
    title: str = "",
) -> alt.LayerChart:
    """Lines of ``y`` against a quantitative ``x`` with an interval band per ``color`` group;
    rows where the boolean column ``mark`` is true get a larger ringed point."""
    enc_color = alt.Color(f"{color}:N", title=humanize(color)) if color else alt.value("#1f77b4")
    base = alt.Chart(df).encode(
        x=alt.X(f"{x}:Q", title=x_title or humanize(x), axis=alt.Axis(tickMinStep=1)), color=enc_color
    )
    tooltip = [f"{x}:Q", alt.Tooltip(f"{y}:Q", format=".4f")] + ([f"{color}:N"] if color else [])
    layers = [
        base.mark_area(opacity=0.2).encode(y=f"{low}:Q", y2=f"{high}:Q"),
        base.mark_line(point=True).encode(
            y=alt.Y(f"{y}:Q", title=y_title or humanize(y), scale=alt.Scale(zero=False)), tooltip=tooltip
        ),
    ]
    if mark:
        layers.append(
            alt.Chart(df[df[mark]])
            .mark_point(size=160, shape="circle", filled=False, strokeWidth=2)
            .encode(x=f"{x}:Q", y=f"{y}:Q", color=enc_color, tooltip=tooltip)
        )
    return alt.layer(*layers).properties(title=wrap_title(title), width=420, height=260)


def replicate_effects(effects: dict[str, pd.DataFrame]) -> alt.VConcatChart:
    """One interval-point chart per claim: each replicate's effect (observed minus its null) with
    its interval; the dashed rule is the null (0) and the dotted one the claim's floor (``effects``
    as from :func:`moe_utils.zoo.replication.replicate_effects`)."""
    charts = []
    for claim, g in effects.items():
        floor = float(g["floor"].iloc[0]) * (-1 if str(claim) == "obs3_slope" else 1)
        pts = interval_points(
            g,
            x="effect",
            y="replicate",
            low="ci_low",
            high="ci_high",
            color="organism",
            zero_rule=True,
            x_title="effect (observed minus null)",
            title=f"{g['title'].iloc[0]} (floor {abs(floor):.3g})",
        )
        rule = (
            alt.Chart(pd.DataFrame({"floor": [floor]})).mark_rule(strokeDash=[1, 3], color="gray").encode(x="floor:Q")
        )
        charts.append(alt.layer(pts, rule))
    return alt.vconcat(*charts)


def ladder_lines(table: pd.DataFrame, *, x: str, x_title: str, title: str) -> alt.VConcatChart:
    """Per claim: the effect against ``x`` (layers or training steps) with its interval, one colour
    per series; the dashed rule is the null (0), the dotted one the floor."""
    charts = []
    for claim, g in table.groupby("claim", sort=False):
        floor = float(g["floor"].iloc[0]) * (-1 if claim == "obs3_slope" else 1)
        lines = interval_lines(
            g,
            x=x,
            y="effect",
            low="ci_low",
            high="ci_high",
            color="series",
            x_title=x_title,
            y_title="effect",
            title=f"{title}: {g['title'].iloc[0]}",
        )
        rules = (
            alt.Chart(pd.DataFrame({"y": [0.0, floor], "rule": ["null", "floor"]}))
            .mark_rule(strokeDash=[4, 4], color="gray")
            .encode(y="y:Q", tooltip=["rule:N", alt.Tooltip("y:Q", format=".3f")])
        )
        charts.append(alt.layer(lines, rules))
    return alt.vconcat(*charts)


def emergence_lines(
    em: pd.DataFrame, marks: dict[str, float] | None = None, mark_label: str = "paper"
) -> alt.VConcatChart:
    """Per quantity, its value against training tokens seen, one line per ``series``; the rows
    flagged ``final`` get a ringed point and ``marks`` a dashed reference rule. Two charts a row."""
    marks = marks or {}
    rows = []
    for q in em.quantity.unique():
        sub = em[em.quantity == q]
        layers = [
            alt.Chart(sub.drop(columns="final"))
            .mark_line(point=True)
            .encode(
                x=alt.X("tokens_seen:Q", title="training tokens seen"),
                y=alt.Y("value:Q", title=humanize(q), scale=alt.Scale(zero=False)),
                color=alt.Color("series:N", legend=alt.Legend(orient="bottom", direction="vertical")),
                tooltip=["series", "step", "tokens_seen", alt.Tooltip("value:Q", format=".4f")],
            )
        ]
        fin = sub.loc[sub.final].drop(columns="final")
        layers.append(
            alt.Chart(fin)
            .mark_point(size=150, filled=False, strokeWidth=2)
            .encode(
                x="tokens_seen:Q",
                y="value:Q",
                color="series:N",
                tooltip=["series", alt.Tooltip("value:Q", format=".4f")],
            )
        )
        if q in marks:
            layers.append(
                alt.Chart(pd.DataFrame({"value": [marks[q]], "label": [mark_label]}))
                .mark_rule(strokeDash=[4, 4], color="gray")
                .encode(y="value:Q", tooltip=["label:N", "value:Q"])
            )
        rows.append(alt.layer(*layers).properties(title=wrap_title(humanize(q), 40), width=280, height=180))
    return alt.vconcat(*[alt.hconcat(*rows[i : i + 2]) for i in range(0, len(rows), 2)])
