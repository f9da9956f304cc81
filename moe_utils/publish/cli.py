"""The ``moe-book`` command: one argparse tree for running the notebooks, building the site,
writing a new book, the coverage page and the model zoo.

moe-book run [--model ID_OR_DIR] [--dense-baseline ID] [--notebooks NAME ...]
             [--out DIR] [--trust-remote-code] [--allow-pickle] [-p NAME VALUE ...]
moe-book build [--out DIR] [--build-dir DIR] [--no-strict] [--allow-fewer-pages]
               [--repository-url URL [--branch B]]
moe-book init DIR [--repository-url URL [--branch B]]
                              (a new book folder: pages, notebooks, offline JavaScript)
moe-book coverage [--notebooks] [--families NAME ...] [--workers N] [--root DIR] [--resume]
moe-book zoo train [--models NAME ...] [--out DIR] [--force] [--resume] [--max-minutes M] ...
moe-book zoo study (--list | --run NAME ... | --measure NAME ...) [--out DIR] ...

Every level answers ``--help``; a bad option or value exits with 2. Each command imports what it
runs only when it runs, so the parser, ``--help`` and option errors start without torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moe_utils import __version__
from moe_utils.core.errors import MoEUtilsError, RunInterrupted, UsageError
from moe_utils.publish.guards import ALLOW_FLAG
from moe_utils.zoo.commands import STUDY_DESCRIPTION, TRAIN_DESCRIPTION, add_study_arguments, add_train_arguments

DEFAULT_OUT = Path("book/runs")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="execute the notebooks with papermill, one folder per model",
        description=(
            "Execute the notebooks with papermill. Without --model: every per-model notebook on "
            "each embedded default model, then the book-level notebooks (model organisms, "
            "summary). With --model: the per-model notebooks on that model only. Outputs go to "
            "OUT/<model-slug>/<notebook>.ipynb, results to OUT/<model-slug>/results/."
        ),
    )
    p.add_argument("--model", help="zoo:NAME, random:FAMILY, a hub id (org/Name) or a local folder")
    p.add_argument(
        "--dense-baseline",
        metavar="ID",
        help="dense model compared as 'F' (default: none with --model, the zoo's with no --model)",
    )
    p.add_argument(
        "--notebooks", nargs="+", metavar="NAME", help="run only these notebooks (file name with or without .ipynb)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"runs folder (default {DEFAULT_OUT})")
    p.add_argument(
        "--notebooks-dir",
        type=Path,
        default=Path("notebooks"),
        help="folder of the source notebooks (default notebooks)",
    )
    p.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        dest="parameters",
        help="extra notebook parameter; VALUE is read as a Python literal when it is one. "
        "Names and types are checked against the notebooks' parameters cells "
        "(e.g. -p layers '[0, 3]', -p revision COMMIT)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="same as -p trust_remote_code True: run the checkpoint publisher's Python code",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="same as -p allow_pickle True: load .bin/.pt weights (with torch.load "
        "weights_only=True) when the model has no safetensors",
    )


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build the static Jupyter Book from the executed notebooks (no re-execution)",
        description="Generate the table of contents from the runs folder and build the HTML site.",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"runs folder written by `moe-book run` (default {DEFAULT_OUT})"
    )
    p.add_argument("--root", type=Path, default=Path("."), help="book folder with _config.yml (default .)")
    p.add_argument("--build-dir", type=Path, default=None, help="where _build/html goes (default: the book folder)")
    p.add_argument("--no-strict", dest="strict", action="store_false", help="do not treat Sphinx warnings as errors")
    p.add_argument(
        ALLOW_FLAG,
        action="store_true",
        help="publish even when the new site has fewer model pages than the current one "
        "(without it such a build is refused)",
    )
    _add_launch_buttons(
        p,
        "add Binder and Colab launch buttons opening the notebooks from this repository "
        "(e.g. https://github.com/OWNER/REPO; the executed notebooks must be committed "
        "there); without it the site has none",
    )


def _add_launch_buttons(p: argparse.ArgumentParser, url_help: str) -> None:
    """``--repository-url`` (launch buttons, off without it) and ``--branch``."""
    p.add_argument("--repository-url", metavar="URL", help=url_help)
    p.add_argument("--branch", default="main", help="branch of --repository-url (default main)")


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="write a new book folder: config, pages, notebooks and the offline JavaScript",
        description=(
            "Write a new book folder DIR (absent or empty). Inside it, `moe-book run --model ID` "
            "runs the notebooks on a model and `moe-book build` publishes the site, which works "
            "offline (no npm needed)."
        ),
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="the folder to create")
    _add_launch_buttons(
        p,
        "the repository the book will be pushed to (e.g. https://github.com/OWNER/REPO): its "
        "_config.yml then has Binder and Colab launch buttons opening the notebooks from there "
        "(commit the executed notebooks too); without it the site has none",
    )


def _add_zoo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zoo", help="the embedded model organisms", description="Train the model organisms and the study."
    )
    zsub = p.add_subparsers(dest="zoo_command", metavar="COMMAND", required=True)
    add_train_arguments(zsub.add_parser("train", help="train the model zoo", description=TRAIN_DESCRIPTION))
    add_study_arguments(zsub.add_parser("study", help="the organism study's replicates", description=STUDY_DESCRIPTION))


def _add_coverage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coverage",
        help="check every MoE family of the installed transformers and write the coverage page",
        description="Coverage matrix: which MoE families of the installed transformers the book runs on.",
    )
    p.add_argument(
        "--notebooks", action="store_true", help="also run every per-model notebook (slow: a minute or two per family)"
    )
    p.add_argument(
        "--families",
        nargs="+",
        metavar="NAME",
        help="only these families (their rows replace those in the existing data file)",
    )
    p.add_argument("--workers", type=int, default=1, help="families checked in parallel")
    p.add_argument("--root", type=Path, default=Path("."), help="book root (default .)")
    p.add_argument(
        "--resume", action="store_true", help="keep the rows already in the data file and check the other families"
    )
    p.add_argument("--row", metavar="NAME", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The one argument parser of ``moe-book``, every subcommand included (exposed for tests)."""
    parser = argparse.ArgumentParser(
        prog="moe-book",
        description="Run the MoE notebooks on a model and publish them as an offline Jupyter Book.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run(sub)
    _add_build(sub)
    _add_init(sub)
    _add_coverage(sub)
    _add_zoo(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from moe_utils.publish.params import parse_parameters  # the handlers import what they run:
    from moe_utils.publish.plan import RunRequest, plan_request  # --help and option errors stay fast
    from moe_utils.publish.runner import check_output_folder, run_notebooks

    parameters = parse_parameters(args.parameters)
    for flag, name in ((args.trust_remote_code, "trust_remote_code"), (args.allow_pickle, "allow_pickle")):
        if flag:
            if parameters.get(name, True) is not True:
                raise UsageError(f"--{name.replace('_', '-')} contradicts -p {name} {parameters[name]!r}")
            parameters[name] = True
    req = RunRequest(
        notebooks_dir=args.notebooks_dir,
        out=args.out,
        model=args.model,
        dense_baseline=args.dense_baseline,
        notebooks=list(args.notebooks or []),
        parameters=parameters,
    )
    jobs = plan_request(req)
    check_output_folder(args.out)
    run_notebooks(jobs)
    if args.model is not None and not any(job.model is None for job in jobs):
        print(
            "book-level pages (summary) were not rerun; to include this model there: moe-book run --notebooks summary"
        )
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from moe_utils.publish.bookbuild import build_book

    root = args.root
    runs = args.out if args.out.is_absolute() else (Path.cwd() / args.out)
    build_book(
        root=root,
        runs_dir=runs,
        build_dir=args.build_dir,
        strict=args.strict,
        repository_url=args.repository_url,
        branch=args.branch,
        allow_fewer_pages=args.allow_fewer_pages,
    )
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from moe_utils.publish.scaffold import init_book

    written = init_book(args.dir, repository_url=args.repository_url, branch=args.branch)
    print(
        f"wrote {len(written)} files to {args.dir}; next:\n"
        f"    cd {args.dir}\n"
        "    moe-book run --model random:mixtral     # or a hub id, a local folder, zoo:NAME\n"
        "    moe-book build                          # the site goes to _build/html"
    )
    return 0


def _cmd_coverage(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from moe_utils.publish import coverage  # lazy: builds models (torch)

    return coverage.run(args)


def _cmd_zoo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    # lazy: pulls in torch and the training code
    if args.zoo_command == "study":
        from moe_utils.zoo import study

        return int(study.run(args) or 0)
    from moe_utils.zoo import train

    return int(train.run(args, " ".join(["moe-book", *argv])) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (argparse exits with 2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = args.command if args.command != "zoo" else f"zoo {args.zoo_command}"
    handlers: dict[str, Callable[[argparse.Namespace, Sequence[str]], int]] = {
        "run": lambda a, _: _cmd_run(a),
        "build": lambda a, _: _cmd_build(a),
        "init": lambda a, _: _cmd_init(a),
        "coverage": _cmd_coverage,
        "zoo": _cmd_zoo,
    }
    try:
        return handlers[args.command](args, argv)
    except RunInterrupted as exc:
        print(f"moe-book {command}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        kept = (
            "the previous site was kept"
            if command == "build"
            else "notebooks that had finished were kept and nothing else was changed"
        )
        print(f"moe-book {command}: interrupted; {kept}", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"moe-book {command}: error: {exc}", file=sys.stderr)
        return 2
    except MoEUtilsError as exc:
        print(f"moe-book {command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
