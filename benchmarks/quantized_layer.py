"""Observation 1's weight pass on one real-width quantized MoE layer: time, peak memory, stored bytes.

Writes random one-layer checkpoints in the hub layouts under a temporary folder, then, each in a
fresh process, runs ``static.weight_report`` as the notebook calls it (``open_study(weights_only=True)``,
no reordering) with the layer's files evicted from the page cache first:

- ``fp8``: DeepSeek-V3 width, fine-grained FP8 with 128 x 128 block scales: routed experts
  ``[2048, 7168]`` (gate, up) and ``[7168, 2048]`` (down) plus one shared expert of the same
  width, router in bf16, correction bias in float32, in shards of at most 2 GB with an index;
- ``mxfp4``: gpt-oss-120b width, 128 experts of ``2880 x 2880`` in MXFP4 (``*_blocks``,
  ``*_scales``), biases and router in bf16.

The weight pass keeps the routed experts encoded on their memory maps and decodes each block of
neurons when it reads it, so the layer is written with every expert the model has (``--experts``
to change that) whatever the memory. Prints the figures (peak RSS against the stored and the
decoded bytes), writes ``benchmarks/results/quantized_layer.json`` and deletes the checkpoints.
Needs about 12 GB of disk at a time.

    python benchmarks/quantized_layer.py [--only fp8|mxfp4] [--dir /tmp] [--experts N]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import ROOT, child_peak, evict, machine, measured, save_results

DEEPSEEK = {"experts": 256, "hidden": 7168, "inter": 2048, "shared": 1, "block": 128}
GPT_OSS_120B = {"experts": 128, "hidden": 2880, "inter": 2880}
SHARD_BYTES = 2 * 2**30
#: Free disk the benchmark asks for: the larger layer (FP8, 11.7 GB stored) with room to spare;
#: each layer is deleted before the next is written.
DISK_BYTES = 16e9


def available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def random_fp8(g: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """Random e4m3 codes, NaN codes (0x7F, 0xFF) replaced by the largest finite ones."""
    codes = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] -= 1
    return codes.view(torch.float8_e4m3fn)


def write_shards(folder: Path, config: dict, tensors_of) -> list[Path]:
    """config.json plus shards filled from the generator ``tensors_of`` (name, tensor), each at most
    :data:`SHARD_BYTES`, and their index; returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, str] = {}
    paths: list[Path] = []

    def flush() -> None:
        name = f"model-{len(paths) + 1:05d}.safetensors"
        save_file(shards[-1], str(folder / name))
        weight_map.update(dict.fromkeys(shards[-1], name))
        paths.append(folder / name)
        shards[-1] = {}

    for name, t in tensors_of:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if shards[-1]:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return paths


