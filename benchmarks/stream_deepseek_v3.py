"""Observation 2 through the layer stream on a two-layer DeepSeek-V3-width model stored in FP8.

Writes a random DeepSeek-V3 model at full width (256 routed experts of 7168 x 2048, one shared
expert, top-8 of 8 groups, MLA attention with 128 heads; the zoo tokenizer and its vocabulary)
with ``--layers`` MoE decoder layers (default 2), its routed and shared experts in the hub's
fine-grained FP8 layout (float8_e4m3fn weights with ``weight_scale_inv`` per 128 x 128 block,
``quantization_config: fp8``; about 11.3 GB a layer against 22.5 GB decoded to bf16, more than
this machine can hold beside anything else), everything else bf16. Layer 0's expert bytes are
random; layer 1 is a byte copy under its own names. Then, in a fresh process after dropping the
files from the page cache, runs observation 2 with ``open_study(..., stream=True,
dtype="bfloat16")`` on the short prompt: the stream reads each layer's router, shared expert and
attention, and computes its block expert by expert (the block too large to decode whole): each
routed expert is read and decoded once per layer, in one sweep that gives the block's output and
every expert's outputs on the captured inputs. Measures wall time, peak RSS, the seconds spent
reading each layer's other tensors and sweeping its experts; compares the peak with the layer's
stored bytes. Prints the ratios, writes ``benchmarks/results/stream_deepseek_v3.json`` and
deletes the model.

    nice -n 5 python benchmarks/stream_deepseek_v3.py [--layers 2] [--dir /tmp]
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
    copy_layer,
    evict,
    machine,
    measured,
    save_results,
    write_safetensors,
)

E, H, I, TOP_K, HEADS = 256, 7168, 2048, 8, 128
BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}


def config(layers: int, vocab: int) -> dict:
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=H,
        intermediate_size=18432,
        moe_intermediate_size=I,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        n_routed_experts=E,
        num_experts_per_tok=TOP_K,
        n_shared_experts=1,
        first_k_dense_replace=0,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        tie_word_embeddings=False,
    ).to_dict()
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = FP8_CONFIG
    return cfg


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The checkpoint's tensors: the model's own (built empty), routed experts one tensor per expert
    (hub names), routed and shared expert weights in FP8 with their block scales."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    plain = {k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype")}
    with torch.device("meta"):  # parameters never allocated (a fused expert tensor exceeds memory)
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**plain))

    def fp8(name: str, shape: tuple[int, int]) -> list:
        grid = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
        return [(name, shape, torch.float8_e4m3fn), (name + "_scale_inv", grid, torch.float32)]

    specs = []
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name.removesuffix("gate_up_proj")
            for e in range(t.shape[0]):
                specs += fp8(f"{p}{e}.gate_proj.weight", (I, H)) + fp8(f"{p}{e}.up_proj.weight", (I, H))
                specs += fp8(f"{p}{e}.down_proj.weight", (H, I))
        elif name.endswith("mlp.experts.down_proj"):
            continue
        elif ".shared_experts." in name:
            specs += fp8(name, tuple(t.shape))
        else:
            dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            specs.append((name, tuple(t.shape), dtype))
    return specs


def _fill(name: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor | None:
    if dtype == torch.float8_e4m3fn:  # random codes, NaN (0x7f, 0xff) left out
        t = torch.randint(0, 127, shape, generator=g, dtype=torch.uint8)
        t |= torch.randint(0, 2, shape, generator=g, dtype=torch.uint8) << 7
        return t
    if name.endswith("_scale_inv"):
        return torch.full(shape, 2e-4, dtype=torch.float32)
    return None


def write_tensors(path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
    write_safetensors(path, specs, seed=0, fill=_fill)


def write_model(folder: Path, layers: int) -> tuple[list[Path], int]:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((ZOO_TOKENIZER / "config.json").read_text())["vocab_size"]
    cfg = config(layers, vocab)
    specs = tensor_specs(cfg)
    outer = [s for s in specs if not s[0].startswith("model.layers.")]
    first = [s for s in specs if s[0].startswith("model.layers.0.")]
    files = [folder / "outer.safetensors", folder / "layer-000.safetensors"]
    write_tensors(files[0], outer)
    write_tensors(files[1], first)
    weight_map = {name: files[0].name for name, _, _ in outer}
    weight_map.update({name: files[1].name for name, _, _ in first})
    for layer in range(1, layers):
        path = folder / f"layer-{layer:03d}.safetensors"
        copy_layer(files[1], path, layer)
        files.append(path)
        weight_map.update({n.replace("model.layers.0.", f"model.layers.{layer}."): path.name for n, _, _ in first})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ZOO_TOKENIZER / name, folder / name)
    return files, files[1].stat().st_size


def child(folder: str) -> None:
    import moe_utils.models.stream as stream
    from moe_utils.analysis import obs2_norms
    from moe_utils.analysis.context import open_study
    from moe_utils.models.layer_load import ExpertSweep

    reads: list[float] = []
    sweeps: list[float] = []
    fill, sweep = stream.fill_layer, ExpertSweep.sweep

    def timed_fill(*args, **kwargs):
        t = time.perf_counter()
        out = fill(*args, **kwargs)
        reads.append(time.perf_counter() - t)
        return out

    def timed_sweep(self, inputs):
        t = time.perf_counter()
        out = sweep(self, inputs)
        sweeps.append(time.perf_counter() - t)
        return out

    stream.fill_layer = timed_fill
    ExpertSweep.sweep = timed_sweep
    t0 = time.perf_counter()
    study = open_study(folder, None, dtype="bfloat16", stream=True, results_dir=Path(folder) / "results")
    r = obs2_norms.norms_report(study, inputs="short")
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "read_seconds": reads,
                "sweep_seconds": sweeps,
                "tokens": int(r.short_trace.num_tokens),
                "peak_rss": child_peak(),
                "max_rel_error": r.max_rel_error,
                "top1_agreement": float(r.pooled.share),
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
    base = Path(tempfile.mkdtemp(prefix="moe-dsv3-", dir=args.dir))
    folder = base / f"synthetic-deepseek-v3-width-{args.layers}layers"
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out: dict = {"machine": machine(), "experts": E, "hidden": H, "intermediate": I, "layers": args.layers}
    try:
        t0 = time.perf_counter()
        files, layer_bytes = write_model(folder, args.layers)
        decoded = 2 * E * 3 * H * I
        out.update(
            stored_layer_bytes=layer_bytes,
            decoded_routed_expert_bytes=decoded,
            weight_bytes=sum(f.stat().st_size for f in files),
            write_seconds=time.perf_counter() - t0,
        )
        print(
            f"wrote {args.layers} DeepSeek-V3-width FP8 layers ({layer_bytes / 1e9:.2f} GB stored a layer, "
            f"{decoded / 1e9:.1f} GB of routed experts decoded) in {out['write_seconds']:.0f} s",
            flush=True,
        )
        out["cold_read_seconds"] = cold_read(files)
        evict(files)
        r = measured([sys.executable, __file__, "--child", str(folder)], env=env, cwd=ROOT)
        c = r["child"]
        reads, sweeps = sum(c["read_seconds"]), sum(c["sweep_seconds"])
        out["obs2_router_norms"] = {
            "seconds": r["seconds"],
            "cpu_seconds": r.get("cpu_seconds"),
            "load_average": r.get("load_average"),
            "peak_rss": r["peak_rss"],
            "read_seconds_per_layer": c["read_seconds"],
            "sweep_seconds_per_layer": c["sweep_seconds"],
            "rest_seconds_per_layer": (c["seconds"] - reads - sweeps) / args.layers,
            "tokens": c["tokens"],
            "max_rel_error": c["max_rel_error"],
            "peak_over_stored_layer": r["peak_rss"] / layer_bytes,
            "peak_over_decoded_experts": r["peak_rss"] / decoded,
        }
        o = out["obs2_router_norms"]
        print(
            f"obs2_router_norms streamed expert by expert: {r['seconds']:.0f} s wall "
            f"(sweeps {', '.join(f'{x:.0f}' for x in c['sweep_seconds'])} s); peak RSS "
            f"{r['peak_rss'] / 1e9:.2f} GB = {o['peak_over_stored_layer']:.2f}x one stored layer "
            f"({o['peak_over_decoded_experts']:.2f}x its routed experts decoded); block rebuilt to {c['max_rel_error']:.1e}",
            flush=True,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    path = save_results("stream_deepseek_v3", out)
    print(f"deleted the model; wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
