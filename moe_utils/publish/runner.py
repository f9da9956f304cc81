"""Execute the book's notebooks with papermill, one folder per model (``moe-book run``).

Two kinds of notebook live in ``notebooks/``:

* per-model notebooks run once for each model, into ``<out>/<model-slug>/<name>.ipynb``, with
  ``model``, ``dense_baseline`` and ``results_dir`` injected;
* book-level notebooks (the model organisms page, the summary) run once, into
  ``<out>/book/<name>.ipynb``, with ``runs_dir`` (the folder holding every model's folder) and
  ``results_dir`` injected.

A notebook says which kind it is in its metadata, ``{"moe_book": {"scope": "model"}}`` or
``{"moe_book": {"scope": "book", "place": "front"}}`` ("front": listed before the model parts of
the book, "back": after them). Without that key, names starting with ``obs`` are per-model and
anything else is book-level; ``organisms`` goes to the front, the rest to the back.

Every notebook runs with ``BOOK_BUILD=1`` in its kernel's environment (so charts use the offline
renderer of :mod:`moe_utils.publish.render`), its working directory set to the folder it is written to,
and paths injected relative to that folder, so the executed notebooks carry no machine-specific
paths and still work when opened where they lie.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from moe_utils import zoo
from moe_utils.arch import SPECS
from moe_utils.arch.catalogue import entry_for
from moe_utils.core.errors import (
    CheckpointError,
    InputSpecError,
    MoEUtilsError,
    OutputFolderError,
    RunInterrupted,
    UsageError,
)
from moe_utils.core.files import atomic_write_text
from moe_utils.core.names import looks_local, model_label, model_slug
from moe_utils.core.paths import BOOK_FOLDER, zoo_path
from moe_utils.core.progress import PROGRESS_ENV, relay
from moe_utils.engine.inputs import check_inputs_spec
from moe_utils.publish.notebook_meta import read_notebook_metadata
from moe_utils.publish.params import check_parameters, notebook_parameters
from moe_utils.publish.render import BOOK_BUILD_ENV

RESULTS_FOLDER = "results"
METADATA_KEY = "moe_book"
RESERVED_PARAMETERS = ("model", "dense_baseline", "results_dir", "runs_dir")
"""Parameters the runner sets itself; ``-p`` may not override them (use the flags instead)."""

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


# --------------------------------------------------------------------------- names and values


def parse_value(text: str) -> Any:
    """A ``-p`` value read the way papermill's own ``-p`` reads it, plus literal containers.

    Like papermill: ``"True"``/``"False"``/``"None"`` -> bool/None, ``"30"`` -> 30,
    ``"0.5"`` -> 0.5, anything else -> the string itself (``"zoo:tiny-dense"``). In addition a
    Python list, tuple, dict or quoted string literal is parsed: ``"[0, 3]"`` -> [0, 3].
    """
    constants = {"True": True, "False": False, "None": None}
    if text in constants:
        return constants[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "(", "{", "'", '"'):
        try:
            return ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return text


def parse_parameters(pairs: Iterable[Sequence[str]] | None) -> dict[str, Any]:
    """``[("layers", "[0, 1]"), ...]`` -> ``{"layers": [0, 1]}``; rejects bad or reserved names."""
    params: dict[str, Any] = {}
    for pair in pairs or ():
        name, value = pair
        if not name.isidentifier():
            raise UsageError(f"parameter name {name!r} is not a Python identifier")
        if name in RESERVED_PARAMETERS:
            raise UsageError(f"-p {name} is set by moe-book itself; use --model / --dense-baseline / --out instead")
        params[name] = parse_value(value)
    return params


# --------------------------------------------------------------------------- notebooks


@dataclass(frozen=True)
class NotebookInfo:
    """A source notebook and how the book uses it."""

    path: Path
    scope: str  # "model" (run per model) or "book" (run once)
    place: str = "back"  # book-level only: "front" (before the model parts) or "back"

    @property
    def name(self) -> str:
        """File stem, e.g. ``obs2_router_norms``."""
        return self.path.stem


def notebook_info(path: str | Path, metadata: dict[str, Any] | None = None) -> NotebookInfo:
    """Read a notebook's ``moe_book`` metadata, falling back to its file name.

    ``metadata`` is the notebook's top-level metadata when the caller has already parsed the
    file (it is then not read again).
    """
    path = Path(path)
    if metadata is None:
        metadata = read_notebook_metadata(path, "Restore it (e.g. git checkout) or delete it.")
    meta = metadata.get(METADATA_KEY, {})
    scope = meta.get("scope") or ("model" if path.stem.startswith("obs") else "book")
    place = meta.get("place") or ("front" if path.stem == "organisms" else "back")
    if scope not in ("model", "book") or place not in ("front", "back"):
        raise MoEUtilsError(
            f"{path}: metadata {METADATA_KEY}.scope must be 'model' or 'book' and .place "
            f"'front' or 'back' (got scope={scope!r}, place={place!r})"
        )
    return NotebookInfo(path=path, scope=scope, place=place)


def discover_notebooks(notebooks_dir: str | Path) -> list[NotebookInfo]:
    """Every ``*.ipynb`` directly in ``notebooks_dir``, sorted by name."""
    folder = Path(notebooks_dir)
    if not folder.is_dir():
        raise UsageError(
            f"notebook folder {folder} does not exist; run moe-book from the repository root or pass --notebooks-dir"
        )
    return [notebook_info(p) for p in sorted(folder.glob("*.ipynb"))]


def select_notebooks(available: Sequence[NotebookInfo], names: Sequence[str] | None) -> list[NotebookInfo]:
    """The notebooks named (stem or file name), in the order given; all when ``names`` is empty."""
    if not names:
        return list(available)
    by_name = {nb.name: nb for nb in available}
    chosen = []
    for name in names:
        stem = Path(name).name.removesuffix(".ipynb")
        if stem not in by_name:
            raise UsageError(f"no notebook named {name!r}; available: {', '.join(sorted(by_name)) or '(none)'}")
        chosen.append(by_name[stem])
    return chosen


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Job:
    """One papermill execution: which notebook, where to, with what parameters."""

    notebook: NotebookInfo
    output: Path
    parameters: dict[str, Any]
    model: str | None = None  # None for book-level notebooks

    @property
    def label(self) -> str:
        """Short progress label, e.g. ``random-mixtral/obs2_router_norms``."""
        return f"{self.output.parent.name}/{self.notebook.name}"


def default_models() -> tuple[list[str], str | None]:
    """The embedded default MoE models and dense baseline from :mod:`moe_utils.zoo`."""

    def as_id(name: str) -> str:
        # The zoo lists bare names ("tiny-dense"); notebooks take model ids ("zoo:tiny-dense").
        if ":" not in name and name in zoo.ZOO_MODELS:
            return f"zoo:{name}"
        return name

    return [as_id(m) for m in zoo.DEFAULT_MOE_MODELS], as_id(zoo.DEFAULT_DENSE_BASELINE)


def _relative_to(path: Path, workdir: Path) -> str:
    """``path`` written relative to ``workdir`` (the kernel's working directory), POSIX style."""
    return Path(os.path.relpath(path.resolve(), workdir.resolve())).as_posix()


def _local_paths_relative(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Local model folders and input files given relative to the user's directory (or absolute)
    rewritten relative to the kernel's working directory: they still resolve there, and the
    executed notebook names no absolute path."""
    out = dict(params)
    for key in ("model", "dense_baseline"):
        value = out.get(key)
        if isinstance(value, str) and looks_local(value):
            out[key] = _relative_to(Path(value).expanduser(), workdir)
    value = out.get("inputs")
    if isinstance(value, str) and not value.startswith("hf:") and Path(value).expanduser().is_file():
        out["inputs"] = _relative_to(Path(value).expanduser(), workdir)
    return out


def plan_jobs(
    notebooks: Sequence[NotebookInfo],
    models: Sequence[str],
    dense_baseline: str | None,
    out: str | Path,
    extra: dict[str, Any] | None = None,
    include_book: bool = True,
    declared: dict[str, set[str]] | None = None,
) -> list[Job]:
    """Per-model notebooks for every model (in order), then book-level ones once.

    Paths are injected relative to each output folder (the kernel's working directory). With
    ``declared`` (notebook name -> its parameter names), a notebook only receives the extra
    parameters it declares.
    """
    out = Path(out)
    extra = dict(extra or {})
    revision = extra.get("revision")
    jobs: list[Job] = []
    slugs: dict[str, str] = {}

    def extra_for(nb: NotebookInfo) -> dict[str, Any]:
        if declared is None or nb.name not in declared:
            return dict(extra)
        return {k: v for k, v in extra.items() if k in declared[nb.name]}

    for model in models:
        slug = model_slug(model, revision if isinstance(revision, str) else None)
        if slug in slugs and slugs[slug] != model:
            raise UsageError(f"models {slugs[slug]!r} and {model!r} would share folder {slug!r}")
        slugs[slug] = model
        for nb in notebooks:
            if nb.scope == "model":
                params = {
                    **extra_for(nb),
                    "model": model,
                    "dense_baseline": dense_baseline,
                    "results_dir": RESULTS_FOLDER,
                }
                output = out / slug / f"{nb.name}.ipynb"
                jobs.append(Job(nb, output, _local_paths_relative(params, output.parent), model))
    if include_book:
        for nb in notebooks:
            if nb.scope == "book":
                params = {**extra_for(nb), "runs_dir": "..", "results_dir": RESULTS_FOLDER}
                output = out / BOOK_FOLDER / f"{nb.name}.ipynb"
                jobs.append(Job(nb, output, _local_paths_relative(params, output.parent)))
    return jobs


# --------------------------------------------------------------------------- parameter checks


def check_request_parameters(
    notebooks: Sequence[NotebookInfo], values: dict[str, Any], dense_baseline: str | None = None
) -> dict[str, set[str]]:
    """Check ``-p`` values against the notebooks' ``parameters`` cells, before anything runs.

    A name must be declared by at least one of ``notebooks`` and its value must have the type
    each declaring notebook gives it; an ``inputs`` file and a local ``dense_baseline`` folder
    must exist. Raises :class:`UsageError`; returns notebook name -> declared parameter names.
    """
    per_notebook = {nb.name: notebook_parameters(nb.path) for nb in notebooks}
    union: dict[str, Any] = {}
    for specs in per_notebook.values():
        for name, spec in specs.items():
            union.setdefault(name, spec)
    settable = {k: v for k, v in union.items() if k not in RESERVED_PARAMETERS}
    names = ", ".join(nb.name for nb in notebooks)
    check_parameters({k: v for k, v in values.items() if k not in settable}, settable, where=f"notebook(s) {names}")
    for specs in per_notebook.values():
        check_parameters({k: v for k, v in values.items() if k in specs}, specs, where=f"notebook(s) {names}")
    if isinstance(values.get("inputs"), str):
        try:
            check_inputs_spec(values["inputs"])
        except InputSpecError as exc:
            raise UsageError(f"-p inputs: {exc}") from exc
    if isinstance(values.get("dtype"), str):
        from moe_utils.models.loading import as_dtype  # imports torch: only when a dtype is given

        try:
            as_dtype(values["dtype"])
        except ValueError as exc:
            raise UsageError(f"-p dtype: {exc}") from exc
    if dense_baseline and looks_local(dense_baseline) and not Path(dense_baseline).expanduser().is_dir():
        raise UsageError(f"dense baseline folder {dense_baseline} does not exist")
    return {name: set(specs) for name, specs in per_notebook.items()}


def _check_random_family(text: str) -> None:
    """``random:FAMILY`` must name a family a tiny random model can be built for."""
    family = text[len("random:") :]
    spec = SPECS.get(family)
    if spec is not None:
        if spec.config_class is None or not spec.tiny_config:
            raise UsageError(
                f"{text}: {family} models need their publisher's code, so no random model can be built; "
                "pass a local checkpoint folder instead"
            )
        return
    entry = entry_for(family) if family else None
    if entry is None or entry.excluded:
        why = f" ({entry.excluded})" if entry is not None and entry.excluded else ""
        raise UsageError(
            f"unknown model family {family!r} in {text!r}{why}; use random:FAMILY with one of "
            f"{', '.join(SPECS)} or an MoE model_type of the installed transformers (see the coverage page)"
        )


def check_model_id(model: str) -> None:
    """Check a model id before any notebook starts: a local folder must exist, ``zoo:NAME`` must
    name an installed zoo model and ``random:FAMILY`` a known family (:class:`UsageError`)."""
    text = str(model).strip()
    if text.startswith(("/", "./", "../", "~")) and not Path(text).expanduser().is_dir():
        raise UsageError(
            f"model folder {text} does not exist; pass a folder holding config.json and "
            "*.safetensors, a hub id (org/Name), zoo:NAME or random:FAMILY"
        )
    if text.startswith("zoo:"):
        try:
            zoo_path(text)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from exc
    elif text.startswith("random:"):
        _check_random_family(text)


# --------------------------------------------------------------------------- execution


def tidy_parameters(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Tag parameter cells for the book: defaults removed, injected values behind a toggle.

    The cell tagged ``parameters`` gets ``remove-cell``; the ``injected-parameters`` cell gets
    ``hide-input``. Idempotent; returns the same notebook object.
    """
    for cell in nb.cells:
        tags = list(cell.get("metadata", {}).get("tags", []))
        add = []
        if "parameters" in tags and "remove-cell" not in tags:
            add.append("remove-cell")
        if "injected-parameters" in tags and "hide-input" not in tags:
            add.append("hide-input")
        if add:
            cell.setdefault("metadata", {})["tags"] = tags + add
    return nb


def _relative_paths_in_metadata(nb: nbformat.NotebookNode, base: Path) -> None:
    """Replace papermill's input/output paths by paths relative to ``base`` (the repository
    root) or, for files outside it, by their names: published notebooks name no local folders.
    """
    meta = nb.metadata.get("papermill", {})
    base = base.resolve()
    for key in ("input_path", "output_path"):
        value = meta.get(key)
        if value:
            path = Path(value).resolve()
            meta[key] = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name


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


def _first_line(source: str | None) -> str | None:
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
            _first_line(exc.source),
            exc.exec_count,
        )
    except OSError:
        raise  # disk full, read-only folder: reported by run_jobs
    except Exception as exc:  # kernel died, missing kernel, unreadable notebook, ...
        return NotebookRunError(
            job.notebook.path.name, job.model, failed_path(job.output), type(exc).__name__, str(exc)
        )
    return None


def execute_job(job: Job, root: Path | None = None) -> None:
    """Run one job transactionally; raise :class:`NotebookRunError` on failure.

    Must be called inside :func:`kernel_environment`. See :func:`staged_run` for what happens to
    the files; the output notebook is tidied (:func:`tidy_parameters`) before it lands.
    """
    with staged_run(job, root) as stage:
        error = _run_papermill(job, stage.notebook, stage.parameters)
        if error is not None:
            stage.fail()
            raise error


# --------------------------------------------------------------------------- transactional runs

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


def _final_parameters(nb: nbformat.NotebookNode, parameters: dict[str, Any], output: Path) -> None:
    """Show ``parameters`` (the final results folder, not the staging one) in the injected cell
    and record ``output`` (where the notebook lands) as papermill's output path."""
    from papermill.translators import translate_parameters

    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    language = nb.metadata.get("kernelspec", {}).get("language", "python")
    for cell in nb.cells:
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source = translate_parameters(kernel, language, parameters, "Parameters")
    if "papermill" in nb.metadata:
        nb.metadata.papermill["parameters"] = parameters
        nb.metadata.papermill["output_path"] = str(output)


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


def _unstage_outputs(nb: nbformat.NotebookNode, staging: str) -> None:
    """Outputs that name the staging folder (``wrote .staging-.../results/x.json``) name the final
    folder instead, where the files are once the run is published."""
    prefix = f"{staging}/"

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(prefix, "")
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            for key in ("text", "traceback", "evalue"):
                if key in out:
                    out[key] = fix(out[key])
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/"):
                    out["data"][mime] = fix(value)


def reader_label(model: str) -> str:
    """The model's name on the pages: :func:`model_label` without the ``zoo:`` prefix of the
    embedded models (``zoo:tiny-moe-fine`` -> ``tiny-moe-fine``)."""
    return model_label(model).removeprefix("zoo:")


def name_model_in_heading(nb: nbformat.NotebookNode, label: str) -> nbformat.NotebookNode:
    """Append the model's name to the page's title (the first ``# `` heading), so that the pages of
    one notebook run on several models have distinct titles. Idempotent."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            if line.startswith("# "):
                suffix = f" ({label})"
                if not line.rstrip().endswith(suffix):
                    lines[i] = line.rstrip() + suffix
                    cell.source = "\n".join(lines)
                return nb
    return nb


def _finish_notebook(stage: Stage, output: Path, root: Path | None) -> None:
    """Read the staged notebook once; show the final parameters and outputs that name the final
    results folder, tag its cells for the book, record where it lands and the model's label;
    write it back."""
    job = stage.job
    nb = nbformat.read(stage.notebook, as_version=4)
    _final_parameters(nb, job.parameters, output)
    _unstage_outputs(nb, stage.folder.name)
    if job.model is not None:
        label = reader_label(job.model)
        nb.metadata.setdefault(METADATA_KEY, {})["model_label"] = label
        name_model_in_heading(nb, label)
    tidy_parameters(nb)
    _relative_paths_in_metadata(nb, root or Path.cwd())
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
        parameters["results_dir"] = _relative_to(folder / RESULTS_FOLDER, workdir)
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


def run_jobs(jobs: Sequence[Job], log: Log = print, root: Path | None = None) -> list[Path]:
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


@dataclass
class RunRequest:
    """What ``moe-book run`` was asked to do (the CLI's arguments, parsed)."""

    notebooks_dir: Path = Path("notebooks")
    out: Path = Path("book/runs")
    model: str | None = None
    dense_baseline: str | None = None
    notebooks: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


def plan_request(req: RunRequest) -> list[Job]:
    """Turn a :class:`RunRequest` into jobs, after checking every parameter.

    Without a model: the default plan (every selected per-model notebook on each default MoE
    model with the default dense baseline, then the selected book-level notebooks). With a
    model: its per-model notebooks only, plus book-level notebooks that were named explicitly.
    Unknown ``-p`` names, wrong types, a missing inputs file or model folder, an unknown
    ``zoo:NAME`` or ``random:FAMILY`` raise :class:`UsageError` here, before any notebook (or
    model) is loaded.
    """
    available = discover_notebooks(req.notebooks_dir)
    chosen = select_notebooks(available, req.notebooks)
    if req.model is None:
        models, baseline = default_models()
        if req.dense_baseline is not None:
            baseline = req.dense_baseline
        include_book = True
    else:
        check_model_id(req.model)
        models, baseline = [req.model], req.dense_baseline
        include_book = bool(req.notebooks)
    if req.dense_baseline is not None and req.dense_baseline.startswith(("zoo:", "random:")):
        check_model_id(req.dense_baseline)  # a local folder is checked with the parameters
    planned = [nb for nb in chosen if nb.scope == "model" or include_book]
    declared = check_request_parameters(planned or chosen, req.parameters, baseline)
    jobs = plan_jobs(chosen, models, baseline, req.out, req.parameters, include_book, declared)
    if not jobs:
        raise UsageError(f"nothing to run: no matching notebooks in {req.notebooks_dir}")
    return jobs
