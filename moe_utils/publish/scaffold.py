"""A new book folder for a user of the installed package (``moe-book init DIR``).

The folder has the layout that ``moe-book run`` and ``moe-book build`` expect in their working
directory, the same as the repository's: ``_config.yml`` and ``_toc.yml`` at its root, the
hand-written pages and the bibliography in ``book/``, the notebooks in ``notebooks/``, and the
JavaScript the site serves itself (``book/_static/vega-bundle.js`` and ``book/_extra/vendor/``),
so that building and reading the site needs neither npm nor a network connection.

What is copied is listed in ``book_files.txt`` beside this module. An installed wheel carries
those files in ``book_template/`` (put there by the build, see ``setup.py``); in a clone of the
repository they are read from the repository root.
"""

from __future__ import annotations

from pathlib import Path

from moe_utils.core.errors import MoEUtilsError, UsageError

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "book_files.txt"
PACKAGED_TEMPLATE = HERE / "book_template"
REPOSITORY_ROOT = HERE.parents[1]
OFFLINE_JS = (
    "book/_static/vega-bundle.js",
    "book/_extra/vendor/require.js",
    "book/_extra/vendor/ipywidgets/embed-amd.js",
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


def init_book(dest: str | Path) -> list[Path]:
    """Write a new book folder at ``dest`` (absent or empty); return the files written.

    Besides the template's files it gets a ``_toc.yml`` of its hand-written pages and a
    ``.gitignore`` for the build outputs.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} already exists and is not an empty folder; choose a new folder name")
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
    chapters = "".join(f"      - file: {page}\n" for page in TOC_PAGES if (dest / f"{page}.md").is_file())
    for name, text in (("_toc.yml", TOC_TEXT.format(chapters=chapters)), (".gitignore", GITIGNORE_TEXT)):
        (dest / name).write_text(text, encoding="utf-8")
        written.append(dest / name)
    return written
