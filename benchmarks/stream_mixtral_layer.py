"""Stream Mixtral-8x7B-sized MoE layers from disk through matrix-level expert similarity.

Writes a synthetic checkpoint with Mixtral 8x7B's real layer width (H=4096, I=14336, 8 experts,
bf16, original per-expert tensor names, one shard per layer + index; 2 layers = ~5.6 GB), then
computes the cosine similarity of the flattened W_act / W_up / W_down matrices of all expert
pairs in each layer with ``moe_utils.expert_gram.expert_grams`` (Gram-matrix accumulation over
row chunks of the memory-mapped tensors). It reports

* wall time of the similarity pass vs. the time ``cat`` needs to read the same files, both with
  the files evicted from the page cache (``posix_fadvise(DONTNEED)`` after ``fsync``; "cold") and
  right after reading them once ("warm");
* peak resident memory (``ru_maxrss`` of the worker process, which includes mapped file pages
  it touched) vs. the bytes of one layer's experts.

The similarity pass runs in a child process so its peak RSS is not mixed with the writer's.
The checkpoint is deleted at the end unless ``--keep``.

    python benchmarks/stream_mixtral_layer.py [--dir /tmp/moe_stream_bench] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

E, H, I = 8, 4096, 14336


# ---- writing a big safetensors file without holding it in memory --------------------------------
def _write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """Write bf16 tensors one at a time (header first, then each tensor's bytes)."""
    header, offset = {}, 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in specs:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            f.write(t.view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(folder: Path, layers: int, H: int = H, I: int = I) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, files = {}, []
    for n in range(layers):
        p = f"model.layers.{n}.block_sparse_moe."
        specs = [(p + "gate.weight", (E, H))]
        for e in range(E):
            specs += [(p + f"experts.{e}.w1.weight", (I, H)), (p + f"experts.{e}.w2.weight", (H, I)),
                      (p + f"experts.{e}.w3.weight", (I, H))]
        fname = f"model-{n + 1:05d}-of-{layers:05d}.safetensors"
        _write_safetensors(folder / fname, specs, seed=n)
        weight_map.update({name: fname for name, _ in specs})
        files.append(folder / fname)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": H,
              "intermediate_size": I, "num_hidden_layers": layers, "num_local_experts": E,
              "num_experts_per_tok": 2, "hidden_act": "silu", "torch_dtype": "bfloat16",
              "max_position_embeddings": 32768, "vocab_size": 32000}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return files


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (works without root for clean pages)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_cat(files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


# ---- the measured work (runs in a child process) ------------------------------------------------
def worker(folder: Path, chunk_mb: float) -> None:
    from moe_utils.arch import spec_for_config
    from moe_utils.arch.config import read_config_json
    from moe_utils.expert_gram import cosine_from_gram, expert_grams

    cfg = read_config_json(folder)
    layers = spec_for_config(cfg).moe_layers(cfg)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    sims = {}
    for layer in layers:
        grams = expert_grams(folder, layer, chunk_mb=chunk_mb)
        sims[layer] = {m: cosine_from_gram(g) for m, g in grams.items()}
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    off = [float(s["up"][~torch.eye(E, dtype=torch.bool)].abs().max()) for s in sims.values()]
    print(json.dumps({"seconds": elapsed, "peak_rss": peak, "rss_after_imports": rss_start,
                      "max_offdiag_cos_up": max(off)}))


def run_worker(folder: Path, chunk_mb: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", "--dir", str(folder),
                          "--chunk-mb", str(chunk_mb)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe_stream_bench"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk-mb", type=float, default=128.0)
    parser.add_argument("--hidden", type=int, default=H, help="H (default: Mixtral 8x7B's 4096)")
    parser.add_argument("--inter", type=int, default=I, help="I (default: Mixtral 8x7B's 14336)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.dir, args.chunk_mb)
        return

    layer_bytes = 3 * E * args.hidden * args.inter * 2
    t0 = time.perf_counter()
    files = write_checkpoint(args.dir, args.layers, args.hidden, args.inter)
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {total / 1e9:.2f} GB ({args.layers} layers, {E} experts, H={args.hidden}, "
          f"I={args.inter}, bf16) "
          f"in {time.perf_counter() - t0:.0f} s to {args.dir}")
    try:
        evict(files)
        cat_cold = time_cat(files)
        cat_warm = time_cat(files)
        evict(files)
        cold = run_worker(args.dir, args.chunk_mb)
        warm = run_worker(args.dir, args.chunk_mb)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(f"one layer's expert bytes: {layer_bytes / 1e9:.2f} GB; chunk budget {args.chunk_mb:.0f} MB")
    print(f"read (cat > /dev/null): cold {cat_cold:.1f} s ({total / cat_cold / 1e9:.2f} GB/s), "
          f"warm {cat_warm:.1f} s ({total / cat_warm / 1e9:.2f} GB/s)")
    for label, res, ref in (("cold", cold, cat_cold), ("warm", warm, cat_warm)):
        print(f"similarity pass, {label}: {res['seconds']:.1f} s = {res['seconds'] / ref:.2f}x the "
              f"{label} read; peak RSS {res['peak_rss'] / 1e9:.2f} GB = "
              f"{res['peak_rss'] / layer_bytes:.2f}x one layer "
              f"(RSS after imports {res['rss_after_imports'] / 1e9:.2f} GB)")
    print(f"sanity: max |off-diagonal cosine| of W_up (random weights, expect ~0): "
          f"{cold['max_offdiag_cos_up']:.2e}")
    print("deleted the checkpoint" if not args.keep else f"kept {args.dir}")


if __name__ == "__main__":
    main()
