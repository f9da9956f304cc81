"""Observations 2 and 3 on a whole one-layer model at Mixtral 8x7B width, on the CPU, in bf16.

Writes a random one-layer Mixtral (8 experts, H 4096, I 14336, 32 heads / 8 KV heads, the zoo
tokenizer and its vocabulary; about 3 GB of bf16 weights) under /tmp and runs each dynamic
notebook on it with ``moe-book run ... -p dtype bfloat16`` on the long input (about 1,100
tokens), each in a fresh process: wall time and the peak RSS of the kernel (ratio to the model's
weight bytes). Prints the figures, writes ``benchmarks/results/dynamic_mixtral.json`` and
deletes the model.

    python benchmarks/dynamic_model.py [--notebooks obs2_router_norms obs3_depth_diversity]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import ROOT, machine, measured, save_results, write_full_model

E, H, I = 8, 4096, 14336


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", nargs="+", default=["obs2_router_norms", "obs3_depth_diversity"])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the model (default: /tmp)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="moe-dynamic-", dir=args.dir))
    folder = base / "synthetic-mixtral-1layer"
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = {"machine": machine(), "experts": E, "hidden": H, "intermediate": I, "notebooks": {}}
    try:
        t0 = time.perf_counter()
        files = write_full_model(folder, E, H, I)
        weight_bytes = sum(f.stat().st_size for f in files)
        out["weight_bytes"] = weight_bytes
        print(
            f"wrote a one-layer Mixtral-width model ({weight_bytes / 1e9:.2f} GB bf16) in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        for name in args.notebooks:
            cmd = [
                sys.executable,
                "-m",
                "moe_utils.publish.cli",
                "run",
                "--model",
                str(folder),
                "--notebooks",
                name,
                "--out",
                str(base / "runs"),
                "-p",
                "dtype",
                "bfloat16",
            ]
            r = measured(cmd, env=env, cwd=ROOT)
            out["notebooks"][name] = {
                "seconds": r["seconds"],
                "cpu_seconds": r.get("cpu_seconds"),
                "load_average": r.get("load_average"),
                "peak_rss": r["peak_rss"],
                "peak_rss_over_weights": r["peak_rss"] / weight_bytes,
            }
            print(
                f"{name}: {r['seconds']:.0f} s wall, {r.get('cpu_seconds', 0):.0f} s CPU (load "
                f"{r.get('load_average', 0):.1f}); peak RSS {r['peak_rss'] / 1e9:.2f} GB = "
                f"{r['peak_rss'] / weight_bytes:.2f}x the weights",
                flush=True,
            )
            save_results("dynamic_mixtral", out)  # after each notebook, in case a later one is stopped
    finally:
        shutil.rmtree(base, ignore_errors=True)
    path = save_results("dynamic_mixtral", out)
    print(f"deleted the model; wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
