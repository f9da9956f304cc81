"""Build hook: put the book template (pages, notebooks, offline JavaScript) into the wheel.

Everything else is declared in pyproject.toml. The files listed in
``moe_utils/publish/book_files.txt`` live at the repository root (the book is built from there),
so a plain package-data entry cannot reach them; this copies them into
``moe_utils/publish/book_template/`` of the build, where ``moe-book init`` finds them once the
package is installed. Editable installs read them from the repository instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MANIFEST = ROOT / "moe_utils" / "publish" / "book_files.txt"
TEMPLATE = Path("moe_utils", "publish", "book_template")
NEEDS_VENDOR = ("book/_static/vega-bundle.js", "book/_extra/vendor/mathjax/tex-mml-chtml.js")


def book_files() -> list[Path]:
    """The files of the manifest's patterns, relative to the repository root."""
    patterns = [line.strip() for line in MANIFEST.read_text(encoding="utf-8").splitlines()]
    found: set[Path] = set()
    for pattern in patterns:
        if pattern and not pattern.startswith("#"):
            found |= {p.relative_to(ROOT) for p in ROOT.glob(pattern) if p.is_file()}
    return sorted(found)


class BuildPyWithBook(build_py):
    """``build_py`` that also copies the book template into the built package."""

    def run(self) -> None:
        editable = getattr(self, "editable_mode", False)
        if not editable:
            # build/lib of an earlier build would otherwise keep modules removed since then, and
            # they would end up in the wheel.
            shutil.rmtree(Path(self.build_lib) / "moe_utils", ignore_errors=True)
        super().run()
        if editable:
            return
        missing = [name for name in NEEDS_VENDOR if not (ROOT / name).is_file()]
        if missing:
            raise SystemExit(
                f"cannot build the package: {', '.join(missing)} missing. The wheel ships the book's "
                "offline JavaScript; run `make vendor` (needs npm) first, then build again."
            )
        dest = Path(self.build_lib) / TEMPLATE
        shutil.rmtree(dest, ignore_errors=True)
        for rel in book_files():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target)


setup(cmdclass={"build_py": BuildPyWithBook})
