"""What happens when a run goes wrong: one test per case of the book's "What happens when..." table.

Most cases go through the public command line (``moe_utils.publish.cli.main`` in-process, or a
``moe-book`` subprocess where a signal must hit it). Small stand-in notebooks keep them fast: they
declare their parameters like the real ones and write a results file with ``moe_utils.analysis.results``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from tiny_models import synthetic_mistral, synthetic_mixtral, tiny

from moe_utils.analysis.context import checkpoint_only, open_study
from moe_utils.analysis.results import read_result
from moe_utils.core.errors import CheckpointError, InputSpecError, PickleRefusedError, UsageError
from moe_utils.models import fingerprint
from moe_utils.models.consistency import ConfigMismatchError
from moe_utils.models.loading import load_model
from moe_utils.publish import bookbuild, cli, pages, plan, runner, staging

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "moe_utils" / "zoo" / "models"
MODEL, SLUG = "zoo:tiny-moe-fine", "tiny-moe-fine"  # a real zoo id: the stand-in notebooks never load it

FAKE_PARAMETERS = """model = "zoo:x"
dense_baseline: "Optional[str]" = None
results_dir: "Optional[str]" = None
inputs = "short"
value = 1
fail = False
sleep = 0.0"""

FAKE_BODY = """import time
import warnings
from pathlib import Path
from moe_utils.publish.render import setup_altair
from moe_utils.analysis.results import write_result
setup_altair()
warnings.warn("a visible note")
write_result(results_dir, "obs_fake", model, "fp", {"value": value}, {}, {"v": value})
print("model:", model, "inputs:", inputs)
print("results in", Path(results_dir) / "obs_fake.json")
time.sleep(sleep)
if fail:
    raise RuntimeError("boom")"""


def fake_notebooks(folder: Path) -> Path:
    """A notebooks folder with one per-model stand-in notebook, ``obs_fake``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["moe_book"] = {"scope": "model"}
    nb.cells = [
        nbformat.v4.new_code_cell(FAKE_PARAMETERS, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(FAKE_BODY),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / "obs_fake.ipynb")
    return folder


def run_cli(nbs: Path, out: Path, *args: str, model: str = MODEL) -> int:
    return cli.main(["run", "--model", model, "--notebooks-dir", str(nbs), "--out", str(out), *args])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every visible file under ``folder`` (relative path -> bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


@pytest.fixture()
def first_run(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A successful first run of ``obs_fake`` (value 1): notebooks dir, runs dir, its files."""
    nbs, out = fake_notebooks(tmp_path / "nbs"), tmp_path / "runs"
    assert run_cli(nbs, out, "-p", "value", "1") == 0
    assert read_result(out / SLUG / "results" / "obs_fake.json").value("v") == 1
    return nbs, out, snapshot(out)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def _wait_for_staged_result(out: Path, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in (out / SLUG).glob(".staging-*/results/obs_fake.json"):
            if json.loads(path.read_text())["summary"]["v"]["value"] == 2:
                return path
        time.sleep(0.2)
    raise AssertionError("the staged run never wrote its results file")


# --------------------------------------------------------------------------- 3. transactional runs


@pytest.mark.slow
def test_failed_run_keeps_previous_notebook_and_results(first_run, capsys) -> None:
    nbs, out, before = first_run
    assert run_cli(nbs, out, "-p", "value", "2", "-p", "fail", "True") == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "obs_fake.failed.ipynb" in err
    assert snapshot(out) == {
        **before,
        f"{SLUG}/obs_fake.failed.ipynb": (out / SLUG / "obs_fake.failed.ipynb").read_bytes(),
    }
    failed = nbformat.read(out / SLUG / "obs_fake.failed.ipynb", as_version=4)
    assert failed.metadata.papermill.exception is True
    assert not list((out / SLUG).glob(".staging-*"))  # nothing left behind
    # The build never publishes it; a later successful run removes it.
    index = bookbuild.collect_runs(out)
    assert [p.name for p in index.failed] == ["obs_fake.failed.ipynb"]
    assert [p.name for m in index.models for p in m.notebooks] == ["obs_fake.ipynb"]
    assert run_cli(nbs, out, "-p", "value", "3") == 0
    assert read_result(out / SLUG / "results" / "obs_fake.json").value("v") == 3
    assert not (out / SLUG / "obs_fake.failed.ipynb").exists()
    injected = next(
        c
        for c in nbformat.read(out / SLUG / "obs_fake.ipynb", as_version=4).cells
        if "injected-parameters" in c.metadata.get("tags", [])
    )
    assert 'results_dir = "results"' in injected.source and ".staging" not in injected.source
    # Outputs name the results file where it is now, not the staging folder it was written in.
    published = (out / SLUG / "obs_fake.ipynb").read_text(encoding="utf-8")
    assert "results in results/obs_fake.json" in published and ".staging" not in published


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_run_keeps_previous_files(first_run, sig) -> None:
    nbs, out, before = first_run
    cmd = [
        sys.executable,
        "-m",
        "moe_utils.publish.cli",
        "run",
        "--model",
        MODEL,
        "--notebooks-dir",
        str(nbs),
        "--out",
        str(out),
        "-p",
        "value",
        "2",
        "-p",
        "sleep",
        "60",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait_for_staged_result(out)
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=240)  # kernel shutdown is slow on a loaded machine
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    after = snapshot(out)
    after.pop(f"{SLUG}/obs_fake.failed.ipynb", None)
    assert after == before  # byte for byte
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        lines = [l for l in err.strip().splitlines() if l.startswith("moe-book")]
        assert len(lines) == 1 and "interrupted" in lines[0] and "kept" in lines[0]
        assert "Traceback" not in err
    else:
        assert list((out / SLUG).glob(".staging-*"))  # only the staging folder remains
        assert [p.name for m in bookbuild.collect_runs(out).models for p in m.notebooks] == ["obs_fake.ipynb"]
        assert run_cli(nbs, out, "-p", "value", "4") == 0  # the next run clears it
        assert not list((out / SLUG).glob(".staging-*"))
        assert read_result(out / SLUG / "results" / "obs_fake.json").value("v") == 4


@pytest.mark.slow
def test_ctrl_c_absorbed_by_the_kernel_client_still_keeps_previous_files(first_run, monkeypatch) -> None:
    """A Ctrl-C that the notebook client swallows (the interrupted run then returns as if it had
    finished) still counts: the run does not land and the previous files stay."""
    nbs, out, before = first_run
    real = runner._run_papermill

    def absorbing(job, output, parameters):
        error = real(job, output, parameters)  # the run itself finishes (value 2)
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what a client that absorbs the interrupt does
        return error

    monkeypatch.setattr(runner, "_run_papermill", absorbing)
    assert run_cli(nbs, out, "-p", "value", "2") == 130
    after = snapshot(out)
    after.pop(f"{SLUG}/obs_fake.failed.ipynb", None)
    assert after == before


@pytest.mark.slow
def test_full_disk_while_publishing_keeps_previous_files(first_run, monkeypatch, capsys) -> None:
    nbs, out, before = first_run

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / SLUG / "results"))

    monkeypatch.setattr(staging, "_publish_results", full)
    assert run_cli(nbs, out, "-p", "value", "2") == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "previous notebooks and results were kept" in err
    after = snapshot(out)
    after.pop(f"{SLUG}/obs_fake.failed.ipynb", None)
    assert after == before


def test_read_only_or_unusable_output_folder_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    nbs = fake_notebooks(tmp_path / "nbs")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_cli(nbs, blocker / "runs") == 1
    err = capsys.readouterr().err
    assert "cannot write to" in err and "a-file" in err and "Traceback" not in err

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(runner.tempfile, "mkstemp", read_only)
    assert run_cli(nbs, tmp_path / "ro") == 1
    assert "the file system is read-only" in capsys.readouterr().err


def _book(tmp_path: Path) -> Path:
    root = tmp_path / "bookroot"
    (root / "book").mkdir(parents=True)
    (root / "_config.yml").write_text("title: t\n")
    for name in ("intro", "method", "reproduce"):
        (root / "book" / f"{name}.md").write_text(f"# {name}\n")
    (root / bookbuild.VEGA_BUNDLE).parent.mkdir(parents=True, exist_ok=True)
    (root / bookbuild.VEGA_BUNDLE).write_text("/* stand-in */")
    for f in bookbuild.VENDOR_FILES:
        (root / bookbuild.VENDOR_DIR / f).parent.mkdir(parents=True, exist_ok=True)
        (root / bookbuild.VENDOR_DIR / f).write_text("")
    (root / "_build" / "html").mkdir(parents=True)
    (root / "_build" / "html" / "index.html").write_text("previous site")
    return root


def _executed(runs: Path, slug: str, name: str, exception: bool = False) -> Path:
    """A notebook as papermill leaves it (``exception`` True for a failed run)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"exception": exception or None, "parameters": {"model": f"zoo:{slug}"}}
    (runs / slug).mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, runs / slug / f"{name}.ipynb")
    return runs / slug / f"{name}.ipynb"


def _site_building(monkeypatch, text: str = "new site") -> list[list[str]]:
    """Stand in for jupyter-book: each build writes an index.html saying ``text``; returns the calls."""
    calls: list[list[str]] = []

    def build(cmd, cwd=None):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--path-output") + 1]) / "_build" / "html"
        out.mkdir(parents=True)
        (out / "index.html").write_text(text)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bookbuild.subprocess, "run", build)
    return calls


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, hidden ones included (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_failed_build_keeps_the_previous_site(tmp_path: Path, monkeypatch, capsys) -> None:
    root = _book(tmp_path)
    _executed(root / "book" / "runs", "m", "obs1")

    def failing(cmd, cwd=None):
        out = Path(cmd[cmd.index("--path-output") + 1]) / "_build" / "html"
        out.mkdir(parents=True)
        (out / "index.html").write_text("half a site")
        return subprocess.CompletedProcess(cmd, 2)

    monkeypatch.setattr(bookbuild.subprocess, "run", failing)
    assert cli.main(["build", "--root", str(root), "--out", str(root / "book" / "runs")]) == 1
    assert "previous site" in capsys.readouterr().err
    assert (root / "_build" / "html" / "index.html").read_text() == "previous site"
    assert not list((root / "_build").glob(".site-staging-*"))

    def succeeding(cmd, cwd=None):
        out = Path(cmd[cmd.index("--path-output") + 1]) / "_build" / "html"
        out.mkdir(parents=True)
        (out / "index.html").write_text("new site")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bookbuild.subprocess, "run", succeeding)
    assert cli.main(["build", "--root", str(root), "--out", str(root / "book" / "runs")]) == 0
    assert (root / "_build" / "html" / "index.html").read_text() == "new site"


