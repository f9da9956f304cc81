"""Altair charts of the token explorer page: interactive in the static site, without a kernel.

Each builder returns one Vega-Lite spec whose controls are parameters: a layer slider (a range
input over layer positions, as in :mod:`moe_utils.publish.chart_parts`) and click selections (a token
of the text, an expert of the load bars). The data embedded in the page are the compact tables
of :mod:`moe_utils.analysis.token_routing`; fields are renamed to short keys here, so that a page
with a few hundred tokens and 30 experts stays well under a megabyte of chart data.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd

from moe_utils.publish.chart_parts import COLUMN_WIDTH, MAX_PLOT, columnar, flat, layer_slider

CHAR_WIDTH = 7.25  # pixels per character of the 12 px monospace font of the text view
LINE_HEIGHT = 19  # pixels per line of the text view
FONT = "DejaVu Sans Mono, Menlo, Consolas, Liberation Mono, monospace"
TABLEAU20 = [
    "#4e79a7",
    "#a0cbe8",
    "#f28e2b",
    "#ffbe7d",
    "#59a14f",
    "#8cd17d",
    "#b6992d",
    "#f1ce63",
    "#499894",
    "#86bcb6",
    "#e15759",
    "#ff9d9a",
    "#79706e",
    "#bab0ac",
    "#d37295",
    "#fabfd2",
    "#b07aa1",
    "#d4a6c8",
    "#9d7660",
    "#d7b5a6",
]


def expert_palette(num_experts: int) -> list[str]:
    """One colour per expert: Tableau's 10 or 20 colours, else evenly spaced hues in two
    lightness steps."""
    if num_experts <= 10:
        return TABLEAU20[0::2][:num_experts]
    if num_experts <= 20:
        return TABLEAU20[:num_experts]
    out = []
    for e in range(num_experts):
        hue = (e * 0.618034) % 1.0
        r, g, b = colorsys.hls_to_rgb(hue, 0.45 if e % 2 == 0 else 0.68, 0.65)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def _expert_color(num_experts: int, field: str = "expert", title: str = "expert", legend: bool = True) -> alt.Color:
    """Colour by expert number, the same colour for an expert on every chart of the page."""
    return alt.Color(
        f"{field}:N",
        scale=alt.Scale(domain=[str(e) for e in range(num_experts)], range=expert_palette(num_experts)),
        title=title,
        legend=alt.Legend(columns=2 if num_experts > 12 else 1, symbolType="square") if legend else None,
    )


def _layer_param(layers: Sequence[int], start: int = 0) -> alt.Parameter:
    """The book's layer control (:func:`moe_utils.publish.chart_parts.layer_slider`), valued by the layer's
    own number; ``start`` is the position among ``layers`` shown first."""
    return layer_slider(pd.DataFrame({"layer": list(layers)}), start=start)


def _position_expr(layers: Sequence[int], layer: str = "layer_slider") -> str:
    """A Vega expression for the position of ``layer`` (an expression) among ``layers``."""
    return f"indexof([{', '.join(str(int(l)) for l in layers)}], {layer})"


def _layers_expr(layers: Sequence[int], index: str) -> str:
    """A Vega expression for the model layer at layer position ``index``."""
    return f"[{', '.join(str(int(l)) for l in layers)}][{index}]"


def _caption(text: str) -> alt.Chart:
    """A bold one-line caption whose text is a Vega expression (it may read the parameters)."""
    return (
        alt.Chart(alt.Data(values=[{}]))
        .transform_calculate(text=text)
        .mark_text(align="left", fontSize=13, fontWeight="bold", dx=2)
        .encode(text="text:N")
        .properties(height=16)
    )


# --------------------------------------------------------------------------- the coloured text


def token_explorer(
    tokens: pd.DataFrame,
    layers: Sequence[int],
    num_experts: int,
    top_k: int,
    *,
    title: str = "",
    width_chars: int = 84,
    start_layer_pos: int = 0,
) -> alt.VConcatChart:
    """The text coloured by each token's top-1 expert at the slider's layer; clicking a token shows
    its path across layers (chosen experts sized by gate score, and their output norms).

    ``tokens`` is :func:`moe_utils.analysis.token_routing.explorer_tokens`'s table.
    """
    has_norms = "pn" in tokens.columns
    cols = ["i", "line", "col", "cols", "text_col", "text", "position", "context", "top1", "g1", "pe", "pg"]
    data = pd.DataFrame(tokens[cols + (["pn"] if has_norms else [])]).rename(
        columns={
            "line": "ln",
            "col": "c",
            "cols": "w",
            "text_col": "tc",
            "text": "t",
            "position": "p",
            "context": "ctx",
        }
    )
    n_lines = int(data.ln.max()) + 1 if len(data) else 1
    slider = _layer_param(layers, start_layer_pos)
    first = int(data.i.iloc[0]) if len(data) else 0
    pick = alt.selection_point(name="token", fields=["i"], on="click", value=[{"i": first}], clear=False)
    here = _position_expr(layers)
    base = alt.Chart(data).transform_calculate(
        expert=f"'' + datum.top1[{here}]",
        gate=f"datum.g1[{here}]",
        layer="layer_slider",
        x0=f"datum.c * {CHAR_WIDTH}",
        x1=f"(datum.c + datum.w) * {CHAR_WIDTH} - 1",
        xt=f"datum.tc * {CHAR_WIDTH}",
        y0=f"datum.ln * {LINE_HEIGHT}",
        y1=f"(datum.ln + 1) * {LINE_HEIGHT} - 2",
        ym=f"(datum.ln + 0.5) * {LINE_HEIGHT}",
    )
    tooltip = [
        alt.Tooltip("t:N", title="token"),
        alt.Tooltip("p:Q", title="position"),
        alt.Tooltip("layer:Q", title="layer"),
        alt.Tooltip("expert:N", title="top-1 expert"),
        alt.Tooltip("gate:Q", title="its gate score", format=".3f"),
    ]
    boxes = base.mark_rect(opacity=0.75, cornerRadius=2, cursor="pointer").encode(
        x=alt.X("x0:Q", scale=None, axis=None),
        x2="x1:Q",
        y=alt.Y("y0:Q", scale=None, axis=None),
        y2="y1:Q",
        color=_expert_color(num_experts),
        stroke=alt.condition(pick, alt.value("black"), alt.value(None)),
        strokeWidth=alt.condition(pick, alt.value(2), alt.value(0)),
        tooltip=tooltip,
    )
    words = base.mark_text(
        align="left", baseline="middle", font=FONT, fontSize=12, color="black", cursor="pointer"
    ).encode(
        x=alt.X("xt:Q", scale=None, axis=None), y=alt.Y("ym:Q", scale=None, axis=None), text="t:N", tooltip=tooltip
    )
    text_view = (
        alt.layer(boxes.add_params(pick), words)
        .properties(width=width_chars * CHAR_WIDTH, height=n_lines * LINE_HEIGHT, view=alt.ViewBackground(stroke=None))
        .add_params(slider)
    )
    layer_caption = _caption("'Text coloured by the top-1 expert of layer ' + layer_slider + ' (click a token)'")

    k = int(top_k)
    flattened = ["pe", "pg", *(["pn"] if has_norms else [])]
    path = (
        alt.Chart(data)
        .transform_filter(pick)
        .transform_flatten(flattened, ["expert_n", "gate", "norm"][: len(flattened)])
        .transform_window(entry="row_number()")
        .transform_calculate(
            lp=f"floor((datum.entry - 1) / {k})",
            rank=f"(datum.entry - 1) % {k} + 1",
            expert="'' + datum.expert_n",
        )
        .transform_calculate(layer=_layers_expr(layers, "datum.lp"), current="datum.layer == layer_slider")
    )
    path_tooltip = [
        alt.Tooltip("layer:O", title="layer"),
        alt.Tooltip("rank:Q", title="rank"),
        alt.Tooltip("expert:N", title="expert"),
        alt.Tooltip("gate:Q", title="gate score", format=".3f"),
        *([alt.Tooltip("norm:Q", title="output norm", format=".3f")] if has_norms else []),
    ]
    width = int(min(COLUMN_WIDTH - 220, max(300, 26 * len(layers))))
    layer_axis = alt.X("layer:O", title="layer", sort=[int(l) for l in layers])
    chosen_panel = (
        path.mark_circle(stroke="black")
        .encode(
            x=layer_axis,
            y=alt.Y("expert:N", sort=[str(e) for e in range(num_experts)], title="chosen expert"),
            size=alt.Size("gate:Q", title="gate score", scale=alt.Scale(domain=[0, 1], range=[20, 600])),
            color=_expert_color(num_experts),
            strokeWidth=alt.condition("datum.current", alt.value(2), alt.value(0)),
            tooltip=path_tooltip,
        )
        .properties(
            width=width,
            height=int(max(160, min(14 * num_experts, 420))),
            title="chosen experts (size: gate score; outlined: the slider's layer)",
        )
    )
    panels: list[alt.Chart | alt.LayerChart] = [chosen_panel]
    if has_norms:
        norm_y = alt.Y("norm:Q", title="expert output norm")
        lines = path.transform_filter("datum.rank == 1").mark_line(color="#888").encode(x=layer_axis, y=norm_y)
        pts = path.mark_point(filled=True, size=60).encode(
            x=layer_axis,
            y=norm_y,
            color=_expert_color(num_experts),
            shape=alt.Shape("rank:O", title="rank"),
            tooltip=path_tooltip,
        )
        panels.append(
            alt.layer(lines, pts).properties(
                width=width, height=180, title="output norms of the chosen experts (line: the top-1 expert)"
            )
        )
    token_caption = (
        alt.Chart(data)
        .transform_filter(pick)
        .transform_calculate(text="'Path of the token ' + datum.ctx + ' (position ' + datum.p + ') across layers'")
        .mark_text(align="left", fontSize=13, fontWeight="bold", dx=2)
        .encode(text="text:N")
        .properties(height=16)
    )
    return alt.vconcat(layer_caption, text_view, token_caption, *panels, title=title).resolve_scale(color="shared")


# --------------------------------------------------------------------------- co-activation


def coactivation_maps(
    coact: pd.DataFrame,
    *,
    title: str = "",
    random_lift: float | None = None,
    cell: int = 22,
    start_layer_pos: int = 0,
) -> alt.VConcatChart:
    """Two expert-by-expert maps per layer (slider), one above the other: how many tokens chose
    experts i and j together, and the lift against independence (log colour scale, 1 =
    independent).

    ``coact`` is :func:`moe_utils.analysis.token_routing.coactivation_frame`'s table; the diagonal
    (an expert with itself) is left out.
    """
    layers = sorted(int(l) for l in coact.layer.unique())
    off = coact[coact.expert_i != coact.expert_j]
    table = pd.DataFrame(
        {
            "layer": off.layer.astype(int),
            "a": off.expert_i.astype(int),
            "b": off.expert_j.astype(int),
            "n": off["count"].astype(int),
            "x": off.expected.astype(float),
            "f": off.lift.astype(float),
        }
    )
    experts = [str(e) for e in sorted(set(coact.expert_i) | set(coact.expert_j))]
    slider = _layer_param(layers, start_layer_pos)
    size = int(min(MAX_PLOT, max(140, cell * len(experts))))
    base = (
        flat(columnar(table))
        .transform_filter(alt.datum.layer == slider)
        .transform_calculate(
            ea="'' + datum.a",
            eb="'' + datum.b",
            log2_lift="isValid(datum.f) ? clamp(log(max(datum.f, 1e-9)) / log(2), -3, 3) : null",
        )
        .encode(
            x=alt.X("eb:N", sort=experts, title="expert j"),
            y=alt.Y("ea:N", sort=experts, title="expert i"),
            tooltip=[
                alt.Tooltip("layer:Q", title="layer"),
                alt.Tooltip("ea:N", title="expert i"),
                alt.Tooltip("eb:N", title="expert j"),
                alt.Tooltip("n:Q", title="tokens choosing both"),
                alt.Tooltip("x:Q", title="expected if independent", format=".1f"),
                alt.Tooltip("f:Q", title="lift", format=".2f"),
            ],
        )
        .properties(width=size, height=size)
    )
    counts = base.mark_rect().encode(
        color=alt.Color("n:Q", scale=alt.Scale(scheme="viridis"), title="tokens choosing both")
    )
    lift = base.mark_rect().encode(
        color=alt.Color(
            "log2_lift:Q",
            scale=alt.Scale(scheme="redblue", reverse=True, domain=[-3, 3], domainMid=0),
            title="log2 lift",
            legend=alt.Legend(values=[-3, -2, -1, 0, 1, 2, 3]),
        )
    )
    note = ""
    if random_lift is not None and random_lift == random_lift:
        note = f" (random top-k routing: {random_lift:.2f})"
    caption = _caption("'layer ' + layer_slider").add_params(slider)
    return alt.vconcat(
        caption,
        counts.properties(title="tokens that chose both experts"),
        lift.properties(title=f"lift: observed / independent{note}"),
        title=title,
    ).resolve_scale(color="independent")


# --------------------------------------------------------------------------- expert cards


def expert_cards(
    load: pd.DataFrame,
    tokens: pd.DataFrame,
    contexts: pd.DataFrame,
    *,
    title: str = "",
    start_layer_pos: int = 0,
) -> alt.VConcatChart:
    """An expert card per layer (slider) and expert (click a bar): how many tokens chose each
    expert, the tokens the selected one is chosen for most, and the contexts where it gets its
    highest gate scores.

    The tables are :func:`moe_utils.analysis.token_routing.expert_cards`'s ``load``, ``tokens``
    and ``contexts``.
    """
    layers = sorted(int(l) for l in load.layer.unique())
    num_experts = int(load.expert.max()) + 1
    slider = _layer_param(layers, start_layer_pos)
    first_layer = load[load.layer == layers[max(0, min(len(layers) - 1, start_layer_pos))]]
    busiest = int(first_layer.expert.iloc[int(np.argmax(first_layer.tokens.to_numpy()))]) if len(first_layer) else 0
    pick = alt.selection_point(name="expert_pick", fields=["e"], on="click", value=[{"e": busiest}], clear=False)
    on_layer = alt.datum.layer == slider

    load_data = pd.DataFrame(
        {
            "layer": load.layer.astype(int),
            "e": load.expert.astype(int),
            "n": load.tokens.astype(int),
            "s": load.share.round(4),
            "t1": load.top1.astype(int),
        }
    )
    bars = (
        alt.Chart(load_data)
        .transform_filter(on_layer)
        .transform_calculate(expert="'' + datum.e")
        .mark_bar(cursor="pointer")
        .encode(
            x=alt.X("expert:N", sort=[str(e) for e in range(num_experts)], title="expert (click one)"),
            y=alt.Y("n:Q", title="tokens that chose it"),
            color=_expert_color(num_experts, legend=False),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.35)),
            tooltip=[
                alt.Tooltip("expert:N"),
                alt.Tooltip("n:Q", title="tokens that chose it"),
                alt.Tooltip("s:Q", title="share of tokens", format=".1%"),
                alt.Tooltip("t1:Q", title="as top-1"),
            ],
        )
        .add_params(pick)
        .properties(width=int(min(COLUMN_WIDTH - 80, max(300, 18 * num_experts))), height=150, title="expert load")
    )
    tok_data = pd.DataFrame(
        {
            "layer": tokens.layer.astype(int),
            "e": tokens.expert.astype(int),
            "r": tokens["rank"].astype(int),
            "t": tokens.token.astype(str),
            "n": tokens["count"].astype(int),
            "o": tokens.occurrences.astype(int),
            "s": tokens.share.round(3),
        }
    )
    top = (
        alt.Chart(tok_data)
        .transform_filter(on_layer)
        .transform_filter(pick)
        .transform_calculate(label="datum.r + '. ' + datum.t")
        .mark_bar(color="#4e79a7")
        .encode(
            y=alt.Y("label:N", sort=alt.EncodingSortField("r", order="ascending"), title=None),
            x=alt.X("n:Q", title="times chosen"),
            tooltip=[
                alt.Tooltip("t:N", title="token"),
                alt.Tooltip("n:Q", title="times chosen"),
                alt.Tooltip("o:Q", title="occurrences in the text"),
                alt.Tooltip("s:Q", title="share of its occurrences", format=".0%"),
            ],
        )
        .properties(width=300, height=alt.Step(16), title="tokens it is chosen for most")
    )
    ctx_data = pd.DataFrame(
        {
            "layer": contexts.layer.astype(int),
            "e": contexts.expert.astype(int),
            "r": contexts["rank"].astype(int),
            "g": contexts.gate.round(3),
            "c": contexts.context.astype(str),
        }
    )
    ctx = (
        alt.Chart(ctx_data)
        .transform_filter(on_layer)
        .transform_filter(pick)
        .transform_calculate(line="format(datum.g, '.2f') + '   ' + datum.c")
        .mark_text(align="left", font=FONT, fontSize=12)
        .encode(
            y=alt.Y("r:O", title=None, axis=None),
            x=alt.value(0),
            text="line:N",
            tooltip=[alt.Tooltip("c:N", title="context"), alt.Tooltip("g:Q", title="gate score", format=".3f")],
        )
        .properties(
            width=COLUMN_WIDTH - 80,
            height=alt.Step(18),
            title="its highest gate scores: score, then the [token] in its context",
        )
    )
    caption = (
        alt.Chart(load_data)
        .transform_filter(on_layer)
        .transform_filter(pick)
        .transform_calculate(
            text="'layer ' + datum.layer + ', expert ' + datum.e + ': chosen by ' "
            "+ datum.n + ' tokens (' + format(datum.s, '.1%') + '), top-1 for ' + datum.t1"
        )
        .mark_text(align="left", fontSize=13, fontWeight="bold", dx=2)
        .encode(text="text:N")
        .properties(height=16)
        .add_params(slider)
    )
    return alt.vconcat(caption, bars, top, ctx, title=title)


# --------------------------------------------------------------------------- training snapshots


def snapshot_lines(table: pd.DataFrame, *, title: str = "") -> alt.Chart:
    """Value of each snapshot quantity against the training step (one line per quantity)."""
    return (
        alt.Chart(table)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="training step"),
            y=alt.Y("value:Q", title="value"),
            color=alt.Color("quantity:N"),
            tooltip=["replicate:N", "quantity:N", "step:Q", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(width=420, height=220, title=title)
    )
