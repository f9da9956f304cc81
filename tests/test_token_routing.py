"""The token explorer's tables (moe_utils.analysis.token_routing) against naive loops over tokens,
its charts compiled by Vega-Lite, and (slow) the page's weight after a run on an organism."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import vl_convert
from tiny_models import sequences, tiny

from moe_utils.analysis import token_routing as T
from moe_utils.analysis.results import write_result
from moe_utils.models.trace import trace
from moe_utils.publish import explorer_charts as C
from moe_utils.publish.chart_parts import COLUMN_WIDTH
from moe_utils.publish.render import MIN_FONT_SIZE, setup_altair

FAMILIES = ["mixtral", "qwen2_moe"]  # top-2 of a few experts; top-k of more experts with a shared expert


def _record(family: str) -> T.RoutingRecord:
    lm = tiny(family)
    tr = trace(lm, sequences(seed=3, lengths=(48, 31, 20)))
    norms = {l: np.abs(np.random.default_rng(l).normal(size=tr[l].router_logits.shape)) for l in tr.layers}
    return T.record_from_trace(tr, norms=norms)


@pytest.fixture(scope="module", params=FAMILIES)
def record(request) -> T.RoutingRecord:
    return _record(request.param)


def test_record_sorts_the_chosen_experts_by_routing_weight(record: T.RoutingRecord):
    for layer in record.layers:
        w = record.weights[layer]
        assert (np.diff(w, axis=1) <= 0).all()
        chosen = record.chosen[layer]
        assert all(len(set(row)) == record.top_k for row in chosen.tolist())  # no expert twice
        scores = record.scores[layer]
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_coactivation_counts_and_lift_match_a_naive_loop(record: T.RoutingRecord):
    e, n = record.num_experts, record.num_tokens
    frame = T.coactivation_frame(record)
    assert len(frame) == len(record.layers) * e * e
    for layer in record.layers:
        chosen = record.chosen[layer].tolist()
        together = [[0] * e for _ in range(e)]
        alone = [0] * e
        for row in chosen:
            for i in set(row):
                alone[i] += 1
                for j in set(row):
                    if i != j:
                        together[i][j] += 1
        counts, lift = T.coactivation(record.chosen[layer], e)
        rows = frame[frame.layer == layer]
        for i in range(e):
            assert counts[i, i] == alone[i]
            for j in range(e):
                if i == j:
                    assert math.isnan(lift[i, j])
                    continue
                assert counts[i, j] == together[i][j]
                p_i, p_j = alone[i] / n, alone[j] / n
                expect = (together[i][j] / n) / (p_i * p_j) if p_i * p_j > 0 else float("nan")
                if math.isnan(expect):
                    assert math.isnan(lift[i, j])
                else:
                    assert lift[i, j] == pytest.approx(expect, rel=1e-12)
                row = rows[(rows.expert_i == i) & (rows.expert_j == j)].iloc[0]
                assert row["count"] == together[i][j]
                assert row.expected == pytest.approx(n * p_i * p_j)
        assert (counts == counts.T).all()


def test_random_routing_lift_is_what_random_top_k_gives():
    rng = np.random.default_rng(0)
    e, k, n = 8, 2, 40000
    chosen = np.argsort(rng.random((n, e)), axis=1)[:, :k]
    _, lift = T.coactivation(chosen, e)
    off = lift[~np.eye(e, dtype=bool)]
    assert off.mean() == pytest.approx(T.random_routing_lift(e, k), abs=0.02)
    assert T.random_routing_lift(8, 2) == pytest.approx(8 / 14)
    assert T.random_routing_lift(30, 1) == 0.0


def test_expert_cards_top_tokens_match_a_naive_count(record: T.RoutingRecord):
    top_n = 5
    cards = T.expert_cards(record, top_tokens=top_n, contexts=2)
    ids = record.token_ids.tolist()
    occurrences = Counter(ids)
    for layer in record.layers:
        chosen = record.chosen[layer].tolist()
        for e in range(record.num_experts):
            hits = [t for t, row in enumerate(chosen) if e in row]
            counts = Counter(ids[t] for t in hits)
            first = {}
            for t in hits:
                first.setdefault(ids[t], t)
            expected = sorted(counts, key=lambda tok: (-counts[tok], first[tok]))[:top_n]
            got = cards.tokens[(cards.tokens.layer == layer) & (cards.tokens.expert == e)].sort_values("rank")
            assert got.token_id.tolist() == expected
            assert got["count"].tolist() == [counts[t] for t in expected]
            assert got.occurrences.tolist() == [occurrences[t] for t in expected]
            assert got["rank"].tolist() == list(range(1, len(expected) + 1))
            load = cards.load[(cards.load.layer == layer) & (cards.load.expert == e)].iloc[0]
            assert load.tokens == len(hits)
            assert load.top1 == sum(row[0] == e for row in chosen)
            ctx = cards.contexts[(cards.contexts.layer == layer) & (cards.contexts.expert == e)]
            best = sorted(hits, key=lambda t: (-record.scores[layer][t, e], t))[:2]
            assert ctx.token_index.tolist() == best


def test_token_context_stays_in_its_sequence():
    rec = T.RoutingRecord(
        model="m",
        token_ids=np.arange(6),
        tokens=["a", "b", "c", "x", "y", "z"],
        seq=np.array([0, 0, 0, 1, 1, 1]),
        position=np.array([0, 1, 2, 0, 1, 2]),
        layers=[0],
        chosen={0: np.zeros((6, 1), dtype=int)},
        weights={0: np.ones((6, 1))},
        scores={0: np.ones((6, 1))},
    )
    assert T.token_context(rec, 3, left=2, right=1) == "[x]y"
    assert T.token_context(rec, 2, left=1, right=3) == "b[c]"


def test_layout_places_tokens_in_lines():
    lay = T.layout(["def", " f", "():\n", "    return", " 1", "x" * 10], [0, 0, 0, 0, 0, 1], width=12)
    assert lay.line.tolist() == [0, 0, 0, 1, 1, 3]  # a newline ends line 0; a new sequence after a blank line
    assert lay.col.tolist() == [0, 3, 5, 0, 10, 0]
    assert lay.text.tolist() == ["def", "f", "():↵", "return", "1", "x" * 10]
    assert lay.text_col.tolist() == [0, 4, 5, 4, 11, 0]
    assert T.layout(["a\x0eb"], [0]).text.tolist() == ["a\u240eb"]  # a control character drawn as its picture
    assert T.visible(" a\x7f") == "·a\u2421"
    wrapped = T.layout(["abcdefgh", "ijklmn"], [0, 0], width=10)
    assert wrapped.line.tolist() == [0, 1] and wrapped.col.tolist() == [0, 0]


def test_explorer_tokens_carry_each_tokens_path(record: T.RoutingRecord):
    tokens = T.explorer_tokens(record, max_tokens=60)
    lengths = np.bincount(record.seq)
    assert len(tokens) == lengths[0] + (lengths[1] if lengths[0] + lengths[1] <= 60 else 0)
    k = record.top_k
    for row in tokens.itertuples():
        for pos, layer in enumerate(record.layers):
            chosen = record.chosen[layer][row.i]
            assert row.top1[pos] == chosen[0]
            assert row.pe[pos * k : (pos + 1) * k] == chosen.tolist()
            assert row.pg[pos * k] == pytest.approx(record.scores[layer][row.i, chosen[0]], abs=5e-4)
            assert row.pn[pos * k + 1] == pytest.approx(record.norms[layer][row.i, chosen[1]], abs=5e-4)


def _emergence(folder: Path, replicate: str, organism: str, quantities: list[str]) -> None:
    rows = [
        {"organism": organism, "seed": 0, "step": s, "tokens_seen": 10 * s, "quantity": q, "value": 0.1 * s}
        for s in (0, 10)
        for q in quantities
    ]
    write_result(
        folder / replicate,
        "study_emergence",
        replicate,
        "f" * 16,
        {"replicate": replicate},
        {"emergence": pd.DataFrame(rows)},
        {},
    )


def test_snapshot_similarity_is_shown_only_when_measured(tmp_path: Path):
    _emergence(tmp_path, "fine-s0", "tiny-moe-fine", ["router_saturation"])
    missing = T.shipped_snapshot_similarity("tiny-moe-upcycled", tmp_path)
    assert missing.table.empty and "Not available" in missing.note and "fine-s0" in missing.note
    measured_other = T.shipped_snapshot_similarity("tiny-moe-fine", tmp_path)
    assert measured_other.table.empty and "router_saturation" in measured_other.note
    _emergence(tmp_path, "upcycled-s0", "tiny-moe-upcycled", ["expert_weight_similarity", "trend_rho"])
    found = T.shipped_snapshot_similarity("tiny-moe-upcycled", tmp_path)
    assert set(found.table.quantity) == {"expert_weight_similarity"} and len(found.table) == 2


def test_shipped_study_results_say_what_they_hold_for_the_upcycled_organism():
    shipped = T.snapshots_of("zoo:tiny-moe-upcycled")
    emergence = T.emergence_tables()
    upcycled = emergence[emergence.organism == "tiny-moe-upcycled"] if not emergence.empty else emergence
    has = not upcycled.empty and upcycled.quantity.str.contains(T.WEIGHT_SIMILARITY_MARK).any()
    assert shipped.table.empty != has
    if not has:
        assert "Not available" in shipped.note
    assert "not one of them" in T.snapshots_of("random:mixtral").note


@pytest.mark.parametrize("family", FAMILIES)
def test_charts_compile_and_stay_small(family: str):
    rec = _record(family)
    tokens = T.explorer_tokens(rec, max_tokens=80)
    cards = T.expert_cards(rec)
    charts = [
        C.token_explorer(tokens, rec.layers, rec.num_experts, rec.top_k, title=f"random:{family}"),
        C.coactivation_maps(T.coactivation_frame(rec), random_lift=T.random_routing_lift(rec.num_experts, rec.top_k)),
        C.expert_cards(cards.load, cards.tokens, cards.contexts, title=f"random:{family}"),
    ]
    setup_altair({})  # the book's theme: its text sizes
    for chart in charts:
        spec = chart.to_dict()
        assert len(json.dumps(spec)) < 400_000
        svg = vl_convert.vegalite_to_svg(spec)
        assert svg.startswith("<svg") and "<text" in svg
        width = float(re.search(r'<svg[^>]*width="([\d.]+)"', svg).group(1))
        assert width <= COLUMN_WIDTH, width
        sizes = [float(v) for v in re.findall(r'font-size="([\d.]+)px"', svg)]
        assert sizes and min(sizes) >= MIN_FONT_SIZE


def test_expert_palette_has_one_distinct_colour_per_expert():
    for e in (2, 8, 16, 30, 64):
        colours = C.expert_palette(e)
        assert len(colours) == e and len(set(colours)) == e


@pytest.mark.slow
def test_page_weight_after_a_run_on_the_fine_organism(repo_root: Path, tmp_path: Path):
    """The organism with the most experts and the largest top-k gives the heaviest page."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_utils.publish.cli",
            "run",
            "--model",
            "zoo:tiny-moe-fine",
            "--dense-baseline",
            "zoo:tiny-dense",
            "--notebooks",
            "token_explorer",
            "--out",
            str(tmp_path),
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    nb = json.loads((tmp_path / "tiny-moe-fine" / "token_explorer.ipynb").read_text())
    html = [
        "".join(out["data"]["text/html"])
        for cell in nb["cells"]
        for out in cell.get("outputs", [])
        if "text/html" in out.get("data", {})
    ]
    assert sum(h.count("vegaEmbed(") for h in html) >= 3  # text, co-activation, cards
    assert sum(len(h.encode()) for h in html) < 2_500_000  # the page's charts and tables, under 3 MB with the theme
    assert (tmp_path / "tiny-moe-fine" / "results" / "token_explorer.json").is_file()
