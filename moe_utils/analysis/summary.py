"""The book's summary page: gather every model's results files into verdict tables.

Only results files are read; nothing is recomputed. The headline quantities are the claims of the
observation registry (:mod:`moe_utils.analysis.claims`), fixed on the pre-registration page; the
detail table lists every summary number the pages wrote.
"""

from __future__ import annotations

import math
from pathlib import Path

import altair as alt
import pandas as pd

from .. import metrics as M
from ..analysis.results import BOOK_LEVEL_MODEL, iter_results, read_result
from . import obs1_neurons, obs3_depth
from .claims import CLAIMS, OBSERVATIONS


def _headlines() -> dict[tuple[str, str], str]:
    out = {}
    for o in OBSERVATIONS:
        for i, key in enumerate(o.claims):
            tag = f"{o.number}{'ab'[i] if len(o.claims) > 1 else ''}"
            out[(o.notebook, CLAIMS[key].quantity)] = f"{tag}. {CLAIMS[key].title}"
    return out


HEADLINES = _headlines()
VERDICT_COLOURS = {
    "holds": "#2ca02c",
    "detectable but below the floor": "#98df8a",
    "inconclusive": "#bcbd22",
    "does not hold": "#d62728",
    "undefined": "#7f7f7f",
}


def collect(runs_dir: str | Path) -> pd.DataFrame:
    """One row per (model, analysis, summary key) from every ``results/*.json`` under ``runs_dir``."""
    rows = []
    for res in iter_results(runs_dir, "*/results/*.json"):
        if res.model == BOOK_LEVEL_MODEL:  # the study's and interventions' results have their own tables
            continue
        for key, entry in res.summary.items():
            paper = entry.get("paper") or {}
            rows.append(
                {
                    "model": res.model,
                    "analysis": res.analysis,
                    "quantity": key,
                    "value": entry.get("value"),
                    "ci_low": entry.get("ci_low"),
                    "ci_high": entry.get("ci_high"),
                    "baseline": entry.get("baseline"),
                    "verdict": entry.get("verdict"),
                    "observed": entry.get("observed"),
                    "null": entry.get("null"),
                    "floor": entry.get("floor"),
                    "p_value": entry.get("p_value"),
                    "power": entry.get("power"),
                    "note": ("INVALID: non-finite weights were excluded; " if res.invalid else "")
                    + (entry.get("note") or ""),
                    "invalid": res.is_invalid,
                    "paper": "; ".join(f"{m}: {v:g}" for m, v in paper.items() if v is not None),
                    "fingerprint": res.fingerprint,
                    "file": str(res.path),
                }
            )
    return _distinct_model_names(pd.DataFrame(rows))


def _distinct_model_names(table: pd.DataFrame) -> pd.DataFrame:
    """Two checkpoints shown under one name (local folders ``a/hf`` and ``b/hf`` are both ``hf``)
    get their fingerprint added, ``hf (3f2a1b0c)``, so their numbers are never merged."""
    if table.empty:
        return table
    counts = table.groupby("model")["fingerprint"].nunique()
    shared = set(counts.loc[counts > 1].index)
    if shared:
        table = table.copy()
        mask = table["model"].isin(shared)
        table.loc[mask, "model"] = table.loc[mask, "model"] + " (" + table.loc[mask, "fingerprint"].str[:8] + ")"
    return table


