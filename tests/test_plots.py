"""moe_utils.publish.plots and chart_parts: every chart builder, on a 30-expert model (the widest the book shows),
rendered offline to SVG by vl-convert: it draws, fits the text column, has no text under 12 px,
and its embedded data stays small."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from moe_utils.publish import chart_parts, plots
from moe_utils.publish.render import MIN_FONT_SIZE, book_theme_config, humanize, setup_altair

vl_convert = pytest.importorskip("vl_convert")

E, L, T = 30, 8, 8
rng = np.random.default_rng(0)


def _similarity() -> pd.DataFrame:
    rows = [
        {"layer": la, "matrix": m, "expert_i": str(i), "expert_j": str(j), "similarity": float(rng.uniform(-1, 1))}
        for la in range(L)
        for m in ("W_act", "W_up", "W_down")
        for i in range(E)
        for j in range(E)
    ]
    return pd.DataFrame(rows)


def _token_similarity() -> pd.DataFrame:
    rows = [
        {
            "layer": la,
            "token_index": t,
            "token": f"tok{t}",
            "expert_i": i,
            "expert_j": j,
            "similarity": float(rng.uniform(-1, 1)),
            "chosen_text": "1, 2",
        }
        for la in range(L)
        for t in range(T)
        for i in range(E)
        for j in range(E)
    ]
    return pd.DataFrame(rows)


def _charts() -> dict:
    ranks = pd.DataFrame(
        [
            {"layer": la, "norm_rank": a, "score_rank": b, "count": int(rng.integers(100))}
            for la in range(L)
            for a in range(1, E + 1)
            for b in range(1, E + 1)
        ]
    )
    pairs = pd.DataFrame(
        [
            {"layer": la, "matrix": m, "gate_similarity": rng.random(), "expert_similarity": rng.random()}
            for la in range(L)
            for m in ("W_act", "W_up")
            for _ in range(E * (E - 1) // 2)
        ]
    )
    bars = pd.DataFrame(
        [
            {
                "layer": la,
                "token_index": t,
                "token": f"t{t}",
                "expert": e,
                "chosen": e < 2,
                "norm": rng.random(),
                "score": rng.random(),
            }
            for la in range(L)
            for t in range(T)
            for e in range(E)
        ]
    )
    loads = pd.DataFrame(
        [
            {"model": m, "layer": la, "expert": e, "share": rng.random() / E, "uniform": 1 / E}
            for m in ("a", "b")
            for la in range(L)
            for e in range(E)
        ]
    )
    return {
        "similarity": plots.similarity_heatmaps(_similarity(), title="matrix-level similarity"),
        "token similarity": plots.token_similarity_heatmaps(_token_similarity(), title="per token"),
        "rank bars": plots.rank_count_bars(ranks.groupby(["norm_rank", "score_rank"], as_index=False)["count"].sum()),
        "rank by layer": plots.rank_count_heatmap_by_layer(ranks),
        "scatter": plots.scatter_by_layer(pairs, x="gate_similarity", y="expert_similarity", facet_field="matrix"),
        "token bars": plots.token_expert_bars(bars),
        "loads": plots.expert_load_heatmap(loads),
    }


@pytest.fixture(scope="module")
def charts() -> dict:
    setup_altair({})
    return _charts()


@pytest.mark.parametrize(
    "name", ["similarity", "token similarity", "rank bars", "rank by layer", "scatter", "token bars", "loads"]
)
def test_chart_fits_the_column_with_readable_text(charts: dict, name: str) -> None:
    spec = charts[name].to_dict()
    svg = vl_convert.vegalite_to_svg(spec)
    width = float(re.search(r'<svg[^>]*width="([\d.]+)"', svg).group(1))
    assert width <= chart_parts.COLUMN_WIDTH, f"{name}: {width} px"
    sizes = [float(s) for s in re.findall(r'font-size="([\d.]+)px"', svg)]
    assert sizes and min(sizes) >= MIN_FONT_SIZE, (name, sorted(set(sizes)))
    assert len(json.dumps(spec)) < 1_000_000, name


def test_matrix_source_rebuilds_every_cell() -> None:
    df = _similarity()
    labels = [str(i) for i in range(E)]
    data, chart = chart_parts.matrix_source(df, ["layer", "matrix"], "expert_i", "expert_j", "similarity", labels)
    record = data.values[0]
    assert len(record["_v"]) == L * 3 and all(len(v) == E * E for v in record["_v"])
    # The cell of (layer 2, W_up, expert 3, expert 5), found where the chart's calculation looks.
    k = next(
        i for i, (la, m) in enumerate(zip(record["layer"], record["matrix"], strict=True)) if la == 2 and m == "W_up"
    )
    want = df.query("layer == 2 and matrix == 'W_up' and expert_i == '3' and expert_j == '5'").similarity.item()
    assert record["_v"][k][3 * E + 5] == pytest.approx(want, abs=1e-3)
    calc = json.dumps(chart.mark_rect().to_dict())
    assert f"floor((datum._cell - 1) / {E})" in calc and f"(datum._cell - 1) % {E}" in calc


def test_theme_and_labels() -> None:
    config = book_theme_config()["config"]
    assert min(v for part in ("axis", "legend", "header") for k, v in config[part].items() if "Font" in k) >= 12
    assert humanize("sim_before") == "sim before" and humanize("W_act") == "W_act" and humanize("S_ee") == "S_ee"
