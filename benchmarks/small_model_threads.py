"""Held-out loss of a shipped organism with one thread against the machine's default, in one run.

The book's organisms are 128 wide: their matrix products are too small for several threads to
share. This times ``interventions.window_nll`` (the interventions page's inner loop) on
``zoo:tiny-moe-scratch`` with the package's rule (one thread below ``SMALL_MODEL_WIDTH``) and with
torch's default thread count, alternating ``--repeats`` times, checks that both give the same
losses, prints the ratio and the load average, and writes ``benchmarks/results/small_model_threads.json``.
The ratio depends on what else runs on the machine: run it once idle and once beside other work.

    python benchmarks/small_model_threads.py [--windows 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import machine, save_results

import moe_utils.core.cpus as cpus
from moe_utils.analysis.interventions import window_nll
from moe_utils.models.loading import load_model
from moe_utils.zoo import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    info = machine()
    windows = evaluate.load_windows(max_windows=args.windows)
    model = load_model("zoo:tiny-moe-scratch").built()
    rule = cpus.SMALL_MODEL_WIDTH
    seconds: dict[str, list[float]] = {"one thread": [], "default threads": []}
    sums: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for label, width in (("one thread", rule), ("default threads", 0)):
            cpus.SMALL_MODEL_WIDTH = width
            t = time.perf_counter()
            sums[label], _ = window_nll(model, windows)
            seconds[label].append(time.perf_counter() - t)
    cpus.SMALL_MODEL_WIDTH = rule
    diff = float(np.max(np.abs(sums["one thread"] - sums["default threads"])))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    ratio = med["default threads"] / med["one thread"]
    print(
        f"window_nll on {len(windows)} windows, zoo:tiny-moe-scratch: one thread {med['one thread']:.2f} s, "
        f"default ({torch.get_num_threads()} threads) {med['default threads']:.2f} s (median of {args.repeats}): "
        f"default / one = {ratio:.2f}; largest NLL difference {diff:.1e} nats; load average {os.getloadavg()[0]:.1f}"
    )
    path = save_results(
        "small_model_threads",
        {
            "machine": info,
            "windows": len(windows),
            "default_threads": torch.get_num_threads(),
            "seconds": seconds,
            "median_seconds": med,
            "default_over_one": ratio,
            "max_nll_difference": diff,
            "load_average_at_end": os.getloadavg()[0],
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
