"""The intro's findings box: the book's own verdict on each claim, per organism kind, in words.

Written at build time into ``book/generated/findings.md`` (the intro includes it) from the
results files the pages wrote: each model's claims, the across-seed combination of the
replication page and the interventions page's verdicts. Nothing is recomputed, and a claim
without results says so instead of showing a number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import pandas as pd

from ..analysis import summary as S
from ..analysis.claims import CLAIMS, OBSERVATIONS
from .tidy import reader_label

FINDINGS = Path("book/generated/findings.md")
ORGANISMS = ("tiny-moe-upcycled", "tiny-moe-scratch", "tiny-moe-fine")
WORDS = {
    "holds": "holds",
    "detectable but below the floor": "is detectable but smaller than the floor",
    "inconclusive": "is inconclusive",
    "does not hold": "does not hold",
    "undefined": "has no verdict yet",
}


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.{digits}f}"


def _doc(root: Path, rel: str, text: str) -> str:
    """A link to a page of the book when it exists, else the plain text."""
    for suffix in (".ipynb", ".md"):
        if (root / f"{rel}{suffix}").exists():
            return f"{{doc}}`{text} </{rel}>`"
    return text


def _book_level(runs: Path) -> pd.DataFrame:
    for folder in sorted(runs.glob("*/results")):
        table = S.book_level_verdicts(folder)
        if not table.empty:
            return table
    return S.book_level_verdicts(runs / "book" / "results")


def _bound(key: str) -> str:
    """``"floor 0.065"``, or ``"margin 0.005"`` for a claim that an effect is no smaller than a reference."""
    claim = CLAIMS[key]
    return f"{'margin' if claim.kind == 'noninferior' else 'floor'} {claim.floor:g}"


def _claim_line(key: str, org: str, pages: pd.DataFrame, across: pd.DataFrame) -> str:
    claim = CLAIMS[key]
    row = across[across.quantity == f"{key}_{org}"] if not across.empty else across
    if len(row) and row.verdict.iloc[0] not in (None, "undefined"):
        r = row.iloc[0]
        return (
            f"{WORDS.get(r.verdict, r.verdict)} across seeds (effect {_num(r.value)}, 95% interval "
            f"{_num(r.ci_low)} to {_num(r.ci_high)}, {_bound(key)})"
        )
    hit = pages[(pages.model == f"zoo:{org}") & (pages.quantity == claim.quantity)] if not pages.empty else pages
    if not len(hit):
        return "not measured in this build"
    h = hit.iloc[0]
    return (
        f"{WORDS.get(h.verdict, h.verdict)} on seed 0 (effect {_num(h.value)}, 95% interval {_num(h.ci_low)} "
        f"to {_num(h.ci_high)}, {_bound(key)}; the other seeds are not combined yet)"
    )


def findings_markdown(root: str | Path = ".", runs_dir: str | Path = "book/runs") -> str:
    """The findings box as MyST markdown (an admonition), from the results under ``runs_dir``."""
    root = Path(root)
    runs = root / runs_dir
    pages = S.collect(runs) if runs.is_dir() else pd.DataFrame()
    book = _book_level(runs) if runs.is_dir() else pd.DataFrame()
    across = cast(pd.DataFrame, book[book.page == "replication"]) if not book.empty else book
    advice = cast(pd.DataFrame, book[book.page == "interventions"]) if not book.empty else book
    rel_runs = Path(runs_dir).as_posix()
    lines = [
        "```{admonition} What this book finds",
        ":class: tip",
        "",
        "Each claim of the paper is tested on the book's own model organisms as an effect against a computed null "
        "and a floor fixed in advance (the "
        + _doc(root, "book/preregistration", "pre-registration")
        + "). On the organisms, in short:",
        "",
    ]
    if pages.empty and across.empty:
        lines.append("*No results yet: run the notebooks (`moe-book run`) and build again.*")
    for obs in OBSERVATIONS:
        for key in obs.claims:
            claim = CLAIMS[key]
            label = f"{obs.number}{'ab'[obs.claims.index(key)] if len(obs.claims) > 1 else ''}"
            parts = []
            for org in ORGANISMS:
                page = _doc(root, f"{rel_runs}/{org}/{obs.notebook}", reader_label(f"zoo:{org}"))
                parts.append(f"{page} {_claim_line(key, org, pages, across)}")
            paper = (
                "" if math.isnan(claim.paper_effect) else f" The paper's Mixtral 8x7B effect: {claim.paper_effect:.2f}."
            )
            lines.append(
                f"- **{label}. {claim.title[:1].upper() + claim.title[1:]}.** " + "; ".join(parts) + "." + paper
            )
    if not advice.empty:
        tested = "; ".join(
            f"{str(r['quantity']).replace('_', ' ')}: {WORDS.get(r['verdict'], r['verdict'])} ({_num(r['value'])})"
            for r in advice.to_dict("records")
            if isinstance(r["verdict"], str)
        )
        if tested:
            lines.append(
                "- **Intervening on the routing** ("
                + _doc(root, f"{rel_runs}/book/interventions", "interventions")
                + ", seed-0 organisms): "
                + tested
                + "."
            )
    lines += [
        "",
        "The "
        + _doc(root, f"{rel_runs}/book/summary", "summary")
        + " lists every verdict with its numbers; the "
        + _doc(root, f"{rel_runs}/book/replication", "replication page")
        + " combines the seeds and follows the claims through training and depth; the "
        + _doc(root, f"{rel_runs}/book/interventions", "interventions page")
        + " changes how the trained organisms route, and the "
        + _doc(root, f"{rel_runs}/book/organisms", "model organisms page")
        + " describes them.",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_findings(root: str | Path = ".", runs_dir: str | Path = "book/runs") -> Path:
    """Write :func:`findings_markdown` to ``book/generated/findings.md`` under ``root``."""
    path = Path(root) / FINDINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(findings_markdown(root, runs_dir), encoding="utf-8")
    return path