def test_build_names_an_unreadable_notebook(tmp_path: Path, capsys) -> None:
    root = _book(tmp_path)
    bad = root / "book" / "runs" / "some-model" / "obs2_router_norms.ipynb"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"cells": [', encoding="utf-8")  # truncated by a crash
    assert cli.main(["build", "--root", str(root), "--out", str(root / "book" / "runs")]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert (root / "_build" / "html" / "index.html").read_text() == "previous site"


def test_build_leaves_out_unfinished_notebooks(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name, meta in (
        ("obs1.ipynb", {"papermill": {"exception": None, "parameters": {"model": "zoo:m"}}}),
        ("obs2.ipynb", {}),  # never executed by papermill
        ("obs3.failed.ipynb", {"papermill": {"exception": True}}),
    ):
        nb = nbformat.v4.new_notebook()
        nb.metadata.update(meta)
        (runs / "m").mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, runs / "m" / name)
    (runs / "m" / ".staging-obs1-1-x").mkdir()
    nbformat.write(nbformat.v4.new_notebook(), runs / "m" / ".staging-obs1-1-x" / "obs1.ipynb")
    index = bookbuild.collect_runs(runs)
    assert [p.name for m in index.models for p in m.notebooks] == ["obs1.ipynb"]
    assert sorted(p.name for p in index.failed) == ["obs2.ipynb", "obs3.failed.ipynb"]


@pytest.mark.parametrize("case", ["missing", "a-file", "only-failed"])
def test_build_from_a_missing_or_empty_runs_folder_is_refused_before_anything_is_touched(
    tmp_path: Path, monkeypatch, capsys, case: str
) -> None:
    root = _book(tmp_path)
    runs = root / "book" / "runs"
    if case == "a-file":
        runs.write_text("not a folder")
    elif case == "only-failed":
        _executed(runs, "m", "obs1", exception=True)
    before, calls = _tree(root), _site_building(monkeypatch)
    assert cli.main(["build", "--root", str(root), "--out", str(runs)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(runs) in line and "moe-book run" in line
    assert ("1 failed or unfinished" in line) == (case == "only-failed")
    assert _tree(root) == before and not calls


def test_build_that_would_lose_model_pages_needs_allow_fewer_pages(tmp_path: Path, monkeypatch, capsys) -> None:
    root = _book(tmp_path)
    runs = root / "book" / "runs"
    _executed(runs, "kept", "obs1")
    site = root / "_build" / "html" / "book" / "runs"
    for page in ("kept/obs1", "gone/obs1", "gone/obs2", "book/summary"):  # book/summary is no model page
        (site / page).parent.mkdir(parents=True, exist_ok=True)
        (site / page).with_suffix(".html").write_text("a page of the current site")
    before, calls = _tree(root), _site_building(monkeypatch)
    build = ["build", "--root", str(root), "--out", str(runs)]
    assert cli.main(build) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "lose 2 model page(s)" in line and "book/runs/gone/obs1, book/runs/gone/obs2" in line
    assert "--allow-fewer-pages" in line and "summary" not in line
    assert _tree(root) == before and not calls
    assert cli.main([*build, "--allow-fewer-pages"]) == 0
    assert (root / "_build" / "html" / "index.html").read_text() == "new site"
    assert cli.main(build) == 0  # the site now has what the runs folder has: nothing to lose
    # The generated table of contents counts as the current site too.
    toc = root / bookbuild.GENERATED_TOC
    toc.write_text(toc.read_text().replace("book/runs/kept/obs1", "book/runs/kept/obs1\n  - file: book/runs/old/obs3"))
    assert "file: book/runs/old/obs3" in toc.read_text()
    assert cli.main(build) == 2
    assert "book/runs/old/obs3" in capsys.readouterr().err


def test_build_from_another_runs_folder_still_counts_the_current_model_pages(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    root = _book(tmp_path)
    _executed(root / "book" / "runs", "m", "obs1")
    _site_building(monkeypatch)
    assert cli.main(["build", "--root", str(root), "--out", str(root / "book" / "runs")]) == 0
    capsys.readouterr()
    _executed(root / "elsewhere", "other", "obs1")
    assert cli.main(["build", "--root", str(root), "--out", str(root / "elsewhere")]) == 2
    assert "lose 1 model page(s) the current one has (book/runs/m/obs1)" in capsys.readouterr().err


# --------------------------------------------------------------------------- 3b. one landing per run


class Crash(BaseException):
    """The process dies here: nothing after this instant of the landing happens."""


def _landing_job(root: Path) -> plan.Job:
    (info,) = pages.discover_notebooks(fake_notebooks(root.parent / "nbs"))
    output = root / "book" / "runs" / SLUG / "obs_fake.ipynb"
    return plan.Job(info, output, {"model": MODEL, "results_dir": "results"}, MODEL)


def _land(job: plan.Job, value: int, root: Path) -> None:
    """A successful run that wrote ``value`` into its notebook and two results files (no kernel)."""
    with staging.staged_run(job, root) as stage:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"value {value}")])
        nb.metadata["papermill"] = {"exception": None, "parameters": {}}
        nbformat.write(nb, stage.notebook)
        for name in ("obs_fake", "obs_fake_extra"):
            (stage.results / f"{name}.json").write_text(json.dumps({"v": value}))


def _pair(job: plan.Job) -> tuple[int | None, ...]:
    """What the model's folder holds: the notebook's value and each results file's."""
    folder = job.output.parent
    text = job.output.read_text() if job.output.exists() else ""
    values = [int(text.split("value ")[1][0]) if "value " in text else None]
    for name in ("obs_fake", "obs_fake_extra"):
        path = folder / "results" / f"{name}.json"
        values.append(json.loads(path.read_text())["v"] if path.exists() else None)
    return tuple(values)


@pytest.mark.parametrize("at", ["before-commit", 0, 1, 2], ids=lambda a: f"crash-{a}")
def test_a_crash_while_landing_leaves_the_old_pair_or_the_new_one(tmp_path: Path, monkeypatch, at) -> None:
    root = _book(tmp_path)
    job = _landing_job(root)
    _land(job, 1, root)
    assert _pair(job) == (1, 1, 1)
    moved: list[Path] = []
    real_move = staging._move

    def crashing_move(src: Path, dst: Path) -> None:
        if len(moved) >= at:
            raise Crash
        real_move(src, dst)
        moved.append(dst)

    def crashing_commit(_stage) -> None:
        raise Crash

    if at == "before-commit":
        monkeypatch.setattr(staging, "_publish_results", crashing_commit)
    else:
        monkeypatch.setattr(staging, "_move", crashing_move)
    with pytest.raises(Crash):
        _land(job, 2, root)
    journals = list(job.output.parent.glob(f".staging-*/{staging.LANDING}"))
    assert len(journals) == (0 if at == "before-commit" else 1)  # committed: the journal stays
    # The next moe-book process (here a build; a run does the same) finds the dead run's journal.
    monkeypatch.setattr(staging, "_move", real_move)
    monkeypatch.setattr(staging, "_pid_alive", lambda pid: False)
    _site_building(monkeypatch)
    assert cli.main(["build", "--root", str(root), "--out", str(root / "book" / "runs")]) == 0
    assert _pair(job) == ((1, 1, 1) if at == "before-commit" else (2, 2, 2))
    assert not list(job.output.parent.glob(".staging-*"))


def test_ctrl_c_while_landing_finishes_the_landing(tmp_path: Path, monkeypatch) -> None:
    root = _book(tmp_path)
    job = _landing_job(root)
    _land(job, 1, root)
    real_move, calls = staging._move, []

    def interrupted_once(src: Path, dst: Path) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_move(src, dst)

    monkeypatch.setattr(staging, "_move", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        _land(job, 2, root)
    assert _pair(job) == (2, 2, 2) and not list(job.output.parent.glob(".staging-*"))


# --------------------------------------------------------------------------- 4. model identity


@pytest.mark.slow
def test_two_local_checkpoints_with_the_same_name_get_two_folders(tmp_path: Path) -> None:
    nbs, out = fake_notebooks(tmp_path / "nbs"), tmp_path / "runs"
    for parent in ("a", "b"):
        (tmp_path / parent / "hf").mkdir(parents=True)
    assert run_cli(nbs, out, "-p", "value", "1", model=str(tmp_path / "a" / "hf")) == 0
    assert run_cli(nbs, out, "-p", "value", "2", model=str(tmp_path / "b" / "hf")) == 0
    folders = sorted(p.name for p in out.iterdir())
    assert len(folders) == 2 and all(f.startswith("hf-") for f in folders)
    values = sorted(read_result(out / f / "results" / "obs_fake.json").value("v") for f in folders)
    assert values == [1, 2]
    # 8. privacy: the sidebar and the executed notebooks name the folder, never its location.
    index = bookbuild.collect_runs(out)
    assert [m.model for m in index.models] == ["hf", "hf"]
    for f in folders:
        text = (out / f / "obs_fake.ipynb").read_text()
        assert str(tmp_path) not in text


def _copy_zoo(name: str, dest: Path) -> Path:
    shutil.copytree(ZOO / name, dest)
    return dest


@pytest.fixture()
def hash_cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("MOE_UTILS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "_HASHES", {})
    return tmp_path / "cache"


def test_fingerprint_changes_when_weight_bytes_change(tmp_path: Path, hash_cache: Path) -> None:
    folder = _copy_zoo("tiny-moe-upcycled", tmp_path / "m")
    first = checkpoint_only(str(folder)).fingerprint
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor; same size
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == len(data)
    second = checkpoint_only(str(folder)).fingerprint
    assert second != first
    # The content hash is cached by (path, size, mtime): the same file is not read twice.
    cache = json.loads((hash_cache / "file-hashes.json").read_text())
    import hashlib

    assert hashlib.sha256(bytes(data)).hexdigest() in cache.values()


def test_hub_snapshot_is_identified_by_revision_and_etags(tmp_path: Path, hash_cache: Path) -> None:
    import hashlib

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for src in (ZOO / "tiny-moe-upcycled").iterdir():
        if src.name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            data = src.read_bytes()
            blob = blobs / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / src.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from moe_utils.analysis.context import checkpoint_only\n"
        "lm = checkpoint_only('org/tiny')\n"
        "print(lm.name, lm.source['kind'], lm.source['revision'], lm.fingerprint)"
    )
    env = {**_env(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "MOE_UTILS_CACHE": str(hash_cache)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name, kind, revision, fingerprint = done.stdout.split()
    assert (name, kind, revision) == ("org/tiny", "hub", commit)
    # The blob names are the files' SHA-256: the same content in a local folder gives the same
    # fingerprint, and the hub's weights were never read to compute it.
    assert not (hash_cache / "file-hashes.json").exists()
    assert fingerprint == checkpoint_only(str(ZOO / "tiny-moe-upcycled")).fingerprint


def test_results_record_source_fingerprint_and_versions(tmp_path: Path, hash_cache: Path) -> None:
    folder = _copy_zoo("tiny-moe-upcycled", tmp_path / "ckpt" / "my-moe")
    study = open_study(str(folder), None, weights_only=True, results_dir=tmp_path / "results")
    path = study.save("obs_x", {}, {"v": 1.0})
    res = read_result(path)
    assert res.model == "my-moe" and str(tmp_path) not in path.read_text()
    assert res.source == {"kind": "local", "id": "my-moe", "revision": None, "fingerprint": res.fingerprint}
    from moe_utils import __version__

    assert res.versions["moe_utils"] == __version__ and "torch" in res.versions


def test_revision_is_accepted_and_gets_its_own_folder(tmp_path: Path) -> None:
    req = plan.RunRequest(
        notebooks_dir=REPO / "notebooks",
        out=tmp_path,
        model="org/Name",
        notebooks=["obs2_router_norms"],
        parameters={"revision": "abc123"},
    )
    (job,) = plan.plan_request(req)
    assert job.parameters["revision"] == "abc123"
    assert job.output.parent.name == "org--Name--rev-abc123"
    with pytest.raises(UsageError, match="revision"):
        plan.plan_request(
            plan.RunRequest(
                notebooks_dir=REPO / "notebooks",
                out=tmp_path,
                model="org/Name",
                notebooks=["obs2_router_norms"],
                parameters={"revision": 3},
            )
        )


# --------------------------------------------------------------------------- 5. parameters


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "layer", "[0]"], "unknown parameter 'layer' for notebook(s) obs2_router_norms. Did you mean 'layers'?"),
        (["-p", "layers", "34"], "parameter 'layers' must be a list of ints or None; got 34 (int)"),
        (["-p", "layers", '"34"'], "parameter 'layers' must be a list of ints or None; got '34' (str)"),
        (["-p", "max_tokens", "lots"], "parameter 'max_tokens' must be an int or None; got 'lots'"),
        (["-p", "trust_remote_code", "yes"], "parameter 'trust_remote_code' must be True or False"),
        (["-p", "inputs", "/no/such/file.txt"], "-p inputs: unknown inputs '/no/such/file.txt'"),
        (["-p", "dtype", "float8"], "-p dtype: unknown dtype 'float8'"),
        (["--dense-baseline", "/no/such/dense"], "dense baseline folder /no/such/dense does not exist"),
    ],
)
def test_bad_parameters_exit_2_before_anything_runs(tmp_path: Path, capsys, args, message) -> None:
    out = tmp_path / "runs"
    code = cli.main(
        [
            "run",
            "--model",
            "org/never-loaded",
            "--notebooks",
            "obs2_router_norms",
            "--notebooks-dir",
            str(REPO / "notebooks"),
            "--out",
            str(out),
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing ran, nothing written


def test_unknown_parameter_lists_valid_names(capsys) -> None:
    assert (
        cli.main(
            [
                "run",
                "--model",
                "org/x",
                "--notebooks",
                "obs2_router_norms",
                "--notebooks-dir",
                str(REPO / "notebooks"),
                "-p",
                "seeds",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "Did you mean 'seed'?" in err
    for name in ("layers", "inputs", "max_tokens", "allow_pickle", "revision", "trust_remote_code"):
        assert name in err


def test_input_file_that_is_not_text_is_refused_before_loading(tmp_path: Path, capsys) -> None:
    binary = tmp_path / "in.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert (
        cli.main(
            [
                "run",
                "--model",
                "org/x",
                "--notebooks",
                "obs2_router_norms",
                "--out",
                str(tmp_path / "o"),
                "--notebooks-dir",
                str(REPO / "notebooks"),
                "-p",
                "inputs",
                str(binary),
            ]
        )
        == 2
    )
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_missing_local_model_folder_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert (
        cli.main(
            [
                "run",
                "--model",
                str(tmp_path / "nothing"),
                "--notebooks-dir",
                str(REPO / "notebooks"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "model", "message"),
    [
        ("--model", "zoo:nope", "unknown zoo model 'zoo:nope'; the zoo holds: tiny-dense"),
        ("--model", "random:nope", "unknown model family 'nope' in 'random:nope'"),
        ("--model", "random:", "unknown model family '' in 'random:'"),
        ("--model", "random:grok1", "random:grok1: grok1 models need their publisher's code"),
        ("--dense-baseline", "zoo:no-dense", "unknown zoo model 'zoo:no-dense'"),
    ],
)
def test_unknown_zoo_or_random_model_is_refused_before_anything_runs(
    tmp_path: Path, capsys, flag: str, model: str, message: str
) -> None:
    args = ["--model", MODEL] if flag == "--dense-baseline" else []
    out = tmp_path / "out"
    code = cli.main(
        ["run", *args, flag, model, "--notebooks", "obs2_router_norms", "--notebooks-dir", str(REPO / "notebooks")]
        + ["--out", str(out)]
    )
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line
    assert not out.exists()


def test_open_study_checks_layers_and_inputs_before_loading(monkeypatch) -> None:
    from moe_utils.analysis import context

    def no_loading(*_a, **_k):
        raise AssertionError("a model was loaded before the parameters were checked")

    monkeypatch.setattr(context, "load_model", no_loading)
    monkeypatch.setattr(context, "checkpoint_only", no_loading)
    with pytest.raises(UsageError, match="layers must be a list of ints or None; got '34'"):
        open_study("zoo:tiny-moe-upcycled", layers="34")
    with pytest.raises(InputSpecError, match="no such preset or file"):
        open_study("zoo:tiny-moe-upcycled", inputs="/no/such/file.txt")


# --------------------------------------------------------------------------- 6. clear errors


def test_corrupt_safetensors_is_named_on_the_loading_path(tmp_path: Path, hash_cache: Path) -> None:
    folder = _copy_zoo("tiny-moe-upcycled", tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    with pytest.raises(CheckpointError, match=r"model\.safetensors .* truncated"):
        load_model(folder)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        checkpoint_only(str(folder))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=r"weight file model\.safetensors .* is corrupt"):
        load_model(folder)


@pytest.mark.parametrize("how", ["replaced", "truncated"])
def test_weight_file_changed_during_a_run_is_named_at_the_next_layer(tmp_path: Path, how: str) -> None:
    """A weight file rewritten (a new download moved into place) or truncated while the layers
    are being read stops the next layer read with the file's name, instead of SIGBUS or another
    checkpoint's tensors."""
    from moe_utils.models.weights import iter_layer_weights

    folder = _copy_zoo("tiny-moe-upcycled", tmp_path / "m")
    weights = folder / "model.safetensors"
    layers = iter_layer_weights(str(folder), layers=[0, 1])
    first = next(layers)  # float32 copies: nothing of layer 0 stays mapped
    assert first.w_up.dtype == torch.float32
    del first
    if how == "replaced":
        other = folder / "incoming.tmp"
        other.write_bytes(weights.read_bytes() + b" ")
        os.replace(other, weights)
    else:
        with open(weights, "r+b") as fh:
            fh.truncate(weights.stat().st_size // 2)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors in .* (changed on disk|was removed).* while this run"
    ):
        next(layers)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "num_local_experts",
            1000000,
            "config num_local_experts=1000000 but model.layers.0.block_sparse_moe.gate.weight has 8 experts [8, 128]",
        ),
        (
            "intermediate_size",
            100,
            "config intermediate_size=100 but model.layers.0.block_sparse_moe.experts.0.w1.weight has 256 "
            "as expert width [256, 128]",
        ),
        ("hidden_size", 64, "config hidden_size=64 but model.layers.0.block_sparse_moe.gate.weight has 128"),
    ],
)
def test_config_that_contradicts_the_tensors_is_refused_before_the_model_is_built(
    tmp_path: Path, monkeypatch, key: str, value: int, message: str
) -> None:
    import transformers

    folder = _copy_zoo("tiny-moe-upcycled", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))

    def never(*_a, **_k):
        raise AssertionError("the model was built before config.json was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ConfigMismatchError) as info:
        load_model(folder)
    assert message in str(info.value) and "fix config.json" in str(info.value)
    assert "\n" not in str(info.value)


def test_undefined_depth_series_is_a_value_not_a_crash(tmp_path: Path) -> None:
    """A 4-layer OLMoE whose experts are all zero: every similarity is undefined, so each depth
    series has no finite value; observation 3 still reports, with NaN and no verdict for or against."""
    from moe_utils.analysis.obs3_depth import depth_report

    lm = load_model("random:olmoe", config_overrides={"num_hidden_layers": 4})
    with torch.no_grad():
        for name, param in lm.built().named_parameters():
            if ".experts." in name:
                param.zero_()
    lm.built().save_pretrained(tmp_path / "olmoe4")
    lm.tokenizer.save_pretrained(tmp_path / "olmoe4")
    study = open_study(str(tmp_path / "olmoe4"))
    assert study.lm.moe_layers == [0, 1, 2, 3]
    report = depth_report(study, inputs="short", max_tokens=32)
    assert len(report.depth_tests) == 4  # one row per series, every number undefined
    assert report.depth_tests.select_dtypes("number").isna().all().all()
    depth = {k: v for k, v in report.summary.items() if k != "routing_repeat_rate"}
    assert depth and all(np.isnan(entry["value"]) for entry in depth.values())
    assert not {entry["verdict"] for entry in depth.values()} & {"holds", "does not hold"}


def test_dense_baseline_with_another_hidden_size_is_left_out_with_a_note(tmp_path: Path) -> None:
    synthetic_mixtral(tmp_path / "moe", H=16)
    synthetic_mistral(tmp_path / "dense", H=24)
    with pytest.warns(UserWarning, match="hidden size is 24, the model's is 16"):
        study = open_study(
            str(tmp_path / "moe"), str(tmp_path / "dense"), weights_only=True, results_dir=tmp_path / "r"
        )
    assert study.dense is None
    shown = study.describe().loc["dense baseline (F)", "value"]
    assert shown.startswith("left out: dense: its hidden size is 24")


def test_dense_baseline_with_another_tokenizer_is_left_out_with_a_note(tmp_path: Path) -> None:
    dense = _copy_zoo("tiny-dense", tmp_path / "dense-bytes")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dense / f).unlink()
    tiny("mixtral").tokenizer.save_pretrained(dense)  # a byte-level tokenizer instead
    with pytest.warns(UserWarning, match="tokenizer splits text differently"):
        study = open_study("zoo:tiny-moe-upcycled", str(dense), results_dir=tmp_path / "r")
    assert study.dense is None
    assert "tokenizer splits text differently" in study.describe().loc["dense baseline (F)", "value"]


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    folder = _copy_zoo("tiny-moe-upcycled", tmp_path / "no-tok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    with pytest.raises(CheckpointError, match="no-tok has no tokenizer files"):
        open_study(str(folder), None, results_dir=tmp_path / "r")


# --------------------------------------------------------------------------- 7. pickle opt-in


def test_allow_pickle_is_a_parameter_and_a_flag(tmp_path: Path) -> None:
    synthetic_mixtral(tmp_path / "moe", H=16)
    from safetensors.torch import load_file

    state = {}
    for shard in (tmp_path / "moe").glob("*.safetensors"):
        state.update(load_file(shard))
        shard.unlink()
    (tmp_path / "moe" / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save(state, tmp_path / "moe" / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        open_study(str(tmp_path / "moe"), None, weights_only=True, results_dir=tmp_path / "r")
    study = open_study(str(tmp_path / "moe"), None, weights_only=True, allow_pickle=True, results_dir=tmp_path / "r")
    assert study.lm.is_moe

    args = cli.build_parser().parse_args(["run", "--allow-pickle", "--model", "x"])
    assert args.allow_pickle is True
    req = plan.RunRequest(
        notebooks_dir=REPO / "notebooks",
        out=tmp_path / "o",
        model=str(tmp_path / "moe"),
        parameters={"allow_pickle": True},
    )
    jobs = plan.plan_request(req)
    assert jobs and all(j.parameters["allow_pickle"] is True for j in jobs)


# --------------------------------------------------------------------------- 8. privacy


@pytest.mark.slow
def test_published_notebooks_name_local_files_without_their_path(tmp_path: Path) -> None:
    nbs, out = fake_notebooks(tmp_path / "nbs"), tmp_path / "site" / "runs"
    model = tmp_path / "private" / "checkpoints" / "my-moe"
    model.mkdir(parents=True)
    text = tmp_path / "private" / "prompts.txt"
    text.write_text("one paragraph\n\nanother\n", encoding="utf-8")
    assert run_cli(nbs, out, "-p", "inputs", str(text), model=str(model)) == 0
    (folder,) = list(out.iterdir())
    executed = (folder / "obs_fake.ipynb").read_text()
    assert str(tmp_path) not in executed  # relative paths only
    assert "UserWarning: a visible note" in executed  # warnings without their file
    assert str(REPO) not in executed and "ipykernel_" not in executed
    injected = next(
        c for c in nbformat.reads(executed, as_version=4).cells if "injected-parameters" in c.metadata.get("tags", [])
    )
    assert 'inputs = "../../../private/prompts.txt"' in injected.source
    index = bookbuild.collect_runs(out)
    assert [m.model for m in index.models] == ["my-moe"]  # the sidebar caption
    from moe_utils.engine.inputs import file_sha256, inputs_label

    assert inputs_label(str(text)) == f"prompts.txt (sha256 {file_sha256(text)})"


def test_summary_keeps_two_checkpoints_with_one_name_apart(tmp_path: Path) -> None:
    from moe_utils.analysis import summary
    from moe_utils.analysis.results import write_result

    for folder, fp, v in (("hf-aaaa0000", "1111111111111111", 0.25), ("hf-bbbb0000", "2222222222222222", 0.75)):
        write_result(
            tmp_path / folder / "results",
            "obs2_router_norms",
            "hf",
            fp,
            {},
            {},
            {"top1_norm_agreement": {"value": v, "verdict": "holds"}},
        )
    table = summary.collect(tmp_path)
    assert sorted(table.model) == ["hf (11111111)", "hf (22222222)"]
    assert dict(zip(table.model, table.value)) == {"hf (11111111)": 0.25, "hf (22222222)": 0.75}


@pytest.mark.slow
def test_real_notebook_on_local_files_publishes_no_local_path(tmp_path: Path, hash_cache: Path) -> None:
    model = _copy_zoo("tiny-moe-upcycled", tmp_path / "private" / "my-moe")
    dense = _copy_zoo("tiny-dense", tmp_path / "private" / "my-dense")
    text = tmp_path / "private" / "prompts.txt"
    text.write_text("The model reads this paragraph.\n\nAnd then this one, a little longer than the first.\n")
    out = tmp_path / "runs"
    code = cli.main(
        [
            "run",
            "--model",
            str(model),
            "--dense-baseline",
            str(dense),
            "--notebooks",
            "obs2_router_norms",
            "--notebooks-dir",
            str(REPO / "notebooks"),
            "--out",
            str(out),
            "-p",
            "inputs",
            str(text),
            "-p",
            "max_tokens",
            "48",
        ]
    )
    assert code == 0
    (folder,) = list(out.iterdir())
    executed = (folder / "obs2_router_norms.ipynb").read_text()
    assert str(tmp_path) not in executed and str(REPO) not in executed and "ipykernel_" not in executed
    assert "my-moe" in executed and "my-dense" in executed
    res = read_result(folder / "results" / "obs2_router_norms.json")
    from moe_utils.engine.inputs import file_sha256

    assert res.model == "my-moe" and res.source["kind"] == "local"
    assert res.params["inputs"] == f"prompts.txt (sha256 {file_sha256(text)})"
    assert res.params["dense_baseline"] == "my-dense" and res.params["dense_used"] is True
    assert str(tmp_path) not in (folder / "results" / "obs2_router_norms.json").read_text()
    assert [m.model for m in bookbuild.collect_runs(out).models] == ["my-moe"]
