"""``moe-book init``: the book folder a user of the installed package starts from; launch buttons."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from moe_utils.core.errors import MoEUtilsError
from moe_utils.publish import bookbuild, scaffold
from moe_utils.publish.cli import main

needs_vendor = pytest.mark.skipif(
    not all((scaffold.REPOSITORY_ROOT / name).is_file() for name in scaffold.OFFLINE_JS),
    reason="the offline JavaScript is not vendored in this clone (make vendor)",
)


@needs_vendor
def test_init_writes_a_complete_book_folder(tmp_path: Path, repo_root: Path, capsys) -> None:
    dest = tmp_path / "mybook"
    assert main(["init", str(dest)]) == 0
    assert "moe-book run --model" in capsys.readouterr().out
    # Every source notebook and hand-written page of the book, byte for byte.
    for nb in (repo_root / "notebooks").glob("*.ipynb"):
        assert (dest / "notebooks" / nb.name).read_bytes() == nb.read_bytes()
    for name in (
        "_config.yml",
        "book/intro.md",
        "book/method.md",
        "book/reproduce.md",
        "book/references.bib",
        *scaffold.OFFLINE_JS,
    ):
        assert (dest / name).read_bytes() == (repo_root / name).read_bytes(), name
    vendored = {p.relative_to(repo_root) for p in (repo_root / "book/_extra/vendor").rglob("*") if p.is_file()}
    assert vendored and all((dest / rel).is_file() for rel in vendored)
    # The project's own coverage page is not part of a user's book, and the toc lists only pages present.
    assert not (dest / "book" / "coverage.md").exists()
    toc = yaml.safe_load((dest / "_toc.yml").read_text(encoding="utf-8"))
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert toc["root"] == "book/intro" and all((dest / f"{f}.md").is_file() for f in files)
    assert "book/coverage" not in files
    # The generated table of contents of moe-book build finds its fixed pages there.
    generated = bookbuild.make_toc(bookbuild.RunsIndex(), dest)
    assert generated["root"] == "book/intro"


@needs_vendor
def test_init_refuses_a_folder_in_use(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["init", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_init_without_the_offline_javascript_says_what_to_do(tmp_path: Path, repo_root: Path, monkeypatch) -> None:
    clone = tmp_path / "clone"
    (clone / "book").mkdir(parents=True)
    shutil.copy(repo_root / "_config.yml", clone)
    shutil.copytree(repo_root / "notebooks", clone / "notebooks")
    monkeypatch.setattr(scaffold, "REPOSITORY_ROOT", clone)
    monkeypatch.setattr(scaffold, "PACKAGED_TEMPLATE", tmp_path / "not-installed")
    with pytest.raises(MoEUtilsError, match="make vendor"):
        scaffold.init_book(tmp_path / "mybook")
    assert not (tmp_path / "mybook").exists()


def test_manifest_patterns_match_files_of_the_repository(repo_root: Path) -> None:
    for pattern in scaffold.manifest_patterns():
        if "vendor" in pattern or "vega-bundle" in pattern:
            continue  # copied by `make vendor`, not committed
        assert any(p.is_file() for p in repo_root.glob(pattern)), f"{pattern} matches nothing"


def test_launch_buttons_are_off_by_default(repo_root: Path) -> None:
    config = yaml.safe_load((repo_root / "_config.yml").read_text(encoding="utf-8"))
    buttons = config["launch_buttons"]
    assert not buttons["binderhub_url"] and not buttons["colab_url"] and not config["repository"]["url"]
    assert config["html"]["use_repository_button"] is False


def test_launch_buttons_follow_the_repository_url(repo_root: Path) -> None:
    config = yaml.safe_load((repo_root / "_config.yml").read_text(encoding="utf-8"))
    out = bookbuild.launch_config(config, "https://github.com/someone/mybook/", branch="pages")
    assert out["repository"]["url"] == "https://github.com/someone/mybook"
    assert out["repository"]["branch"] == "pages"
    assert out["launch_buttons"]["binderhub_url"] == bookbuild.BINDER_URL
    assert out["launch_buttons"]["colab_url"] == bookbuild.COLAB_URL
    assert out["html"]["use_repository_button"] is True
    # The rest of the configuration is kept, and the input is not changed.
    assert out["sphinx"] == config["sphinx"] and out["title"] == config["title"]
    assert config["launch_buttons"]["colab_url"] == ""
    with pytest.raises(MoEUtilsError, match="https://"):
        bookbuild.launch_config(config, "github.com/someone/mybook")


def test_build_parser_knows_init_and_the_repository_url() -> None:
    from moe_utils.publish.cli import build_parser

    args = build_parser().parse_args(["build", "--repository-url", "https://example.org/r"])
    assert args.repository_url == "https://example.org/r" and args.branch == "main"
    assert build_parser().parse_args(["build"]).repository_url is None
    assert build_parser().parse_args(["init", "mybook"]).dir == Path("mybook")
    assert build_parser().parse_args(["init", "mybook"]).repository_url is None
    init = build_parser().parse_args(["init", "mybook", "--repository-url", "https://example.org/r", "--branch", "b"])
    assert init.repository_url == "https://example.org/r" and init.branch == "b"


@needs_vendor
def test_init_with_a_repository_url_turns_the_launch_buttons_on(tmp_path: Path, repo_root: Path) -> None:
    dest = tmp_path / "mybook"
    assert main(["init", str(dest), "--repository-url", "https://github.com/someone/mybook/", "--branch", "pages"]) == 0
    text = (dest / "_config.yml").read_text(encoding="utf-8")
    original = (repo_root / "_config.yml").read_text(encoding="utf-8")
    expected = bookbuild.launch_config(yaml.safe_load(original), "https://github.com/someone/mybook", branch="pages")
    assert yaml.safe_load(text) == expected
    # Edited in place: the template's other lines and comments are kept.
    changed = set(text.splitlines()) ^ set(original.splitlines())
    assert len(changed) <= 14 and any("sphinx prefixes" in line.lower() for line in text.splitlines())
    assert scaffold.OFFLINE_COMMENT not in text
    # The other files are the template's, as without the option.
    assert (dest / "notebooks" / "obs2_router_norms.ipynb").read_bytes() == (
        repo_root / "notebooks" / "obs2_router_norms.ipynb"
    ).read_bytes()


@needs_vendor
def test_init_refuses_a_repository_url_that_is_not_one(tmp_path: Path, capsys) -> None:
    assert main(["init", str(tmp_path / "mybook"), "--repository-url", "github.com/someone/mybook"]) == 2
    assert "https://" in capsys.readouterr().err
    assert not (tmp_path / "mybook").exists()


def test_launch_buttons_of_a_config_laid_out_otherwise_are_set_too() -> None:
    text = 'title: "t"\nlaunch_buttons: {binderhub_url: "", colab_url: ""}\nrepository: {url: ""}\n'
    out = scaffold.config_with_launch_buttons(text, "https://example.org/r", branch="dev")
    assert yaml.safe_load(out) == bookbuild.launch_config(yaml.safe_load(text), "https://example.org/r", branch="dev")
    assert yaml.safe_load(out)["html"]["use_repository_button"] is True