def write_fp8(folder: Path, experts: int) -> tuple[list[Path], int]:
    """DeepSeek-V3-width FP8 layer 0; returns its files and its decoded (bf16) expert bytes."""
    from transformers import DeepseekV3Config

    H, I, B = DEEPSEEK["hidden"], DEEPSEEK["inter"], DEEPSEEK["block"]
    config = DeepseekV3Config(
        vocab_size=1024,
        hidden_size=H,
        intermediate_size=18432,
        moe_intermediate_size=I,
        num_hidden_layers=1,
        n_routed_experts=experts,
        n_shared_experts=DEEPSEEK["shared"],
        num_experts_per_tok=8,
        first_k_dense_replace=0,
        n_group=8,
        topk_group=4,
    ).to_dict()
    config.pop("dtype", None)
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [B, B],
    }
    g = torch.Generator().manual_seed(0)

    def tensors():
        p = "model.layers.0.mlp."
        yield p + "gate.weight", (torch.randn(experts, H, generator=g) * 0.02).to(torch.bfloat16)
        yield p + "gate.e_score_correction_bias", torch.randn(experts, generator=g) * 0.01
        owners = [f"experts.{e}." for e in range(experts)] + ["shared_experts."]
        for owner in owners:
            for proj, rows, cols in (("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)):
                name = f"{p}{owner}{proj}.weight"
                yield name, random_fp8(g, rows, cols)
                grid = (math.ceil(rows / B), math.ceil(cols / B))
                yield name + "_scale_inv", torch.rand(grid, generator=g) * 2e-4 + 1e-5

    decoded = (experts + DEEPSEEK["shared"]) * 3 * H * I * 2
    return write_shards(folder, config, tensors()), decoded


def write_mxfp4(folder: Path, experts: int) -> tuple[list[Path], int]:
    """gpt-oss-120b-width MXFP4 layer 0; returns its files and its decoded (bf16) expert bytes."""
    from transformers import GptOssConfig

    H, I = GPT_OSS_120B["hidden"], GPT_OSS_120B["inter"]
    config = GptOssConfig(
        vocab_size=1024,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=1,
        num_local_experts=experts,
        num_experts_per_tok=4,
        layer_types=["full_attention"],
    ).to_dict()
    config.pop("dtype", None)
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    g = torch.Generator().manual_seed(0)

    def tensors():
        p = "model.layers.0.mlp."
        yield p + "router.weight", (torch.randn(experts, H, generator=g) * 0.02).to(torch.bfloat16)
        yield p + "router.bias", (torch.randn(experts, generator=g) * 0.01).to(torch.bfloat16)
        for proj, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            yield f"{p}experts.{proj}_blocks", blocks
            yield (
                f"{p}experts.{proj}_scales",
                torch.randint(117, 123, (experts, rows, cols // 32), generator=g, dtype=torch.uint8),
            )
            yield f"{p}experts.{proj}_bias", (torch.randn(experts, rows, generator=g) * 0.01).to(torch.bfloat16)

    decoded = experts * 3 * H * I * 2
    return write_shards(folder, config, tensors()), decoded


def _weights_child(folder: str) -> None:
    from moe_utils.analysis import static
    from moe_utils.analysis.context import open_study

    study = open_study(folder, None, weights_only=True)  # hashes the new checkpoint once
    evict(sorted(Path(folder).glob("*.safetensors")))  # so the weight pass reads the layer cold
    t0, c0 = time.perf_counter(), time.process_time()
    report = static.weight_report(study.weights_source, study.layers, study.dense_weights_source, reorder_max_pairs=0)
    seconds = time.perf_counter() - t0
    sim = report["similarity"]
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": time.process_time() - c0,
                "peak_rss": child_peak(),
                "similarity_rows": len(sim),
                "mean_matrix_similarity": float(sim.loc[sim["level"] == "matrix", "similarity"].mean()),
            }
        )
    )


def run(kind: str, base: Path, experts: int) -> dict:
    """Write one layer, measure the weight pass on it in a fresh process, delete it."""
    writer = write_fp8 if kind == "fp8" else write_mxfp4
    folder = Path(tempfile.mkdtemp(prefix=f"quantized-{kind}-", dir=base))
    try:
        t0 = time.perf_counter()
        files, decoded = writer(folder, experts)
        write_s = time.perf_counter() - t0
        stored = sum(f.stat().st_size for f in files)
        print(
            f"{kind}: {experts} experts written ({stored / 1e9:.2f} GB stored, {decoded / 1e9:.2f} GB decoded) in {write_s:.0f} s",
            flush=True,
        )
        child = measured([sys.executable, __file__, "--child", str(folder)], cwd=ROOT)
        weights = child.get("child", {})
        peak = int(weights.get("peak_rss", child["peak_rss"]))
        out = {
            "experts": experts,
            "stored_bytes": stored,
            "decoded_bytes": decoded,
            "weights": {**weights, "process_seconds": child["seconds"], "load_average": child["load_average"]},
            "peak_rss_over_stored": peak / stored,
            "peak_rss_over_decoded": peak / decoded,
        }
        print(
            f"{kind}: weight pass {weights.get('seconds', float('nan')):.1f} s, peak RSS {peak / 1e9:.2f} GB = "
            f"{peak / stored:.2f} x stored, {peak / decoded:.2f} x decoded",
            flush=True,
        )
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("fp8", "mxfp4"), default=None)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write the layers")
    parser.add_argument("--experts", type=int, default=None, help="experts per layer (default: the real models')")
    args = parser.parse_args()
    free = shutil.disk_usage(args.dir).free
    if free < DISK_BYTES:
        raise SystemExit(f"{args.dir} has {free / 1e9:.0f} GB free; the benchmark wants {DISK_BYTES / 1e9:.0f} GB")
    out: dict = {"machine": machine(), "memory_available_at_start": available_bytes()}
    kinds = [args.only] if args.only else ["fp8", "mxfp4"]
    for kind in kinds:
        experts = args.experts or (DEEPSEEK if kind == "fp8" else GPT_OSS_120B)["experts"]
        out[kind] = run(kind, args.dir, experts)
    print(json.dumps(out, indent=1))
    path = save_results("quantized_layer", out)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _weights_child(sys.argv[2])
    else:
        main()
