"""What ``moe-book run`` will execute: the jobs (notebook, output, parameters), checked before any runs.

Per-model notebooks (see :mod:`moe_utils.publish.pages`) run once for each model, into
``<out>/<model-slug>/<name>.ipynb``, with ``model``, ``dense_baseline`` and ``results_dir``
injected; book-level notebooks run once, into ``<out>/book/<name>.ipynb``, with ``runs_dir`` (the
folder holding every model's folder) and ``results_dir`` injected. Paths are injected relative to
the folder a notebook is written to, so executed notebooks carry no machine-specific paths.
Every ``-p`` value, model id and input file is checked here, before any notebook or model loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_utils import zoo
from moe_utils.arch import SPECS
from moe_utils.arch.catalogue import entry_for
from moe_utils.core.errors import CheckpointError, InputSpecError, UsageError
from moe_utils.core.names import looks_local, model_slug
from moe_utils.core.paths import BOOK_FOLDER, zoo_path
from moe_utils.engine.inputs import check_inputs_spec
from moe_utils.publish.pages import NotebookInfo, discover_notebooks, select_notebooks
from moe_utils.publish.params import RESERVED_PARAMETERS, check_parameters, notebook_parameters

RESULTS_FOLDER = "results"


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


def relative_to(path: Path, workdir: Path) -> str:
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
            out[key] = relative_to(Path(value).expanduser(), workdir)
    value = out.get("inputs")
    if isinstance(value, str) and not value.startswith("hf:") and Path(value).expanduser().is_file():
        out["inputs"] = relative_to(Path(value).expanduser(), workdir)
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
