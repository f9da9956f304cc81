"""Coverage matrix: which MoE families of the installed transformers the book runs on.

For every family of :func:`moe_utils.arch.catalogue.catalogue` a tiny random model is built from
its config class (``random:FAMILY``) and checked at two levels:

* **trace level** (cheap): the family spec (hand-written or derived) is found, one traced
  forward pass rebuilds every MoE block's output from the experts (largest relative error,
  identical top-k sets), and the checkpoint saved both ways (per-expert original names and
  fused names) streams the same weights as the model holds;
* **notebook level** (expensive): every per-model notebook runs through ``moe-book run``; the
  weights analysis is observation 1, the dynamic analyses are observations 2 and 3.

``moe-book coverage`` (or ``make test-families``) writes the matrix to ``book/coverage.json``
and renders it as the book page ``book/coverage.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from moe_utils.analysis.context import checkpoint_only
from moe_utils.arch import SPECS, FamilySpec
from moe_utils.arch.catalogue import CatalogueEntry, catalogue
from moe_utils.arch.optional_parts import config_variants
from moe_utils.core.files import atomic_write_text
from moe_utils.core.messages import first_line
from moe_utils.models.derive import rebuild_errors
from moe_utils.models.loading import LoadedModel, load_model
from moe_utils.models.random_models import random_config
from moe_utils.models.specs import get_spec
from moe_utils.models.stream import stream_check
from moe_utils.models.weights import layer_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TOLERANCE = 1e-5
WEIGHTS_NOTEBOOKS = ("obs1_neurons_as_experts",)
DYNAMIC_NOTEBOOKS = ("obs2_router_norms", "obs3_depth_diversity")
DATA_FILE = Path("book/coverage.json")
PAGE_FILE = Path("book/coverage.md")
NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
# Tokens of the notebooks' default inputs used per family (the checks are about running every
# analysis on the family, not about the numbers of a random model).
MAX_TOKENS = 512


@dataclass
class FamilyRow:
    """One row of the coverage matrix."""

    family: str
    package: str
    config_class: str
    spec: str = "none"  # "hand-written", "derived" or "none"
    spec_name: str | None = None
    trace_ok: bool = False
    rebuild_error: float | None = None
    disk_ok: bool | None = None
    weights_ok: bool | None = None  # None: notebooks not run
    dynamic_ok: bool | None = None
    quirks: list[str] = field(default_factory=list)
    variants: dict[str, str] = field(default_factory=dict)  # "part: key=value" -> "" (passes) or why not
    routing: str | None = None
    reason: str | None = None
    seconds: float = 0.0
    notebooks_date: str | None = None  # when the notebook columns were filled (None: not run)
    checks_date: str | None = None  # when the rebuild, disk, stream and variant checks ran
    stream_ok: bool | None = None  # the layer stream gives the whole-model captures (None: not checked)
    stream_reason: str | None = None  # one line: why it cannot be streamed (observations 2-3 then load it whole)

    @property
    def passes(self) -> bool:
        """Both analyses ran and every MoE block was rebuilt within the tolerance."""
        return bool(
            self.trace_ok
            and self.weights_ok
            and self.dynamic_ok
            and self.rebuild_error is not None
            and self.rebuild_error <= TOLERANCE
        )


def spec_origin(family: str) -> tuple[str, FamilySpec]:
    """``("hand-written" | "derived", spec)`` of a ``random:`` family name."""
    for spec in SPECS.values():
        if family == spec.name or family in spec.model_types:
            return "hand-written", spec
    return "derived", get_spec(family)


def random_name(entry: CatalogueEntry) -> str:
    """The ``random:`` name for an entry (the hand-written spec's name where there is one)."""
    for spec in SPECS.values():
        if entry.model_type in spec.model_types and spec.tiny_config:
            return spec.name
    return entry.model_type


def _disk_check(lm: LoadedModel, folder_root: Path) -> None:
    """Weights streamed from both on-disk spellings equal the model's own, for every MoE layer."""
    for fused in (False, True):
        folder = folder_root / ("fused" if fused else "original")
        model = cast("PreTrainedModel", lm.built())  # random: models are transformers models
        model.save_pretrained(folder, save_original_format=not fused)  # True is its default
        saved = checkpoint_only(str(folder))  # its spec resolved from the saved config.json
        for layer in lm.moe_layers:
            want, got = layer_weights(lm, layer), layer_weights(saved, layer)
            for name in ("router", "w_act", "w_up", "w_down", "score_correction_bias", "router_bias", "shared_gate"):
                a, b = getattr(want, name), getattr(got, name)
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                    spelling = "fused" if fused else "per-expert"
                    raise AssertionError(
                        f"{name} of layer {layer} read from the {spelling} checkpoint differs from the model's"
                    )


def trace_check(row: FamilyRow, name: str) -> FamilyRow:
    """Fill the trace-level columns of ``row`` for ``random:name``."""
    try:
        row.spec, spec = spec_origin(name)
        row.spec_name = spec.name
        row.quirks = list(getattr(spec, "quirks", ()))
        row.routing = spec.description
        lm = load_model(f"random:{name}")
        errors = rebuild_errors(lm)
        row.rebuild_error = max(errors.values())
        row.trace_ok = row.rebuild_error <= TOLERANCE
        if not row.trace_ok:
            worst = max(errors, key=lambda layer: errors[layer])
            row.reason = (
                f"layer {worst} rebuilt with relative error {errors[worst]:.2e}"
                if errors[worst] != float("inf")
                else f"layer {worst}: top-k sets differ"
            )
            return row
    except Exception as exc:
        row.reason = first_line(exc)[:400]
        return row
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with tempfile.TemporaryDirectory() as tmp:
            _disk_check(lm, Path(tmp))
        row.disk_ok = True
    except Exception as exc:
        row.disk_ok = False
        row.reason = f"on-disk weights: {first_line(exc)[:400]}"
        return row
    why = stream_check(f"random:{name}")
    row.stream_ok, row.stream_reason = not why, why or None
    return row


INVALID_VARIANT = "not a valid config of this class: "


def variant_label(part: str, overrides: dict[str, Any]) -> str:
    """``"part: key=value, ..."`` of a config variant."""
    return f"{part}: " + ", ".join(f"{k}={v}" for k, v in overrides.items())


def family_variants(name: str) -> dict[str, str]:
    """Every optional-part variant of ``random:name``'s tiny config, checked: label -> '' or why not."""
    _, spec = spec_origin(name)
    base = random_config(spec).to_dict()
    return {variant_label(part, v): variant_check(name, v) for part, v in config_variants(base)}


def variant_check(name: str, overrides: dict[str, Any]) -> str:
    """'' when ``random:name`` with ``overrides`` gets a spec (derived from that config) that
    rebuilds every MoE block and streams both saved spellings of its checkpoint; else why not."""
    try:
        random_config(spec_origin(name)[1], **overrides)
    except Exception as exc:  # the config class's own validation refuses the combination
        return INVALID_VARIANT + first_line(exc)[:300]
    try:
        lm = load_model(f"random:{name}", config_overrides=overrides)
        errors = rebuild_errors(lm)
        worst = max(errors, key=lambda layer: errors[layer])
        if not errors[worst] <= TOLERANCE:
            return f"layer {worst} rebuilt with relative error {errors[worst]:.2e}"
        with tempfile.TemporaryDirectory() as tmp:
            _disk_check(lm, Path(tmp))
    except Exception as exc:
        return first_line(exc)[:400]
    return ""


def _env() -> dict[str, str]:
    """Environment of the checking subprocesses: one thread each (tiny models run fastest so, and
    parallel families do not oversubscribe the cores)."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, "1")
    return env


def _run_notebooks(
    name: str, notebooks: Sequence[str], out: Path, timeout: float, max_tokens: int | None = MAX_TOKENS
) -> tuple[bool, str, str]:
    cmd = [
        sys.executable,
        "-m",
        "moe_utils.publish.cli",
        "run",
        "--model",
        f"random:{name}",
        "--out",
        str(out),
        "--notebooks-dir",
        str(NOTEBOOKS_DIR),
        "--notebooks",
        *notebooks,
    ]
    if max_tokens is not None:
        cmd += ["-p", "max_tokens", str(int(max_tokens))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    except subprocess.TimeoutExpired:
        return False, f"notebooks took longer than {timeout:.0f} s", ""
    if proc.returncode == 0:
        return True, "", proc.stdout
    lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
    errors = [l for l in lines if "Error" in l or "error" in l]
    why = (errors[-1] if errors else (lines[-1] if lines else f"exit {proc.returncode}"))[:400]
    return False, why, proc.stdout


def notebook_check(row: FamilyRow, name: str, out: Path, timeout: float = 900) -> FamilyRow:
    """Fill the notebook columns: observation 1 (weights) and observations 2-3 (dynamic).

    All three run in one ``moe-book run``; it stops at the first failing notebook, so after a
    failure of the weights notebook the dynamic ones are run on their own."""
    ok, why, log = _run_notebooks(name, WEIGHTS_NOTEBOOKS + DYNAMIC_NOTEBOOKS, out, timeout)
    reasons = []
    if ok:
        row.weights_ok = row.dynamic_ok = True
    else:
        row.weights_ok = all(f"/{nb} done in" in log for nb in WEIGHTS_NOTEBOOKS)
        if row.weights_ok:
            row.dynamic_ok = False
            reasons.append(f"dynamic notebooks: {why}")
        else:
            reasons.append(f"weights notebook: {why}")
            ok, why, _ = _run_notebooks(name, DYNAMIC_NOTEBOOKS, out, timeout)
            row.dynamic_ok = ok
            if not ok:
                reasons.append(f"dynamic notebooks: {why}")
    if reasons:
        row.reason = "; ".join([r for r in [row.reason] if r] + reasons)
    return row


def family_row(entry: CatalogueEntry, notebooks: bool = False, out: Path | None = None) -> FamilyRow:
    """The coverage row of one catalogue entry."""
    start = time.perf_counter()
    row = FamilyRow(entry.model_type, entry.package, entry.config_class)
    if entry.excluded:
        row.reason = f"not covered: {entry.excluded}"
        return row
    name = random_name(entry)
    trace_check(row, name)
    if row.trace_ok:
        row.variants = family_variants(name)
    if notebooks and row.trace_ok:
        with tempfile.TemporaryDirectory() as tmp:
            notebook_check(row, name, Path(out) if out else Path(tmp))
    if notebooks and row.trace_ok:
        row.notebooks_date = _dt.date.today().isoformat()
    row.checks_date = _dt.date.today().isoformat()
    row.seconds = round(time.perf_counter() - start, 1)
    return row


def _row_in_subprocess(entry: CatalogueEntry, notebooks: bool, timeout: float) -> FamilyRow:
    """One family checked in a fresh interpreter (memory is returned after every family)."""
    cmd = [sys.executable, "-m", "moe_utils.publish.cli", "coverage", "--row", entry.model_type]
    if notebooks:
        cmd.append("--notebooks")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
        line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("{")), None)
        if line is not None:
            return FamilyRow(**json.loads(line))
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        why = f"checking the family crashed (exit {proc.returncode}): {tail[:300]}"
    except subprocess.TimeoutExpired:
        why = f"checking the family took longer than {timeout:.0f} s"
    return FamilyRow(entry.model_type, entry.package, entry.config_class, reason=why)


def coverage(
    families: Iterable[str] | None = None,
    notebooks: bool = False,
    log: Callable[[str], None] = print,
    workers: int = 1,
    timeout: float = 1800,
    skip: Iterable[str] = (),
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """The coverage matrix as a JSON-ready dict (rows plus versions and date).

    With ``workers > 1`` families are checked in parallel subprocesses; ``skip`` leaves
    families out; ``on_row`` sees every finished row (used to save progress).
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    wanted = set(families) if families is not None else None
    skipped = set(skip)
    entries = [
        e
        for e in catalogue()
        if (wanted is None or e.model_type in wanted or e.package in wanted) and e.model_type not in skipped
    ]
    lock = threading.Lock()

    def one(entry: CatalogueEntry) -> FamilyRow:
        row = _row_in_subprocess(entry, notebooks, timeout) if workers > 1 else family_row(entry, notebooks=notebooks)
        status = "ok" if (row.passes if notebooks else row.trace_ok) else "FAIL"
        with lock:
            log(f"{row.family:24s} {row.spec:12s} {status:4s} {row.seconds:6.1f}s {row.reason or ''}")
            if on_row is not None:
                on_row(asdict(row))
        return row

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(one, entries))
    return {**_header(notebooks), "rows": [asdict(r) for r in rows]}


