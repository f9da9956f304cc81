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


def test_zoo_train_gets_every_argument(monkeypatch) -> None:
    received = []
    fake = types.ModuleType("moe_utils.zoo.train")
    fake.main = lambda argv: received.append(argv) or 0
    import moe_utils.zoo

    monkeypatch.setitem(sys.modules, "moe_utils.zoo.train", fake)
    monkeypatch.setattr(moe_utils.zoo, "train", fake, raising=False)
    assert cli.main(["zoo", "train", "--steps", "3", "--help-me", "tiny-moe-scratch"]) == 0
    assert received == [["--steps", "3", "--help-me", "tiny-moe-scratch"]]


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
