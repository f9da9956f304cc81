"""Altair charts of the study's pages (replication, interventions): effects with intervals across
replicates, training ladders and how an effect emerges during training."""

from __future__ import annotations

import altair as alt
import pandas as pd

from ..analysis.claims import CLAIMS
from .chart_parts import wrap_title
from .render import humanize


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
        floor = float(g["floor"].iloc[0]) * CLAIMS[str(claim)].direction
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
        floor = float(g["floor"].iloc[0]) * CLAIMS[str(claim)].direction
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