def _header(notebooks: bool) -> dict:
    import transformers

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "date": _dt.date.today().isoformat(),
        "notebooks": notebooks,
        "tolerance": TOLERANCE,
        "max_tokens": MAX_TOKENS if notebooks else None,
    }


NOTEBOOK_FIELDS = ("weights_ok", "dynamic_ok", "notebooks_date")


def _keep_notebook_columns(old_row: dict, new_row: dict) -> dict:
    """``new_row`` (checked without notebooks) with the notebook columns of ``old_row``, when the
    family still rebuilds; the reasons the notebooks gave are kept after the new reason."""
    if not new_row.get("trace_ok") or old_row.get("weights_ok") is None:
        return new_row
    kept = {k: old_row.get(k) for k in NOTEBOOK_FIELDS}
    nb_reasons = [
        p for p in (old_row.get("reason") or "").split("; ") if p.startswith(("weights notebook", "dynamic notebooks"))
    ]
    reason = "; ".join([r for r in [new_row.get("reason")] if r] + nb_reasons) or None
    return {**new_row, **kept, "reason": reason}


def _dated(data: dict) -> list[dict]:
    """The rows of ``data``, each with the dates its checks ran and its notebook columns were filled
    (files written before rows carried them have one date for the whole run)."""
    run_date = data.get("notebooks_date") or (data.get("date") if data.get("notebooks") else None)
    return [
        {
            **r,
            "notebooks_date": r.get("notebooks_date") or (run_date if r.get("weights_ok") is not None else None),
            "checks_date": r.get("checks_date") or data.get("date"),
        }
        for r in data.get("rows", [])
    ]


