"""The interventions page: the paper's advice tested on the shipped MoE organisms.

:func:`interventions_report` runs the routing interventions, the expert ablation and the top-k
sweep on each organism (:func:`moe_utils.analysis.interventions.intervention_tables`), reads the
dense-layer placement replicates (:mod:`moe_utils.zoo.study_results`) and returns an
:class:`InterventionsReport` with the page's tables, the verdicts and the tables and summary of
``interventions.json``. Each verdict names what was tested on these organisms (an effect, its
null, an interval and a floor, judged with the four outcomes), not the design advice itself. The
interventions run on the shipped organisms, which are the study's seed 0 (seeds 1 and 2 ship
results, not weights); their intervals resample held-out documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..analysis import interventions as I
from ..analysis import paper
from ..models.loading import load_model
from . import configs, evaluate
from . import study_results as S

ADVICE_NORM_ROUTING = "post-hoc norm selection recovers the learned router's gain over random routing"
ADVICE_NORM_CAUSAL = "removing the largest-norm chosen expert costs more than removing the top-scored one"
ADVICE_PLACEMENT = "held-out loss rises as the one dense layer moves deeper (before the last layer)"
PLACEMENT_ORGANISMS = "placement organisms, 3 seeds"
VERDICT_COLUMNS = ["verdict", "value", "ci_low", "ci_high", "null", "floor", "power", "note"]
PLACEMENT_COLUMNS = ["dense_layer", "seed", "nll", "ppl"]
PLACEMENT_LAYERS = int(configs.PLACEMENT_SHAPE["num_hidden_layers"])


def verdict_frame(verdicts: dict[str, dict[str, Any]], value_name: str) -> pd.DataFrame:
    """One row per organism: the verdict entry's value (named ``value_name``), interval, null,
    floor, verdict, note."""
    return pd.DataFrame(
        [
            {
                "organism": n,
                value_name: v["value"],
                "ci_low": v["ci_low"],
                "ci_high": v["ci_high"],
                "null": v.get("null"),
                "floor": v.get("floor"),
                "verdict": v["verdict"],
                "note": v["note"],
            }
            for n, v in verdicts.items()
        ]
    ).set_index("organism")


def k_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per organism: the trained k and its NLL beside the k with the lowest NLL in the sweep."""
    best = sweep.loc[sweep.groupby("organism").nll.idxmin()].set_index("organism")
    trained = sweep[sweep.trained_k].set_index("organism")
    return pd.DataFrame(
        {"trained k": trained.k, "NLL at trained k": trained.nll, "best k": best.k, "NLL at best k": best.nll}
    )


def paper_table6() -> pd.DataFrame:
    """The paper's Table 6 (one dense layer moved through a 24-layer 3.6B MoE)."""
    return pd.DataFrame(
        [
            {"paper: dense layer (1-based, 24 layers)": k, "paper: PPL": v[0], "paper: bench avg": v[1]}
            for k, v in paper.DENSE_LAYER_EXPERIMENT.items()
        ]
    )


def paper_trend_sentence() -> str:
    """How the paper's Table 6 trend is expressed in this page's units, and what it would mean here."""
    t6 = paper.DENSE_LAYER_EXPERIMENT
    slope = S.paper_placement_trend()
    depth = (PLACEMENT_LAYERS - 2) / (PLACEMENT_LAYERS - 1)
    return (
        f"the paper's Bench avg falls from {t6[1][1]:.2f} to {t6[18][1]:.2f} as the dense layer moves from position 1 "
        f"to 18 of 24, and its perplexity rises from {t6[1][0]:.2f} to {t6[18][0]:.2f} over the same positions. The "
        "organisms are "
        "measured by held-out NLL, so the trend is taken from the perplexity column: the least-squares slope of "
        f"ln PPL against relative depth over positions 1, 6, 12 and 18 is {slope:.4f} nats per unit depth, a rise "
        f"of {slope * depth:.4f} nats from the first to the fifth of our {PLACEMENT_LAYERS} layers. The floor is a "
        f"quarter of it ({I.PLACEMENT_TREND_FLOOR:g}); the power is the chance that three seeds of this design "
        "would put the whole interval above the floor if the true slope were the paper's, with the standard error "
        "these seeds show."
    )


def placement_rule() -> str:
    """The placement verdict's rule, as stated in :func:`moe_utils.zoo.study_results.placement_verdict`."""
    return " ".join((S.placement_verdict.__doc__ or "").split(":", 1)[1].split())


def advice_table(
    moe_models: Sequence[str],
    norm_v: dict[str, dict[str, Any]],
    causal_v: dict[str, dict[str, Any]],
    place_v: dict[str, Any],
) -> pd.DataFrame:
    """One row per (advice, organism): the verdict entry."""
    rows = []
    for n in moe_models:
        rows.append({"advice": ADVICE_NORM_ROUTING, "organism": f"{n}, seed 0", **norm_v[n]})
        rows.append({"advice": ADVICE_NORM_CAUSAL, "organism": f"{n}, seed 0", **causal_v[n]})
    rows.append({"advice": ADVICE_PLACEMENT, "organism": PLACEMENT_ORGANISMS, **place_v})
    return pd.DataFrame(rows).reindex(columns=["advice", "organism", *VERDICT_COLUMNS])


