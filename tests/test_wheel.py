"""The package as a user installs it: the built wheel in a fresh virtual environment.

In an empty folder, with nothing of the repository importable: ``moe-book --version``,
``moe-book init mybook``, then inside it ``moe-book run --model random:mixtral`` and
``moe-book build``; the site must have the model's pages, serve its JavaScript itself, draw its
charts in a Chromium that can reach no other host, and have no launch buttons. A second book made
with ``moe-book init --repository-url`` and built from the same runs has Binder and Colab buttons
for that repository. The virtual environment is made once per test session (torch first, pinned,
as the Makefile does).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import chromium
import pytest
import yaml

from moe_utils import __version__
from moe_utils.publish import scaffold

pytestmark = [pytest.mark.slow, pytest.mark.wheel]

MODEL = "random:mixtral"
SLUG = "random-mixtral"
REPOSITORY = "https://github.com/someone/mybook"
LAUNCH_HOSTS = ("colab.research.google.com", "mybinder.org")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 3600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def wheel(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this tree."""
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
    (built,) = dist.glob("moe_utils-*.whl")
    return built


@pytest.fixture(scope="session")
def venv(wheel: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with ``wheel`` (book extra) installed in it."""
    venv = tmp_path_factory.mktemp("venv")
    env = _outside_env()  # with PYTHONPATH at this tree, pip would take the package as installed
    _run([sys.executable, "-m", "venv", str(venv)], cwd=wheel.parent, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(repo_root / "constraints.txt")]
    _run([*pip, "torch==2.13.0"], cwd=wheel.parent, env=env)
    _run([*pip, f"{wheel}[book]"], cwd=wheel.parent, env=env)
    return venv


def _outside_env() -> dict[str, str]:
    """This process's environment without what would make this tree or another venv importable."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


@pytest.fixture(scope="session")
def installed(venv: Path) -> dict[str, str]:
    """The environment of a shell of a user of ``venv``: its ``bin`` first on PATH, no PYTHONPATH."""
    env = _outside_env()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="session")
def user_book(installed: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``moe-book init``, ``run`` and ``build`` in an empty folder, as a new user would."""
    empty = tmp_path_factory.mktemp("empty")
    out = _run(["moe-book", "init", "mybook"], cwd=empty, env=installed)
    assert "moe-book run --model" in out
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


@pytest.fixture(scope="session")
def launch_book(user_book: Path, installed: dict[str, str]) -> Path:
    """A book made with ``moe-book init --repository-url``, built from ``user_book``'s runs."""
    book = user_book.parent / "mybook-launch"
    _run(["moe-book", "init", book.name, "--repository-url", REPOSITORY], cwd=user_book.parent, env=installed)
    shutil.copytree(user_book / "book" / "runs", book / "book" / "runs")
    _run(["moe-book", "build"], cwd=book, env=installed)
    return book


def _launch_links(html: Path) -> dict[str, list[str]]:
    """The links to Colab or Binder of each page of the site ``html``, by page."""
    found = {}
    for page in sorted(html.rglob("*.html")):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        links = [u for u in parser.urls if urlparse(u).hostname in LAUNCH_HOSTS]
        if links:
            found[page.relative_to(html).as_posix()] = links
    return found


class _Links(HTMLParser):
    """Every ``href`` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if href:
            self.urls.append(href)


def test_wheel_holds_the_sources_and_the_book_template_and_nothing_else(wheel: Path, repo_root: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    modules = {n for n in names if n.endswith(".py") and "/book_template/" not in n}
    sources = {p.relative_to(repo_root).as_posix() for p in (repo_root / "moe_utils").rglob("*.py")}
    # No module of an earlier build (a stale build/lib) and none missing.
    assert modules == sources
    prefix = "moe_utils/publish/book_template/"
    template = {n[len(prefix) :] for n in names if n.startswith(prefix)}
    expected = {p.as_posix() for p in scaffold.template_files(repo_root)}
    assert template == expected and set(scaffold.OFFLINE_JS) <= template


def test_installed_package_is_the_wheel_and_knows_its_version(
    venv: Path, installed: dict[str, str], tmp_path: Path
) -> None:
    out = _run(["moe-book", "--version"], cwd=tmp_path, env=installed)
    assert out.strip() == f"moe-book {__version__}"
    assert Path(shutil.which("moe-book", path=installed["PATH"]) or "").parent == venv / "bin"
    code = "import moe_utils.publish.scaffold as s; print(s.__file__); print(s.template_root())"
    where, template = _run(["python", "-c", code], cwd=tmp_path, env=installed).split()
    assert Path(where).resolve().is_relative_to(venv.resolve()) and "site-packages" in where, where
    assert Path(template).name == "book_template" and Path(template).resolve().is_relative_to(venv.resolve())


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


@pytest.mark.browser
def test_user_site_draws_its_charts_offline(user_book: Path, tmp_path: Path) -> None:
    html = user_book / "_build" / "html"
    pages = sorted((html / "book" / "runs" / SLUG).glob("*.html"))
    with chromium.serve(html) as site, chromium.open_browser(tmp_path / "chromium-profile") as browser:
        for page in pages:
            chromium.open_chart_page(browser, f"{site}/book/runs/{SLUG}/{page.name}")
            undrawn = browser.evaluate(
                "Array.from(document.querySelectorAll('.moe-book-chart'))"
                ".filter(c => c.querySelector('svg, canvas') === null).length"
            )
            assert undrawn == 0, f"{page.name}: {undrawn} chart(s) not drawn"
        requested = chromium.requested_urls(browser)
        assert any(u.endswith("/_static/vega-bundle.js") or "/_static/vega-bundle.js?" in u for u in requested)
        assert not chromium.requests_elsewhere(browser), chromium.requests_elsewhere(browser)


def test_user_book_has_no_launch_buttons_by_default(user_book: Path) -> None:
    config = yaml.safe_load((user_book / "_config.yml").read_text(encoding="utf-8"))
    assert not config["repository"]["url"] and not config["launch_buttons"]["colab_url"]
    assert not config["launch_buttons"]["binderhub_url"]
    assert _launch_links(user_book / "_build" / "html") == {}


def test_book_made_with_a_repository_url_has_colab_and_binder_buttons(launch_book: Path) -> None:
    links = _launch_links(launch_book / "_build" / "html")
    names = sorted(p.stem for p in (launch_book / "book" / "runs" / SLUG).glob("*.ipynb"))
    assert names
    for name in names:
        notebook = f"book/runs/{SLUG}/{name}.ipynb"
        page = links.get(f"book/runs/{SLUG}/{name}.html", [])
        assert f"https://colab.research.google.com/github/someone/mybook/blob/main/{notebook}" in page, page
        assert f"https://mybinder.org/v2/gh/someone/mybook/main?urlpath=lab/tree/{notebook}" in page, page
