"""Observation 2 (the router prefers experts with larger output norms): every table and summary
entry of its page.

:func:`norms_report` traces the short prompt and the long input once each, evaluates every expert
on every token, and returns an :class:`Obs2Report` with the tables written to the results file,
their summary entries and the tables the page shows beside the paper's values
(:mod:`moe_utils.analysis.paper`). Experts without a gate projection W_act have no act(W_act x): the
activation-ratio part is then left out and :attr:`Obs2Report.note` says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from .. import metrics as M
from ..analysis import paper
from ..engine.inputs import Inputs
from ..models.loading import LoadedModel
from ..models.stream import SweptLayer
from ..models.trace import LayerCheck, Trace, dense_intermediates, router_scores, verify_trace
from ..models.weights import dense_mlp_weights, layer_weights
from . import dynamic
from .claims import OBS2_PAPER_EFFECT
from .effects import obs2_effect, top_choices
from .verdicts import NAN, descriptive

ANALYSIS = "obs2_router_norms"  # the page, and the name of its results file
BASELINE_LABEL = "random baseline 1/E"
NO_GATE_NOTE = (
    "**Note:** the experts of this model have no gate projection $W_{act}$, so there is no "
    "$\\sigma(W_{act}x)$ to measure: the activation ratio is left out of this page and its results-file entry "
    "is empty (no value)."
)


def pooled_row(agree: pd.DataFrame) -> pd.Series:
    """The pooled (every token and layer) row of an agreement table."""
    return agree[agree.scope == "all"].iloc[0]


def mean_activation_ratio(ratios: pd.DataFrame) -> float:
    """Mean activation ratio over layers and experts, F left out (NaN when there is none)."""
    if ratios.empty:
        return NAN
    experts = ratios[ratios.expert.astype(str) != "F"]
    return float(experts.ratio.mean()) if len(experts) else NAN


def obs2_summary(tables: Mapping[str, pd.DataFrame], n_experts: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Observation 2's summary from ``top_choices``, ``agreement_top1``, ``agreement_top2`` and
    ``activation_ratio``.

    ``norm_preference`` (the verdict) is the pooled top-1 agreement minus the independence null of
    the per-layer marginals, with a delete-one-sequence jackknife interval
    (:func:`moe_utils.analysis.effects.obs2_effect`); the agreement shares against 1/E stay as
    descriptive numbers, the paper's reference.

    The agreement shares are the pooled rows (every (token, layer) pair); they equal the diagonal
    of the summed ``rank_counts`` table. ``activation_ratio`` is the mean over layers and experts
    (F excluded) of the per-expert share of |act(W_act x)| above the threshold (NaN when the
    experts have no W_act).
    """
    p1, p2 = pooled_row(tables["agreement_top1"]), pooled_row(tables["agreement_top2"])
    eff, _ = obs2_effect(tables["top_choices"], int(n_experts), seed=seed)
    return {
        eff.quantity: eff.summary_entry({"Mixtral 8x7B": round(OBS2_PAPER_EFFECT, 3)}),
        "top1_norm_agreement": {
            "value": float(p1.share),
            "ci_low": float(p1.low),
            "ci_high": float(p1.high),
            "baseline": float(p1.baseline),
            "verdict": None,
            "paper": {"Mixtral 8x7B": paper.TOP1_NORM_AGREEMENT.value},
            "note": f"{int(p1.n)} (token, layer) pairs, {p1.method} interval; baseline 1/E, the paper's reference "
            "(the verdict is norm_preference, against the independence null)",
        },
        "top2_norm_agreement": {
            "value": float(p2.share),
            "ci_low": float(p2.low),
            "ci_high": float(p2.high),
            "baseline": float(p2.baseline),
            "verdict": None,
            "paper": {},
            "note": "against 1/E-type baseline, descriptive",
        },
        "activation_ratio": descriptive(
            mean_activation_ratio(tables["activation_ratio"]), {k: v.value for k, v in paper.ACTIVATION_RATIO.items()}
        ),
    }


