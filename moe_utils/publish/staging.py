"""Transactional runs: a notebook and the results files it writes land together, or not at all.

A run writes into a hidden staging folder beside its final folder (``.staging-<name>-<pid>-<random>``).
On success a journal of the moves (:data:`LANDING`) is committed, then each file is renamed into
place; a crash before the commit leaves the previous files, after it the next ``moe-book run`` or
``build`` finishes the moves. A failed run's partial notebook is kept as ``<name>.failed.ipynb``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from moe_utils.core.files import atomic_write_text
from moe_utils.publish.pages import METADATA_KEY
from moe_utils.publish.plan import RESULTS_FOLDER, Job, relative_to
from moe_utils.publish.tidy import (
    final_parameters,
    name_model_in_heading,
    reader_label,
    relative_paths_in_metadata,
    tidy_parameters,
    unstage_outputs,
)

STAGING_PREFIX = ".staging-"


FAILED_SUFFIX = ".failed.ipynb"


def failed_path(output: Path) -> Path:
    """Where the notebook of a failed run of ``output`` is kept: ``<name>.failed.ipynb``."""
    return output.with_name(output.stem + FAILED_SUFFIX)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stage_pid(folder: Path) -> int | None:
    """The process id in a staging folder's name (``.staging-<name>-<pid>-<random>``)."""
    try:
        return int(folder.name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return None


def _remove_stale_stages(workdir: Path, name: str = "") -> None:
    """Staging folders (of notebook ``name``, or all) left by a killed run (its process is gone):
    a committed landing (:data:`LANDING` present) is finished first, then the folder is removed."""
    for stale in workdir.glob(f"{STAGING_PREFIX}{name}{'-' if name else ''}*"):
        pid = _stage_pid(stale)
        if pid is None or _pid_alive(pid) or not stale.is_dir():
            continue
        if (stale / LANDING).is_file():
            _apply_landing(stale, workdir)
        shutil.rmtree(stale, ignore_errors=True)


def finish_landings(runs: Path) -> None:
    """Finish the landings that killed runs committed under ``runs`` (one folder per model) and
    remove their staging folders, so readers see each notebook with its own results files."""
    if runs.is_dir():
        for folder in runs.iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                _remove_stale_stages(folder)


@dataclass
class Stage:
    """One staged run: the temporary notebook, the parameters the kernel gets, and the outcome."""

    job: Job
    folder: Path
    parameters: dict[str, Any]
    failed: bool = False
    committed: bool = False  # the landing's journal is written: the new files are the outcome

    @property
    def notebook(self) -> Path:
        return self.folder / self.job.output.name

    @property
    def results(self) -> Path:
        return self.folder / RESULTS_FOLDER

    def fail(self) -> None:
        """Mark the run as failed: nothing it wrote replaces the previous files."""
        self.failed = True


LANDING = "LANDING.json"
"""The journal of a landing in its staging folder: once written, the new notebook and results are
the outcome, and an interrupted landing is finished by the next ``moe-book run`` or ``build``."""


def _move(src: Path, dst: Path) -> None:
    """One atomic rename (a seam: tests simulate a crash between two moves through it)."""
    os.replace(src, dst)


def _landing_moves(stage: Stage) -> list[tuple[str, str]]:
    """``(path in the staging folder, path in the model's folder)`` of every file a successful
    run lands: the results files it wrote or changed, then the notebook."""
    moves = []
    final = stage.job.output.parent / RESULTS_FOLDER
    if stage.results.is_dir():
        for path in sorted(stage.results.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            target = final / path.name
            if target.is_file() and target.read_bytes() == path.read_bytes():
                continue
            moves.append((f"{RESULTS_FOLDER}/{path.name}", f"{RESULTS_FOLDER}/{path.name}"))
    moves.append((stage.notebook.name, stage.job.output.name))
    return moves


def _publish_results(stage: Stage) -> None:
    """Commit the landing: write its journal (moves, and the stale failed notebook to remove)
    into the staging folder, atomically and flushed to disk. Nothing has moved yet."""
    plan = {"moves": _landing_moves(stage), "remove": [failed_path(stage.job.output).name]}
    atomic_write_text(stage.folder / LANDING, json.dumps(plan))


def _apply_landing(folder: Path, workdir: Path) -> None:
    """Carry out (or finish) the moves of ``folder``'s journal into ``workdir``; a file already
    moved is skipped, so running it again after an interruption completes the landing."""
    plan = json.loads((folder / LANDING).read_text(encoding="utf-8"))
    for src, dst in plan["moves"]:
        source, target = folder / src, workdir / dst
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _move(source, target)
    for name in plan["remove"]:
        (workdir / name).unlink(missing_ok=True)
    (folder / LANDING).unlink()


def _finish_notebook(stage: Stage, output: Path, root: Path | None) -> None:
    """Read the staged notebook once; show the final parameters and outputs that name the final
    results folder, tag its cells for the book, record where it lands and the model's label;
    write it back."""
    job = stage.job
    nb = nbformat.read(stage.notebook, as_version=4)
    final_parameters(nb, job.parameters, output)
    unstage_outputs(nb, stage.folder.name)
    if job.model is not None:
        label = reader_label(job.model)
        nb.metadata.setdefault(METADATA_KEY, {})["model_label"] = label
        name_model_in_heading(nb, label)
    tidy_parameters(nb)
    relative_paths_in_metadata(nb, root or Path.cwd())
    nbformat.write(nb, stage.notebook)


def publish_stage(stage: Stage, root: Path | None) -> None:
    """Land a successful run as one unit: commit a journal of the moves (results files, then the
    notebook), then rename each into place. A crash before the commit leaves the previous files;
    after it, the new ones (the next run or build finishes the moves)."""
    _finish_notebook(stage, stage.job.output, root)
    _publish_results(stage)
    stage.committed = True
    _apply_landing(stage.folder, stage.job.output.parent)


def keep_failed(stage: Stage, root: Path | None) -> Path | None:
    """Keep the partial notebook of a failed run as ``<name>.failed.ipynb``; drop its results."""
    if not stage.notebook.exists():
        return None
    target = failed_path(stage.job.output)
    try:
        _finish_notebook(stage, target, root)
    except Exception:
        pass
    os.replace(stage.notebook, target)
    return target


@contextlib.contextmanager
def staged_run(job: Job, root: Path | None = None) -> Iterator[Stage]:
    """Give a run a temporary notebook and results folder; publish them only on success.

    The kernel works in the final folder but writes its notebook and results into a hidden
    staging folder beside them (``.staging-<name>-<pid>-<random>``). When the body returns
    without :meth:`Stage.fail`, the notebook and the results files it wrote land together
    (:func:`publish_stage`). On failure, Ctrl-C or any error before the landing is committed the
    previous notebook and results stay byte for byte as they were and the partial notebook is kept
    as ``<name>.failed.ipynb``; an error after the commit finishes the landing. After SIGKILL only
    the staging folder is left: the next run or build finishes a committed landing from it and
    removes it.
    """
    workdir = job.output.parent
    workdir.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(workdir, job.notebook.name)
    folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{job.notebook.name}-{os.getpid()}-", dir=workdir))
    parameters = dict(job.parameters)
    results_final = workdir / RESULTS_FOLDER
    if "results_dir" in parameters:
        parameters["results_dir"] = relative_to(folder / RESULTS_FOLDER, workdir)
    stage = Stage(job, folder, parameters)
    (folder / RESULTS_FOLDER).mkdir()
    if results_final.is_dir():  # readers (and caches) in the run see the current results
        for path in results_final.iterdir():
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, stage.results / path.name)
    try:
        yield stage
        if stage.failed:
            keep_failed(stage, root)
        else:
            publish_stage(stage, root)
    except BaseException:
        with contextlib.suppress(Exception):
            if stage.committed:
                _apply_landing(folder, workdir)
            else:
                keep_failed(stage, root)
        raise
    finally:
        if not (folder / LANDING).exists():  # else kept for the next run or build to finish
            shutil.rmtree(folder, ignore_errors=True)
