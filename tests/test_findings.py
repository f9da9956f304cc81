"""The intro's findings box: read from the results files, linked only to pages that exist."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from moe_utils.analysis.results import write_result
from moe_utils.publish.findings import findings_markdown, write_findings


def _obs1(runs: Path, verdict: str, effect: float) -> None:
    write_result(
        runs / "tiny-moe-scratch" / "results",
        "obs1_neurons_as_experts",
        "zoo:tiny-moe-scratch",
        "fp",
        {},
        {"t": pd.DataFrame({"x": [1]})},
        {
            "router_act_alignment": {
                "value": effect,
                "ci_low": effect - 0.05,
                "ci_high": effect + 0.05,
                "baseline": 0.0,
                "verdict": verdict,
                "floor": 0.065,
                "null": -0.03,
                "observed": effect - 0.03,
            }
        },
    )


def test_findings_state_each_verdict_and_link_only_existing_pages(tmp_path: Path):
    runs = tmp_path / "book" / "runs"
    _obs1(runs, "does not hold", -0.086)
    text = findings_markdown(tmp_path, "book/runs")
    assert text.startswith("```{admonition} What this book finds")
    assert "tiny-moe-scratch does not hold on seed 0 (effect -0.086" in text  # no page yet: plain name
    assert "tiny-moe-upcycled not measured in this build" in text
    (runs / "tiny-moe-scratch" / "obs1_neurons_as_experts.ipynb").write_text("{}")
    linked = findings_markdown(tmp_path, "book/runs")
    assert "{doc}`tiny-moe-scratch </book/runs/tiny-moe-scratch/obs1_neurons_as_experts>` does not hold" in linked
    path = write_findings(tmp_path, "book/runs")
    assert path == tmp_path / "book" / "generated" / "findings.md" and path.read_text() == linked


def test_findings_without_results_say_so(tmp_path: Path):
    assert "No results yet" in findings_markdown(tmp_path, "book/runs")


def test_a_noninferiority_claim_states_its_margin_not_a_floor(tmp_path: Path):
    runs = tmp_path / "book" / "runs"
    write_result(
        runs / "tiny-moe-fine" / "results",
        "obs3_depth_diversity",
        "zoo:tiny-moe-fine",
        "fp",
        {},
        {"t": pd.DataFrame({"x": [1]})},
        {
            "last_layer_as_early": {
                "value": 0.002,
                "ci_low": -0.003,
                "ci_high": 0.007,
                "baseline": 0.0,
                "verdict": "holds",
                "floor": 0.005,
            }
        },
    )
    line = next(l for l in findings_markdown(tmp_path, "book/runs").splitlines() if l.startswith("- **3b."))
    assert "tiny-moe-fine holds on seed 0 (effect +0.002, 95% interval -0.003 to +0.007, margin 0.005;" in line
    assert "floor" not in line
