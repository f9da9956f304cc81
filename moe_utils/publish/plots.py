"""Altair chart builders for the book's figures.

Every builder takes a tidy pandas DataFrame (one row per plotted value) and returns an Altair
chart. Per-layer figures carry a layer slider made of an ``alt.param`` bound to a range input,
so they stay interactive in the static site without a kernel. The slider moves over the
*position* of a layer in the list of analysed layers, which keeps it usable when only some
layers are analysed (for example DeepSeekMoE's MoE layers 1-27, or ``layers=[0, 5, 10]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import altair as alt
import pandas as pd

if TYPE_CHECKING:
    from altair.vegalite.v6.schema._typing import ColorScheme_T

LAYER_POS = "layer_pos"

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


def layer_slider(
    df: pd.DataFrame, name: str = "layer_slider", start: int | None = None, label: str = "layer position "
) -> alt.Parameter:
    """A range-slider parameter over the layer positions present in ``df``."""
    n = int(df[LAYER_POS].max()) + 1
    value = n - 1 if start is None else max(0, min(n - 1, start))
    return alt.param(name=name, value=value, bind=alt.binding_range(min=0, max=max(n - 1, 0), step=1, name=label))


def _caption(data: pd.DataFrame, predicates: Sequence[alt.Predicate], text: str, **fields: str) -> alt.Chart:
    """A one-line bold caption naming the current slider selection (e.g. "layer 7").

    ``fields`` are aggregates of the filtered rows (``layer="min(layer)"``) that ``text``, a Vega
    expression, refers to as ``datum.<name>``.
    """
    chart = alt.Chart(data)
    for p in predicates:
        chart = chart.transform_filter(p)
    return (
        chart.transform_aggregate(alt.Undefined, alt.Undefined, **fields)
        .transform_calculate(text=text)
        .mark_text(align="left", fontSize=13, fontWeight="bold")
        .encode(text="text:N")
        .properties(height=16)
    )


def _layer_caption(data: pd.DataFrame, *predicates: alt.Predicate) -> alt.Chart:
    return _caption(data, predicates, "'layer ' + datum.layer", layer="min(layer)")


def _typed_fields(df: pd.DataFrame) -> list[str]:
    """Tooltip shorthands with explicit types, needed when the data sits on a facet's parent."""
    return [f"{c}:{'Q' if pd.api.types.is_numeric_dtype(df[c]) else 'N'}" for c in df.columns if c != LAYER_POS]


def token_slider(n_tokens: int) -> alt.Parameter:
    """A range-slider parameter over token indices 0..n_tokens-1."""
    return alt.param(
        name="token_slider", value=0, bind=alt.binding_range(min=0, max=max(n_tokens - 1, 0), step=1, name="token ")
    )


def _layer_filter(param: alt.Parameter) -> alt.Predicate:
    return alt.datum[LAYER_POS] == param


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
    """Expert-by-expert heat maps (one panel per ``facet_field`` value) with a layer slider.

    ``df`` needs columns layer, row_field, col_field, value_field and facet_field. Labels are
    strings (for example "0".."7" and "F"); their order follows first appearance in ``df``.
    """
    data = with_layer_position(df)
    labels = list(dict.fromkeys(list(data[row_field].astype(str)) + list(data[col_field].astype(str))))
    data[row_field] = data[row_field].astype(str)
    data[col_field] = data[col_field].astype(str)
    slider = layer_slider(data, start=start_layer_pos)
    size = max(120, cell * len(labels))
    scale = alt.Scale(scheme=scheme, domain=list(domain)) if domain else alt.Scale(scheme=scheme)
    base = (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X(f"{col_field}:N", sort=labels, title="expert"),
            y=alt.Y(f"{row_field}:N", sort=labels, title="expert"),
            color=alt.Color(f"{value_field}:Q", scale=scale, title=value_title),
            tooltip=["layer:O", f"{row_field}:N", f"{col_field}:N", alt.Tooltip(f"{value_field}:Q", format=".3f")],
        )
        .properties(width=size, height=size)
    )
    base = base.transform_filter(_layer_filter(slider))
    if facet_field:
        order = list(facet_order) if facet_order else list(dict.fromkeys(data[facet_field]))
        chart = base.facet(column=alt.Column(f"{facet_field}:N", sort=order, title=None))
    else:
        chart = base
    layer_label = _layer_caption(data, _layer_filter(slider))
    return _filtered_vconcat(layer_label, chart, slider, title)


