"""Observation 2 through the layer stream on a gpt-oss-120b-width model stored in MXFP4.

Writes a random gpt-oss model at gpt-oss-120b's width (128 experts, H 2880, I 2880, top-4, 64
heads / 8 KV heads of 64, attention sinks and biases; the zoo tokenizer and its vocabulary) with
``--layers`` decoder layers (default 2), its experts in the hub's MXFP4 layout (``*_blocks`` uint8
[E, out, in/32, 16] and ``*_scales`` uint8 exponents; about 1.7 GB a layer against 6.4 GB decoded to
bf16), everything else bf16, and ``quantization_config: mxfp4`` in config.json. Then, in a fresh
process after dropping the files from the page cache, runs observation 2 with
``open_study(..., stream=True, dtype="bfloat16")`` on the short prompt: every layer is read once,
its experts decoded to bf16, the layer run by transformers' own module. Measures wall time, peak RSS
and the seconds spent reading and decoding each layer; compares the peak with one decoded layer
plus the activations. Prints the ratios, writes ``benchmarks/results/stream_gpt_oss.json`` and
deletes the model.

    nice -n 5 python benchmarks/stream_gpt_oss.py [--layers 2] [--dir /tmp]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import (
    ROOT,
    ZOO_TOKENIZER,
    child_peak,
    cold_read,
    evict,
    machine,
    measured,
    save_results,
    write_safetensors,
)

E, H, I, TOP_K, HEADS, KV, HEAD_DIM = 128, 2880, 2880, 4, 64, 8, 64


def config(layers: int, vocab: int) -> dict:
    from transformers import GptOssConfig

    cfg = GptOssConfig(
        vocab_size=vocab,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        head_dim=HEAD_DIM,
        num_local_experts=E,
        num_experts_per_tok=TOP_K,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        tie_word_embeddings=False,
    ).to_dict()
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    return cfg


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every tensor of the checkpoint: the model's own names and shapes (built empty), the experts
    replaced by their MXFP4 blocks and scales."""
    from transformers import GptOssConfig, GptOssForCausalLM

    plain = {k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype")}
    with torch.device("meta"):  # parameters never allocated (a fused expert tensor exceeds memory)
        model = GptOssForCausalLM(GptOssConfig(**plain))
    specs = []
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, inn, out = t.shape  # [E, in, out] in memory
            specs += [
                (name + "_blocks", (e, out, inn // 32, 16), torch.uint8),
                (name + "_scales", (e, out, inn // 32), torch.uint8),
            ]
        else:
            specs.append((name, tuple(t.shape), torch.bfloat16))
    return specs


def _fill(name: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor | None:
    if name.endswith("_scales"):
        return torch.randint(119, 124, shape, generator=g, dtype=torch.uint8)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return None


def write_tensors(path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
    write_safetensors(path, specs, seed=0, fill=_fill)


def write_model(folder: Path, layers: int) -> tuple[list[Path], int]:
    """One shard per decoder layer plus one for the rest; returns the files and one layer's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((ZOO_TOKENIZER / "config.json").read_text())["vocab_size"]
    cfg = config(layers, vocab)
    specs = tensor_specs(cfg)
    files, weight_map = [], {}
    groups: dict[str, list] = {}
    for spec in specs:
        parts = spec[0].split(".")
        key = f"layer-{int(parts[2]):03d}" if spec[0].startswith("model.layers.") else "outer"
        groups.setdefault(key, []).append(spec)
    for key, group in sorted(groups.items()):
        path = folder / f"{key}.safetensors"
        write_tensors(path, group)
        files.append(path)
        weight_map.update({name: path.name for name, _, _ in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ZOO_TOKENIZER / name, folder / name)
    return files, (folder / "layer-000.safetensors").stat().st_size


def child(folder: str) -> None:
    import moe_utils.models.stream as stream
    from moe_utils.analysis import obs2_norms
    from moe_utils.analysis.context import open_study

    reads: list[float] = []
    fill = stream.fill_layer

    def timed_fill(*args, **kwargs):
        t = time.perf_counter()
        fill(*args, **kwargs)
        reads.append(time.perf_counter() - t)

    stream.fill_layer = timed_fill
    t0 = time.perf_counter()
    study = open_study(folder, None, dtype="bfloat16", stream=True, results_dir=Path(folder) / "results")
    r = obs2_norms.norms_report(study, inputs="short")
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "read_seconds": reads,
                "tokens": int(r.short_trace.num_tokens),
                "peak_rss": child_peak(),
                "max_rel_error": r.max_rel_error,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    base = Path(tempfile.mkdtemp(prefix="moe-gptoss-", dir=args.dir))
    folder = base / f"synthetic-gpt-oss-120b-width-{args.layers}layers"
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out: dict = {"machine": machine(), "experts": E, "hidden": H, "intermediate": I, "layers": args.layers}
    try:
        t0 = time.perf_counter()
        files, layer_bytes = write_model(folder, args.layers)
        decoded = layer_bytes + E * 3 * H * I * 2 - E * 3 * H * I * 17 // 32  # MXFP4 (4.25 bits) -> bf16
        out.update(
            stored_layer_bytes=layer_bytes,
            decoded_layer_bytes=decoded,
            weight_bytes=sum(f.stat().st_size for f in files),
            write_seconds=time.perf_counter() - t0,
        )
        print(
            f"wrote {args.layers} gpt-oss-120b-width MXFP4 layers ({layer_bytes / 1e9:.2f} GB stored, "
            f"{decoded / 1e9:.2f} GB decoded a layer) in {out['write_seconds']:.0f} s",
            flush=True,
        )
        out["cold_read_seconds"] = cold_read(files)
        evict(files)
        r = measured([sys.executable, __file__, "--child", str(folder)], env=env, cwd=ROOT)
        c = r["child"]
        activations = args.layers * c["tokens"] * H * 4 * 3
        reads = sum(c["read_seconds"])
        out["obs2_router_norms"] = {
            "seconds": r["seconds"],
            "cpu_seconds": r.get("cpu_seconds"),
            "load_average": r.get("load_average"),
            "peak_rss": r["peak_rss"],
            "read_decode_seconds": reads,
            "read_decode_seconds_per_layer": c["read_seconds"],
            "compute_seconds_per_layer": (c["seconds"] - reads) / args.layers,
            "tokens": c["tokens"],
            "max_rel_error": c["max_rel_error"],
            "peak_over_decoded_layer_plus_activations": r["peak_rss"] / (decoded + activations),
            "peak_over_stored_layer": r["peak_rss"] / layer_bytes,
        }
        o = out["obs2_router_norms"]
        print(
            f"obs2_router_norms streamed: {r['seconds']:.0f} s wall ({reads:.0f} s reading and decoding layers); "
            f"peak RSS {r['peak_rss'] / 1e9:.2f} GB = {o['peak_over_decoded_layer_plus_activations']:.2f}x one decoded "
            f"layer + activations ({o['peak_over_stored_layer']:.2f}x its stored bytes); block rebuilt to "
            f"{c['max_rel_error']:.1e}",
            flush=True,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    path = save_results("stream_gpt_oss", out)
    print(f"deleted the model; wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
