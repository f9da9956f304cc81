"""Observations 2 and 3 through the layer stream on a Mixtral 8x7B-width model larger than memory.

Writes a random Mixtral-width model (8 experts, H 4096, I 14336, 32 heads / 8 KV heads, the zoo
tokenizer; one shard per decoder layer, about 2.9 GB of bf16 each) under /tmp, with ``--layers``
decoder layers (default 10: about 29 GB, more than this machine's memory). Layer 0's tensors are
random; the other layers are byte copies of it under their own names (the cost of reading and
computing a layer does not depend on its values). Then, each in a fresh process and after the
files are dropped from the page cache, runs observation 2 and observation 3 with
``open_study(..., stream=True, dtype="bfloat16")`` on the short prompt (a few short sequences),
and measures: wall time, peak RSS, the seconds spent reading each layer (``fill_layer``) and the
rest (compute). It compares the peak with one decoder layer's bytes plus the captured
activations, and the wall time with a cold read of the files (``cat``) plus the measured compute.
Prints the ratios, writes ``benchmarks/results/stream_mixtral.json`` and deletes the model.

    nice -n 5 python benchmarks/stream_mixtral.py [--layers 10] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import (
    ROOT,
    ZOO_TOKENIZER,
    child_peak,
    cold_read,
    copy_layer,
    evict,
    expert_specs,
    machine,
    measured,
    mixtral_config,
    save_results,
    write_safetensors,
)

E, H, I, HEADS, KV = 8, 4096, 14336, 32, 8
NOTEBOOKS = ("obs2_router_norms", "obs3_depth_diversity")


def layer_specs(layer: int) -> list[tuple[str, tuple[int, ...]]]:
    hd = H // HEADS
    p = f"model.layers.{layer}."
    return [
        (p + "input_layernorm.weight", (H,)),
        (p + "post_attention_layernorm.weight", (H,)),
        (p + "self_attn.q_proj.weight", (HEADS * hd, H)),
        (p + "self_attn.k_proj.weight", (KV * hd, H)),
        (p + "self_attn.v_proj.weight", (KV * hd, H)),
        (p + "self_attn.o_proj.weight", (H, HEADS * hd)),
        *expert_specs(layer, E, H, I),
    ]


def write_model(folder: Path, layers: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((ZOO_TOKENIZER / "config.json").read_text())["vocab_size"]
    outer = folder / "outer.safetensors"
    write_safetensors(
        outer,
        [("model.embed_tokens.weight", (vocab, H)), ("model.norm.weight", (H,)), ("lm_head.weight", (vocab, H))],
        1,
    )
    files = [outer]
    weight_map = {
        "model.embed_tokens.weight": outer.name,
        "model.norm.weight": outer.name,
        "lm_head.weight": outer.name,
    }
    first = folder / "layer-000.safetensors"
    write_safetensors(first, layer_specs(0), seed=2)
    files.append(first)
    for layer in range(layers):
        path = folder / f"layer-{layer:03d}.safetensors"
        if layer > 0:
            copy_layer(first, path, layer)
            files.append(path)
        weight_map.update({name: path.name for name, _ in layer_specs(layer)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = mixtral_config(E, H, I, layers, vocab=vocab, heads=HEADS, kv_heads=KV)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ZOO_TOKENIZER / name, folder / name)
    return files


def child(folder: str, notebook: str) -> None:
    """One notebook's analysis through the stream, in this process; prints its timings as JSON."""
    import moe_utils.models.stream as stream
    from moe_utils.analysis import obs2_norms, obs3_depth
    from moe_utils.analysis.context import open_study

    reads: list[float] = []
    fill = stream.fill_layer

    def timed_fill(*args, **kwargs):  # the seconds spent reading (and laying out) each layer
        t = time.perf_counter()
        fill(*args, **kwargs)
        reads.append(time.perf_counter() - t)

    stream.fill_layer = timed_fill
    t0 = time.perf_counter()
    study = open_study(folder, None, dtype="bfloat16", stream=True, results_dir=Path(folder) / "results")
    report = obs2_norms.norms_report if notebook == NOTEBOOKS[0] else obs3_depth.depth_report
    r = report(study, inputs="short")
    seconds = time.perf_counter() - t0
    tokens = int(r.short_trace.num_tokens)
    print(json.dumps({"seconds": seconds, "read_seconds": reads, "tokens": tokens, "peak_rss": child_peak()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the model (default: /tmp)")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "NOTEBOOK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    base = Path(tempfile.mkdtemp(prefix="moe-stream-", dir=args.dir))
    folder = base / f"synthetic-mixtral-{args.layers}layers"
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out: dict = {"machine": machine(), "experts": E, "hidden": H, "intermediate": I, "layers": args.layers}
    try:
        t0 = time.perf_counter()
        files = write_model(folder, args.layers)
        total = sum(f.stat().st_size for f in files)
        layer_bytes = files[1].stat().st_size
        out.update(weight_bytes=total, layer_bytes=layer_bytes, write_seconds=time.perf_counter() - t0)
        print(
            f"wrote {args.layers} Mixtral-width layers ({total / 1e9:.1f} GB bf16, {layer_bytes / 1e9:.2f} GB a layer) "
            f"in {out['write_seconds']:.0f} s",
            flush=True,
        )
        out["cold_read_seconds"] = cold_read(files)
        print(f"cold read of the files: {out['cold_read_seconds']:.0f} s", flush=True)
        out["notebooks"] = {}
        for name in NOTEBOOKS:
            evict(files)
            r = measured([sys.executable, __file__, "--child", str(folder), name], env=env, cwd=ROOT)
            c = r["child"]
            reads = sum(c["read_seconds"])
            compute = c["seconds"] - reads
            activations = args.layers * c["tokens"] * H * 4 * 3  # captured inputs, outputs, hidden states (fp32)
            expected = out["cold_read_seconds"] + compute
            row = {
                "seconds": r["seconds"],
                "cpu_seconds": r.get("cpu_seconds"),
                "load_average": r.get("load_average"),
                "peak_rss": r["peak_rss"],
                "read_seconds": reads,
                "read_seconds_per_layer": c["read_seconds"],
                "compute_seconds": compute,
                "compute_seconds_per_layer": compute / args.layers,
                "tokens": c["tokens"],
                "activation_bytes": activations,
                "peak_over_layer_plus_activations": r["peak_rss"] / (layer_bytes + activations),
                "wall_over_cold_read_plus_compute": r["seconds"] / expected,
            }
            out["notebooks"][name] = row
            print(
                f"{name}: {r['seconds']:.0f} s wall ({reads:.0f} s reading layers, {compute:.0f} s the rest, "
                f"{c['tokens']} tokens); peak RSS {r['peak_rss'] / 1e9:.2f} GB = "
                f"{row['peak_over_layer_plus_activations']:.2f}x one layer + activations; wall = "
                f"{row['wall_over_cold_read_plus_compute']:.2f}x (cold read + compute)",
                flush=True,
            )
            save_results("stream_mixtral", out)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    path = save_results("stream_mixtral", out)
    print(f"deleted the model; wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