def _filtered_vconcat(
    label: alt.Chart, chart: alt.Chart | alt.FacetChart, slider: alt.Parameter, title: str
) -> alt.VConcatChart:
    """Stack a layer label (which carries the slider parameter) over an already filtered chart."""
    return alt.vconcat(label.add_params(slider), chart, title=title)


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
    enc_color = alt.Color(f"{color}:N", title=color) if color else alt.value("#1f77b4")
    base = alt.Chart(df).encode(x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)), color=enc_color)
    tooltip = ["layer:Q", alt.Tooltip(f"{y}:Q", format=".3f")] + ([f"{color}:N"] if color else [])
    layers: list[alt.Chart] = []
    if band:
        layers.append(base.mark_area(opacity=0.2).encode(y=f"{band[0]}:Q", y2=f"{band[1]}:Q"))
    layers.append(base.mark_line(point=True).encode(y=alt.Y(f"{y}:Q", title=y_title or y), tooltip=tooltip))
    if reference is not None and len(reference):
        layers.append(
            alt.Chart(reference)
            .mark_rule(strokeDash=[4, 4], color="gray")
            .encode(y=f"{y}:Q", tooltip=["label:N", alt.Tooltip(f"{y}:Q", format=".3f")])
        )
    return alt.layer(*layers).properties(title=title, width=420, height=240)


def rank_count_bars(df: pd.DataFrame, *, title: str = "") -> alt.Chart:
    """The paper's Fig. 10: for each norm rank, one bar per score rank (counts summed over layers).

    ``df`` columns: norm_rank, score_rank, count.
    """
    n = int(df["norm_rank"].max())
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
        .properties(title=title, width=max(360, 48 * n), height=260)
    )


def rank_count_heatmap_by_layer(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """Per-layer rank-count matrices with a layer slider. ``df``: layer, norm_rank, score_rank, count."""
    data = with_layer_position(df)
    slider = layer_slider(data)
    n = int(data["norm_rank"].max())
    size = max(160, 24 * n)
    chart = (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X("norm_rank:O", title="norm rank"),
            y=alt.Y("score_rank:O", title="score rank", sort="descending"),
            color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), title="count"),
            tooltip=["layer:O", "norm_rank:O", "score_rank:O", "count:Q"],
        )
        .transform_filter(_layer_filter(slider))
        .properties(width=size, height=size)
    )
    label = _layer_caption(data, _layer_filter(slider))
    return _filtered_vconcat(label, chart, slider, title)


def token_expert_bars(
    df: pd.DataFrame, *, value_fields: Sequence[str] = ("norm", "score"), title: str = ""
) -> alt.VConcatChart:
    """The paper's Fig. 4: per expert, output norm and gate score for one token, one layer.

    ``df`` columns: layer, token_index, token, expert, chosen and the value fields. Sliders pick
    the layer and the token.
    """
    data = with_layer_position(df)
    slider = layer_slider(data)
    n_tok = int(data["token_index"].max()) + 1
    tok = token_slider(n_tok)
    panels = []
    for field in value_fields:
        panels.append(
            alt.Chart(data)
            .mark_bar()
            .encode(
                x=alt.X("expert:O", title="expert"),
                y=alt.Y(f"{field}:Q", title=field),
                color=alt.condition(alt.datum.chosen, alt.value("#d62728"), alt.value("#7f7f7f")),
                tooltip=["layer:O", "token:N", "expert:O", alt.Tooltip(f"{field}:Q", format=".4f"), "chosen:N"],
            )
            .properties(width=260, height=180)
        )
    pred = alt.datum[LAYER_POS] == slider
    tok_pred = alt.datum.token_index == tok
    label = _caption(
        data,
        [pred, tok_pred],
        "'layer ' + datum.layer + ', token ' + datum.token",
        layer="min(layer)",
        token="min(token)",
    )
    row = alt.hconcat(*[p.transform_filter(pred).transform_filter(tok_pred) for p in panels])
    return alt.vconcat(label.add_params(slider, tok), row, title=title)


