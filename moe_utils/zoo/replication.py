"""The replication page: every organism kind on several seeds, as tables, text and a summary.

:func:`replication_report` reads the shipped (or a given) study folder once
(:mod:`moe_utils.zoo.study_results`) and returns a :class:`ReplicationReport` with the tables the
page shows and the summary entries of ``replication.json``: one across-seed verdict per
(organism kind, observation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..analysis import paper
from ..core.frames import int_key
from . import study_results as S

OBSERVATION_NAMES = {
    1: "neurons act like fine-grained experts (r² advantage of W_act)",
    2: "the router prefers large-norm experts",
    3: "diversity grows with depth, last layer excepted",
}
PAPER_MARK_LABEL = "paper, Mixtral 8x7B"


def emergence_paper_marks() -> dict[str, float]:
    """The paper's Mixtral 8x7B value for each emergence quantity that has one."""
    mixtral = paper.GATE_R2["Mixtral 8x7B"]
    return {
        "top1_norm_agreement": float(paper.TOP1_NORM_AGREEMENT.value or float("nan")),
        "gate_act_advantage": mixtral["W_act"] - max(mixtral["W_up"], mixtral["W_down"]),
    }


def _effect_cell(verdict: str, effect: float, low: float, high: float) -> str:
    return f"{verdict}: {effect:.3f}" + (f" [{low:.3f}, {high:.3f}]" if pd.notna(low) else "")


def replicate_table(held: pd.DataFrame, training: pd.DataFrame) -> pd.DataFrame:
    """One row per trained replicate (placement variants left out): held-out loss and perplexity,
    training tokens and minutes."""
    reps = held[held.kind != "placement"].merge(
        training[["organism", "seed", "kind", "training_seconds", "tokens"]],
        on=["organism", "kind", "seed"],
        how="left",
    )
    reps["training minutes"] = (reps.training_seconds / 60).round(1)
    return reps.sort_values(["kind", "seed"]).set_index(["organism", "seed"])[
        ["heldout_loss", "heldout_perplexity", "tokens", "training minutes"]
    ]


def verdict_grid(verdicts: pd.DataFrame) -> pd.DataFrame:
    """(observation, quantity) by (organism, seed): "verdict: effect [low, high]"."""
    cells = verdicts.assign(
        cell=[
            _effect_cell(v, e, lo, hi)
            for v, e, lo, hi in zip(verdicts.verdict, verdicts.effect, verdicts.ci_low, verdicts.ci_high, strict=False)
        ]
    )
    return cells.pivot_table(
        index=["observation", "quantity"], columns=["organism", "seed"], values="cell", aggfunc="first"
    )


def across_seed_grid(across: pd.DataFrame) -> pd.DataFrame:
    """Observation by organism kind: the across-seed "verdict: mean [low, high]"."""
    acr = across.assign(
        **{
            "across seeds": [
                _effect_cell(v, m, lo, hi)
                for v, m, lo, hi in zip(across.verdict, across.mean_effect, across.ci_low, across.ci_high, strict=False)
            ]
        }
    )
    return acr.pivot(index="observation", columns="organism", values="across seeds")


def replicate_effects(verdicts: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """Per observation: one row per replicate (label ``organism sSEED``); a missing interval is
    drawn as the point itself."""
    out = {}
    for obs, g in verdicts.groupby("observation"):
        out[int_key(obs)] = g.assign(
            replicate=g.organism + " s" + g.seed.astype(str),
            ci_low=g.ci_low.fillna(g.effect),
            ci_high=g.ci_high.fillna(g.effect),
        )
    return out


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


def across_seed_narrative(across: pd.DataFrame) -> str:
    """Markdown: per observation and kind the across-seed verdict, then what is settled and what is not."""
    lines = []
    for obs, g in across.groupby("observation"):
        parts = [
            f"**{r['organism']}**: {r['verdict']} ({r['seeds']} seeds; per seed: {r['seed_verdicts']}; "
            f"mean {r['mean_effect']:.3f}"
            + (f", 95% interval {r['ci_low']:.3f} to {r['ci_high']:.3f}" if pd.notna(r["ci_low"]) else "")
            + ")"
            for r in g.to_dict("records")
        ]
        lines.append(f"- Observation {obs}, {OBSERVATION_NAMES[int_key(obs)]}: " + "; ".join(parts) + ".")
    settled = across[across.verdict != "inconclusive"]
    open_ = across[across.verdict == "inconclusive"]
    lines.append("")
    lines.append(
        f"Settled across seeds: {len(settled)} of {len(across)} (kind, observation) cells"
        + (
            " - "
            + ", ".join(f"observation {r.observation} on {r.organism} ({r.verdict})" for r in settled.itertuples())
            if len(settled)
            else ""
        )
        + f". Not settled: {len(open_)}"
        + (
            " - " + ", ".join(f"observation {r.observation} on {r.organism}" for r in open_.itertuples())
            if len(open_)
            else ""
        )
        + "."
    )
    for r in settled.itertuples():
        if all(v.strip() == S.INCONCLUSIVE for v in str(r.seed_verdicts).split(",")):
            lines.append("")
            lines.append(
                f"Observation {r.observation} on {r.organism} is settled across seeds although no single seed "
                "settles it: each seed's own interval (over its layers) includes the baseline, but the seeds' "
                f"means agree closely ({r.mean_effect:.3f}, 95% interval {r.ci_low:.3f} to {r.ci_high:.3f}). "
                "What is reproducible is the small average over these layers, not the effect in any one layer."
            )
    few = across[across.seeds < S.MIN_SEEDS]
    if len(few):
        lines.append(
            f"Kinds with fewer than three measured seeds so far: {', '.join(sorted(set(few.organism)))}; "
            "their cells can only become settled when the remaining replicates are trained."
        )
    return "\n".join(lines)


def replication_summary(across: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """``replication.json``'s summary: one entry ``obsN_KIND`` per across-seed verdict."""
    return {
        f"obs{r['observation']}_{r['organism']}": {
            "value": r["mean_effect"],
            "ci_low": r["ci_low"],
            "ci_high": r["ci_high"],
            "baseline": r["baseline"],
            "verdict": r["verdict"],
            "paper": {},
            "note": f"{r['seeds']} seeds: {r['seed_verdicts']}",
        }
        for r in across.to_dict("records")
    }


@dataclass(frozen=True)
class ReplicationReport:
    """The replication page's tables (``tables`` go to replication.json) and summary entries."""

    replicates: list[str]
    tables: dict[str, pd.DataFrame]
    summary: dict[str, dict[str, Any]]

    @property
    def empty(self) -> bool:
        return self.tables["verdicts"].empty

    @property
    def verdicts(self) -> pd.DataFrame:
        return self.tables["verdicts"]

    @property
    def emergence(self) -> pd.DataFrame:
        return self.tables["emergence"]

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
    def narrative(self) -> str:
        return across_seed_narrative(self.across)


def replication_report(study_dir: str | Path | None = None) -> ReplicationReport:
    """Read the study results (default: those shipped with the package) into the page's report."""
    shipped = S.load_shipped(Path(study_dir) if study_dir else None)
    tables = S.replication_tables(shipped)
    return ReplicationReport(sorted(shipped), tables, replication_summary(tables["across_seeds"]))
