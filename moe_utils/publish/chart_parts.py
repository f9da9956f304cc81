"""The pieces every chart of the book shares: its data, its controls, its captions, its sizes.

Charts embed tidy data column by column (:func:`columnar`), per-layer charts carry a layer slider
made of an ``alt.param`` bound to a range input, so they stay interactive in the static site
without a kernel. The slider moves over the *position* of a layer in the list of analysed layers,
which keeps it usable when only some layers are analysed (for example DeepSeekMoE's MoE layers
1-27, or ``layers=[0, 5, 10]``).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from typing import Any, cast

import altair as alt
import pandas as pd

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


def caption(data: alt.InlineData, predicates: Sequence[alt.Predicate], text: str, **fields: str) -> alt.Chart:
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


def layer_caption(data: alt.InlineData, *predicates: alt.Predicate) -> alt.Chart:
    return caption(data, predicates, "'layer ' + datum.layer", layer="min(layer)")


def selection_caption(data: alt.InlineData, preds: Sequence[alt.Predicate], facet_field: str | None) -> alt.Chart:
    """The line above a selectable chart naming the layer (and the facet value) on show."""
    if facet_field:
        return caption(
            data,
            preds,
            f"'layer ' + datum.layer + ', ' + datum.{facet_field}",
            layer="min(layer)",
            **{facet_field: f"min({facet_field})"},
        )
    return layer_caption(data, *preds)


def tooltip_fields(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """Tooltip shorthands with explicit types."""
    return [f"{c}:{'Q' if pd.api.types.is_numeric_dtype(df[c]) else 'N'}" for c in columns]


def token_slider(n_tokens: int) -> alt.Parameter:
    """A range-slider parameter over token indices 0..n_tokens-1."""
    return alt.param(
        name="token_slider", value=0, bind=alt.binding_range(min=0, max=max(n_tokens - 1, 0), step=1, name="token ")
    )


def layer_filter(param: alt.Parameter) -> alt.Predicate:
    return alt.datum["layer"] == param


def square_size(n: int, cell: int) -> int:
    """Side of a heat map of ``n`` rows: ``cell`` px a row, between 120 px and :data:`MAX_PLOT`."""
    return int(min(MAX_PLOT, max(120, cell * n)))


def default_domain(value_title: str) -> tuple[float, float]:
    """The fixed colour domain of a similarity: [0, 1] for angular similarity, else [-1, 1]."""
    return ANGULAR_DOMAIN if "angular" in value_title else COSINE_DOMAIN
