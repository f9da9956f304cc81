"""``moe-book zoo study``: train the study's replicates and write their results files.

    moe-book zoo study --list
    moe-book zoo study --run NAME [NAME ...] --out DIR [--threads 1] [--max-minutes M]
    moe-book zoo study --measure NAME --out DIR     # results only, from an existing training

Layout under ``DIR``::

    prepared/                    corpus, tokenizer, token streams (shared by every replicate)
    replicates/NAME/checkpoints/last.pt     resumable training state (model, optimizer, RNG)
    replicates/NAME/snapshots/step-NNNNN/   emergence snapshots (bf16, Hugging Face folders)
    replicates/NAME/model/                  the final model (bf16, like the shipped organisms)
    replicates/NAME/training_log.json
    replicates/NAME/results/*.json          results files (schema moe-book-results/1)

Training uses one torch thread by default so that a rerun on the same machine type gives the same
numbers; an interrupted run continues from its last checkpoint when started again.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from moe_utils.core.errors import EnvironmentMismatchError, ReplicateError
from moe_utils.core.paths import ZOO_MODELS_DIR, ZOO_STUDY_DIR
from moe_utils.zoo import configs, study_results, train
from moe_utils.zoo import replicates as R
from moe_utils.zoo.cards import finalize_model
from moe_utils.zoo.commands import STUDY_DESCRIPTION, add_study_arguments
from moe_utils.zoo.long_corpus import LONG_CORPUS_FILE, LONG_META_FILE, prepare_long
from moe_utils.zoo.replicates import Replicate, prepared_dir, replicate_dir, snapshot_dir
from moe_utils.zoo.tokenizer import load_zoo_tokenizer

EVAL_WINDOWS_DURING_TRAINING = 24


def is_trained(out: Path, name: str) -> bool:
    return (replicate_dir(out, name) / "model" / "model.safetensors").exists()


def _save_copy(model, folder: Path, tokenizer_dir: Path) -> None:
    """Save a bf16 copy of ``model`` (the live float32 model is left untouched)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(torch.bfloat16)
    if hasattr(m.config, "output_router_logits"):
        m.config.output_router_logits = False
    m.config.use_cache = True
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    m.save_pretrained(str(tmp))
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _initial_model(rep: Replicate, out: Path):
    if rep.kind != "upcycled":
        return rep.build()(rep.spec.seed)
    if rep.parent is None:
        raise ReplicateError(
            f"{rep.name}: an upcycled replicate needs a parent to start from; set its parent in zoo/replicates.py"
        )
    parent = R.get(rep.parent)
    ck = replicate_dir(out, parent.name) / "checkpoints" / "last.pt"
    if not ck.exists():
        raise FileNotFoundError(
            f"{rep.name} starts from {parent.name}, whose final checkpoint {ck} is missing; "
            f"run 'moe-book zoo study --run {parent.name} --out {out}' first"
        )
    dense = train.build_dense(parent.spec.seed)
    dense.load_state_dict(torch.load(ck, map_location="cpu", weights_only=True)["model"])
    return train.upcycle(dense, configs.moe_config(), rep.spec.seed)


