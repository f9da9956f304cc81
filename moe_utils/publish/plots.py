"""Altair charts of the observation and organisms pages, most of them per layer.

Every builder takes a tidy pandas DataFrame (one row per plotted value) and returns an Altair
chart; per-layer charts carry the layer slider of :mod:`moe_utils.publish.chart_parts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import altair as alt
import pandas as pd

from .chart_parts import (
    COSINE_DOMAIN,
    MAX_PLOT,
    caption,
    choice,
    columnar,
    default_domain,
    flat,
    layer_caption,
    layer_filter,
    layer_slider,
    matrix_source,
    selection_caption,
    square_size,
    token_slider,
    tooltip_fields,
    wrap_title,
)
from .render import humanize

if TYPE_CHECKING:
    from altair.vegalite.v6.schema._typing import ColorScheme_T


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
    size = square_size(len(labels), cell)
    lo, hi = domain or default_domain(value_title)
    groups = ["layer"] + ([facet_field] if facet_field else [])
    src, base = matrix_source(data, groups, row_field, col_field, value_field, labels)
    preds = [layer_filter(slider)]
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
    label = selection_caption(src, preds, facet_field)
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
        size = square_size(n, 16)
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
    size = square_size(n, 24)
    src = columnar(df, ["layer", "norm_rank", "score_rank", "count"])
    pred = layer_filter(slider)
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
    label = layer_caption(src, pred)
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
    pred = layer_filter(slider)
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
    label = caption(
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
    size = square_size(len(labels), 22)
    _, base = matrix_source(data, ["layer", "token_index"], "expert_i", "expert_j", "similarity", labels)
    per_token = data.drop_duplicates(["layer", "token_index"])
    info_cols = ["layer", "token_index", "token"] + (["chosen_text"] if "chosen_text" in data else [])
    info = columnar(per_token, info_cols)
    pred = layer_filter(slider)
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
    label = caption(info, [pred, tok_pred], "'layer ' + datum.layer + ', token ' + datum.token" + chosen, **fields)
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
    preds = [layer_filter(slider)]
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
        tooltip=tooltip_fields(df, cols),
    )
    body = (
        alt.layer(pts, pts.transform_regression(x, y).mark_line(color="#e45756").encode(color=alt.Undefined))
        if with_fit
        else pts
    )
    body = body.properties(width=360, height=280)
    label = selection_caption(src, preds, facet_field)
    return alt.vconcat(label.add_params(*params), body, title=wrap_title(title))


def routing_pattern(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """Chosen experts per token with their gate weights (the paper's Fig. 14), per layer (slider).

    ``df`` columns: layer, token_index, token, expert, weight (one row per chosen expert).
    """
    slider = layer_slider(df)
    pred = layer_filter(slider)
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
    label = layer_caption(src, pred)
    return alt.vconcat(label.add_params(slider), chart, title=wrap_title(title))


def pca_scatter(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """2-D PCA projections, one layer (slider) and one matrix (dropdown) at a time.

    Columns: layer, matrix, label, pc1, pc2, kind.
    """
    slider = layer_slider(df)
    pick = choice(list(dict.fromkeys(df["matrix"].astype(str))), "matrix_choice", "matrix")
    preds = [layer_filter(slider), alt.datum.matrix == pick]
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
    label = caption(
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
    label = caption(src, [pred], "'token ' + datum.token", token="min(token)")
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
    label = caption(src, [pred], "datum.model", model="min(model)")
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
