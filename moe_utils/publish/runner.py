"""Execute the book's notebooks with papermill (``moe-book run``), one job at a time.

What runs where is planned in :mod:`moe_utils.publish.plan`; each job runs transactionally
(:mod:`moe_utils.publish.staging`). Every notebook runs with ``BOOK_BUILD=1`` in its kernel's
environment (so charts use the offline renderer of :mod:`moe_utils.publish.render`), its working
directory set to the folder it is written to, and paths injected relative to that folder, so the
executed notebooks carry no machine-specific paths and still work when opened where they lie.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from moe_utils.core.errors import MoEUtilsError, OutputFolderError, RunInterrupted
from moe_utils.core.progress import PROGRESS_ENV, relay
from moe_utils.publish.plan import Job
from moe_utils.publish.render import BOOK_BUILD_ENV
from moe_utils.publish.staging import failed_path, finish_landings, staged_run

Log = Callable[[str], None]


class NotebookRunError(MoEUtilsError, RuntimeError):
    """A notebook raised while papermill executed it; names the notebook, the cell and the error."""

    def __init__(
        self,
        notebook: str,
        model: str | None,
        output: Path,
        ename: str,
        evalue: str,
        cell_index: int | None = None,
        cell_first_line: str | None = None,
        execution_count: int | None = None,
    ) -> None:
        self.notebook, self.model, self.output = notebook, model, output
        self.ename, self.evalue = ename, evalue
        self.cell_index, self.cell_first_line = cell_index, cell_first_line
        self.execution_count = execution_count
        where = f"notebook {notebook}" + (f" (model {model})" if model else "")
        cell = ""
        if cell_index is not None:
            cell = f" in cell {cell_index}"
            cell += f" (In [{execution_count}])" if execution_count is not None else ""
            cell += f": `{cell_first_line}`" if cell_first_line else ""
        super().__init__(
            f"{where} failed{cell}: {ename}: {evalue}\n"
            f"The partly executed notebook is kept as {output}; open it to see the traceback, fix "
            f"the cause and run again. The previous {Path(notebook).stem} notebook and results of "
            f"this model were left as they were, and so were notebooks that succeeded before it."
        )


@contextlib.contextmanager
def kernel_environment() -> Iterator[None]:
    """Environment for the notebook kernels: ``BOOK_BUILD=1``, progress bars off (tqdm and
    Hugging Face bars would be saved as widgets frozen mid-way into the static pages), and a
    ``python3`` kernel that is this interpreter (a user-level ``python3`` kernelspec pointing
    elsewhere would miss moe_utils). The package's own progress bars (per layer, per reordered
    pair) go to a log file named by ``MOE_BOOK_PROGRESS``, relayed to this process's stderr.
    """
    settings = {BOOK_BUILD_ENV: "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    saved = {key: os.environ.get(key) for key in (*settings, "JUPYTER_PATH", PROGRESS_ENV)}
    with tempfile.TemporaryDirectory(prefix="moe-book-kernel-") as tmp, relay(Path(tmp) / "progress.log"):
        settings[PROGRESS_ENV] = str(Path(tmp) / "progress.log")
        spec_dir = Path(tmp) / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
        os.environ.update(settings)
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (tmp, saved["JUPYTER_PATH"]) if p)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _first_code_line(source: str | None) -> str | None:
    """The first non-blank line of a cell's source (at most 120 characters), for error messages."""
    for line in (source or "").splitlines():
        if line.strip():
            return line.strip()[:120]
    return None