def train_replicate(
    rep: Replicate, out: Path, *, max_seconds: float | None = None, progress: bool = True, log=print
) -> bool:
    """Train one replicate (resuming from its checkpoint); returns True when finished."""
    folder = replicate_dir(out, rep.name)
    if is_trained(out, rep.name):
        log(f"{rep.name}: already trained in {folder}")
        return True
    prepared = prepared_dir(out)
    if rep.ladder == "length":  # 4x the steps on a 4x stream: the corpus is seen as often as by the organisms
        stream = prepare_long(prepared, R.LADDER_LENGTH_FACTOR, load_zoo_tokenizer(prepared / "tokenizer"), log)
    else:
        stream = np.load(prepared / "train_ids.npy")
    windows = json.loads((prepared / "heldout_windows.json").read_text())
    eval_w = windows[:: max(1, len(windows) // EVAL_WINDOWS_DURING_TRAINING)][:EVAL_WINDOWS_DURING_TRAINING]
    model = _initial_model(rep, out)
    tok = prepared / "tokenizer"

    def snapshot(step: int, m) -> None:
        target = snapshot_dir(out, rep.name, step)
        if not (target / "model.safetensors").exists():
            _save_copy(m, target, tok)

    res = train.train_model(
        model,
        stream,
        rep.spec,
        eval_windows=eval_w,
        ckpt_path=folder / "checkpoints" / "last.pt",
        resume=True,
        max_seconds=max_seconds,
        desc=rep.name,
        progress=progress,
        snapshot_steps=rep.snapshots,
        on_snapshot=snapshot,
    )
    if not res["done"]:
        log(f"{rep.name}: stopped at the time limit after {res['elapsed']:.0f} s; run the same command to continue")
        return False
    _save_copy(model, folder / "model", tok)
    info = {
        "name": rep.name,
        "kind": rep.kind,
        "organism": rep.organism,
        "seed_index": rep.seed_index,
        "parent": rep.parent,
        "dense_layer": rep.dense_layer,
        "train_spec": rep.spec.as_dict(),
        "training_seconds": res["elapsed"],
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "snapshots": list(rep.snapshots),
        "log": res["log"],
    }
    (folder / "training_log.json").write_text(json.dumps(info, indent=1))
    log(f"{rep.name}: trained in {res['elapsed']:.0f} s")
    return True


def check_prepared(out: Path) -> None:
    """Refuse a prepared corpus whose tokenizer differs from the shipped organisms' one."""
    made = json.loads((prepared_dir(out) / "tokenizer" / "tokenizer.json").read_text())
    shipped = json.loads((ZOO_MODELS_DIR / "tiny-dense" / "tokenizer.json").read_text())
    if made != shipped:
        raise EnvironmentMismatchError(
            "the corpus built on this machine gives another tokenizer than the shipped organisms' "
            "(a different CPython version or build?); study results would not be comparable: run the study "
            "with the CPython version recorded in the shipped corpus.json"
        )


def ship_results(rep: Replicate, out: Path, log=print) -> Path:
    """Copy a replicate's results files into the package (``moe_utils/zoo/study/NAME``)."""
    import shutil

    src = replicate_dir(out, rep.name) / "results"
    dest = ZOO_STUDY_DIR / rep.name
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("study_*.json")):
        shutil.copy2(f, dest / f.name)
    manifest = prepared_dir(out) / LONG_META_FILE
    if rep.ladder == "length" and manifest.is_file():  # what the 4x runs' enlarged stream holds
        shutil.copy2(manifest, ZOO_STUDY_DIR / LONG_CORPUS_FILE)
    log(f"shipped the results of {rep.name} into {dest}")
    return dest


def install_weights(rep: Replicate, out: Path, command: str, log=print) -> Path:
    """Install a replicate's final weights as its shipped organism (card, evaluation, loss curve)."""
    import shutil

    if not rep.shipped_as:
        raise ReplicateError(f"{rep.name} does not ship as an organism; install only replicates with shipped_as set")
    prepared = prepared_dir(out)
    staged = prepared / "models" / rep.shipped_as
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(replicate_dir(out, rep.name) / "model", staged)
    info = json.loads((replicate_dir(out, rep.name) / "training_log.json").read_text())
    info.update(name=rep.shipped_as, command=command)
    (staged / "training_log.json").write_text(json.dumps(info, indent=1))
    finalize_model(prepared, rep.shipped_as)
    dest = ZOO_MODELS_DIR / rep.shipped_as
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(staged, dest)
    log(f"installed {rep.name} as {dest}")
    return dest


def list_rows() -> list[dict]:
    """One row per replicate with its recipe and, where a shipped training log exists, its cost."""
    rows = []
    for rep in R.REPLICATES.values():
        rows.append(
            {
                "name": rep.name,
                "kind": rep.kind,
                "seed": rep.spec.seed,
                "steps": rep.spec.steps,
                "tokens": rep.spec.tokens,
                "parent": rep.parent or "",
                "dense_layer": rep.dense_layer,
                "snapshots": len(rep.snapshots),
                "ships_as": rep.shipped_as or "",
            }
        )
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options of ``moe-book zoo study`` (defined in :mod:`moe_utils.zoo.commands`)."""
    p = argparse.ArgumentParser(prog="moe-book zoo study", description=STUDY_DESCRIPTION)
    return add_study_arguments(p).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m moe_utils.zoo.study``: :func:`run` on ``argv``."""
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``moe-book zoo study`` with its parsed options."""
    if args.list:
        print(study_results.list_table(list_rows()).to_string(index=False))
        return 0
    names = args.run or args.measure
    try:
        chains = [R.chain(n) for n in names]
    except KeyError as err:
        print(f"moe-book zoo study: {err.args[0]}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    if args.run:
        train.prepare(prepared_dir(out))
        check_prepared(out)
        for ch in chains:
            for rep in ch:
                left = None if deadline is None else max(1.0, deadline - time.time())
                if not train_replicate(rep, out, max_seconds=left, progress=not args.no_progress):
                    return 3
    if args.train_only:
        return 0
    for ch in chains:
        for rep in ch:
            if not is_trained(out, rep.name) and not rep.shipped_as:
                print(f"moe-book zoo study: {rep.name} is not trained in {out}; use --run", file=sys.stderr)
                return 2
            study_results.write_replicate_results(rep, out)
            if args.ship:
                ship_results(rep, out)
                if rep.shipped_as and is_trained(out, rep.name):
                    install_weights(rep, out, f"moe-book zoo study --run {rep.name} --out study-build --threads 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
