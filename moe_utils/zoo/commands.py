"""The options of ``moe-book zoo train`` and ``moe-book zoo study``, defined once and without torch.

``moe-book`` builds its one parser tree from these (so ``--help`` works at every level without
loading the trainer), and ``python -m moe_utils.zoo.train`` / ``moe_utils.zoo.study.main`` parse
with the same definitions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MODEL_ORDER = ("tiny-dense", "tiny-moe-upcycled", "tiny-moe-scratch")
"""The organisms ``moe-book zoo train`` trains, in training order (the upcycled one needs the dense one)."""

TRAIN_DESCRIPTION = (
    "Rebuild the model organisms: corpus -> tokenizer -> tiny-dense -> tiny-moe-upcycled, tiny-moe-scratch."
)
STUDY_DESCRIPTION = "``moe-book zoo study``: train the study's replicates and write their results files."


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``moe-book zoo train``, added to ``p``; returns ``p``."""
    p.add_argument("--models", nargs="+", default=list(MODEL_ORDER), choices=MODEL_ORDER)
    p.add_argument("--out", type=Path, default=Path("zoo-build"))
    p.add_argument("--force", action="store_true", help="retrain finished models / replace shipped ones")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--install", action="store_true", help="copy the results into the package")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--finalize-only", action="store_true", help="only (re)write cards and pictures")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_study_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``moe-book zoo study``, added to ``p``; returns ``p``."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--list", action="store_true", help="list every replicate with its training cost")
    g.add_argument("--run", nargs="+", metavar="NAME", help="train these replicates and write their results")
    g.add_argument("--measure", nargs="+", metavar="NAME", help="write results of already trained replicates")
    p.add_argument("--out", type=Path, default=Path("study-build"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 reproduces the shipped numbers)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--train-only", action="store_true", help="train, but write no results yet")
    p.add_argument(
        "--ship", action="store_true", help="copy the results into the package (and install shipped organisms' weights)"
    )
    return p