def _run_papermill(job: Job, output: Path, parameters: dict[str, Any]) -> NotebookRunError | None:
    """Execute ``job`` into ``output`` with papermill; the error of a failed run, else None."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(job.notebook.path),
            str(output),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(job.output.parent),
            progress_bar=False,
            log_output=False,
            # Quiet the kernel's own log (start-up warnings, and the socket errors it logs when
            # Ctrl-C shuts it down mid-cell); cell errors are reported through papermill, and a
            # crashing kernel still writes to stderr.
            extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
        )
    except PapermillExecutionError as exc:
        return NotebookRunError(
            job.notebook.path.name,
            job.model,
            failed_path(job.output),
            exc.ename,
            exc.evalue,
            exc.cell_index,
            _first_code_line(exc.source),
            exc.exec_count,
        )
    except OSError:
        raise  # disk full, read-only folder: reported by run_notebooks
    except Exception as exc:  # kernel died, missing kernel, unreadable notebook, ...
        return NotebookRunError(
            job.notebook.path.name, job.model, failed_path(job.output), type(exc).__name__, str(exc)
        )
    return None


@contextlib.contextmanager
def _noticing_ctrl_c() -> Iterator[Callable[[], bool]]:
    """Yield a function telling whether SIGINT arrived while the block ran; the previous handler
    still runs. A Ctrl-C that the kernel client absorbs (the interrupted cell then looks finished)
    must still count as an interruption, so that the run never lands."""
    import signal
    import threading

    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)


def execute_job(job: Job, root: Path | None = None) -> None:
    """Run one job transactionally; raise :class:`NotebookRunError` on failure.

    Must be called inside :func:`kernel_environment`. See :func:`staged_run` for what happens to
    the files; the output notebook is tidied (:func:`tidy_parameters`) before it lands.
    """
    with staged_run(job, root) as stage, _noticing_ctrl_c() as interrupted:
        error = _run_papermill(job, stage.notebook, stage.parameters)
        if error is None and interrupted():
            error = NotebookRunError(
                job.notebook.path.name, job.model, failed_path(job.output), "KeyboardInterrupt", "interrupted"
            )
        if error is not None:
            stage.fail()
            raise error


def check_output_folder(out: Path) -> None:
    """Fail early, naming the folder, when ``out`` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".moe-book-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputFolderError(_disk_message(exc, out)) from exc


def _disk_message(exc: OSError, where: Path | str) -> str:
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EDQUOT: "the disk quota is exceeded",
    }
    fallback = exc.strerror or str(exc)
    reason = fallback if exc.errno is None else reasons.get(exc.errno, fallback)
    return (
        f"cannot write to {exc.filename or where} ({reason}). Free some space or pass a "
        f"writable folder with --out; the previous notebooks and results were kept as they were."
    )


def _quiet_dead_kernel_tasks() -> None:
    """After Ctrl-C the kernel (same process group) dies with the runner; the executor's pending
    task then fails with DeadKernelError, which asyncio would print as an unretrieved-exception
    traceback at exit. The interruption message already says what happened and what was kept."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def run_notebooks(jobs: Sequence[Job], log: Log = print, root: Path | None = None) -> list[Path]:
    """Execute ``jobs`` in order, logging progress; stop at the first failure.

    Returns the written notebooks. A failed job leaves the previous notebook and results of
    that job as they were (see :func:`staged_run`); notebooks that succeeded before it stay.
    Ctrl-C raises :class:`RunInterrupted` and a full or read-only disk
    :class:`OutputFolderError`, each saying what was kept.
    """
    done: list[Path] = []
    for runs in sorted({job.output.parent.parent for job in jobs}):
        finish_landings(runs)
    with kernel_environment():
        start = time.perf_counter()
        for i, job in enumerate(jobs, 1):
            log(f"[{i}/{len(jobs)}] {job.label} ...")
            t0 = time.perf_counter()
            try:
                execute_job(job, root)
            except NotebookRunError as exc:
                log(f"[{i}/{len(jobs)}] {job.label} FAILED after {time.perf_counter() - t0:.1f} s")
                if exc.ename == "KeyboardInterrupt":
                    _quiet_dead_kernel_tasks()
                    raise RunInterrupted(
                        f"interrupted during {job.label}: its previous notebook and results were "
                        f"kept; the partial notebook is in {exc.output}."
                    ) from exc
                raise
            except KeyboardInterrupt as exc:
                _quiet_dead_kernel_tasks()
                kept = (
                    f"; the partial notebook is in {failed_path(job.output)}"
                    if failed_path(job.output).exists()
                    else ""
                )
                raise RunInterrupted(
                    f"interrupted during {job.label}: its previous notebook and results were kept"
                    f"{kept}; {len(done)} notebook(s) finished before it."
                ) from exc
            except OSError as exc:
                raise OutputFolderError(_disk_message(exc, job.output.parent)) from exc
            done.append(job.output)
            log(f"[{i}/{len(jobs)}] {job.label} done in {time.perf_counter() - t0:.1f} s")
        log(f"ran {len(jobs)} notebook(s) in {time.perf_counter() - start:.1f} s")
    return done
