"""Observation 3 (expert diversity grows with depth, except in the last layer): every table and
summary entry of its page.

:func:`depth_report` traces the short prompt, the long input and the routing prompt once each and
returns an :class:`Obs3Report`: the tables written to the results file, their summary entries
and the tables the page shows. The per-layer series of the depth trend are named by the
``SERIES_*`` constants (the summary page selects them by these names).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import metrics as M
from ..analysis import paper
from ..core.errors import MoEUtilsError
from ..core.frames import int_key
from ..engine.inputs import Inputs
from ..models.loading import LoadedModel
from ..models.stream import SweptLayer
from ..models.trace import Trace, dense_outputs
from ..models.weights import dense_mlp_weights
from . import dynamic, static
from .effects import obs3_effects
from .labels import distinct_expert_pairs
from .verdicts import NAN, descriptive, versus_baseline

ANALYSIS = "obs3_depth_diversity"  # the page, and the name of its results file
SERIES_OUTPUTS_LONG = "outputs, long input (angular)"
SERIES_OUTPUTS_SHORT = "outputs, short prompt (cosine)"
SERIES_WEIGHTS_MATRIX = "weights, matrix level (cosine)"
SERIES_WEIGHTS_NEURON = "weights, neuron-averaged (cosine)"
SHARE_HIGH = f"share above {paper.LAST_LAYER_HIGH_SIMILARITY:g}"
REPEAT_SERIES = ("repeat rate", "uniform baseline", "frequency baseline")
_CLUSTER_STRIDE = 10_000  # sequence-index offset per layer when pooling layers into clusters


# ---- summary entries ---------------------------------------------------------------------------
def long_top1_table(tr: Trace) -> pd.DataFrame:
    """Each token's top-1 expert (largest routing weight) per layer: ``layer, seq, position, expert``."""
    frames = []
    for layer in tr.layers:
        lt = tr.per_layer[layer]
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "seq": tr.seq_index.numpy(),
                    "position": tr.position.numpy(),
                    "expert": M.top1_experts(lt.routed_index, lt.routed_weight),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def output_similarity_by_layer(avg_sim: pd.DataFrame) -> dict[int, float]:
    """Mean angular similarity between distinct experts per layer (F and SE left out)."""
    s = distinct_expert_pairs(avg_sim)
    return {int(k): float(v) for k, v in s.groupby("layer").similarity.mean().items()}


def pooled_repeat_rate(top1: pd.DataFrame, num_experts: int, seed: int = 0) -> tuple[M.RepeatRate, float]:
    """Top-1 repeat rate pooled over layers (adjacent pairs within each (layer, sequence); a
    sequence's pairs in every layer resampled together) and the frequency baseline, averaged over layers (expert identities differ between layers)."""
    t = top1.sort_values(["layer", "seq", "position"])
    layers = sorted(t.layer.unique())
    clusters = t.layer.map({l: i for i, l in enumerate(layers)}).to_numpy() * 10_000_000 + t.seq.to_numpy()
    pooled = M.repeat_rate(
        t.expert.to_numpy()[:, None], clusters, num_experts=num_experts, seed=seed, cluster_index=t.seq.to_numpy()
    )
    freq = [
        M.repeat_rate(g.expert.to_numpy()[:, None], g.seq.to_numpy(), num_experts=num_experts).freq_baseline_top1
        for _, g in t.groupby("layer")
    ]
    return pooled, float(np.mean(freq))


