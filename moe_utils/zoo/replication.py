"""The replication page: every organism kind on several seeds, as tables, text and a summary.

:func:`replication_report` reads the shipped (or a given) study folder once
(:mod:`moe_utils.zoo.study_results`) and returns a :class:`ReplicationReport` with the tables the
page shows and the summary entries of ``replication.json``: one across-seed verdict per
(organism kind, observation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from .. import metrics as M
from ..analysis import paper
from ..analysis.claims import CLAIMS
from ..core.paths import ZOO_STUDY_DIR
from . import ladder_predictions as P
from . import ladder_words as W
from . import study_results as S
from .long_corpus import LONG_CORPUS_FILE, describe_long_stream
from .replicates import REPLICATES

CLAIM_NAMES = {c.key: c.title for c in CLAIMS.values()}
PAPER_MARK_LABEL = "paper, Mixtral 8x7B"
COPIES_SIMILARITY = 0.999  # matrix-level similarity at which a snapshot's experts count as copies of one another


def emergence_paper_marks() -> dict[str, float]:
    """The paper's Mixtral 8x7B value for each emergence quantity that has one."""
    mixtral = paper.GATE_R2["Mixtral 8x7B"]
    return {
        "top1_norm_agreement": float(paper.TOP1_NORM_AGREEMENT.value or float("nan")),
        "gate_act_advantage": mixtral["W_act"] - max(mixtral["W_up"], mixtral["W_down"]),
        "router_act_alignment": CLAIMS["obs1"].paper_effect,
        "norm_preference": CLAIMS["obs2"].paper_effect,
    }


def _effect_cell(verdict: str, effect: float, low: float, high: float) -> str:
    return f"{verdict}: {effect:.3f}" + (f" [{low:.3f}, {high:.3f}]" if pd.notna(low) else "")


def replicate_table(held: pd.DataFrame, training: pd.DataFrame) -> pd.DataFrame:
    """One row per trained replicate (placement variants and ladder rungs left out): held-out loss
    and perplexity, training tokens and minutes."""

    def base(t: pd.DataFrame) -> pd.DataFrame:
        return cast(pd.DataFrame, t[t.ladder.fillna("") == ""]) if "ladder" in t else t

    reps = base(cast(pd.DataFrame, held[held.kind != "placement"])).merge(
        cast(pd.DataFrame, base(training)[["organism", "seed", "kind", "training_seconds", "tokens"]]),
        on=["organism", "kind", "seed"],
        how="left",
    )
    reps["training minutes"] = (reps.training_seconds / 60).round(1)
    return cast(
        pd.DataFrame,
        reps.sort_values(["kind", "seed"]).set_index(["organism", "seed"])[
            ["heldout_loss", "heldout_perplexity", "tokens", "training minutes"]
        ],
    )


