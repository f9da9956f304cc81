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
renderer of :mod:`moe_utils.render`), its working directory set to the folder it is written to,
and paths injected relative to that folder, so the executed notebooks carry no machine-specific
paths and still work when opened where they lie.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import nbformat

from moe_utils.errors import MoEUtilsError
from moe_utils.render import BOOK_BUILD_ENV

BOOK_FOLDER = "book"
"""Name of the run folder that holds the book-level notebooks (reserved: no model slug may use it)."""

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
            f"The partly executed notebook is in {output}; open it to see the traceback, fix the "
            f"cause and run again (notebooks that succeeded before it were kept)."
        )


# --------------------------------------------------------------------------- names and values


def model_slug(model: str | os.PathLike[str]) -> str:
    """Folder name for a model id.

    ``zoo:tiny-moe-upcycled`` -> ``tiny-moe-upcycled``; ``random:mixtral`` -> ``random-mixtral``;
    hub id ``org/Name`` -> ``org--Name``; an existing local folder -> its base name. Characters
    outside ``[A-Za-z0-9._-]`` become ``-``.
    """
    text = os.fspath(model).strip()
    if not text:
        raise MoEUtilsError("empty model id: pass a zoo name (zoo:NAME), a hub id or a local folder")
    looks_local = text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().is_dir()
    if looks_local:
        slug = Path(text).expanduser().resolve().name
    elif text.startswith("zoo:"):
        slug = text[len("zoo:"):]
    else:
        slug = text.replace("/", "--").replace(":", "-")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", slug).strip("-.")
    if not slug:
        raise MoEUtilsError(f"cannot make a folder name from model id {text!r}")
    if slug == BOOK_FOLDER:
        slug = f"{BOOK_FOLDER}-model"
    return slug


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
            raise MoEUtilsError(f"parameter name {name!r} is not a Python identifier")
        if name in RESERVED_PARAMETERS:
            raise MoEUtilsError(
                f"-p {name} is set by moe-book itself; use --model / --dense-baseline / --out instead"
            )
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
        metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
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
        raise MoEUtilsError(
            f"notebook folder {folder} does not exist; run moe-book from the repository root "
            f"or pass --notebooks-dir"
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
            raise MoEUtilsError(
                f"no notebook named {name!r}; available: {', '.join(sorted(by_name)) or '(none)'}"
            )
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
    try:
        from moe_utils import zoo
    except ImportError as exc:  # the zoo package is optional at import time of this module
        raise MoEUtilsError(
            f"the embedded default models are not available ({exc}); pass --model ID_OR_DIR"
        ) from exc
    def as_id(name: str | None) -> str | None:
        # The zoo lists bare names ("tiny-dense"); notebooks take model ids ("zoo:tiny-dense").
        if name is not None and ":" not in name and name in zoo.ZOO_MODELS:
            return f"zoo:{name}"
        return name

    return [as_id(m) for m in zoo.DEFAULT_MOE_MODELS], as_id(zoo.DEFAULT_DENSE_BASELINE)


def plan_jobs(
    notebooks: Sequence[NotebookInfo],
    models: Sequence[str],
    dense_baseline: str | None,
    out: str | Path,
    extra: dict[str, Any] | None = None,
    include_book: bool = True,
) -> list[Job]:
    """Per-model notebooks for every model (in order), then book-level ones once.

    Paths are injected relative to each output folder (the kernel's working directory).
    """
    out = Path(out)
    extra = dict(extra or {})
    jobs: list[Job] = []
    slugs: dict[str, str] = {}
    for model in models:
        slug = model_slug(model)
        if slug in slugs and slugs[slug] != model:
            raise MoEUtilsError(f"models {slugs[slug]!r} and {model!r} would share folder {slug!r}")
        slugs[slug] = model
        for nb in notebooks:
            if nb.scope == "model":
                params = {**extra, "model": model, "dense_baseline": dense_baseline,
                          "results_dir": RESULTS_FOLDER}
                jobs.append(Job(nb, out / slug / f"{nb.name}.ipynb", params, model))
    if include_book:
        for nb in notebooks:
            if nb.scope == "book":
                params = {**extra, "runs_dir": "..", "results_dir": RESULTS_FOLDER}
                jobs.append(Job(nb, out / BOOK_FOLDER / f"{nb.name}.ipynb", params))
    return jobs


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


def tidy_file(path: Path, base: Path | None = None) -> None:
    """Apply :func:`tidy_parameters` (and relative metadata paths) to a notebook file in place."""
    nb = nbformat.read(path, as_version=4)
    tidy_parameters(nb)
    _relative_paths_in_metadata(nb, base or Path.cwd())
    nbformat.write(nb, path)


@contextlib.contextmanager
def kernel_environment() -> Iterator[None]:
    """Environment for the notebook kernels: ``BOOK_BUILD=1``, progress bars off (tqdm and
    Hugging Face bars would be saved as widgets frozen mid-way into the static pages), and a
    ``python3`` kernel that is this interpreter (a user-level ``python3`` kernelspec pointing
    elsewhere would miss moe_utils). The package's own progress bars (per layer, per reordered
    pair) go to a log file named by ``MOE_BOOK_PROGRESS``, relayed to this process's stderr.
    """
    from moe_utils.progress import PROGRESS_ENV, relay

    settings = {BOOK_BUILD_ENV: "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    saved = {key: os.environ.get(key) for key in (*settings, "JUPYTER_PATH", PROGRESS_ENV)}
    with tempfile.TemporaryDirectory(prefix="moe-book-kernel-") as tmp, \
            relay(Path(tmp) / "progress.log"):
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


def execute_job(job: Job, root: Path | None = None) -> None:
    """Run one job with papermill, tidy its output; raise :class:`NotebookRunError` on failure.

    Must be called inside :func:`kernel_environment`. The output notebook is written even when
    a cell fails (papermill saves the partial run), and is tidied in both cases.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    workdir = job.output.parent
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RESULTS_FOLDER).mkdir(exist_ok=True)
    try:
        papermill.execute_notebook(
            str(job.notebook.path),
            str(job.output),
            parameters=job.parameters,
            kernel_name="python3",
            cwd=str(workdir),
            progress_bar=False,
            log_output=False,
            # Quiet the kernel's own start-up warnings (errors still show); cell errors are
            # reported through papermill.
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except PapermillExecutionError as exc:
        error = NotebookRunError(
            job.notebook.path.name, job.model, job.output, exc.ename, exc.evalue,
            exc.cell_index, _first_line(exc.source), exc.exec_count,
        )
    except Exception as exc:  # kernel died, missing kernel, unreadable notebook, ...
        error = NotebookRunError(job.notebook.path.name, job.model, job.output,
                                 type(exc).__name__, str(exc))
    else:
        error = None
    if job.output.exists():
        tidy_file(job.output, root)
    if error is not None:
        raise error


def run_jobs(jobs: Sequence[Job], log: Log = print, root: Path | None = None) -> list[Path]:
    """Execute ``jobs`` in order, logging progress; stop at the first failure.

    Returns the written notebooks. On failure the exception propagates after logging; the
    notebooks already written stay in place.
    """
    done: list[Path] = []
    with kernel_environment():
        start = time.perf_counter()
        for i, job in enumerate(jobs, 1):
            log(f"[{i}/{len(jobs)}] {job.label} ...")
            t0 = time.perf_counter()
            try:
                execute_job(job, root)
            except NotebookRunError:
                log(f"[{i}/{len(jobs)}] {job.label} FAILED after {time.perf_counter() - t0:.1f} s")
                raise
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
    """Turn a :class:`RunRequest` into jobs.

    Without a model: the default plan (every selected per-model notebook on each default MoE
    model with the default dense baseline, then the selected book-level notebooks). With a
    model: its per-model notebooks only, plus book-level notebooks that were named explicitly.
    """
    available = discover_notebooks(req.notebooks_dir)
    chosen = select_notebooks(available, req.notebooks)
    if req.model is None:
        models, baseline = default_models()
        if req.dense_baseline is not None:
            baseline = req.dense_baseline
        include_book = True
    else:
        models, baseline = [req.model], req.dense_baseline
        include_book = bool(req.notebooks)
    jobs = plan_jobs(chosen, models, baseline, req.out, req.parameters, include_book)
    if not jobs:
        raise MoEUtilsError(f"nothing to run: no matching notebooks in {req.notebooks_dir}")
    return jobs