def token_similarity_heatmaps(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """Per-token expert-output similarity maps (the paper's Fig. 2) with layer and token sliders.

    ``df`` columns: layer, token_index, token, expert_i, expert_j, similarity.
    """
    data = with_layer_position(df)
    data["expert_i"] = data["expert_i"].astype(str)
    data["expert_j"] = data["expert_j"].astype(str)
    labels = list(dict.fromkeys(data["expert_i"]))
    slider = layer_slider(data)
    n_tok = int(data["token_index"].max()) + 1
    tok = token_slider(n_tok)
    size = max(140, 22 * len(labels))
    chart = (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X("expert_j:N", sort=labels, title="expert"),
            y=alt.Y("expert_i:N", sort=labels, title="expert"),
            color=alt.Color("similarity:Q", scale=alt.Scale(scheme="viridis", domain=[-1, 1]), title="cosine"),
            tooltip=["layer:O", "token:N", "expert_i:N", "expert_j:N", alt.Tooltip("similarity:Q", format=".3f")],
        )
        .properties(width=size, height=size)
    )
    pred = alt.datum[LAYER_POS] == slider
    tok_pred = alt.datum.token_index == tok
    label = _caption(
        data,
        [pred, tok_pred],
        "'layer ' + datum.layer + ', token ' + datum.token + '  (chosen: ' + datum.chosen + ')'",
        layer="min(layer)",
        token="min(token)",
        chosen="min(chosen_text)",
    )
    return alt.vconcat(
        label.add_params(slider, tok), chart.transform_filter(pred).transform_filter(tok_pred), title=title
    )


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
    """Scatter of ``y`` against ``x`` for one layer at a time (slider), with a least-squares line."""
    data = with_layer_position(df)
    slider = layer_slider(data)
    pred = alt.datum[LAYER_POS] == slider
    base = (alt.Chart() if facet_field else alt.Chart(data)).transform_filter(pred)
    pts = base.mark_circle(size=40, opacity=0.7).encode(
        x=alt.X(f"{x}:Q", title=x_title or x, scale=alt.Scale(zero=False)),
        y=alt.Y(f"{y}:Q", title=y_title or y, scale=alt.Scale(zero=False)),
        color=alt.Color(f"{color}:N") if color else alt.value("#1f77b4"),
        tooltip=_typed_fields(data),
    )
    layered = (
        alt.layer(
            pts, pts.transform_regression(x, y, groupby=[facet_field] if facet_field else []).mark_line(color="black")
        )
        if with_fit
        else pts
    )
    layered = layered.properties(width=240, height=220)
    body = layered.facet(column=alt.Column(f"{facet_field}:N", title=None), data=data) if facet_field else layered
    label = _layer_caption(data, pred)
    return alt.vconcat(label.add_params(slider), body, title=title)


def routing_pattern(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """Chosen experts per token with their gate weights (the paper's Fig. 14), per layer (slider).

    ``df`` columns: layer, token_index, token, expert, weight (one row per chosen expert).
    """
    data = with_layer_position(df)
    slider = layer_slider(data)
    pred = alt.datum[LAYER_POS] == slider
    n_tok = int(data["token_index"].max()) + 1
    chart = (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X(
                "token_index:O", title="token position", axis=alt.Axis(labelAngle=0, values=list(range(0, n_tok, 8)))
            ),
            y=alt.Y("expert:O", title="expert"),
            color=alt.Color("weight:Q", scale=alt.Scale(scheme="oranges", domain=[0, 1]), title="gate weight"),
            tooltip=["layer:O", "token_index:O", "token:N", "expert:O", alt.Tooltip("weight:Q", format=".3f")],
        )
        .transform_filter(pred)
        .properties(width=max(360, 9 * n_tok), height=180)
    )
    label = _layer_caption(data, pred)
    return alt.vconcat(label.add_params(slider), chart, title=title)