def merge(old: dict, new: dict) -> dict:
    """``old`` with the rows of ``new`` replacing those of the same family (catalogue order).

    A row of ``new`` checked without notebooks keeps the notebook columns of its ``old`` row;
    every row carries the date of its own notebook run."""
    by_family = {r["family"]: r for r in _dated(old)}
    for r in _dated(new):
        prev = by_family.get(r["family"])
        by_family[r["family"]] = _keep_notebook_columns(prev, r) if not new.get("notebooks") and prev else r
    order = [e.model_type for e in catalogue()]
    rows = sorted(by_family.values(), key=lambda r: order.index(r["family"]) if r["family"] in order else len(order))
    header = {k: v for k, v in {**old, **new}.items() if k not in ("rows", "notebooks_date")}
    header["notebooks"] = bool(old.get("notebooks") or new.get("notebooks"))
    header["max_tokens"] = new.get("max_tokens") or old.get("max_tokens")
    return {**header, "rows": rows}


def summary_counts(data: dict) -> dict[str, int]:
    """Listed families, families passing both analyses, derived / hand-written specs."""
    rows = [FamilyRow(**r) for r in data["rows"]]
    return {
        "listed": len(rows),
        "covered": sum(1 for r in rows if r.spec != "none"),
        "pass": sum(1 for r in rows if r.passes),
        "trace_ok": sum(1 for r in rows if r.trace_ok),
        "derived": sum(1 for r in rows if r.spec == "derived" and r.trace_ok),
        "hand_written": sum(1 for r in rows if r.spec == "hand-written"),
    }


