"""Observation 1 (neurons act like fine-grained experts): every table and summary entry of its page.

:func:`neurons_report` reads the weights once (:func:`moe_utils.analysis.static.weight_report`)
and returns an :class:`Obs1Report`: the tables written to the results file, the summary entries,
and the derived tables the page shows (each next to the paper's values from
:mod:`moe_utils.analysis.paper`). Experts without a gate projection W_act (an MLP ``W_down act(W_up x)``,
as the relu^2 experts of Nemotron-H) still get every W_up / W_down analysis; the W_act parts and
the verdict, which compares W_act with the other two, are left out and :attr:`Obs1Report.note`
says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pandas as pd

from .. import metrics as M
from ..analysis import paper
from .effects import obs1_effect
from .labels import is_expert
from .static import MATRICES, offdiagonal_summary, weight_report
from .verdicts import NAN, descriptive

ANALYSIS = "obs1_neurons_as_experts"  # the page, and the name of its results file
GATE_R2_KEYS = {"W_act": "gate_r2_act", "W_up": "gate_r2_up", "W_down": "gate_r2_down"}
PAIR_EXPERTS = "expert vs expert"
PAIR_DENSE = "expert vs F"
NO_GATE_NOTE = (
    "**Note:** the experts of this model have no gate projection $W_{act}$ (each expert is "
    "$W_{down}\\,\\sigma(W_{up}x)$), so the $W_{act}$ parts of this page and the verdict, which compares "
    "$W_{act}$ with $W_{up}$ and $W_{down}$, are left out; everything else is computed."
)


def gate_r2_table(gate: pd.DataFrame) -> pd.DataFrame:
    """Per matrix: the paper's average R^2 (each layer's r^2 rounded to 2 decimals, then the mean
    over layers), the unrounded mean, and how many layers have r > 0. Layers with undefined r are
    left out of the averages."""
    rows = []
    for m in MATRICES:
        r = gate.loc[gate.matrix == m, "r"].astype(float) if len(gate) else pd.Series(dtype=float)
        if r.empty:
            continue
        defined = r.dropna()
        rows.append(
            {
                "matrix": m,
                "average r^2 (paper rounding)": M.average_r2(r, decimals=2),
                "average r^2 (unrounded)": M.average_r2(r, decimals=None),
                "layers with r > 0": f"{int((defined > 0).sum())} of {len(r)}",
            }
        )
    return pd.DataFrame(rows).set_index("matrix")


def gate_act_differences(gate: pd.DataFrame) -> pd.Series:
    """Per layer: r^2(W_act) - max(r^2(W_up), r^2(W_down)), unrounded (NaN layers dropped)."""
    wide = gate.pivot(index="layer", columns="matrix", values="r").astype(float) ** 2
    others = [c for c in ("W_up", "W_down") if c in wide]
    return (wide["W_act"] - wide[others].max(axis=1, skipna=False)).dropna()


def paper_gate_advantage(model: str) -> float:
    """The paper's Table 3 W_act average minus the larger of its W_up and W_down averages."""
    d = paper.GATE_R2[model]
    return round(d["W_act"] - max(d["W_up"], d["W_down"]), 2)