def rank_diagonal_table(counts: pd.DataFrame) -> pd.DataFrame:
    """Per norm rank: the share of pairs with the same score rank and the most frequent score rank."""
    diag = counts[counts.norm_rank == counts.score_rank].set_index("norm_rank")["share_of_norm_rank"]
    argmax = counts.loc[counts.groupby("norm_rank")["count"].idxmax()].set_index("norm_rank")["score_rank"]
    return pd.DataFrame({"share with equal score rank": diag.round(3), "most frequent score rank": argmax}).T


def agreement_summary_table(agree: pd.DataFrame, agree2: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """Pooled top-1 / top-2 agreement of this model beside the paper's Fig. 10 value for Mixtral."""
    p1, p2 = pooled_row(agree), pooled_row(agree2)
    ref = paper.TOP1_NORM_AGREEMENT
    return pd.DataFrame(
        [
            {
                "quantity": "top-scored expert has the largest norm",
                "model": model_name,
                "share": p1.share,
                "95% CI": f"{p1.low:.3f} - {p1.high:.3f}",
                "random baseline": p1.baseline,
            },
            {
                "quantity": "top-scored expert among the 2 largest norms",
                "model": model_name,
                "share": p2.share,
                "95% CI": f"{p2.low:.3f} - {p2.high:.3f}",
                "random baseline": p2.baseline,
            },
            {
                "quantity": "largest-norm expert gets the top score",
                "model": f"{ref.model} (paper, read off {ref.source})",
                "share": ref.value,
                "95% CI": "not reported",
                "random baseline": 1 / paper.NUM_EXPERTS[ref.model],
            },
        ]
    ).set_index("quantity")


def paper_activation_ratio_text() -> str:
    """The paper's App. H activation ratios as one line."""
    return ", ".join(v.label() for v in paper.ACTIVATION_RATIO.values())


def expert_norm_description(ns: dynamic.NormsScores, layer: int, expert: int) -> pd.DataFrame:
    """Distribution of one expert's output norm and gate score, chosen vs not chosen."""
    frame = pd.DataFrame(
        {
            "output norm": ns.norms[layer][:, expert],
            "gate score": ns.scores[layer][:, expert],
            "chosen": (ns.chosen[layer] == expert).any(axis=1),
        }
    )
    return frame.groupby("chosen").describe().T


@dataclass(frozen=True)
class Obs2Report:
    """Observation 2 for one model: saved ``tables``, ``summary`` and ``params``, and the page's views."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, dict[str, Any]]
    params: dict[str, Any]
    short: Inputs
    short_trace: Trace
    checks: list[LayerCheck]  # reconstruction of each MoE block on the short prompt
    token_bars: pd.DataFrame  # Fig. 4: per token, layer and expert
    short_norms: dynamic.NormsScores
    long: Inputs
    norms: dynamic.NormsScores  # long input
    rank_counts: pd.DataFrame  # per layer
    summed_rank_counts: pd.DataFrame  # Fig. 10
    rank_diagonal: pd.DataFrame
    agreement: pd.DataFrame  # top-1, per layer and pooled
    agreement_top2: pd.DataFrame
    agreement_summary: pd.DataFrame  # pooled shares beside the paper's value
    activation_ratios: pd.DataFrame  # empty without W_act
    activation: str  # the experts' activation function
    intermediate: pd.DataFrame | None  # act(W_act x) in the last layer (None without W_act)

    @property
    def has_act(self) -> bool:
        return not self.activation_ratios.empty

    @property
    def note(self) -> str:
        """Why parts of the page are missing ('' when nothing is)."""
        return "" if self.has_act else NO_GATE_NOTE

    @property
    def max_rel_error(self) -> float:
        return max(c.max_rel_error for c in self.checks)

    @property
    def layers_indices_equal(self) -> int:
        return sum(c.indices_equal for c in self.checks)

    @property
    def pooled(self) -> pd.Series:
        return pooled_row(self.agreement)

    @property
    def times_baseline(self) -> float:
        """The pooled top-1 share in units of its random baseline."""
        p = self.pooled
        return float(p.share / p.baseline)

    @property
    def verdict(self) -> str:
        """The verdict of ``norm_preference`` (agreement beyond the independence null)."""
        return str(self.summary["norm_preference"]["verdict"])

    @property
    def effect(self) -> dict[str, Any]:
        """The ``norm_preference`` summary entry: observed, null, effect, interval, floor."""
        return self.summary["norm_preference"]

    @property
    def agreement_by_layer(self) -> pd.DataFrame:
        return self.agreement[self.agreement.scope == "layer"].astype({"layer": int})

    @property
    def baseline_frame(self) -> pd.DataFrame:
        """The 1/E reference line of the per-layer chart."""
        return pd.DataFrame([{"share": 1 / self.norms.num_experts, "label": BASELINE_LABEL}])

    @property
    def mean_activation_ratio(self) -> float:
        return mean_activation_ratio(self.activation_ratios)

    @property
    def last_layer(self) -> int:
        return self.short_trace.layers[-1]

    def token_table(self, layer: int, token: int) -> pd.DataFrame:
        """Norm, score and choice of every expert for one token of the short prompt."""
        b = self.token_bars
        return b[(b.layer == layer) & (b.token_index == token)].set_index("expert")[["norm", "score", "chosen"]]

    def expert_description(self, layer: int, expert: int) -> pd.DataFrame:
        return expert_norm_description(self.norms, layer, expert)


# ---- a layer computed expert by expert: the tables from its one pass over the experts ----------
def swept_norms(layer: SweptLayer, tr: Trace, name: str) -> dynamic.NormsScores:
    """:func:`~moe_utils.analysis.dynamic.norms_and_scores` of a streamed layer computed expert by
    expert, from the outputs its sweep computed on input set ``name`` (traced as ``tr``)."""
    lt = tr.per_layer[layer.layer]
    return dynamic.NormsScores(
        {layer.layer: layer.outputs[name].norm(dim=-1).numpy()},
        {layer.layer: router_scores(lt).float().cpu().numpy()},
        {layer.layer: lt.routed_index.cpu().numpy()},
        tr.seq_index.cpu().numpy(),
    )


def _dense_act(dense: LoadedModel | None, dense_tr: Trace | None, layer: int) -> torch.Tensor | None:
    """act(W_act x) of the dense baseline's FFN at ``layer`` on its own inputs ``[N, I]`` (None without one)."""
    if dense is None or dense_tr is None or layer not in dense_tr.per_layer:
        return None
    return dense_intermediates(dense_mlp_weights(dense, layer, dtype=None), dense_tr.per_layer[layer].x)


def swept_activation_ratios(
    layer: SweptLayer, name: str, dense: LoadedModel | None = None, dense_tr: Trace | None = None
) -> pd.DataFrame:
    """:func:`~moe_utils.analysis.dynamic.activation_ratios` of a layer computed expert by expert,
    from the activations its sweep computed on input set ``name``."""
    acts = layer.activations.get(name)
    if acts is None:
        return pd.DataFrame([])
    rows = [
        {"layer": layer.layer, "expert": str(e), "ratio": float(M.activation_ratio(acts[:, e]).overall)}
        for e in range(acts.shape[1])
    ]
    f = _dense_act(dense, dense_tr, layer.layer)
    if f is not None:
        rows.append({"layer": layer.layer, "expert": "F", "ratio": float(M.activation_ratio(f).overall)})
    return pd.DataFrame(rows)


def swept_intermediate_frame(
    layer: SweptLayer,
    tr: Trace,
    name: str,
    dense: LoadedModel | None = None,
    dense_tr: Trace | None = None,
    max_neurons: int = 128,
) -> pd.DataFrame:
    """:func:`~moe_utils.analysis.dynamic.intermediate_frame` of a layer computed expert by expert,
    from the activations its sweep computed on input set ``name`` (traced as ``tr``)."""
    dense_act = _dense_act(dense, dense_tr, layer.layer)
    inter = layer.activations[name]
    return dynamic.intermediates_to_frame(layer.layer, dynamic.token_labels(tr), inter, dense_act, max_neurons)


def _merged(parts: list[dynamic.NormsScores]) -> dynamic.NormsScores:
    out = parts[0]
    for part in parts[1:]:
        out = out.merged(part)
    return out


def norms_report(
    study: Any, inputs: str = "long", max_tokens: int | None = None, seed: int = 0, max_neurons: int = 64
) -> Obs2Report:
    """Observation 2 on an opened study (:func:`moe_utils.analysis.context.open_study`): the short
    prompt for the per-token views and the activations, ``inputs`` for the counts and agreement.
    A study opened with the layer stream is read one decoder layer at a time, each layer once."""
    short = study.inputs("short")
    long_inputs = study.inputs(inputs, max_tokens=max_tokens)
    dense_short = study.dense_trace(short)
    checks: list[LayerCheck] = []
    short_parts: list[dynamic.NormsScores] = []
    long_parts: list[dynamic.NormsScores] = []
    ratio_parts: list[pd.DataFrame] = []
    found: dict[str, Any] = {}  # the first layer's activation, and the last layer's intermediate frame

    def work(source: Any, trs: dict[str, Trace]) -> None:
        short_trace, long_trace = trs["short"], trs["long"]
        swept = source if isinstance(source, SweptLayer) else None  # its experts read once, by the stream
        if swept is not None:
            checks.append(swept.check(short_trace[swept.layer], "short"))
            short_parts.append(swept_norms(swept, short_trace, "short"))
            long_parts.append(swept_norms(swept, long_trace, "long"))
            ratio_parts.append(swept_activation_ratios(swept, "short", study.dense, dense_short))
        else:
            checks.extend(verify_trace(study.lm, short_trace, source=source))
            short_parts.append(dynamic.norms_and_scores(source, short_trace))
            long_parts.append(dynamic.norms_and_scores(source, long_trace))
            ratio_parts.append(dynamic.activation_ratios(source, short_trace, study.dense, dense_short))
        if "activation" not in found:
            first = layer_weights(source, short_trace.layers[0], dtype=None)
            found["activation"], found["has_act"] = first.activation, first.w_act is not None
        last = (study.layers or study.lm.moe_layers)[-1]
        if last in short_trace.layers and found["has_act"]:
            found["intermediate"] = (
                swept_intermediate_frame(swept, short_trace, "short", study.dense, dense_short, max_neurons=max_neurons)
                if swept is not None
                else dynamic.intermediate_frame(
                    source, short_trace, last, study.dense, dense_short, max_neurons=max_neurons
                )
            )

    traces = dynamic.each_traced_layer(study, {"short": short, "long": long_inputs}, work)
    short_trace = traces["short"]
    short_ns = _merged(short_parts)
    ns = _merged(long_parts)
    bars = dynamic.token_bars_frame(short_ns, short_trace)
    per_layer_counts = dynamic.rank_count_frame(ns)
    counts = dynamic.summed_rank_counts(per_layer_counts)
    agree = dynamic.agreement_table(ns, k=1, seed=seed)
    agree2 = dynamic.agreement_table(ns, k=2, seed=seed)
    ratios = pd.concat(ratio_parts, ignore_index=True)
    inter = found.get("intermediate")
    tables = {
        "rank_counts": per_layer_counts,
        "agreement_top1": agree,
        "agreement_top2": agree2,
        "activation_ratio": ratios,
        "mean_norms": dynamic.mean_norm_by_layer(ns),
        "top_choices": top_choices(ns),
    }
    return Obs2Report(
        tables=tables,
        summary=obs2_summary(tables, ns.num_experts, seed=seed),
        params={"long_tokens": long_inputs.n_tokens, "short_tokens": short.n_tokens},
        short=short,
        short_trace=short_trace,
        checks=list(checks),
        token_bars=bars,
        short_norms=short_ns,
        long=long_inputs,
        norms=ns,
        rank_counts=per_layer_counts,
        summed_rank_counts=counts,
        rank_diagonal=rank_diagonal_table(counts),
        agreement=agree,
        agreement_top2=agree2,
        agreement_summary=agreement_summary_table(agree, agree2, study.name),
        activation_ratios=ratios,
        activation=found["activation"],
        intermediate=inter,
    )