def _mark(value: bool | None) -> str:
    return "–" if value is None else ("✓" if value else "✗")


def _variants_cell(row: dict) -> str:
    """``"k of n pass"`` for a row's config variants; "none" when its config has no optional part."""
    variants = {k: why for k, why in (row.get("variants") or {}).items() if not why.startswith(INVALID_VARIANT)}
    if not row.get("trace_ok"):
        return "–"
    if not variants:
        return "none"
    return f"{sum(1 for why in variants.values() if not why)} of {len(variants)} pass"


def _variant_words(why: str) -> str:
    """A variant's outcome in words: passes, refused by its config class, or fails and why."""
    if not why:
        return "its own derived spec passes"
    if why.startswith(INVALID_VARIANT):
        return f"not checked: the config class refuses it ({why[len(INVALID_VARIANT) :]})"
    return f"fails: {why}"


def _dates_line(data: dict) -> str:
    """When the rebuild, disk and variant checks ran, and when each family's notebooks last ran."""
    rows = _dated(data)
    checks = sorted({d for r in rows if (d := r.get("checks_date"))}) or [data["date"]]
    span = f"on {checks[0]}" if len(checks) == 1 else f"between {checks[0]} and {checks[-1]}"
    line = f"The rebuild, disk, layer-stream and config-variant checks ran {span}"
    dates = sorted({d for r in rows if (d := r.get("notebooks_date"))})
    if not dates:
        return line + "; the notebooks were not run."
    if dates == checks == [data["date"]]:
        return line + ", the notebooks on the same day."
    when = dates[0] if len(dates) == 1 else f"between {dates[0]} and {dates[-1]}"
    return line + f"; the notebook columns come from runs {'on ' if len(dates) == 1 else ''}{when}."


