"""Shared pieces of the benchmarks: synthetic real-width checkpoints, cold reads, measured runs.

Checkpoints are written tensor by tensor (random bf16 values, never the whole model in memory),
with the original Mixtral tensor names, under /tmp; the benchmarks delete them afterwards.
Every measured piece of work runs in its own child process so its peak resident memory
(``ru_maxrss`` of that process and its descendants, notebook kernels and workers included) is
not mixed with the writer's or with another measurement's.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ZOO_TOKENIZER = ROOT / "moe_utils" / "zoo" / "models" / "tiny-moe-upcycled"


ST_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}
# A tensor's values from its name, shape, dtype and the file's generator; None: the default fill.
Fill = Callable[[str, tuple[int, ...], torch.dtype, torch.Generator], "torch.Tensor | None"]


def write_safetensors(
    path: Path, specs: Sequence[tuple], seed: int, std: float = 0.02, fill: Fill | None = None
) -> None:
    """Write tensors one at a time (header first, then each tensor's bytes), then fsync.

    ``specs`` are ``(name, shape)`` (bf16) or ``(name, shape, dtype)``; norms are ones, other
    tensors normal with ``std``, unless ``fill`` gives the values (quantized codes, scales)."""
    typed = [(s[0], tuple(s[1]), s[2] if len(s) > 2 else torch.bfloat16) for s in specs]
    header, offset = {}, 0
    for name, shape, dtype in typed:
        nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype in typed:
            t = fill(name, shape, dtype, g) if fill is not None else None
            if t is None:
                t = (
                    torch.ones(shape, dtype=dtype)
                    if name.endswith("norm.weight")
                    else (torch.randn(shape, generator=g) * std).to(dtype)
                )
            f.write(t.view(torch.uint8).numpy().tobytes())
            del t
        f.flush()
        os.fsync(f.fileno())


def copy_layer(src: Path, dst: Path, layer: int) -> None:
    """``src`` (layer 0's shard) with its tensors renamed to ``layer``: a new header, the same bytes."""
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        renamed = {k.replace("model.layers.0.", f"model.layers.{layer}."): v for k, v in header.items()}
        raw = json.dumps(renamed, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(dst, "wb") as g:
            g.write(len(raw).to_bytes(8, "little"))
            g.write(raw)
            shutil.copyfileobj(f, g, 64 << 20)
            g.flush()
            os.fsync(g.fileno())
    evict([dst])


def expert_specs(layer: int, E: int, H: int, I: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{layer}.block_sparse_moe."
    specs = [(p + "gate.weight", (E, H))]
    for e in range(E):
        specs += [
            (p + f"experts.{e}.w1.weight", (I, H)),
            (p + f"experts.{e}.w2.weight", (H, I)),
            (p + f"experts.{e}.w3.weight", (I, H)),
        ]
    return specs


def mixtral_config(
    E: int,
    H: int,
    I: int,
    layers: int,
    vocab: int = 32000,
    heads: int = 32,
    kv_heads: int = 8,
    max_positions: int = 4096,
) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": layers,
        "num_local_experts": E,
        "num_experts_per_tok": 2,
        "hidden_act": "silu",
        "dtype": "bfloat16",
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": max_positions,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "sliding_window": None,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    }


def write_expert_layer(folder: Path, E: int, H: int, I: int) -> list[Path]:
    """A one-layer checkpoint holding only an MoE layer's router and experts (weight analyses)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    write_safetensors(path, expert_specs(0, E, H, I), seed=0)
    (folder / "config.json").write_text(json.dumps(mixtral_config(E, H, I, 1), indent=1))
    return [path]


def write_full_model(folder: Path, E: int, H: int, I: int, heads: int = 32, kv_heads: int = 8) -> list[Path]:
    """A whole one-layer Mixtral (embeddings, attention, experts, head) with the zoo tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((ZOO_TOKENIZER / "config.json").read_text())["vocab_size"]
    hd = H // heads
    p = "model.layers.0."
    specs = [
        ("model.embed_tokens.weight", (vocab, H)),
        (p + "input_layernorm.weight", (H,)),
        (p + "post_attention_layernorm.weight", (H,)),
        (p + "self_attn.q_proj.weight", (heads * hd, H)),
        (p + "self_attn.k_proj.weight", (kv_heads * hd, H)),
        (p + "self_attn.v_proj.weight", (kv_heads * hd, H)),
        (p + "self_attn.o_proj.weight", (H, heads * hd)),
        *expert_specs(0, E, H, I),
        ("model.norm.weight", (H,)),
        ("lm_head.weight", (vocab, H)),
    ]
    path = folder / "model.safetensors"
    write_safetensors(path, specs, seed=1)
    cfg = mixtral_config(E, H, I, 1, vocab=vocab, heads=heads, kv_heads=kv_heads)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ZOO_TOKENIZER / name, folder / name)
    return [path]


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (works without root for clean pages)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read(files: list[Path]) -> float:
    """Seconds ``cat`` needs to read the files after evicting them from the page cache."""
    evict(files)
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` in a fresh child (its stderr passes through: progress bars) and return its
    wall seconds, CPU seconds (with passive OpenMP waits), the peak RSS of it and its descendants, the load average at its
    end (other work on the machine slows the wall time), and its last stdout line parsed as JSON
    when it is JSON."""
    probe = [sys.executable, __file__, "--run", json.dumps(cmd)]
    # idle OpenMP threads sleep instead of spinning, so the CPU seconds count work even when
    # other processes share the cores (a spinning thread's CPU time is whatever share it got)
    out = subprocess.run(
        probe,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        cwd=cwd,
        env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_and_report(cmd: list[str]) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak, cpu = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"{cmd[:4]} failed with exit code {proc.returncode}")
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        payload = json.loads(last)
    except json.JSONDecodeError:
        payload = {}
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_rss": peak,
                "child": payload,
                "load_average": os.getloadavg()[0],
            }
        )
    )


def child_peak() -> int:
    """This process's own peak RSS in bytes (for code running inside a measured child)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict:
    """What the figures were measured on."""
    mem = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def save_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    return path


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--run":
    _run_and_report(json.loads(sys.argv[2]))
