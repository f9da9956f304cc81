"""Build the static site from executed notebooks (``moe-book build``).

The table of contents is generated from what exists in the runs folder, so the book never links
to a page that was not run and never misses a model that was: the front pages (intro, method,
book-level "front" notebooks such as the model organisms page), then one part per model with its
observation notebooks, then the book-level "back" notebooks (the summary) with any further
``book/*.md`` page, then the appendix "Running at scale" (the reproduce, performance and coverage
pages, and how to cite the book). The generated file goes to
``book/generated/_toc.yml``; the committed ``_toc.yml`` lists only the hand-written pages, so
``jupyter-book build .`` works even before any notebook has run.

Jupyter Book 1 then builds with ``execute_notebooks: off`` (set in ``_config.yml``): the outputs
papermill saved are published as they are. Notebooks whose run failed (``NAME.failed.ipynb``, or
a notebook whose papermill record shows an exception) are never published: they are left out with
a warning. A notebook that cannot be read stops the build with its file named. The site is built
into a temporary folder and replaces the previous ``_build/html`` only when the build succeeded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_utils.core.errors import MoEUtilsError
from moe_utils.core.names import model_label, model_slug
from moe_utils.core.paths import BOOK_FOLDER
from moe_utils.publish.findings import write_findings
from moe_utils.publish.guards import check_build, check_runs_folder, current_model_pages
from moe_utils.publish.notebook_meta import read_notebook_metadata
from moe_utils.publish.pages import METADATA_KEY, notebook_info
from moe_utils.publish.plan import default_models
from moe_utils.publish.render import write_vega_bundle
from moe_utils.publish.runner import Log
from moe_utils.publish.staging import FAILED_SUFFIX, finish_landings

PAGES_DIR = "book"
ROOT_PAGE = "intro"
FRONT_PAGES = ("method",)
LAST_PAGE = "reproduce"
APPENDIX_PAGES = ("performance", "coverage")
CITE_PAGE = "cite"
APPENDIX_CAPTION = "Appendix: running at scale"
GENERATED_TOC = Path("book/generated/_toc.yml")
GENERATED_CONFIG = Path("book/generated/_config.yml")
BINDER_URL = "https://mybinder.org"
COLAB_URL = "https://colab.research.google.com"
VEGA_BUNDLE = Path("book/_static/vega-bundle.js")
VENDOR_DIR = Path("book/_extra/vendor")
VENDOR_FILES = ("mathjax/tex-mml-chtml.js",)


@dataclass
class ModelRun:
    """The executed per-model notebooks found in one model's folder."""

    slug: str
    model: str
    notebooks: list[Path] = field(default_factory=list)


@dataclass
class RunsIndex:
    """What ``collect_runs`` found under a runs folder."""

    models: list[ModelRun] = field(default_factory=list)
    front: list[Path] = field(default_factory=list)
    back: list[Path] = field(default_factory=list)
    failed: list[Path] = field(default_factory=list)


def _model_order(slugs: list[str]) -> list[str]:
    """Default models first (in the zoo's order), then the others alphabetically."""
    try:
        preferred = [model_slug(m) for m in default_models()[0]]
    except Exception:  # no zoo yet, or a broken one: fall back to plain sorting
        preferred = []
    rank = {slug: i for i, slug in enumerate(preferred)}
    return sorted(slugs, key=lambda s: (rank.get(s, len(rank)), s))


def _label(nb_meta: dict[str, Any], folder: Path) -> str:
    """The model's name for the sidebar: recorded by the runner, else derived without local paths."""
    label = nb_meta.get(METADATA_KEY, {}).get("model_label")
    if label:
        return str(label)
    model = nb_meta.get("papermill", {}).get("parameters", {}).get("model")
    return model_label(str(model)) if model else folder.name


def collect_runs(runs_dir: str | Path) -> RunsIndex:
    """Index the executed notebooks under ``runs_dir`` (one folder per model plus ``book/``).

    Failed runs (``*.failed.ipynb``, or an exception in papermill's record) and notebooks that
    papermill never executed go to ``failed``; hidden files and folders (staging folders of runs
    in progress) are ignored.
    """
    runs_dir = Path(runs_dir)
    index = RunsIndex()
    if not runs_dir.is_dir():
        return index
    models: dict[str, ModelRun] = {}
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        for nb in sorted(folder.glob("*.ipynb")):
            if nb.name.startswith("."):
                continue
            if nb.name.endswith(FAILED_SUFFIX):
                index.failed.append(nb)
                continue
            nb_meta = read_notebook_metadata(
                nb, "Rerun it with moe-book run, or delete it to leave it out of the book."
            )
            meta = nb_meta.get("papermill")
            if not meta or meta.get("exception"):
                index.failed.append(nb)
                continue
            if folder.name == BOOK_FOLDER:
                place = notebook_info(nb, nb_meta).place
                (index.front if place == "front" else index.back).append(nb)
                continue
            models.setdefault(folder.name, ModelRun(folder.name, _label(nb_meta, folder))).notebooks.append(nb)
    index.models = [models[s] for s in _model_order(list(models))]
    return index


