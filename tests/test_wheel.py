"""The package as a user installs it: the built wheel in a fresh virtual environment.

In an empty folder, with nothing of the repository importable: ``moe-book --version``,
``moe-book init mybook``, then inside it ``moe-book run --model random:mixtral`` and
``moe-book build``; the site must have the model's pages and serve its JavaScript itself.
The virtual environment is made once per test session (torch first, pinned, as the Makefile does).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from moe_utils import __version__
from moe_utils.publish import scaffold

pytestmark = [pytest.mark.slow, pytest.mark.wheel]

MODEL = "random:mixtral"
SLUG = "random-mixtral"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 3600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def installed(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A fresh virtual environment with the wheel of this tree (book extra) installed in it."""
    missing = [name for name in scaffold.OFFLINE_JS if not (repo_root / name).is_file()]
    if missing:
        pytest.skip(f"the wheel needs the vendored JavaScript ({', '.join(missing)}): make vendor")
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(repo_root),
        ],
        cwd=repo_root,
        timeout=1800,
    )
    (wheel,) = dist.glob("moe_utils-*.whl")
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(venv)], cwd=dist)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(repo_root / "constraints.txt")]
    _run([*pip, "torch==2.13.0"], cwd=dist)
    _run([*pip, f"{wheel}[book]"], cwd=dist)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="session")
def user_book(installed: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``moe-book init``, ``run`` and ``build`` in an empty folder, as a new user would."""
    empty = tmp_path_factory.mktemp("empty")
    _run(["moe-book", "init", "mybook"], cwd=empty, env=installed)
    book = empty / "mybook"
    _run(["moe-book", "run", "--model", MODEL], cwd=book, env=installed)
    _run(["moe-book", "build"], cwd=book, env=installed)
    return book


class _Assets(HTMLParser):
    """Every script ``src`` and stylesheet ``href`` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.urls.append(a["src"] or "")
        if tag == "link" and a.get("rel") == "stylesheet" and a.get("href"):
            self.urls.append(a["href"] or "")


def test_installed_package_is_the_wheel_and_knows_its_version(installed: dict[str, str], tmp_path: Path) -> None:
    out = _run(["moe-book", "--version"], cwd=tmp_path, env=installed)
    assert out.strip() == f"moe-book {__version__}"
    where = _run(["python", "-c", "import moe_utils; print(moe_utils.__file__)"], cwd=tmp_path, env=installed)
    assert "site-packages" in where, where


def test_user_book_has_its_files(user_book: Path, repo_root: Path) -> None:
    for nb in (repo_root / "notebooks").glob("*.ipynb"):
        assert (user_book / "notebooks" / nb.name).read_bytes() == nb.read_bytes()
    for name in scaffold.OFFLINE_JS:
        assert (user_book / name).read_bytes() == (repo_root / name).read_bytes(), name


def test_user_site_has_the_model_pages_and_serves_its_javascript(user_book: Path) -> None:
    html = user_book / "_build" / "html"
    assert (html / "index.html").is_file()
    model_pages = sorted((html / "book" / "runs" / SLUG).glob("*.html"))
    per_model = sorted(p.stem for p in (user_book / "book" / "runs" / SLUG).glob("*.ipynb"))
    assert per_model and [p.stem for p in model_pages] == per_model
    for name in (
        "vendor/require.js",
        "vendor/ipywidgets/embed-amd.js",
        "vendor/mathjax/tex-mml-chtml.js",
        "_static/vega-bundle.js",
    ):
        assert (html / name).is_file(), name
    for page in sorted(html.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        parser = _Assets()
        parser.feed(text)
        remote = [u for u in parser.urls if re.match(r"(https?:)?//", u)]
        assert not remote, f"{page.relative_to(html)} loads {remote}"
    chart_page = (html / "book" / "runs" / SLUG / "obs2_router_norms.html").read_text(encoding="utf-8")
    assert "vega-bundle.js" in chart_page and "vegaEmbed" in chart_page
