"""The moe-book command line: help, delegation to the zoo trainer, error reporting."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from moe_utils.publish import cli


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "build", "zoo"):
        assert command in out


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        (["run", "--help"], ["--model", "--dense-baseline", "--notebooks", "--out", "-p NAME VALUE"]),
        (["build", "--help"], ["--out", "--build-dir", "--no-strict"]),
        (["zoo", "--help"], ["train"]),
    ],
)
def test_subcommand_help(argv: list[str], options: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(argv)
    out = capsys.readouterr().out
    for option in options:
        assert option in out


def test_run_arguments_are_parsed() -> None:
    args = cli.build_parser().parse_args(
        [
            "run",
            "--model",
            "org/M",
            "--notebooks",
            "obs1",
            "obs2",
            "-p",
            "layers",
            "[0, 1]",
            "-p",
            "seed",
            "3",
            "--out",
            "x",
        ]
    )
    assert (args.model, args.notebooks, args.out) == ("org/M", ["obs1", "obs2"], Path("x"))
    assert args.parameters == [["layers", "[0, 1]"], ["seed", "3"]]
    assert cli.build_parser().parse_args(["run"]).out == Path("book/runs")


def test_zoo_train_gets_its_parsed_options_and_the_command(monkeypatch) -> None:
    received = []
    fake = types.ModuleType("moe_utils.zoo.train")
    fake.run = lambda args, command: received.append((args.models, args.max_minutes, command)) or 0
    import moe_utils.zoo

    monkeypatch.setitem(sys.modules, "moe_utils.zoo.train", fake)
    monkeypatch.setattr(moe_utils.zoo, "train", fake, raising=False)
    argv = ["zoo", "train", "--models", "tiny-moe-scratch", "--max-minutes", "3"]
    assert cli.main(argv) == 0
    assert received == [(["tiny-moe-scratch"], 3.0, "moe-book zoo train --models tiny-moe-scratch --max-minutes 3")]


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        ([], ["run", "build", "init", "coverage", "zoo"]),
        (["init"], ["DIR", "--repository-url", "--branch"]),
        (["coverage"], ["--notebooks", "--families", "--workers", "--root", "--resume"]),
        (["zoo"], ["train", "study"]),
        (["zoo", "train"], ["--models", "--out", "--force", "--resume", "--max-minutes", "--install", "--threads"]),
        (["zoo", "study"], ["--list", "--run", "--measure", "--out", "--threads", "--train-only", "--ship"]),
    ],
)
def test_every_level_answers_help(argv: list[str], options: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['moe-book', *argv])}")
    for option in options:
        assert option in out


@pytest.mark.parametrize(
    "argv",
    [
        ["publish"],
        ["zoo", "evaluate"],
        ["zoo"],
        ["zoo", "train", "--steps", "3"],
        ["zoo", "train", "--models", "tiny-moe-huge"],
        ["zoo", "study", "--out", "x"],
        ["coverage", "--workers", "two"],
        ["run", "--no-such-flag"],
    ],
)
def test_unknown_subcommands_and_bad_options_exit_with_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()[-1]) < 400


def test_errors_are_reported_with_exit_codes(tmp_path: Path, capsys) -> None:
    # Usage errors (wrong options or parameters) exit with 2, other errors with 1.
    missing = tmp_path / "no-notebooks-here"
    assert cli.main(["run", "--model", "random:mixtral", "--notebooks-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "moe-book run: error:" in err and str(missing) in err

    assert cli.main(["run", "--model", "random:mixtral", "-p", "model", "x"]) == 2
    assert "use --model" in capsys.readouterr().err

    assert cli.main(["build", "--root", str(tmp_path)]) == 1
    assert "_config.yml" in capsys.readouterr().err


def test_the_command_line_parses_without_importing_torch():
    """``moe-book --help`` and option errors answer at once: the parser tree imports no torch,
    scipy or pandas (each command imports what it runs when it runs)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from moe_utils.publish import cli\n"
        "cli.build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'scipy', 'pandas', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
