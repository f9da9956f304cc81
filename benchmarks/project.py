"""Project the measured figures to the paper's models (the tables of book/performance.md).

Reads ``benchmarks/results/obs1_mixtral.json`` and ``benchmarks/results/dynamic_mixtral.json``
(written by ``obs1_layer.py`` and ``dynamic_model.py``), scales them with
:func:`moe_utils.core.hardware.project` and prints Markdown tables.

    python benchmarks/project.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_utils.core.hardware import PAPER_MODEL_SHAPES, Measured, project

RESULTS = Path(__file__).resolve().parent / "results"


def measured_rates() -> Measured:
    obs1 = json.loads((RESULTS / "obs1_mixtral.json").read_text())
    dyn_path = RESULTS / "dynamic_mixtral.json"
    dyn = json.loads(dyn_path.read_text()) if dyn_path.exists() else {"weight_bytes": 0, "notebooks": {}}
    r = obs1["reordering"]
    weights = dyn["weight_bytes"]
    return Measured(
        obs1_seconds_per_expert_byte=obs1["weights"]["seconds"] / obs1["layer_bytes"],
        obs1_peak_over_layer=obs1["weights"]["peak_rss"] / obs1["layer_bytes"],
        pair_seconds=r["seconds_per_pair"],
        pair_width=(obs1["intermediate"], obs1["hidden"]),
        workers=int(r["workers"]),
        dynamic_seconds_per_layer={k: v["seconds"] for k, v in dyn["notebooks"].items()},
        dynamic_excess_bytes={k: max(0.0, v["peak_rss"] - weights) for k, v in dyn["notebooks"].items()},
    )


def table(rows: list[dict]) -> str:
    head = (
        "| model | notebook | CPU hours (wall) | CPU peak memory | GPU memory (weights + activations) | how |\n"
        "|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        gpu = "-" if r["gpu_memory_gb"] is None else f"{r['gpu_memory_gb']:.0f} GB"
        hours = "not measured" if r["cpu_hours"] is None else f"{r['cpu_hours']:.2f}"
        body += f"| {r['model']} | {r['notebook']} | {hours} | {r['cpu_peak_gb']:.1f} GB | {gpu} | {r['note']} |\n"
    return head + body


def main() -> None:
    m = measured_rates()
    rows = [row for shape in PAPER_MODEL_SHAPES.values() for row in project(shape, m)]
    print(table(rows))


if __name__ == "__main__":
    main()