def render_page(data: dict) -> str:
    """The coverage page (Markdown) for a coverage matrix."""
    counts = summary_counts(data)
    lines = [
        "# Model coverage",
        "",
        f"Every decoder Mixture-of-Experts family of the installed transformers "
        f"({data['transformers']}, torch {data['torch']}), checked with a tiny "
        "random model built from the family's own config class. "
        f"**{counts['listed']} families are listed; {counts['pass']} pass both analyses** "
        f"(every notebook ran through `moe-book run` and every MoE block was rebuilt from its "
        f"experts with relative error at most {data['tolerance']:g}).",
        "",
        "A family without a hand-written spec gets a *derived* one: the router, the experts' "
        "fused or per-expert tensors, shared experts and their gate, dense layers, the MoE layer "
        "pattern, the activation and the routing function are found from the model transformers "
        "builds, and the routing function is the one candidate that reproduces the top-k experts "
        "and weights of the model's own forward pass. A derived spec is accepted only when the "
        "single-pass trace rebuilds every MoE block's output; otherwise the reason is listed.",
        "",
        "Columns: *weights* is observation 1 (weight analyses), *dynamic* observations 2 and 3 "
        "(traced forward passes); *disk* says whether the checkpoint saved with per-expert "
        "names and with fused names (`save_original_format=False`) streams the same weights as "
        "the model holds, without building it. *Layer stream* says whether observations 2 and 3 run one "
        "decoder layer at a time from the checkpoint (for models larger than memory) with the same "
        "captures as the whole model; where they cannot, the notebooks fall back to the whole model and "
        "the reason is listed below the table. *Config variants* counts the variants of the "
        "family's config that switch one optional part (shared experts, dense layers, top-k "
        "renormalisation, expert bias) relative to its tiny config and whose own derived spec "
        "passes the same rebuild and disk checks; each variant is listed below the table. "
        "Regenerate with `make test-families` (or `moe-book coverage --notebooks`)"
        + (
            f"; the notebooks ran on the first {data['max_tokens']} tokens of their default inputs."
            if data.get("max_tokens")
            else "."
        ),
        "",
        _dates_line(data),
        "",
        "| family | transformers package | spec | weights | dynamic | disk | layer stream | config variants | largest rebuild error | reason when not |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        err = "" if r["rebuild_error"] is None else f"{r['rebuild_error']:.1e}"
        reason = (r["reason"] or "").replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| `{r['family']}` | {r['package']} | {r['spec']} | {_mark(r['weights_ok'])} | "
            f"{_mark(r['dynamic_ok'])} | {_mark(r['disk_ok'])} | {_mark(r.get('stream_ok'))} | {_variants_cell(r)} | "
            f"{err} | {reason} |"
        )
    lines += [
        "",
        "## How each family routes, and what to keep in mind",
        "",
        "Quirks that change how a number on a model's pages reads (hybrid stacks, "
        "sigmoid routers with bias-based balancing, group-limited routing, chosen weights "
        "that do not sum to 1) are repeated on that model's pages.",
        "",
    ]
    for r in data["rows"]:
        if r["spec"] == "none" or not r.get("routing"):
            continue
        lines.append(f"**`{r['family']}`** ({r['spec']}): {r['routing']}.")
        for q in r.get("quirks") or []:
            lines.append(f"- {q}")
        if r.get("stream_ok") is False and r.get("stream_reason"):
            lines.append(f"- layer stream: {r['stream_reason']}; the whole-model path is used")
        for label, why in (r.get("variants") or {}).items():
            lines.append(f"- config variant `{label}`: {_variant_words(why)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write(data: dict, root: Path = Path(".")) -> tuple[Path, Path]:
    """Write the data file and the page under ``root``."""
    data_path, page_path = root / DATA_FILE, root / PAGE_FILE
    atomic_write_text(data_path, json.dumps(data, indent=1) + "\n")
    atomic_write_text(page_path, render_page(data))
    return data_path, page_path


def run(args: argparse.Namespace) -> int:
    """``moe-book coverage`` with its parsed options (see :func:`moe_utils.publish.cli.build_parser`)."""
    if args.row:
        entry = next(e for e in catalogue() if e.model_type == args.row)
        print(json.dumps(asdict(family_row(entry, notebooks=args.notebooks))))
        return 0
    existing = args.root / DATA_FILE
    # a run without notebooks refreshes the other columns and keeps the notebook ones
    partial = args.families is not None or args.resume or not args.notebooks
    old = json.loads(existing.read_text()) if partial and existing.is_file() else {"rows": []}
    done = (
        [r["family"] for r in old["rows"] if r.get("weights_ok") is not None or not args.notebooks]
        if args.resume
        else []
    )

    def save(row: dict) -> None:  # progress is kept if the run is interrupted
        nonlocal old
        old = merge(old, {**_header(args.notebooks), "rows": [row]})
        write(old, args.root)

    data = merge(old, coverage(args.families, notebooks=args.notebooks, workers=args.workers, skip=done, on_row=save))
    paths = write(data, args.root)
    print(f"wrote {paths[0]} and {paths[1]}")
    counts = summary_counts(data)
    print(
        f"{counts['listed']} families listed, {counts['trace_ok']} rebuilt within "
        f"{TOLERANCE:g}, {counts['pass']} pass both analyses"
    )
    return 0