def _doc(path: Path, root: Path) -> str:
    """Sphinx document name of ``path`` relative to the book root, without suffix."""
    return path.resolve().relative_to(root.resolve()).with_suffix("").as_posix()


SUMMARY_NOTEBOOK = "summary"


def make_toc(index: RunsIndex, root: str | Path) -> dict[str, Any]:
    """The jb-book table of contents for ``index`` (paths relative to ``root``).

    Parts: the paper and the method (with the book-level "front" notebooks), one part per model,
    the summary (the book-level "back" notebooks, then any other ``book/*.md`` page), and the
    appendix for users who run the book themselves: the reproduce page, then
    :data:`APPENDIX_PAGES` that exist, and the citation page last.
    """
    root = Path(root)
    pages = root / PAGES_DIR
    for name in (ROOT_PAGE, *FRONT_PAGES, LAST_PAGE):
        if not (pages / f"{name}.md").exists():
            raise MoEUtilsError(f"page {pages / name}.md is missing; it is part of every book")
    known = {ROOT_PAGE, *FRONT_PAGES, LAST_PAGE, *APPENDIX_PAGES, CITE_PAGE}
    extra_pages = sorted(p.stem for p in pages.glob("*.md") if p.stem not in known)

    # the answer first: a book-level summary page comes right after the intro
    first = [nb for nb in index.front if nb.stem == SUMMARY_NOTEBOOK]
    front = [{"file": _doc(nb, root)} for nb in first]
    front += [{"file": f"{PAGES_DIR}/{name}"} for name in FRONT_PAGES]
    front += [{"file": _doc(nb, root)} for nb in index.front if nb not in first]
    parts: list[dict[str, Any]] = [{"caption": "The paper and the method", "chapters": front}]
    for run in index.models:
        chapters = [{"file": _doc(nb, root)} for nb in run.notebooks]
        parts.append({"caption": f"Model: {run.model}", "chapters": chapters})
    back = [{"file": _doc(nb, root)} for nb in index.back]
    back += [{"file": f"{PAGES_DIR}/{p}"} for p in extra_pages]
    if back:
        parts.append({"caption": "Summary", "chapters": back})
    appendix = [LAST_PAGE, *(p for p in APPENDIX_PAGES if (pages / f"{p}.md").exists())]
    if (pages / f"{CITE_PAGE}.md").exists():
        appendix.append(CITE_PAGE)
    parts.append({"caption": APPENDIX_CAPTION, "chapters": [{"file": f"{PAGES_DIR}/{p}"} for p in appendix]})
    return {"format": "jb-book", "root": f"{PAGES_DIR}/{ROOT_PAGE}", "parts": parts}


def write_toc(toc: dict[str, Any], path: str | Path) -> Path:
    """Write a table of contents as YAML (with a header saying it is generated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Generated by `moe-book build` from the executed notebooks; edits are overwritten.\n"
    path.write_text(header + yaml.safe_dump(toc, sort_keys=False), encoding="utf-8")
    return path


def launch_config(config: dict[str, Any], repository_url: str, branch: str = "main") -> dict[str, Any]:
    """``config`` (a ``_config.yml``) with the repository button and Binder and Colab launch buttons.

    The buttons open a page's notebook from ``repository_url`` at ``branch``, so the executed
    notebooks must be committed there. Without this the site has no launch buttons.
    """
    if not repository_url.startswith(("https://", "http://")):
        raise MoEUtilsError(
            f"repository URL {repository_url!r} must start with https://, e.g. https://github.com/OWNER/REPO"
        )
    out = {key: (dict(value) if isinstance(value, dict) else value) for key, value in config.items()}
    out["repository"] = {**out.get("repository", {}), "url": repository_url.rstrip("/"), "branch": branch}
    out["launch_buttons"] = {**out.get("launch_buttons", {}), "binderhub_url": BINDER_URL, "colab_url": COLAB_URL}
    out["html"] = {**out.get("html", {}), "use_repository_button": True}
    return out


def write_launch_config(root: Path, repository_url: str, branch: str = "main") -> Path:
    """Write ``root``'s ``_config.yml`` with launch buttons to ``GENERATED_CONFIG``; return its path."""
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8")) or {}
    path = root / GENERATED_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Generated by `moe-book build --repository-url`: _config.yml with launch buttons.\n"
    path.write_text(
        header + yaml.safe_dump(launch_config(config, repository_url, branch), sort_keys=False), encoding="utf-8"
    )
    return path


def check_assets(root: Path, log: Log) -> None:
    """Write the vega bundle if missing; warn when the npm vendor files are missing."""
    bundle = root / VEGA_BUNDLE
    if not bundle.exists():
        write_vega_bundle(bundle)
        log(f"wrote {bundle}")
    missing = [f for f in VENDOR_FILES if not (root / VENDOR_DIR / f).exists()]
    if missing:
        log(
            f"WARNING: {', '.join(missing)} missing under {root / VENDOR_DIR}: math "
            f"will not render offline. In a clone, run `make vendor` (needs npm) and build again; a folder "
            f"made by `moe-book init` has them."
        )