def measured(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The verdict rows measured with the nulls (they name a claim), ladder rungs left out."""
    return S._claim_rows(verdicts)


def verdict_grid(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Claim by (organism, seed): "verdict: effect [low, high]" for the issued claims."""
    v = measured(verdicts)
    issued = [c.key for c in CLAIMS.values() if c.issued]
    v = v[v.claim.isin(issued)]
    cells = v.assign(
        cell=[
            _effect_cell(a, e, lo, hi) for a, e, lo, hi in zip(v.verdict, v.effect, v.ci_low, v.ci_high, strict=False)
        ]
    )
    return cells.pivot_table(
        index=["observation", "claim"], columns=["organism", "seed"], values="cell", aggfunc="first"
    )


def across_seed_grid(across: pd.DataFrame) -> pd.DataFrame:
    """Claim by organism kind: the across-seed "verdict: effect [low, high]"."""
    acr = across.assign(
        **{
            "across seeds": [
                _effect_cell(v, m, lo, hi)
                for v, m, lo, hi in zip(across.verdict, across.effect, across.ci_low, across.ci_high, strict=False)
            ]
        }
    )
    return acr.pivot(index=["observation", "claim"], columns="organism", values="across seeds")


def replicate_effects(verdicts: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per issued claim: one row per replicate (label ``organism sSEED``); a missing interval is
    drawn as the point itself."""
    out = {}
    v = measured(verdicts)
    v = v[v.claim.isin([c.key for c in CLAIMS.values() if c.issued])]
    for key, g in v.groupby("claim", sort=False):
        out[str(key)] = g.assign(
            title=CLAIMS[str(key)].title,
            replicate=g.organism + " s" + g.seed.astype(str),
            ci_low=g.ci_low.fillna(g.effect),
            ci_high=g.ci_high.fillna(g.effect),
        )
    return out


# Training steps of each kind's 8-layer organisms: the depth axis compares rungs at this budget.
BASE_STEPS = {kind: REPLICATES[f"{kind}-s0"].spec.steps for kind in ("scratch", "upcycled", "fine")}


def ladder_frame(ladder: pd.DataFrame, axis: str) -> pd.DataFrame:
    """The ladder's rows along one axis ("depth": effect against layers at the organisms' budget;
    "length": against training steps at 8 layers), with a series label and each claim's title."""
    if ladder.empty:
        return ladder.assign(series=[], title=[])
    t = ladder[ladder.claim.isin([c.key for c in CLAIMS.values() if c.kind != "noninferior"] + ["obs3_strong"])]
    t = t.assign(layers=t.layers.astype(int), steps=t.steps.astype(int))
    if axis == "depth":
        t, varies = t[t.steps == t.kind.map(BASE_STEPS)], "layers"
    else:
        t, varies = t[t.layers == 8], "steps"
    t = t.assign(series=t.kind + " seed " + t.seed.astype(str))
    # only series measured at two or more rungs of this axis
    t = t[t.groupby("series")[varies].transform("nunique") > 1]
    return t.assign(title=t.claim.map(lambda k: CLAIMS[k].title)).sort_values(["claim", "series", "layers", "steps"])


def ladder_grid(ladder: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Claim by rung: "outcome: effect [low, high]" for every replicate of one axis."""
    t = ladder_frame(ladder, axis)
    if t.empty:
        return pd.DataFrame()
    col = "layers" if axis == "depth" else "steps"
    cells = t.assign(
        cell=[
            _effect_cell(v, e, lo, hi) for v, e, lo, hi in zip(t.outcome, t.effect, t.ci_low, t.ci_high, strict=False)
        ]
    )
    return cells.pivot_table(index=["claim"], columns=["kind", col, "seed"], values="cell", aggfunc="first")


def ladder_across_grid(combined: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Claim by rung of the seeds combined (``ladder_across_seeds``): "outcome: effect [low, high],
    k seeds" where at least two seeds are measured, along one axis (as :func:`ladder_frame`)."""
    if combined.empty:
        return pd.DataFrame()
    t = cast(pd.DataFrame, combined[combined.seeds >= 2])
    t = cast(pd.DataFrame, t[t.steps == t.kind.map(BASE_STEPS)] if axis == "depth" else t[t.layers == 8])
    col = "layers" if axis == "depth" else "steps"
    rungs = t.groupby("kind")[col].nunique()
    t = cast(pd.DataFrame, t[t.kind.map(rungs) > 1])
    if t.empty:
        return pd.DataFrame()
    cells = t.assign(
        cell=[
            _effect_cell(v, e, lo, hi) + f", {k} seeds"
            for v, e, lo, hi, k in zip(t.outcome, t.effect, t.ci_low, t.ci_high, t.seeds, strict=False)
        ]
    )
    return cells.pivot_table(index=["claim"], columns=["kind", col], values="cell", aggfunc="first")


def trajectory_table(emergence: pd.DataFrame) -> pd.DataFrame:
    """The ``trajectory`` table: (replicate, ladder, run_steps, kind, seed, step, tokens_seen,
    quantity, value, ci_low, ci_high) of every measured training snapshot (intervals where the
    snapshot's results carry them); ``ladder == "length"`` marks the 4x runs."""
    cols = ["replicate", "ladder", "run_steps", "kind", "seed", "step", "tokens_seen", "quantity", "value"]
    cols += ["ci_low", "ci_high"]
    if emergence.empty:
        return pd.DataFrame(columns=cols)
    em = emergence.copy()
    for c, default in (("replicate", ""), ("ladder", ""), ("run_steps", float("nan"))):
        if c not in em:
            em[c] = default
    kinds = {"tiny-moe-scratch": "scratch", "tiny-moe-upcycled": "upcycled", "tiny-moe-fine": "fine"}
    if "kind" not in em:
        em["kind"] = em.organism.map(kinds)
    for c in ("ci_low", "ci_high"):
        if c not in em:
            em[c] = float("nan")
    return em[cols].sort_values(["kind", "replicate", "seed", "quantity", "step"]).reset_index(drop=True)


def length_frame(trajectory: pd.DataFrame) -> pd.DataFrame:
    """The 4x runs' snapshots as the ladder's rows: per claim with an effect in the snapshots, its
    effect and interval at each step, the floor and the outcome judged as a replicate's would be.
    A snapshot whose experts are still copies of one another (the upcycled start) has every outcome
    undefined: with identical experts there is no norm, diversity or specialisation to compare."""
    cols = ["claim", "title", "series", "steps", "effect", "ci_low", "ci_high", "floor", "outcome"]
    if trajectory.empty or "ladder" not in trajectory:
        return pd.DataFrame(columns=cols)
    t = cast(pd.DataFrame, trajectory[trajectory.ladder.fillna("") == "length"])
    bounds = {
        (r.replicate, int(r.step), r.quantity): (float(r.ci_low), float(r.ci_high))  # type: ignore[arg-type]
        for r in t.itertuples()
    }
    copied = t[(t.quantity == "expert_matrix_similarity") & (t.value.astype(float) >= COPIES_SIMILARITY)]
    copies = set(zip(copied.replicate, copied.step.astype(int), strict=True))
    rows = []
    for key in ("obs1", "obs2", "obs3_weak", "obs3_strong"):
        claim = CLAIMS[key]
        for r in t[t.quantity == claim.quantity].itertuples():
            step = int(r.step)  # type: ignore[arg-type]
            if claim.kind == "composite":
                parts = [bounds.get((r.replicate, step, CLAIMS[k].quantity)) for k in ("obs3_slope", "obs3_residual")]
                outcome = M.combine_outcomes(
                    *(
                        _snapshot_outcome(k, *b) if b else "undefined"
                        for k, b in zip(("obs3_slope", "obs3_residual"), parts, strict=True)
                    )
                )
            else:
                outcome = _snapshot_outcome(key, float(r.ci_low), float(r.ci_high))  # type: ignore[arg-type]
            if (r.replicate, step) in copies:
                outcome = "undefined"
            rows.append(
                {
                    "claim": key,
                    "title": claim.title,
                    "series": str(r.replicate),
                    "steps": step,
                    "effect": float(r.value),  # type: ignore[arg-type]
                    "ci_low": float(r.ci_low),  # type: ignore[arg-type]
                    "ci_high": float(r.ci_high),  # type: ignore[arg-type]
                    "floor": claim.floor,
                    "outcome": outcome,
                }
            )
    return pd.DataFrame(rows, columns=cols)


def length_grid(trajectory: pd.DataFrame) -> pd.DataFrame:
    """(4x run, step) by claim: "outcome: effect [low, high]" of every snapshot on the length axis,
    one row per snapshot so that the table grows down the page as runs are added."""
    t = length_frame(trajectory)
    if t.empty:
        return pd.DataFrame()
    cells = t.assign(
        cell=[
            _effect_cell(v, e, lo, hi) for v, e, lo, hi in zip(t.outcome, t.effect, t.ci_low, t.ci_high, strict=False)
        ]
    )
    return cells.pivot_table(index=["series", "steps"], columns=["claim"], values="cell", aggfunc="first")


def _snapshot_outcome(key: str, low: float, high: float) -> str:
    """A snapshot's outcome under the claim's own rule (its sign and floor)."""
    claim = CLAIMS[key]
    if not (np.isfinite(low) and np.isfinite(high)):
        return "undefined"
    if claim.kind == "noninferior":
        return M.noninferior_outcome(low, high, claim.floor)
    lo, hi = sorted((claim.direction * low, claim.direction * high))
    return M.outcome(lo, hi, claim.floor)


def emergence_series(emergence: pd.DataFrame) -> pd.DataFrame:
    """The emergence snapshots with a ``series`` label per replicate ("NAME seed S") and ``final``
    marking each series' last snapshot of each quantity."""
    em = emergence.copy()
    em["series"] = em.organism + " seed " + em.seed.astype(str)
    em["final"] = False
    em.loc[em.groupby(["series", "quantity"]).step.idxmax(), "final"] = True
    return em


def emergence_table(emergence: pd.DataFrame) -> pd.DataFrame:
    """(organism, seed, quantity) by training step: the measured value."""
    return emergence.pivot_table(index=["organism", "seed", "quantity"], columns="step", values="value")


def seed0_check(verdicts: pd.DataFrame, pages: pd.DataFrame) -> pd.DataFrame:
    """Seed 0 is the shipped organism: its study row beside the number on the organism's own page
    (``pages`` as from :func:`moe_utils.analysis.summary.collect`); empty when no page matches."""
    rows = []
    if not pages.empty:
        for row in verdicts[verdicts.seed == 0].itertuples():
            hit = pages[(pages.model == f"zoo:{row.organism}") & (pages.quantity == row.quantity)]
            if len(hit):
                rows.append(
                    {
                        "organism": row.organism,
                        "quantity": row.quantity,
                        "study": row.effect,
                        "page": float(hit.value.iloc[0]),
                        "same verdict": hit.verdict.iloc[0] == row.verdict,
                    }
                )
    return pd.DataFrame(rows)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def across_seed_narrative(across: pd.DataFrame, pending: pd.DataFrame | None = None) -> str:
    """Markdown: per claim and kind the across-seed verdict with its numbers, then what is settled."""
    lines = []
    for key, g in across.groupby("claim", sort=False):
        parts = []
        for r in g.to_dict("records"):
            if r["seeds"] < 2:
                parts.append(f"**{r['organism']}**: {r['verdict']} ({r['note']})")
                continue
            parts.append(
                f"**{r['organism']}**: {r['verdict']} (effect {r['effect']:+.3f}, 95% interval "
                f"{r['ci_low']:+.3f} to {r['ci_high']:+.3f}, floor {r['floor']:.3f}; {r['seeds']} seeds, "
                f"between-seed SD {r['between_seed_sd']:.3f}; per seed: {r['seed_verdicts']})"
            )
        lines.append(f"- {_sentence(CLAIM_NAMES[str(key)])}: " + "; ".join(parts) + ".")
    decided = across[across.verdict.isin(["holds", "does not hold", "detectable but below the floor"])]
    lines.append("")
    lines.append(
        f"Decided across seeds: {len(decided)} of {len(across)} (kind, claim) cells"
        + (
            " - " + ", ".join(f"{r.claim} on {r.organism} ({r.verdict})" for r in decided.itertuples())
            if len(decided)
            else ""
        )
        + "."
    )
    if pending is not None and len(pending):
        by_org = pending.groupby("organism").seed.apply(lambda s: ", ".join(str(x) for x in s))
        lines.append("")
        lines.append(
            "Seeds whose shipped results predate the nulls and are not combined yet (their weights do not "
            "ship; `moe-book zoo study --run NAME` retrains them bit for bit): "
            + "; ".join(f"{o} seed(s) {v}" for o, v in by_org.items())
            + "."
        )
    return "\n".join(lines)


def replication_summary(across: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """``replication.json``'s summary: one entry ``CLAIM_KIND`` per across-seed verdict."""
    return {
        f"{r['claim']}_{r['organism']}": {
            "value": r["effect"],
            "ci_low": r["ci_low"],
            "ci_high": r["ci_high"],
            "baseline": 0.0,
            "verdict": r["verdict"],
            "paper": {},
            "note": r["note"] or f"{r['seeds']} seeds, random effects; floor {r['floor']}; Holm p {r['p_holm']:.3g}",
            "null": r["null"],
            "floor": r["floor"],
            "p_value": r["p_value"],
            "p_holm": r["p_holm"],
            "power": r["power"],
        }
        for r in across.to_dict("records")
    }


@dataclass(frozen=True)
class ReplicationReport:
    """The replication page's tables (``tables`` go to replication.json) and summary entries."""

    replicates: list[str]
    tables: dict[str, pd.DataFrame]
    summary: dict[str, dict[str, Any]]
    study_dir: Path | None = None

    @property
    def empty(self) -> bool:
        return self.tables["verdicts"].empty

    @property
    def verdicts(self) -> pd.DataFrame:
        return self.tables["verdicts"]

    @property
    def emergence(self) -> pd.DataFrame:
        """The organism replicates' snapshots (the 4x runs' are the length axis)."""
        em = self.tables["emergence"]
        return cast(pd.DataFrame, em[em.ladder.fillna("") == ""]) if "ladder" in em else em

    def length_frame(self) -> pd.DataFrame:
        return length_frame(self.tables["trajectory"])

    def length_grid(self) -> pd.DataFrame:
        return length_grid(self.tables["trajectory"])

    def prediction_checks(self) -> list[P.Check]:
        """The pre-registered predictions of both axes, checked against the measured rungs."""
        return P.depth_checks(*P.depth_rungs(self.verdicts)) + P.length_checks(self.tables["trajectory"])

    @property
    def across(self) -> pd.DataFrame:
        return self.tables["across_seeds"]

    @property
    def replicate_table(self) -> pd.DataFrame:
        return replicate_table(self.tables["heldout"], self.tables["training"])

    @property
    def verdict_grid(self) -> pd.DataFrame:
        return verdict_grid(self.verdicts)

    @property
    def across_seed_grid(self) -> pd.DataFrame:
        return across_seed_grid(self.across)

    @property
    def ladder(self) -> pd.DataFrame:
        return self.tables["ladder"]

    def ladder_frame(self, axis: str) -> pd.DataFrame:
        return ladder_frame(self.ladder, axis)

    def ladder_grid(self, axis: str) -> pd.DataFrame:
        return ladder_grid(self.ladder, axis)

    def ladder_across_grid(self, axis: str) -> pd.DataFrame:
        return ladder_across_grid(self.tables["ladder_across_seeds"], axis)

    @property
    def narrative(self) -> str:
        return across_seed_narrative(self.across, self.tables["pending"])

    @cached_property
    def long_corpus(self) -> str:
        """What the 4x runs' enlarged training stream holds (empty before a 4x run is shipped)."""
        path = Path(self.study_dir or ZOO_STUDY_DIR) / LONG_CORPUS_FILE
        return describe_long_stream(json.loads(path.read_text())) if path.is_file() else ""

    def ladder_words(self, axis: str) -> str:
        """The ladder's findings along ``axis`` ("depth" or "length") in plain words."""
        if axis == "depth":
            return W.depth_words(self.tables["ladder_across_seeds"], "scratch", BASE_STEPS["scratch"])
        return W.length_words(self.tables["trajectory"])


def replication_report(study_dir: str | Path | None = None) -> ReplicationReport:
    """Read the study results (default: those shipped with the package) into the page's report."""
    root = Path(study_dir) if study_dir else None
    shipped = S.load_shipped(root)
    tables = S.replication_tables(shipped)
    tables["trajectory"] = trajectory_table(tables["emergence"])
    return ReplicationReport(sorted(shipped), tables, replication_summary(tables["across_seeds"]), root)
