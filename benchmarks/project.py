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
    """Per-layer costs: compute per MoE layer (the larger of ``dynamic_mixtral.json``'s one
    Mixtral-width layer on the long input, about 1,100 tokens, and the stream's measured compute per
    layer), the cold read rate and the peak over one layer plus activations from
    ``stream_mixtral.json`` (the layer stream at the same width)."""
    dyn = json.loads((RESULTS / "dynamic_mixtral.json").read_text())
    st = json.loads((RESULTS / "stream_mixtral.json").read_text())
    return MeasuredStream(
        read_seconds_per_byte=st["cold_read_seconds"] / st["weight_bytes"],
        # the larger of the two measured per-layer costs: whole model on the long input (idle machine)
        # and the stream's compute per layer on the short prompt (busy machine)
        seconds_per_layer={
            k: max(v["seconds"], st["notebooks"].get(k, {}).get("compute_seconds_per_layer", 0.0))
            for k, v in dyn["notebooks"].items()
        },
        peak_over_layer={
            k: st["notebooks"].get(
                k, max(st["notebooks"].values(), key=lambda v: v["peak_over_layer_plus_activations"])
            )["peak_over_layer_plus_activations"]
            for k in dyn["notebooks"]
        },
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


def measured_stream_table() -> str:
    """The layer stream's measured runs (the results files that exist), one row per notebook."""
    rows = []
    path = RESULTS / "stream_mixtral.json"
    if path.exists():
        st = json.loads(path.read_text())
        for name, r in st["notebooks"].items():
            rows.append(
                f"| Mixtral 8x7B width, {st['layers']} layers, bf16 ({st['weight_bytes'] / 1e9:.1f} GB) | {name} | "
                f"{r['seconds'] / 60:.0f} min ({r['read_seconds'] / st['layers']:.0f} s reading, "
                f"{r['compute_seconds_per_layer']:.0f} s computing a layer) | {r['peak_rss'] / 1e9:.2f} GB = "
                f"{r['peak_over_layer_plus_activations']:.2f} x one layer ({st['layer_bytes'] / 1e9:.2f} GB) "
                f"+ activations |"
            )
    for key, label in (
        ("stream_gpt_oss", "gpt-oss-120b width, MXFP4"),
        ("stream_deepseek_v3", "DeepSeek-V3 width, FP8"),
    ):
        path = RESULTS / f"{key}.json"
        if not path.exists():
            continue
        st = json.loads(path.read_text())
        r = st["obs2_router_norms"]
        stored = st["stored_layer_bytes"]
        decoded = r.get("peak_over_decoded_layer_plus_activations")
        versus = (
            f"{decoded:.2f} x one decoded layer ({st['decoded_layer_bytes'] / 1e9:.1f} GB) + activations"
            if decoded is not None
            else f"{r['peak_rss'] / stored:.2f} x one stored layer, experts read one at a time"
        )
        rows.append(
            f"| {label}, {st['layers']} layers ({stored / 1e9:.1f} GB stored a layer) | obs2_router_norms | "
            f"{r['seconds'] / 60:.0f} min | {r['peak_rss'] / 1e9:.2f} GB = {versus} |"
        )
    head = "| model | notebook | wall time | peak memory |\n|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n"


def main() -> None:
    m = measured_rates()
    rows = [row for shape in PAPER_MODEL_SHAPES.values() for row in project(shape, m)]
    print(table(rows))
    if "--stream" in sys.argv[1:]:
        print(measured_stream_table())
        sm = stream_rates()
        shapes = [*PAPER_MODEL_SHAPES.values(), *NEWER_MODEL_SHAPES.values()]
        print(stream_table([row for shape in shapes for row in project_stream(shape, sm)]))


if __name__ == "__main__":
    main()
