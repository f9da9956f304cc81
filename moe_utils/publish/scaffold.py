"""A new book folder for a user of the installed package (``moe-book init DIR``).

The folder has the layout that ``moe-book run`` and ``moe-book build`` expect in their working
directory, the same as the repository's: ``_config.yml`` and ``_toc.yml`` at its root, the
hand-written pages and the bibliography in ``book/``, the notebooks in ``notebooks/``, and the
JavaScript the site serves itself (``book/_static/vega-bundle.js`` and ``book/_extra/vendor/``),
so that building and reading the site needs neither npm nor a network connection.

The site has no launch buttons unless asked: ``moe-book init DIR --repository-url URL`` writes a
``_config.yml`` with Binder and Colab buttons (and the repository button) for the repository the
book will be pushed to, the same settings that ``moe-book build --repository-url`` applies to one
build.

What is copied is listed in ``book_files.txt`` beside this module. An installed wheel carries
those files in ``book_template/`` (put there by the build, see ``setup.py``); in a clone of the
repository they are read from the repository root.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from moe_utils.core.errors import MoEUtilsError, UsageError
from moe_utils.publish.bookbuild import launch_config

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "book_files.txt"
PACKAGED_TEMPLATE = HERE / "book_template"
REPOSITORY_ROOT = HERE.parents[1]
OFFLINE_JS = (
    "book/_static/vega-bundle.js",
    "book/_extra/vendor/mathjax/tex-mml-chtml.js",
)
TOC_PAGES = ("book/method", "book/reproduce", "book/performance")
TOC_TEXT = """\
# The hand-written pages only. `moe-book build` generates the full table of contents
# (book/generated/_toc.yml) from the notebooks that `moe-book run` executed.
format: jb-book
root: book/intro
parts:
  - caption: The paper and the method
    chapters:
{chapters}"""
GITIGNORE_TEXT = "_build/\nbook/generated/\n**/.ipynb_checkpoints/\n"


def manifest_patterns(manifest: Path = MANIFEST) -> list[str]:
    """The glob patterns of ``book_files.txt`` (comments and blank lines dropped)."""
    lines = (line.strip() for line in manifest.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def template_root() -> Path:
    """Where the book's files are read from: the installed template, else the repository."""
    if PACKAGED_TEMPLATE.is_dir():
        return PACKAGED_TEMPLATE
    if (REPOSITORY_ROOT / "_config.yml").is_file() and (REPOSITORY_ROOT / "notebooks").is_dir():
        return REPOSITORY_ROOT
    raise MoEUtilsError(
        f"this installation of moe_utils has no book template ({PACKAGED_TEMPLATE} is missing); "
        "reinstall the package from a wheel built with `python -m build`"
    )


def template_files(root: Path) -> list[Path]:
    """The files under ``root`` that a new book gets, relative to ``root``, sorted."""
    found: set[Path] = set()
    for pattern in manifest_patterns():
        found |= {p.relative_to(root) for p in root.glob(pattern) if p.is_file()}
    return sorted(found)


def _check_template(root: Path, files: list[Path]) -> None:
    """Refuse a template without notebooks or without the offline JavaScript, saying why."""
    names = {f.as_posix() for f in files}
    missing = [name for name in OFFLINE_JS if name not in names]
    if missing:
        raise MoEUtilsError(
            f"the book template in {root} lacks {', '.join(missing)}, which the site needs to work "
            "offline; in a clone of the repository run `make vendor` (needs npm) first"
        )
    if not any(f.parts[0] == "notebooks" for f in files):
        raise MoEUtilsError(f"the book template in {root} has no notebooks")


OFFLINE_COMMENT = "# No Binder, Colab or live kernels: the site is static and works offline."
LAUNCH_COMMENT = (
    "# Binder and Colab launch buttons (moe-book init --repository-url): they open a page's notebook\n"
    "# from the repository below, so commit the executed notebooks (book/runs) there. The site\n"
    "# itself still works offline."
)


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a JSON string is a YAML string


def _set_key(text: str, section: str, key: str, value: Any) -> str:
    """``text`` with ``key`` of the top-level mapping ``section`` set to ``value``, in place:
    the other lines (and their comments) stay as they are. Unchanged when the key is not there."""
    block = re.search(rf"^{re.escape(section)}:[ \t]*\n((?:[ \t]+.*\n|[ \t]*\n)*)", text, flags=re.M)
    if block is None:
        return text
    body = re.sub(
        rf"^([ \t]+{re.escape(key)}:)[ \t]*[^\n#]*?([ \t]+#.*)?$",
        lambda m: f"{m.group(1)} {_yaml_scalar(value)}{m.group(2) or ''}",
        block.group(1),
        count=1,
        flags=re.M,
    )
    return text[: block.start(1)] + body + text[block.end(1) :]


def config_with_launch_buttons(text: str, repository_url: str, branch: str = "main") -> str:
    """The text of a ``_config.yml`` with Binder and Colab launch buttons for ``repository_url``.

    The settings are those of :func:`moe_utils.publish.bookbuild.launch_config`. The template's
    lines are edited in place so that its comments stay; a config laid out otherwise is written
    out anew from the parsed settings (without comments)."""
    config = yaml.safe_load(text) or {}
    wanted = launch_config(config, repository_url, branch)
    edited = text.replace(OFFLINE_COMMENT, LAUNCH_COMMENT)
    for section in ("repository", "launch_buttons", "html"):
        for key, value in wanted[section].items():
            if config.get(section, {}).get(key) != value:
                edited = _set_key(edited, section, key, value)
    if yaml.safe_load(edited) == wanted:
        return edited
    return "# Written by moe-book init --repository-url.\n" + yaml.safe_dump(wanted, sort_keys=False)


def init_book(dest: str | Path, repository_url: str | None = None, branch: str = "main") -> list[Path]:
    """Write a new book folder at ``dest`` (absent or empty); return the files written.

    Besides the template's files it gets a ``_toc.yml`` of its hand-written pages and a
    ``.gitignore`` for the build outputs. With ``repository_url`` its ``_config.yml`` has Binder
    and Colab launch buttons opening the notebooks from that repository at ``branch``; without,
    the site has none.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} already exists and is not an empty folder; choose a new folder name")
    if repository_url is not None:
        try:
            launch_config({}, repository_url, branch)
        except MoEUtilsError as exc:
            raise UsageError(str(exc)) from None
    root = template_root()
    files = template_files(root)
    _check_template(root, files)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((root / rel).read_bytes())
        written.append(target)
    if repository_url is not None:
        config = dest / "_config.yml"
        text = config.read_text(encoding="utf-8")
        config.write_text(config_with_launch_buttons(text, repository_url, branch), encoding="utf-8")
    chapters = "".join(f"      - file: {page}\n" for page in TOC_PAGES if (dest / f"{page}.md").is_file())
    for name, text in (("_toc.yml", TOC_TEXT.format(chapters=chapters)), (".gitignore", GITIGNORE_TEXT)):
        (dest / name).write_text(text, encoding="utf-8")
        written.append(dest / name)
    return written