def _fmt(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def headline_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The three headline quantities for every model."""
    keys = pd.Series(list(zip(table.analysis, table.quantity, strict=True)), index=table.index)
    out = table[keys.isin(list(HEADLINES))].copy()
    out["observation"] = [HEADLINES[k] for k in zip(out.analysis, out.quantity, strict=True)]
    return out


def _effect(value: object, low: object, high: object) -> str:
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]" if _fmt(low) else _fmt(value)


def verdict_table(table: pd.DataFrame) -> pd.DataFrame:
    """Claims x models: verdict and effect (observed minus that model's own null) with its 95%
    interval, the observed value beside the model's null, the floor and the paper's values."""
    out = headline_rows(table)
    out["cell"] = [
        f"{'INVALID (experts with NaN/inf weights excluded) ' if bad else ''}{v}: {_effect(x, lo, hi)}"
        + (f"; observed {_fmt(o)} vs null {_fmt(n)}" if _fmt(n) else "")
        for v, x, lo, hi, bad, o, n in zip(
            out.verdict, out.value, out.ci_low, out.ci_high, out.invalid, out.observed, out.null, strict=True
        )
    ]
    wide = out.pivot(index="observation", columns="model", values="cell")
    meta = out.groupby("observation").agg(floor=("floor", "first"), paper=("paper", "first"))
    meta["floor"] = meta["floor"].map(_fmt)
    meta = meta.rename(columns={"paper": "paper (its models)"})
    return pd.concat([meta[["floor"]], wide, meta[["paper (its models)"]]], axis=1)


def verdict_chart(table: pd.DataFrame) -> alt.Chart:
    """A grid of verdicts: claim by model, coloured by outcome."""
    out = headline_rows(table)
    colors = alt.Scale(domain=list(VERDICT_COLOURS), range=list(VERDICT_COLOURS.values()))
    base = alt.Chart(out).encode(
        x=alt.X("model:N", title=None, axis=alt.Axis(labelAngle=0, labelLimit=140)),
        y=alt.Y("observation:N", title=None, axis=alt.Axis(labelLimit=300)),
    )
    return (
        base.mark_rect().encode(
            color=alt.Color("verdict:N", scale=colors, legend=None),  # each cell names its verdict
            tooltip=["model", "observation", "verdict", alt.Tooltip("value:Q", format=".3f")],
        )
        + base.mark_text().encode(text="verdict:N")
    ).properties(width=min(400, 130 * max(1, out.model.nunique())), height=40 * max(1, out.observation.nunique()))


def family_table(table: pd.DataFrame, book: pd.DataFrame) -> pd.DataFrame:
    """Every verdict the book issues (each model's claims, the across-seed claims), with its raw
    one-sided p-value and the Holm-adjusted one over the whole family."""
    heads = headline_rows(table)
    rows = [
        {"verdict of": f"{r['model']}: {r['observation']}", "verdict": r["verdict"], "p": r["p_value"]}
        for r in heads.to_dict("records")
    ]
    for r in book.to_dict("records"):
        rows.append({"verdict of": f"{r['page']}: {r['quantity']}", "verdict": r["verdict"], "p": r.get("p_value")})
    out = pd.DataFrame(rows, columns=["verdict of", "verdict", "p"])
    out["p"] = pd.to_numeric(out["p"], errors="coerce")
    out["p (Holm)"] = M.holm(out["p"].to_numpy(dtype=float)) if len(out) else []
    return out.set_index("verdict of")


def detail_table(table: pd.DataFrame) -> pd.DataFrame:
    """Every summary number per model (value [95% CI] and verdict), with the paper's values."""
    out = table.copy()
    out["cell"] = [
        _effect(x, lo, hi) + (f" ({v})" if isinstance(v, str) and v else "") + (" INVALID" if bad else "")
        for x, lo, hi, v, bad in zip(out.value, out.ci_low, out.ci_high, out.verdict, out.invalid, strict=True)
    ]
    wide = out.pivot(index=["analysis", "quantity"], columns="model", values="cell")
    paper = out.groupby(["analysis", "quantity"])["paper"].first().rename("paper (its models)")
    return pd.concat([wide, paper], axis=1)


def narrative(table: pd.DataFrame) -> str:
    """A short paragraph per model stating each verdict in words, generated from the numbers."""
    out = headline_rows(table)
    parts = []
    for model, g in out.groupby("model"):
        bits = [
            f"claim {row['observation'].split('.')[0]} **{row['verdict']}** "
            f"(effect {_fmt(row['value'])} against a floor of {_fmt(row['floor'])})"
            for row in g.sort_values("observation").to_dict("records")
        ]
        parts.append(f"- **{str(model).removeprefix('zoo:')}**: " + "; ".join(bits) + ".")
    return "\n".join(parts)


def per_layer_across_models(
    runs_dir: str | Path, analysis: str, table: str, value: str, query: str | None = None, group: str = "layer"
) -> pd.DataFrame:
    """One per-layer series per model, read from a table of each model's results file.

    ``query`` filters the table first (pandas query syntax); values are averaged per layer.
    """
    frames = []
    for res in iter_results(runs_dir, f"*/results/{analysis}.json"):
        if table not in res.tables:
            continue
        t = res.tables[table]
        if query:
            t = t.query(query)
        frames.append(t.groupby(group, as_index=False).agg(**{value: (value, "mean")}).assign(model=res.model))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[group, value, "model"])


def weight_similarity_across_models(runs_dir: str | Path) -> pd.DataFrame:
    """Per model and layer: mean matrix-level cosine between distinct experts (F left out)."""
    return per_layer_across_models(
        runs_dir,
        obs1_neurons.ANALYSIS,
        "weight_similarity",
        "similarity",
        query="level == 'matrix' and expert_i != expert_j and expert_i != 'F' and expert_j != 'F'",
    )


def output_similarity_across_models(runs_dir: str | Path) -> pd.DataFrame:
    """Per model and layer: mean angular similarity of distinct experts' outputs on the long input."""
    return per_layer_across_models(
        runs_dir,
        obs3_depth.ANALYSIS,
        "depth_trend",
        "mean_offdiag",
        query=f"series == {obs3_depth.SERIES_OUTPUTS_LONG!r}",
    )


def repeat_rate_across_models(runs_dir: str | Path) -> pd.DataFrame:
    """Per model and layer: share of adjacent tokens with the same top-1 expert."""
    return per_layer_across_models(runs_dir, obs3_depth.ANALYSIS, "repeat_rate", "repeat rate")


def book_level_verdicts(results_dir: str | Path) -> pd.DataFrame:
    """The across-seed verdicts (replication.json) and the verdicts on the paper's advice
    (interventions.json) written by the book-level pages into ``results_dir``; empty when absent."""
    rows = []
    folder = Path(results_dir)
    for name in ("replication", "interventions"):
        path = folder / f"{name}.json"
        if not path.exists():
            continue
        res = read_result(path)
        for key, entry in res.summary.items():
            rows.append(
                {
                    "page": name,
                    "quantity": key,
                    "value": entry.get("value"),
                    "ci_low": entry.get("ci_low"),
                    "ci_high": entry.get("ci_high"),
                    "baseline": entry.get("baseline"),
                    "verdict": entry.get("verdict"),
                    "note": entry.get("note", ""),
                    "p_value": entry.get("p_value"),
                }
            )
    return pd.DataFrame(
        rows, columns=["page", "quantity", "value", "ci_low", "ci_high", "baseline", "verdict", "note", "p_value"]
    )


def advice_verdicts(book: pd.DataFrame) -> pd.DataFrame:
    """The interventions page's verdicts on the paper's advice, one row per quantity."""
    advice = book.loc[book.page == "interventions"]
    return advice.loc[:, ["quantity", "verdict", "value", "ci_low", "ci_high", "note"]].set_index("quantity")


def single_vs_replicated(table: pd.DataFrame, book: pd.DataFrame) -> pd.DataFrame:
    """Per organism and observation: the single-model verdict of its own page beside the
    across-seed verdict of the replication page."""
    heads = headline_rows(table)
    rep = book.loc[book.page == "replication"]
    rows = []
    for r in rep.to_dict("records"):
        key, _, organism = r["quantity"].partition("_tiny-")
        organism = "tiny-" + organism
        if key not in CLAIMS:
            continue
        claim = CLAIMS[key]
        single = heads[(heads.model == f"zoo:{organism}") & (heads.quantity == claim.quantity)]
        rows.append(
            {
                "organism": organism,
                "claim": claim.title,
                "single model (seed 0)": single.verdict.iloc[0] if len(single) else "",
                "across seeds": r["verdict"],
                "effect across seeds": r["value"],
                "note": r["note"],
            }
        )
    return pd.DataFrame(rows)