def obs3_summary(tables: Mapping[str, pd.DataFrame], num_experts: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Observation 3's summary from ``average_output_similarity``, ``long_top1`` and ``repeat_rate``.

    * ``depth_pattern_weak`` (a verdict): the slope over the non-final layers is negative and the
      last layer lies above the Theil-Sen line of the others (:func:`moe_utils.analysis.effects.obs3_effects`,
      delete-one-sequence jackknife intervals, table ``sequence_similarity``), with the residual of
      random experts on the same block inputs as the input-geometry null;
    * ``last_layer_as_early`` (a verdict): the last layer is as similar as the first third of the
      non-final layers, within the floor;
    * ``depth_slope`` / ``last_layer_residual``: the two parts of the weak form.
    * ``last_layer_output_similarity``: the last layer's mean; baseline = mean of the layers before.
    * ``routing_repeat_rate``: share of adjacent tokens (same sequence) with the same top-1 expert,
      all layers pooled, against the frequency baseline (sum of squared top-1 shares per layer,
      averaged over layers).
    """
    per_layer = output_similarity_by_layer(tables["average_output_similarity"])
    res = obs3_effects(tables["sequence_similarity"])
    values = [per_layer[l] for l in sorted(per_layer)]
    pooled, freq = pooled_repeat_rate(tables["long_top1"], num_experts, seed=seed)
    rep = tables["repeat_rate"]
    overlap, overlap_base = float(rep["top-k overlap"].mean()), float(rep["overlap baseline"].mean())
    return {
        res["weak"].quantity: res["weak"].summary_entry(),
        res["strong"].quantity: res["strong"].summary_entry(),
        res["slope"].quantity: res["slope"].summary_entry(),
        res["residual"].quantity: res["residual"].summary_entry(),
        "last_layer_output_similarity": descriptive(
            values[-1],
            note="baseline = mean over the preceding layers",
            baseline=float(np.mean(values[:-1])) if len(values) > 1 else NAN,
        ),
        "routing_repeat_rate": {
            "value": pooled.top1_rate,
            "ci_low": pooled.top1_low,
            "ci_high": pooled.top1_high,
            "baseline": freq,
            "verdict": versus_baseline(pooled.top1_low, pooled.top1_high, freq),
            "paper": {},
            "note": f"uniform baseline {pooled.baseline_top1:.3f}; top-k overlap {overlap:.3f} vs {overlap_base:.3f}",
        },
    }


# ---- the page's derived tables -----------------------------------------------------------------
def short_similarity_by_layer(tok_sim: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean per-token cosine between distinct experts and the share above the paper's
    0.8 mark (short prompt)."""
    experts_only = distinct_expert_pairs(tok_sim)
    by_layer = experts_only.groupby("layer", as_index=False).agg(similarity=("similarity", "mean"))
    share_high = experts_only.groupby("layer")["similarity"].apply(
        lambda s: float((s > paper.LAST_LAYER_HIGH_SIMILARITY).mean())
    )
    by_layer[SHARE_HIGH] = by_layer.layer.map(share_high)
    return by_layer


def expert_block(square: pd.DataFrame) -> np.ndarray:
    """The routed-expert block (numeric labels, in expert order) of a square similarity map."""
    labels = sorted((c for c in square.columns if str(c).isdigit()), key=int)
    return square.loc[labels, labels].to_numpy()


def output_summary(avg_sim: pd.DataFrame) -> pd.DataFrame:
    """Per-layer summary (:func:`moe_utils.metrics.per_layer_summary`) of the mean output similarity."""
    maps = {
        int_key(layer): g.pivot(index="expert_i", columns="expert_j", values="similarity")
        for layer, g in avg_sim.groupby("layer")
    }
    return M.per_layer_summary({l: expert_block(m) for l, m in maps.items()})


def depth_trend(out_summary: pd.DataFrame, short_by_layer: pd.DataFrame, weight_summary: pd.DataFrame) -> pd.DataFrame:
    """The four per-layer series ``layer, series, mean_offdiag`` (outputs long / short, weights
    matrix / neuron level)."""
    cols = ["layer", "series", "mean_offdiag"]

    def weights(level: str, series: str) -> pd.DataFrame:
        w = weight_summary.loc[weight_summary.level == level]
        return w.groupby("layer", as_index=False).agg(mean_offdiag=("S_ee", "mean")).assign(series=series)

    return pd.concat(
        [
            out_summary.assign(series=SERIES_OUTPUTS_LONG).loc[:, cols],
            short_by_layer.rename(columns={"similarity": "mean_offdiag"})
            .assign(series=SERIES_OUTPUTS_SHORT)
            .loc[:, cols],
            weights("matrix", SERIES_WEIGHTS_MATRIX),
            weights("neuron", SERIES_WEIGHTS_NEURON),
        ],
        ignore_index=True,
    )


def depth_tests(trend: pd.DataFrame) -> pd.DataFrame:
    """Per series (descriptive): Spearman rho over the layers before the last with its exact
    permutation p-value, the depth contrasts of the profile, and the change at the last layer."""
    rows = []
    for series, g in trend.groupby("series"):
        g = g.sort_values("layer")
        v = g.mean_offdiag.to_numpy(dtype=float)
        rho, p = M.exact_spearman(np.arange(len(v) - 1), v[:-1]) if len(v) > 3 else (NAN, NAN)
        c = M.depth_contrasts(v)
        rows.append(
            {
                "series": series,
                "rho (before last)": rho,
                "exact p": p,
                "slope (non-final)": c["slope"],
                "last-layer residual": c["last_residual"],
                "change at last layer": c["last_minus_penultimate"],
            }
        )
    return pd.DataFrame(rows).set_index("series")


def _routing(tr: Trace, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(topk_index, topk_weight, number of experts)`` of one traced layer."""
    lt = tr.per_layer[layer]
    if lt.router_logits is None or lt.topk_index is None or lt.topk_weight is None:
        raise MoEUtilsError(
            f"layer {layer} trace has no router logits or routing weights (dense trace): "
            "the repeat rate needs a trace of the MoE model (moe_utils.models.trace.trace)"
        )
    return lt.topk_index, lt.topk_weight, int(lt.router_logits.shape[1])


def repeat_rate_table(tr: Trace, seed: int = 0) -> pd.DataFrame:
    """Per layer: top-1 repeat rate of adjacent tokens with its interval and baselines, top-k overlap."""
    rows = []
    for layer in tr.layers:
        index, weight, n_experts = _routing(tr, layer)
        r = M.repeat_rate(index, tr.seq_index, num_experts=n_experts, topk_weight=weight, seed=seed)
        rows.append(
            {
                "layer": layer,
                "repeat rate": r.top1_rate,
                "low": r.top1_low,
                "high": r.top1_high,
                "uniform baseline": r.baseline_top1,
                "frequency baseline": r.freq_baseline_top1,
                "top-k overlap": r.overlap_rate,
                "overlap baseline": r.baseline_overlap,
            }
        )
    return pd.DataFrame(rows)


def pooled_trace_repeat_rate(tr: Trace, seed: int = 0) -> M.RepeatRate:
    """Repeat rate with all layers pooled: adjacent pairs within each (layer, sequence), and a
    sequence's pairs in every layer resampled together (one cluster per sequence)."""
    routing = [_routing(tr, layer) for layer in tr.layers]
    return M.repeat_rate(
        np.concatenate([index.numpy() for index, _, _ in routing]),
        np.concatenate([tr.seq_index.numpy() + _CLUSTER_STRIDE * i for i in range(len(routing))]),
        num_experts=routing[0][2],
        topk_weight=np.concatenate([weight.numpy() for _, weight, _ in routing]),
        seed=seed,
        cluster_index=np.concatenate([tr.seq_index.numpy() for _ in routing]),
    )


def repeat_lines(repeats: pd.DataFrame) -> pd.DataFrame:
    """The repeat rate and its two baselines per layer, long (``series``, ``share``)."""
    return repeats.melt(id_vars=["layer"], value_vars=list(REPEAT_SERIES), var_name="series", value_name="share")


# ---- a layer computed expert by expert: the output tables from its one pass over the experts ------
def _swept_outputs(
    layer: SweptLayer, tr: Trace, name: str, dense: LoadedModel | None, dense_tr: Trace | None
) -> tuple[torch.Tensor, list[str]]:
    """The swept outputs of every expert on input set ``name`` (+F, +SE) and their labels, as
    :func:`~moe_utils.analysis.dynamic.token_output_similarity` and
    :func:`~moe_utils.analysis.dynamic.output_similarity` evaluate them."""
    y = layer.outputs[name]
    labels = [str(e) for e in range(y.shape[1])]
    extra = []
    if dense is not None and dense_tr is not None and layer.layer in dense_tr.per_layer:
        dw = dense_mlp_weights(dense, layer.layer, dtype=None)
        extra.append(dense_outputs(dw, dense_tr.per_layer[layer.layer].x).float())
        labels.append("F")
    if layer.weights.shared is not None:
        extra.append(dense_outputs(layer.weights.shared, tr.per_layer[layer.layer].x).float())
        labels.append("SE")
    if extra:
        y = torch.cat([y] + [t[:, None, :] for t in extra], dim=1)
    return y, labels


def swept_token_output_similarity(
    layer: SweptLayer, tr: Trace, name: str, dense: LoadedModel | None = None, dense_tr: Trace | None = None
) -> pd.DataFrame:
    """:func:`~moe_utils.analysis.dynamic.token_output_similarity` of a layer computed expert by
    expert, from the outputs its sweep computed on input set ``name`` (traced as ``tr``)."""
    labels_tok = dynamic.token_labels(tr)
    y, labels = _swept_outputs(layer, tr, name, dense, dense_tr)
    chosen = tr.per_layer[layer.layer].routed_index.cpu().numpy()
    k = len(labels)
    sims = M.token_similarity(y, angular=False)
    return pd.concat(
        [
            pd.DataFrame(
                {
                    "layer": layer.layer,
                    "token_index": t,
                    "token": labels_tok[t],
                    "chosen_text": ",".join(str(int(c)) for c in chosen[t]),
                    "expert_i": np.repeat(labels, k),
                    "expert_j": np.tile(labels, k),
                    "similarity": sims[t].ravel(),
                }
            )
            for t in range(y.shape[0])
        ],
        ignore_index=True,
    )


def swept_output_similarity(
    layer: SweptLayer,
    tr: Trace,
    name: str,
    dense: LoadedModel | None = None,
    dense_tr: Trace | None = None,
    seed: int = 0,
    std: float = 0.02,
    chunk: int = 256,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`~moe_utils.analysis.dynamic.output_similarity` of a layer computed expert by expert,
    from the outputs its sweep computed on input set ``name`` (traced as ``tr``); the random-expert
    null is drawn and evaluated as there (it reads no weights)."""
    i = layer.layer
    y, labels = _swept_outputs(layer, tr, name, dense, dense_tr)
    maps, trained = dynamic.pooled_map_and_trained(i, y, labels, layer.weights.num_experts, chunk)
    del y
    x, seqs = tr.per_layer[i].x, tr.seq_index.cpu().numpy()
    return maps, pd.DataFrame(dynamic.trained_and_random_sums(i, layer.weights, x, seqs, trained, seed, std, chunk))


@dataclass(frozen=True)
class Obs3Report:
    """Observation 3 for one model: saved ``tables``, ``summary`` and ``params``, and the page's views."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, dict[str, Any]]
    params: dict[str, Any]
    short_trace: Trace
    token_similarity: pd.DataFrame  # Fig. 2, short prompt
    short_by_layer: pd.DataFrame
    long: Inputs
    average_similarity: pd.DataFrame  # Fig. 3, long input
    trend: pd.DataFrame  # the SERIES_* per-layer series
    depth_tests: pd.DataFrame
    main: dict[str, Any]  # the weak-form verdict entry (depth_pattern_weak)
    strong: dict[str, Any]  # the strong-form verdict entry (last_layer_as_early)
    routes: pd.DataFrame  # App. I routing prompt
    repeats: pd.DataFrame
    pooled_repeat: M.RepeatRate
    frequency_baseline: float

    @property
    def short_table(self) -> pd.DataFrame:
        """:attr:`short_by_layer` with one column per layer."""
        return self.short_by_layer.set_index("layer").T

    @property
    def repeat_verdict(self) -> str:
        p = self.pooled_repeat
        return versus_baseline(p.top1_low, p.top1_high, self.frequency_baseline)

    @property
    def repeat_lines(self) -> pd.DataFrame:
        return repeat_lines(self.repeats)

    def token_map(self, layer: int, token: int) -> pd.DataFrame:
        """The square similarity map of one token and layer (short prompt)."""
        t = self.token_similarity
        frame = t[(t.layer == layer) & (t.token_index == token)]
        return frame.pivot(index="expert_i", columns="expert_j", values="similarity")


def depth_report(study: Any, inputs: str = "long", max_tokens: int | None = None, seed: int = 0) -> Obs3Report:
    """Observation 3 on an opened study (:func:`moe_utils.analysis.context.open_study`); a study
    opened with the layer stream is read one decoder layer at a time, each layer once."""
    dense = study.dense
    short = study.inputs("short")
    long_inputs = study.inputs(inputs, max_tokens=max_tokens)
    dense_short = study.dense_trace(short)
    dense_long = study.dense_trace(long_inputs)
    std = dynamic.init_std(study.lm.config)
    tok_parts: list[pd.DataFrame] = []
    avg_parts: list[pd.DataFrame] = []
    seq_parts: list[pd.DataFrame] = []
    weight_parts: list[pd.DataFrame] = []

    def work(source: Any, trs: dict[str, Trace]) -> None:
        if isinstance(source, SweptLayer):  # its experts read once, by the stream
            tok_parts.append(swept_token_output_similarity(source, trs["short"], "short", dense, dense_short))
            avg, seq = swept_output_similarity(source, trs["long"], "long", dense, dense_long, seed=seed, std=std)
        else:
            tok_parts.append(dynamic.token_output_similarity(source, trs["short"], dense, dense_short))
            avg, seq = dynamic.output_similarity(source, trs["long"], dense, dense_long, seed=seed, std=std)
        avg_parts.append(avg)
        seq_parts.append(seq)
        weights = study.weights_source if source is study.lm else source  # screened when allow_invalid
        weight_parts.append(static.weight_similarity(weights, trs["long"].layers, study.dense_weights_source))

    traces = dynamic.each_traced_layer(
        study, {"short": short, "long": long_inputs, "routing": study.inputs("routing")}, work
    )
    short_trace, long_trace, routing_trace = traces["short"], traces["long"], traces["routing"]
    tok_sim = pd.concat(tok_parts, ignore_index=True)
    short_by_layer = short_similarity_by_layer(tok_sim)
    avg_sim = pd.concat(avg_parts, ignore_index=True)
    wsum = static.offdiagonal_summary(pd.concat(weight_parts, ignore_index=True))
    out_summary = output_summary(avg_sim)
    trend = depth_trend(out_summary, short_by_layer, wsum)
    tests = depth_tests(trend)
    seq_sim = pd.concat(seq_parts, ignore_index=True)

    routes = dynamic.routing_frame(routing_trace)
    repeats = repeat_rate_table(long_trace, seed=seed)
    pooled = pooled_trace_repeat_rate(long_trace, seed=seed)
    # Expert identities differ between layers, so the frequency baseline is taken layer by layer and
    # averaged (every layer contributes the same adjacent pairs).
    freq_baseline = float(repeats["frequency baseline"].mean())
    tables = {
        "token_output_similarity": tok_sim,
        "average_output_similarity": avg_sim,
        "depth_trend": trend,
        "depth_tests": tests.reset_index(),
        "routing": routes,
        "repeat_rate": repeats,
        "long_top1": long_top1_table(long_trace),
        "sequence_similarity": seq_sim,
    }
    summary = obs3_summary(tables, num_experts=study.num_experts, seed=seed)
    return Obs3Report(
        tables=tables,
        summary=summary,
        params={"long_tokens": long_inputs.n_tokens},
        short_trace=short_trace,
        token_similarity=tok_sim,
        short_by_layer=short_by_layer,
        long=long_inputs,
        average_similarity=avg_sim,
        trend=trend,
        depth_tests=tests,
        main=summary["depth_pattern_weak"],
        strong=summary["last_layer_as_early"],
        routes=routes,
        repeats=repeats,
        pooled_repeat=pooled,
        frequency_baseline=freq_baseline,
    )