def interventions_summary(
    moe_models: Sequence[str],
    norm_v: dict[str, dict[str, Any]],
    causal_v: dict[str, dict[str, Any]],
    place_v: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """``interventions.json``'s summary: the two norm verdicts per organism and the placement verdict."""
    out: dict[str, dict[str, Any]] = {}
    for n in moe_models:
        out[f"norm_routing_{n}"] = {**norm_v[n], "paper": {}}
        out[f"norm_causal_{n}"] = {**causal_v[n], "paper": {}}
    out["dense_placement"] = {**place_v, "paper": {}}
    return out


@dataclass(frozen=True)
class InterventionsReport:
    """The interventions page: per-organism tables, verdicts, and what ``interventions.json`` holds."""

    moe_models: list[str]
    n_windows: int
    n_sweep_windows: int
    routing: pd.DataFrame
    ablation: pd.DataFrame
    sweep: pd.DataFrame
    per_window: pd.DataFrame
    own_forward: pd.DataFrame
    norm_verdicts: dict[str, dict[str, Any]]
    causal_verdicts: dict[str, dict[str, Any]]
    placement: pd.DataFrame
    placement_verdict: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    summary: dict[str, dict[str, Any]]

    @property
    def tokens(self) -> int:
        """Predicted tokens in the routing / ablation windows."""
        return int(self.routing.tokens.iloc[0])

    @property
    def own_forward_error(self) -> float:
        """Largest |patched learned-policy loss - the model's own loss| over the organisms (nats)."""
        return float(self.own_forward.abs_difference.max())

    @property
    def routing_table(self) -> pd.DataFrame:
        return self.routing.set_index(["organism", "policy"]).loc[
            :, ["nll", "ci_low", "ci_high", "delta_nll", "delta_ci_low", "delta_ci_high"]
        ]

    @property
    def norm_routing_table(self) -> pd.DataFrame:
        return verdict_frame(self.norm_verdicts, "recovered share")

    @property
    def ablation_table(self) -> pd.DataFrame:
        """Per organism and removed expert: NLL, change against the full top-k with its interval, and
        the share of (token, layer) pairs where the top-scored and the top-norm chosen expert differ
        (recorded during the top-norm ablation pass; the same for every row of an organism)."""
        return self.ablation.set_index(["organism", "removed"]).loc[
            :,
            ["nll", "delta_nll", "ci_low", "ci_high", "disagreeing_share", "disagreeing_ci_low", "disagreeing_ci_high"],
        ]

    @property
    def disagreement(self) -> pd.DataFrame:
        """Per organism: the share of (token, layer) pairs whose top-scored expert is not the
        largest-norm one among the chosen, with its interval over documents."""
        a = self.ablation.drop_duplicates("organism").set_index("organism")
        return a.loc[:, ["disagreeing_share", "disagreeing_ci_low", "disagreeing_ci_high"]]

    @property
    def documents(self) -> int:
        """Held-out documents behind the routing / ablation windows (the unit of every interval)."""
        return int(self.routing.documents.iloc[0])

    @property
    def norm_causal_table(self) -> pd.DataFrame:
        return verdict_frame(self.causal_verdicts, "top-norm minus top-score")

    @property
    def k_table(self) -> pd.DataFrame:
        return k_table(self.sweep)

    @property
    def placement_summary(self) -> pd.DataFrame:
        return S.placement_summary(self.placement)

    @property
    def placement_slopes(self) -> pd.DataFrame:
        """Per seed: the slope of held-out NLL against the dense layer's relative depth (before the last layer)."""
        return S.placement_slopes(self.placement, PLACEMENT_LAYERS).set_index("seed")

    @property
    def advice(self) -> pd.DataFrame:
        return self.tables["advice"].set_index(["advice", "organism"])


def interventions_report(
    moe_models: Sequence[str], max_windows: int | None = 120, sweep_every: int = 4, seed: int = 0
) -> InterventionsReport:
    """Every intervention of the page on the shipped organisms ``moe_models`` (zoo names), on
    ``max_windows`` held-out windows (every ``sweep_every``-th of them for the top-k sweep)."""
    windows = evaluate.load_windows(max_windows=max_windows)
    documents = evaluate.load_window_documents(max_windows=max_windows)
    sweep_windows = windows[::sweep_every]
    per_model = {
        name: I.intervention_tables(
            load_model(f"zoo:{name}"),
            windows,
            sweep_windows,
            seed=seed,
            organism=name,
            documents=documents,
            sweep_documents=documents[::sweep_every],
        )
        for name in moe_models
    }

    def gather(key: str) -> pd.DataFrame:
        return pd.concat([t[key] for t in per_model.values()], ignore_index=True)

    routing, ablation, sweep, per_window, own = (
        gather(k) for k in ("routing", "ablation", "topk_sweep", "per_window", "own_forward")
    )
    norm_v = {n: I.norm_routing_verdict(per_window.loc[per_window.organism == n]) for n in moe_models}
    causal_v = {n: I.norm_causal_verdict(per_window.loc[per_window.organism == n]) for n in moe_models}
    placement = S.placement_table(S.load_shipped())
    place_v = S.placement_verdict(placement, PLACEMENT_LAYERS)
    dense_placement = placement[PLACEMENT_COLUMNS] if not placement.empty else pd.DataFrame(columns=PLACEMENT_COLUMNS)
    tables = {
        "routing": routing,
        "ablation": ablation,
        "dense_placement": dense_placement,
        "topk_sweep": sweep[["organism", "k", "nll", "ci_low", "ci_high", "trained_k"]],
        "advice": advice_table(moe_models, norm_v, causal_v, place_v),
    }
    return InterventionsReport(
        moe_models=list(moe_models),
        n_windows=len(windows),
        n_sweep_windows=len(sweep_windows),
        routing=routing,
        ablation=ablation,
        sweep=sweep,
        per_window=per_window,
        own_forward=own,
        norm_verdicts=norm_v,
        causal_verdicts=causal_v,
        placement=placement,
        placement_verdict=place_v,
        tables=tables,
        summary=interventions_summary(moe_models, norm_v, causal_v, place_v),
    )