def _staging_build_dir(build_dir: Path) -> Path:
    """A fresh output folder for one build, seeded with the previous build's doctree cache.

    Sphinx then rebuilds incrementally but writes every HTML page anew (none exist there yet), so
    pages of models no longer in the runs folder do not linger in the new site.
    """
    (build_dir / "_build").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".site-staging-", dir=build_dir / "_build"))
    cache = build_dir / "_build" / ".doctrees"
    if cache.is_dir():
        shutil.copytree(cache, staging / "_build" / ".doctrees")
    return staging


def _swap_in(staging: Path, build_dir: Path) -> None:
    """Replace ``_build/html`` (and the doctree cache) by the staged build's, by renames."""
    new_html = staging / "_build" / "html"
    if not (new_html / "index.html").is_file():
        raise MoEUtilsError(f"the build wrote no {new_html / 'index.html'}; the previous site was kept")
    final = build_dir / "_build"
    html, old = final / "html", final / ".html-previous"
    shutil.rmtree(old, ignore_errors=True)
    if html.exists():
        os.replace(html, old)
    os.replace(new_html, html)
    shutil.rmtree(old, ignore_errors=True)
    for name in (".doctrees", "jupyter_execute"):
        src = staging / "_build" / name
        if src.is_dir():
            shutil.rmtree(final / name, ignore_errors=True)
            os.replace(src, final / name)


def build_book(
    root: str | Path = ".",
    runs_dir: str | Path = "book/runs",
    build_dir: str | Path | None = None,
    strict: bool = True,
    log: Log = print,
    repository_url: str | None = None,
    branch: str = "main",
    allow_fewer_pages: bool = False,
) -> Path:
    """Generate the TOC from ``runs_dir`` and run ``jupyter-book build``; return the HTML folder.

    ``runs_dir`` must lie inside ``root`` (Sphinx only reads documents under its source folder).
    ``strict`` turns Sphinx warnings into errors (``-W --keep-going``). ``repository_url`` adds
    Binder and Colab launch buttons for that repository (at ``branch``); none by default.
    A missing or empty runs folder, or one that would drop model pages of the current site
    (unless ``allow_fewer_pages``), is refused before anything is written (:mod:`.guards`).
    """
    if importlib.util.find_spec("jupyter_book") is None:
        raise MoEUtilsError(
            "moe-book build needs Jupyter Book, which is not installed: "
            "pip install 'moe-utils[book]' (or jupyter-book<2)"
        )
    root = Path(root).resolve()
    if not (root / "_config.yml").exists():
        raise MoEUtilsError(
            f"{root} has no _config.yml; run moe-book build in a book folder (the repository "
            "root, or one made by moe-book init)"
        )
    runs = (root / runs_dir).resolve()  # an absolute runs_dir stays as it is
    if not runs.is_relative_to(root):
        raise MoEUtilsError(f"runs folder {runs} must be inside the book folder {root}")
    check_runs_folder(runs)
    finish_landings(runs)  # runs killed while landing: their new notebook and results
    index = collect_runs(runs)
    build_dir = Path(build_dir).resolve() if build_dir is not None else root
    check_build(
        runs,
        executed=sum(len(run.notebooks) for run in index.models) + len(index.front) + len(index.back),
        failed=len(index.failed),
        new_pages={_doc(nb, root) for run in index.models for nb in run.notebooks},
        old_pages=current_model_pages(root, runs, build_dir / "_build" / "html", root / GENERATED_TOC),
        allow_fewer_pages=allow_fewer_pages,
    )
    for nb in index.failed:
        log(
            f"WARNING: leaving out {nb.relative_to(root)}: its run failed or did not finish "
            "(rerun it with moe-book run)"
        )
    toc = write_toc(make_toc(index, root), root / GENERATED_TOC)
    write_findings(root, runs.relative_to(root))
    check_assets(root, log)
    staging = _staging_build_dir(build_dir)
    cmd = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(root),
        "--toc",
        str(toc),
        "--path-output",
        str(staging),
    ]
    if repository_url:
        cmd += ["--config", str(write_launch_config(root, repository_url, branch))]
    if strict:
        cmd += ["--warningiserror", "--keep-going"]
    log(f"building: jupyter-book build {root} --toc {toc} --path-output {build_dir}")
    try:
        proc = subprocess.run(cmd, cwd=root)
        if proc.returncode != 0:
            raise MoEUtilsError(
                f"jupyter-book build failed (exit {proc.returncode}); the messages above say which page. "
                f"The previous site in {build_dir / '_build' / 'html'} was kept."
            )
        _swap_in(staging, build_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    html = build_dir / "_build" / "html"
    shown = html.relative_to(Path.cwd()) if html.is_relative_to(Path.cwd()) else html
    log(f"site built: open {shown / 'index.html'}")
    log(f"or serve it: python3 -m http.server -d {shown}   (then visit http://127.0.0.1:8000)")
    return html
