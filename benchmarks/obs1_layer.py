"""Observation 1 on one real-width MoE layer: the notebook's own code path, time and memory.

Writes a random one-layer checkpoint at Mixtral 8x7B width (8 experts, H 4096, I 14336, bf16,
2.82 GB; ``--width grok``: Grok-1's 8 x 32768 x 6144, 9.7 GB) under /tmp, then measures, each in
a fresh process:

1. a cold read of the layer's file (``cat`` after evicting it from the page cache);
2. ``static.weight_report`` exactly as the notebook calls it (``open_study(weights_only=True)``,
   no reordering), cold: wall time (after imports) and peak RSS, as ratios to the cold read and
   to the layer's bytes;
3. the notebook itself, ``moe-book run --notebooks obs1_neurons_as_experts -p dtype bfloat16
   -p reorder_max_pairs 0`` (kernel start-up, plots and results file included);
4. the reordering (``static.reordering``, what ``weight_report`` calls) of ``--reorder-pairs``
   pairs per matrix over ``--workers`` processes: seconds per pair, and the projection to a
   whole layer (28 expert pairs + 8 expert-vs-F pairs, 3 matrices) and to the paper's 8 layers.

Prints the figures and writes ``benchmarks/results/obs1_<width>.json``; deletes the checkpoint.

    python benchmarks/obs1_layer.py [--width mixtral|grok] [--reorder-pairs 1] [--workers N]
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
    RESULTS,
    ROOT,
    child_peak,
    cold_read,
    evict,
    machine,
    measured,
    save_results,
    write_expert_layer,
)

WIDTHS = {"mixtral": (8, 4096, 14336), "grok": (8, 6144, 32768)}
PAPER_REORDERED_LAYERS = 8  # the paper reorders 8 Mixtral layers (Table 2)


def _weights_child(folder: str) -> None:
    from moe_utils.analysis import static
    from moe_utils.analysis.context import open_study

    t0 = time.perf_counter()
    study = open_study(folder, None, weights_only=True)  # hashes a new local checkpoint once
    t1 = time.perf_counter()
    evict(sorted(Path(folder).glob("*.safetensors")))  # so the weight pass reads the layer cold
    t2 = time.perf_counter()
    c2 = time.process_time()
    report = static.weight_report(study.weights_source, study.layers, study.dense_weights_source, reorder_max_pairs=0)
    seconds = time.perf_counter() - t2
    explained = report["pca_neuron"].groupby("matrix")["explained"].first().to_dict()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": time.process_time() - c2,
                "open_seconds": t1 - t0,
                "peak_rss": child_peak(),
                "neuron_pca_explained": explained,
            }
        )
    )


def _reorder_child(folder: str, pairs: int, workers: int | None) -> None:
    from scipy.optimize import linear_sum_assignment

    from moe_utils.analysis import static
    from moe_utils.analysis.context import open_study
    from moe_utils.analysis.parallel import default_workers
    from moe_utils.metrics.neurons import _all_rows, _cosine_cost, _unit
    from moe_utils.models.weights import layer_weights

    study = open_study(folder, None, weights_only=True)
    # one pair by its parts, in this process (all cores): the cosine matrix, then the assignment
    w = layer_weights(study.weights_source, 0, dtype=None)
    a, b = _unit(_all_rows(w.w_up[0], 0)), _unit(_all_rows(w.w_up[1], 0))
    t0 = time.perf_counter()
    cost = _cosine_cost(a, b, negate=True)
    t_cos = time.perf_counter() - t0
    linear_sum_assignment(cost)
    t_lsa = time.perf_counter() - t0 - t_cos
    del w, a, b, cost
    facts = study.lm.facts
    shape = (int(facts.expert_intermediate_size or 0), facts.hidden_size)
    n_workers = workers or default_workers(8 * shape[0] ** 2 + 16 * shape[0] * shape[1])
    t0 = time.perf_counter()
    rows = static.reordering(study.weights_source, study.layers, max_pairs=pairs, seed=0, workers=n_workers)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "pairs": len(rows),
                "workers": n_workers,
                "peak_rss": child_peak(),
                "mean_tau": float(rows.tau.mean()),
                "single_pair": {"cosine_s": t_cos, "assignment_s": t_lsa},
            }
        )
    )


def _keep_earlier(out: dict, name: str) -> None:
    """Parts this run skipped keep the earlier results file's measurement, marked with its machine
    and date (``earlier_runs``); the earlier weight pass is kept as ``weights_before``."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    when = old.get("machine", {})
    for key in ("notebook", "reordering"):
        if key not in out and key in old:
            out[key] = {**old[key], "measured": old[key].get("measured", when)}
    if "weights" in old and "weights" in out:
        out["weights_before"] = old.get("weights_before", {**old["weights"], "measured": when})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", choices=sorted(WIDTHS), default="mixtral")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: /tmp)")
    parser.add_argument("--reorder-pairs", type=int, default=1, help="pairs per matrix to time (0: skip)")
    parser.add_argument("--workers", type=int, default=None, help="reordering processes (default: the cores)")
    parser.add_argument("--skip-notebook", action="store_true", help="do not run the notebook end to end")
    parser.add_argument(
        "--write-only",
        type=Path,
        default=None,
        help="only write the checkpoint into this folder (a later run can --reuse it)",
    )
    parser.add_argument(
        "--reuse", type=Path, default=None, help="measure a checkpoint written by --write-only (deleted afterwards)"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, *rest = args.child
        if kind == "weights":
            _weights_child(folder)
        else:
            _reorder_child(folder, int(rest[0]), None if rest[1] == "None" else int(rest[1]))
        return

    E, H, I = WIDTHS[args.width]
    layer_bytes = 3 * E * H * I * 2
    if args.write_only is not None:
        t0 = time.perf_counter()
        write_expert_layer(args.write_only / f"synthetic-{args.width}-layer", E, H, I)
        print(f"wrote {args.write_only} in {time.perf_counter() - t0:.0f} s")
        return
    base = args.reuse or Path(tempfile.mkdtemp(prefix=f"moe-obs1-{args.width}-", dir=args.dir))
    folder = base / f"synthetic-{args.width}-layer"
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    me = [sys.executable, str(Path(__file__).resolve())]
    out = {
        "machine": machine(),
        "width": args.width,
        "experts": E,
        "hidden": H,
        "intermediate": I,
        "layer_bytes": layer_bytes,
    }
    try:
        t0 = time.perf_counter()
        files = [folder / "model.safetensors"] if args.reuse else write_expert_layer(folder, E, H, I)
        print(
            f"{'reused' if args.reuse else 'wrote'} one {args.width}-width layer ({layer_bytes / 1e9:.2f} GB of experts) in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        out["cold_read_s"] = cold_read(files)
        print(f"cold read: {out['cold_read_s']:.2f} s ({layer_bytes / out['cold_read_s'] / 1e9:.2f} GB/s)", flush=True)

        evict(files)
        w = measured(me + ["--child", "weights", str(folder)], env=env)
        out["weights"] = {
            "seconds": w["child"]["seconds"],
            "open_seconds": w["child"]["open_seconds"],
            "process_seconds": w["seconds"],
            "cpu_seconds": w["child"]["cpu_seconds"],
            "load_average": w.get("load_average"),
            "peak_rss": w["peak_rss"],
            "neuron_pca_explained": w["child"]["neuron_pca_explained"],
        }
        cores = out["machine"]["cores"] or 1
        cpu = w["child"]["cpu_seconds"]
        print(
            f"opening the checkpoint (content hash of a new local folder, once): {w['child']['open_seconds']:.1f} s",
            flush=True,
        )
        print(
            f"weight_report without reordering (cold): {w['child']['seconds']:.1f} s = "
            f"{w['child']['seconds'] / out['cold_read_s']:.1f}x the cold read; {cpu:.1f} CPU s "
            f"/ {cores} cores = {cpu / cores / out['cold_read_s']:.1f}x the cold read (load "
            f"{w.get('load_average', 0):.1f}); peak RSS "
            f"{w['peak_rss'] / 1e9:.2f} GB = {w['peak_rss'] / layer_bytes:.2f}x the layer",
            flush=True,
        )

        if not args.skip_notebook:
            evict(files)
            cmd = [
                sys.executable,
                "-m",
                "moe_utils.publish.cli",
                "run",
                "--model",
                str(folder),
                "--notebooks",
                "obs1_neurons_as_experts",
                "--out",
                str(base / "runs"),
                "-p",
                "dtype",
                "bfloat16",
                "-p",
                "reorder_max_pairs",
                "0",
            ]
            nb = measured(cmd, env=env, cwd=ROOT)
            out["notebook"] = {
                "seconds": nb["seconds"],
                "cpu_seconds": nb.get("cpu_seconds"),
                "load_average": nb.get("load_average"),
                "peak_rss": nb["peak_rss"],
            }
            print(
                f"moe-book run obs1 (cold, reorder_max_pairs 0): {nb['seconds']:.1f} s = "
                f"{nb['seconds'] / out['cold_read_s']:.1f}x the cold read; peak RSS "
                f"{nb['peak_rss'] / 1e9:.2f} GB = {nb['peak_rss'] / layer_bytes:.2f}x the layer",
                flush=True,
            )

        if args.reorder_pairs > 0:
            r = measured(me + ["--child", "reorder", str(folder), str(args.reorder_pairs), str(args.workers)], env=env)
            pairs = r["child"]["pairs"]
            per_pair = r["child"]["seconds"] / pairs
            per_layer = per_pair * 3 * (E * (E - 1) // 2 + E)
            out["reordering"] = {
                "pairs": pairs,
                "workers": r["child"]["workers"],
                "seconds": r["child"]["seconds"],
                "single_pair": r["child"]["single_pair"],
                "load_average": r.get("load_average"),
                "seconds_per_pair": per_pair,
                "peak_rss": r["peak_rss"],
                "projected_seconds_per_layer": per_layer,
                "projected_hours_paper_layers": per_layer * PAPER_REORDERED_LAYERS / 3600,
            }
            sp = r["child"]["single_pair"]
            print(
                f"one pair alone: cosine matrix {sp['cosine_s']:.1f} s (float32, blocked), assignment "
                f"{sp['assignment_s']:.1f} s",
                flush=True,
            )
            print(
                f"reordering: {pairs} pairs in {r['child']['seconds']:.0f} s = {per_pair:.1f} s per pair "
                f"({r['child']['workers']} workers); a layer (108 pairs with F) ~ {per_layer / 60:.0f} min; "
                f"the paper's {PAPER_REORDERED_LAYERS} layers ~ {per_layer * PAPER_REORDERED_LAYERS / 3600:.1f} h; "
                f"peak RSS of the largest process {r['peak_rss'] / 1e9:.2f} GB",
                flush=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    _keep_earlier(out, f"obs1_{args.width}")
    path = save_results(f"obs1_{args.width}", out)
    print(f"deleted the checkpoint; wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
