"""Each observation's headline effect for one model, computed exactly as its notebook does.

The observation notebooks draw many tables; the organism study (replicates, training snapshots)
needs only the one number per observation that carries the verdict, with its interval. These
functions call the same analysis code as the notebooks, with the same defaults, so a replicate's
verdict row and the model's page agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..models.loading import LoadedModel
from ..models.trace import Trace
from . import dynamic, static
from .obs1_neurons import gate_act_differences
from .obs3_depth import output_similarity_by_layer
from .verdicts import depth_pattern, mean_difference, versus_baseline

OBSERVATIONS = {1: "gate_act_advantage", 2: "top1_norm_agreement", 3: "depth_pattern"}


@dataclass(frozen=True)
class Headline:
    """One observation's effect on one model: value, 95% interval, baseline and verdict."""

    observation: int
    quantity: str
    effect: float
    ci_low: float
    ci_high: float
    baseline: float
    verdict: str
    note: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def observation1(weights_source: Any, layers: Sequence[int] | None = None, seed: int = 0) -> Headline:
    """Mean over layers of r^2(W_act) - max(r^2(W_up), r^2(W_down)), bootstrap CI over layers."""
    gate = static.gate_correlation(weights_source, layers)
    diff = gate_act_differences(gate)
    v = mean_difference(diff.to_numpy(), seed=seed)
    r2_act = gate[gate.matrix == "W_act"].r2.mean()
    return Headline(
        1,
        OBSERVATIONS[1],
        float(v["value"]),
        float(v["ci_low"]),
        float(v["ci_high"]),
        0.0,
        str(v["verdict"]),
        f"mean r2(W_act) = {r2_act:.3f} over {len(diff)} layers",
    )


def observation2(lm: LoadedModel, long_trace: Trace, seed: int = 0) -> Headline:
    """Share of (token, layer) pairs whose top-scored expert has the largest output norm vs 1/E."""
    ns = dynamic.norms_and_scores(lm, long_trace)
    agree = dynamic.agreement_table(ns, k=1, seed=seed)
    pooled = agree[agree.scope == "all"].iloc[0]
    verdict = versus_baseline(pooled.low, pooled.high, pooled.baseline)
    return Headline(
        2,
        OBSERVATIONS[2],
        float(pooled.share),
        float(pooled.low),
        float(pooled.high),
        float(pooled.baseline),
        verdict,
        f"{int(pooled.n)} (token, layer) pairs",
    )


def observation3(lm: LoadedModel, long_trace: Trace) -> tuple[Headline, dict[str, float]]:
    """The two-part depth verdict on long-input output similarity; also returns rho and z."""
    by_layer = output_similarity_by_layer(dynamic.average_output_similarity(lm, long_trace))
    d = depth_pattern(by_layer)
    extra = {
        "trend_rho": float(d["trend_rho"]),
        "trend_p": float(d["trend_p"]),
        "last_layer_z": float(d["value"]),
        "delta_previous": float(d["delta_previous"]),
        "mean_output_similarity": float(np.mean(list(by_layer.values()))),
    }
    return (
        Headline(3, OBSERVATIONS[3], float(d["value"]), float("nan"), float("nan"), 0.0, str(d["verdict"]), d["note"]),
        extra,
    )


def topk_overlap(topk_a: Any, topk_b: Any) -> float:
    """Mean over tokens of |top-k set of a  intersect  top-k set of b| / k (router saturation)."""
    a, b = np.asarray(topk_a), np.asarray(topk_b)
    if a.shape != b.shape:
        raise ValueError(f"top-k index arrays differ in shape: {a.shape} vs {b.shape}")
    k = a.shape[1]
    hits = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)


def router_saturation(trace_s: Trace, trace_final: Trace) -> float:
    """OLMoE's router saturation: share of top-k choices at a checkpoint equal to the final model's,
    pooled over tokens and MoE layers (both traces over the same tokens)."""
    vals = [
        topk_overlap(trace_s.per_layer[l].routed_index.numpy(), trace_final.per_layer[l].routed_index.numpy())
        for l in trace_final.layers
    ]
    return float(np.mean(vals))
