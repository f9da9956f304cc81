"""Project the measured figures to the paper's models and newer MoEs (the tables of book/performance.md).

Reads ``benchmarks/results/obs1_mixtral.json`` and ``benchmarks/results/dynamic_mixtral.json``
(written by ``obs1_layer.py`` and ``dynamic_model.py``), scales them with
:func:`moe_utils.core.hardware.project` and prints Markdown tables. With ``--stream`` it also
reads ``stream_mixtral.json`` (``stream_mixtral.py``) and prints the layer stream's table for the
paper's models and the newer ones (:func:`moe_utils.core.hardware.project_stream`).

    python benchmarks/project.py [--stream]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_utils.core.hardware import (
    NEWER_MODEL_SHAPES,
    PAPER_MODEL_SHAPES,
    Measured,
    MeasuredStream,
    project,
    project_stream,
)

#: Families whose forward pass needs the publisher's code: the layer stream does not run it.
REMOTE_CODE = {"DeepSeekMoE 16B", "Grok-1"}

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


def stream_rates() -> MeasuredStream:
    """Per-layer costs: compute per MoE layer on the long input from ``dynamic_mixtral.json`` (one
    Mixtral-width layer, about 1,100 tokens), the cold read rate and the peak over one layer plus
    activations from ``stream_mixtral.json`` (the layer stream at the same width)."""
    dyn = json.loads((RESULTS / "dynamic_mixtral.json").read_text())
    st = json.loads((RESULTS / "stream_mixtral.json").read_text())
    return MeasuredStream(
        read_seconds_per_byte=st["cold_read_seconds"] / st["weight_bytes"],
        seconds_per_layer={k: v["seconds"] for k, v in dyn["notebooks"].items()},
        peak_over_layer={k: v["peak_over_layer_plus_activations"] for k, v in st["notebooks"].items()},
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def stream_table(rows: list[dict]) -> str:
    head = (
        "| model | notebook | whole model (bf16) | CPU hours, layer stream | CPU peak, layer stream | "
        "fits 24 GB RAM | GPU memory, layer stream | one 24 GB GPU | one 80 GB GPU |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        if r["model"] in REMOTE_CODE:
            body += (
                f"| {r['model']} | {r['notebook']} | {r['whole_model_gb']:.0f} GB | not streamed (publisher's code) "
                f"| - | - | - | - | - |\n"
            )
            continue
        body += (
            f"| {r['model']} | {r['notebook']} | {r['whole_model_gb']:.0f} GB | {r['cpu_hours']:.1f} | "
            f"{r['cpu_peak_gb']:.1f} GB | {_yes(r['fits_cpu'])} | {r['gpu_gb']:.1f} GB | {_yes(r['gpu_24'])} | "
            f"{_yes(r['gpu_80'])} |\n"
        )
    return head + body


def main() -> None:
    m = measured_rates()
    rows = [row for shape in PAPER_MODEL_SHAPES.values() for row in project(shape, m)]
    print(table(rows))
    if "--stream" in sys.argv[1:]:
        sm = stream_rates()
        shapes = [*PAPER_MODEL_SHAPES.values(), *NEWER_MODEL_SHAPES.values()]
        print(stream_table([row for shape in shapes for row in project_stream(shape, sm)]))


if __name__ == "__main__":
    main()