def pca_scatter(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """2-D PCA projections per layer and matrix (slider over layers). Columns: layer, matrix, label, pc1, pc2, kind."""
    data = with_layer_position(df)
    slider = layer_slider(data)
    pred = alt.datum[LAYER_POS] == slider
    pts = (
        alt.Chart()
        .transform_filter(pred)
        .mark_point(filled=True, size=60)
        .encode(
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
        .properties(width=220, height=200)
    )
    text = pts.mark_text(dx=8, dy=-6, fontSize=10).encode(text="label:N")
    body = (
        alt.layer(pts, text)
        .facet(column=alt.Column("matrix:N", title=None), data=data)
        .resolve_scale(x="independent", y="independent")
    )
    label = _layer_caption(data, pred)
    return alt.vconcat(label.add_params(slider), body, title=title)


def intermediate_heatmap(df: pd.DataFrame, *, title: str = "") -> alt.VConcatChart:
    """act(W_act x) per expert (rows, plus "F") and neuron (columns) for one token at a time
    (the paper's Fig. 12). ``df`` columns: token_index, token, expert, neuron, value."""
    n_tok = int(df["token_index"].max()) + 1
    tok = token_slider(n_tok)
    pred = alt.datum.token_index == tok
    experts = list(dict.fromkeys(df["expert"].astype(str)))
    lim = float(df["value"].abs().quantile(0.99)) or 1.0
    chart = (
        alt.Chart(df)
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
        .properties(width=560, height=max(120, 16 * len(experts)))
    )
    label = _caption(df, [pred], "'token ' + datum.token", token="min(token)")
    return alt.vconcat(label.add_params(tok), chart, title=title)


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
        .properties(title=title, width=max(160, cell * len(xs)), height=max(100, cell * len(ys)))
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
    enc_color = alt.Color(f"{color}:N", title=color) if color else alt.value("#1f77b4")
    offset = alt.YOffset(f"{color}:N") if color else alt.Undefined
    base = alt.Chart(df).encode(y=alt.Y(f"{y}:N", title=None), color=enc_color, yOffset=offset)
    tooltip = (
        [f"{y}:N"] + ([f"{color}:N"] if color else []) + [alt.Tooltip(f"{c}:Q", format=".4f") for c in (x, low, high)]
    )
    layers = [
        base.mark_rule().encode(x=alt.X(f"{low}:Q", title=x_title or x, scale=alt.Scale(zero=False)), x2=f"{high}:Q"),
        base.mark_point(filled=True, size=60).encode(x=f"{x}:Q", tooltip=tooltip),
    ]
    if zero_rule and (df[low].min() < 0 < df[high].max() or df[x].min() <= 0):
        layers.append(
            alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(strokeDash=[4, 4], color="gray").encode(x="zero:Q")
        )
    return alt.layer(*layers).properties(title=title, width=420, height=alt.Step(22))


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
    enc_color = alt.Color(f"{color}:N", title=color) if color else alt.value("#1f77b4")
    base = alt.Chart(df).encode(x=alt.X(f"{x}:Q", title=x_title or x, axis=alt.Axis(tickMinStep=1)), color=enc_color)
    tooltip = [f"{x}:Q", alt.Tooltip(f"{y}:Q", format=".4f")] + ([f"{color}:N"] if color else [])
    layers = [
        base.mark_area(opacity=0.2).encode(y=f"{low}:Q", y2=f"{high}:Q"),
        base.mark_line(point=True).encode(
            y=alt.Y(f"{y}:Q", title=y_title or y, scale=alt.Scale(zero=False)), tooltip=tooltip
        ),
    ]
    if mark:
        layers.append(
            alt.Chart(df[df[mark]])
            .mark_point(size=160, shape="circle", filled=False, strokeWidth=2)
            .encode(x=f"{x}:Q", y=f"{y}:Q", color=enc_color, tooltip=tooltip)
        )
    return alt.layer(*layers).properties(title=title, width=420, height=260)


def replicate_effects(effects: dict[int, pd.DataFrame]) -> alt.VConcatChart:
    """One interval-point chart per observation: each replicate's effect with its interval
    (``effects`` as from :func:`moe_utils.zoo.replication.replicate_effects`)."""
    charts = []
    for obs, g in effects.items():
        quantity = g.quantity.iloc[0]
        charts.append(
            interval_points(
                g,
                x="effect",
                y="replicate",
                low="ci_low",
                high="ci_high",
                color="organism",
                zero_rule=False,
                x_title=quantity,
                title=f"Observation {obs}: {quantity} per replicate (baseline {g.baseline.iloc[0]:.3g})",
            )
        )
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
                y=alt.Y("value:Q", title=q, scale=alt.Scale(zero=False)),
                color="series:N",
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
        rows.append(alt.layer(*layers).properties(title=q, width=300, height=180))
    return alt.vconcat(*[alt.hconcat(*rows[i : i + 2]) for i in range(0, len(rows), 2)])