def obs1_summary(tables: Mapping[str, pd.DataFrame], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Observation 1's summary from the tables ``gate_correlation``, ``weight_similarity`` and
    ``reordering`` of its results file.

    * ``router_act_alignment`` (the verdict): per layer, signed r^2 of W_act minus the larger signed
      r^2 of W_up and W_down, minus its label-permutation null (table ``gate_null``), averaged over
      layers with a Student-t interval (:func:`moe_utils.analysis.effects.obs1_effect`). Left out
      when the experts have no W_act.
    * ``gate_act_advantage``: the unsigned r^2 difference without a null, reported beside the
      paper's Table 3 difference (descriptive).
    * ``gate_r2_act`` / ``gate_r2_up`` / ``gate_r2_down``: the paper's Table 3 quantity.
    * ``matrix_similarity_experts`` / ``matrix_similarity_vs_F``: mean over layers and matrices of
      the mean matrix-level cosine between distinct experts (S_ee) and between experts and F (S_ef);
      undefined (NaN) similarities are left out.
    * ``kendall_tau``: mean Kendall tau over expert-expert reordering pairs.
    """
    gate, sim, reorder = tables["gate_correlation"], tables["weight_similarity"], tables["reordering"]
    out: dict[str, dict[str, Any]] = {}
    if len(gate) and "W_act" in set(gate.matrix):
        eff = obs1_effect(tables["gate_null"])
        out[eff.quantity] = eff.summary_entry({k: round(paper_gate_advantage(k), 2) for k in paper.GATE_R2})
        diffs = gate_act_differences(gate)
        out["gate_act_advantage"] = descriptive(
            float(diffs.mean()) if len(diffs) else NAN,
            {k: paper_gate_advantage(k) for k in paper.GATE_R2},
            "mean over layers of r2(W_act) - max(r2(W_up), r2(W_down)) (unsigned, no null: the paper's "
            "quantity; the verdict is router_act_alignment)",
        )
    r2 = gate_r2_table(gate)
    for m, key in GATE_R2_KEYS.items():
        if m in r2.index:
            out[key] = descriptive(
                r2.loc[m, "average r^2 (paper rounding)"],
                {k: d[m] for k, d in paper.GATE_R2.items()},
                "Table 3: per-layer r^2 rounded to 2 decimals, averaged over layers",
            )
    mat = sim.loc[(sim.level == "matrix") & (sim.expert_i != sim.expert_j) & is_expert(sim.expert_i)]
    ee = mat.loc[is_expert(mat.expert_j)].groupby(["layer", "matrix"]).similarity.mean()
    ef = mat.loc[mat.expert_j == "F"].groupby(["layer", "matrix"]).similarity.mean()
    out["matrix_similarity_experts"] = descriptive(
        ee.mean() if len(ee) else NAN, paper.matrix_similarity_experts(), baseline=0.0
    )
    out["matrix_similarity_vs_F"] = descriptive(
        ef.mean() if len(ef) else NAN, paper.matrix_similarity_vs_dense(), baseline=0.0
    )
    taus = reorder.loc[reorder.expert_j != "F", "tau"].astype(float) if len(reorder) else pd.Series(dtype=float)
    out["kendall_tau"] = descriptive(
        taus.mean() if len(taus) else NAN, {k: p.value for k, p in paper.KENDALL_TAU.items()}, baseline=0.0
    )
    return out


# ---- the page's derived tables -----------------------------------------------------------------
def similarity_lines(offdiag: pd.DataFrame) -> pd.DataFrame:
    """Long per-layer table of the matrix-level S_ee / S_ef, one ``series`` per (matrix, pair kind),
    e.g. "W_act S_ee"."""
    cols = [c for c in ("S_ee", "S_ef") if c in offdiag]
    lines = offdiag.melt(
        id_vars=["layer", "matrix", "level"], value_vars=cols, var_name="pair", value_name="similarity"
    ).dropna()
    lines["series"] = lines["matrix"] + " " + lines["pair"]
    return lines.loc[lines.level == "matrix"]


def overall_similarity_table(offdiag: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """Mean S_ee / S_ef over layers and matrices per level, then the paper's approximate values."""
    cols = [c for c in ("S_ee", "S_ef") if c in offdiag]
    overall = cast(pd.DataFrame, offdiag.groupby("level")[cols].mean())  # a list of columns: a frame
    paper_rows = (
        pd.DataFrame(
            [
                {"level": f"paper: {k}", "S_ee" if "vs F" not in k else "S_ef": v.value}
                for k, v in paper.MATRIX_SIMILARITY.items()
            ]
        )
        .groupby("level")
        .first()
    )
    return pd.concat([overall.rename(index=lambda s: f"{model_name}: {s} level"), paper_rows])


def tau_table(reorder: pd.DataFrame) -> pd.DataFrame:
    """Mean Kendall tau, similarity before / after and gain per pair kind and matrix, beside the
    paper's Mixtral 8x7B mean tau (Table 2)."""
    cols = ["tau", "sim_before", "sim_after", "gain"]
    pair = np.where(reorder.expert_j == "F", PAIR_DENSE, PAIR_EXPERTS)
    table = reorder.assign(pair=pair).groupby(["pair", "matrix"]).agg(**{c: (c, "mean") for c in cols})
    table["paper: mean tau"] = [paper.KENDALL_TAU["Mixtral 8x7B"].value] * len(table)
    return table


def tau_by_layer(reorder: pd.DataFrame) -> pd.DataFrame:
    """Mean Kendall tau between distinct experts (F left out) per layer and matrix."""
    return reorder[reorder.expert_j != "F"].groupby(["layer", "matrix"], as_index=False)["tau"].mean()


def gate_r2_with_paper(gate: pd.DataFrame) -> pd.DataFrame:
    """:func:`gate_r2_table` with one column per paper model (Table 3)."""
    table = gate_r2_table(gate)
    for name, values in paper.GATE_R2.items():
        table[f"paper: {name}"] = [values[m] for m in table.index]
    return table


def paper_gate_r2_text() -> str:
    """The paper's Table 3 as one line: "Mixtral 8x7B 0.33 / 0.06 / 0.07; ..." (W_act / W_up / W_down)."""
    return "; ".join(f"{k} {d['W_act']:.2f} / {d['W_up']:.2f} / {d['W_down']:.2f}" for k, d in paper.GATE_R2.items())


@dataclass(frozen=True)
class Obs1Report:
    """Observation 1 for one model: saved ``tables`` and ``summary``, and the page's views."""

    tables: dict[str, pd.DataFrame]  # written to the results file
    summary: dict[str, dict[str, Any]]  # the results file's summary entries
    similarity: pd.DataFrame  # matrix- and neuron-level cosine, all pairs
    similarity_lines: pd.DataFrame  # per-layer matrix-level S_ee / S_ef with a ``series`` label
    overall_similarity: pd.DataFrame  # means over layers and matrices, paper rows below
    reordering: pd.DataFrame
    tau_table: pd.DataFrame
    tau_by_layer: pd.DataFrame
    gate_correlation: pd.DataFrame  # per layer and matrix: Pearson r
    gate_r2: pd.DataFrame  # Table 3 quantity beside the paper's
    gate_pairs: pd.DataFrame  # one point per expert pair (scatter)
    pca_matrix: pd.DataFrame
    pca_neuron: pd.DataFrame
    matrices: list[str] = field(default_factory=list)  # the expert matrices this model has

    @property
    def matrix_similarity(self) -> pd.DataFrame:
        """Matrix-level (flattened) cosine similarity rows (paper Fig. 1)."""
        return self.similarity.loc[self.similarity.level == "matrix"]

    @property
    def neuron_similarity(self) -> pd.DataFrame:
        """Neuron-averaged cosine similarity rows (paper App. D)."""
        return self.similarity.loc[self.similarity.level == "neuron"]

    @property
    def pair_layers(self) -> list[int]:
        """The layers of :attr:`gate_pairs`, sorted."""
        return sorted(int(x) for x in self.gate_pairs.layer.unique()) if len(self.gate_pairs) else []

    def pairs_for(self, layer: int, matrix: str) -> pd.DataFrame:
        """The expert-pair points of one layer and matrix."""
        p = self.gate_pairs
        return p.loc[(p.layer == layer) & (p.matrix == matrix)]

    @property
    def has_act(self) -> bool:
        """Whether the experts have a gate projection W_act (the verdict needs it)."""
        return "W_act" in self.matrices

    @property
    def note(self) -> str:
        """Why parts of the page are missing ('' when nothing is)."""
        return "" if self.has_act else NO_GATE_NOTE

    @property
    def verdict(self) -> dict[str, Any] | None:
        """The ``router_act_alignment`` entry, the page's verdict (None without W_act)."""
        return self.summary.get("router_act_alignment")

    @property
    def gate_r2_paper_rounding(self) -> dict[str, float]:
        """The paper's average R^2 per matrix present."""
        return {m: self.summary[key]["value"] for m, key in GATE_R2_KEYS.items() if key in self.summary}

    @property
    def n_undefined(self) -> int:
        """Similarity values that are undefined (an all-zero matrix or neuron average)."""
        return int(self.similarity.similarity.isna().sum())


def report_from_tables(report: Mapping[str, pd.DataFrame], model_name: str, seed: int = 0) -> Obs1Report:
    """Build the :class:`Obs1Report` from :func:`~moe_utils.analysis.static.weight_report`'s tables."""
    sim, reorder, gate = report["similarity"], report["reordering"], report["gate_correlation"]
    saved = {
        "weight_similarity": sim,
        "reordering": reorder,
        "gate_correlation": gate,
        "gate_null": report["gate_null"],
    }
    summary = obs1_summary(saved, seed=seed)
    offdiag = offdiagonal_summary(sim)
    present = set(sim.matrix)
    return Obs1Report(
        tables={**saved, "pca_matrix": report["pca_matrix"]},
        summary=summary,
        similarity=sim,
        similarity_lines=similarity_lines(offdiag),
        overall_similarity=overall_similarity_table(offdiag, model_name),
        reordering=reorder,
        tau_table=tau_table(reorder),
        tau_by_layer=tau_by_layer(reorder),
        gate_correlation=gate,
        gate_r2=gate_r2_with_paper(gate),
        gate_pairs=report["gate_pairs"],
        pca_matrix=report["pca_matrix"],
        pca_neuron=report["pca_neuron"].assign(label=""),
        matrices=[m for m in MATRICES if m in present],
    )


def neurons_report(
    source: Any,
    layers: Sequence[int] | None = None,
    dense_baseline: Any | None = None,
    model_name: str = "model",
    reorder_max_pairs: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> Obs1Report:
    """Observation 1 on one model in one pass over its weights (see the module docstring).

    ``source`` / ``dense_baseline`` are weight sources as for ``weight_report`` (a study's
    ``weights_source`` and ``dense_weights_source``); ``model_name`` labels the page's tables.
    """
    tables = weight_report(
        source, layers, dense_baseline, reorder_max_pairs=reorder_max_pairs, seed=seed, workers=workers
    )
    return report_from_tables(tables, model_name, seed=seed)
