"""Each claim's headline effect for one model, computed exactly as its notebook does.

The observation notebooks draw many tables; the organism study (replicates, training snapshots)
needs only the one number per observation that carries the verdict, with its interval. These
functions call the same analysis code as the notebooks, with the same defaults, so a replicate's
verdict row and the model's page agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import metrics as M
from ..core.errors import ShapeError
from ..models.loading import LoadedModel
from ..models.trace import Trace
from . import dynamic, effects, static
from .claims import CLAIMS
from .effects import Effect

NAN = float("nan")

OBSERVATIONS = {c.observation: c.quantity for c in CLAIMS.values() if c.issued and c.kind != "noninferior"}


def observation1(weights_source: Any, layers: Sequence[int] | None = None, seed: int = 0) -> Effect:
    """Observation 1's effect: the router/W_act statistic minus its label-permutation null."""
    return effects.obs1_effect(static.gate_null_table(weights_source, layers, seed=seed))


def observation2(lm: LoadedModel, long_trace: Trace, seed: int = 0) -> Effect:
    """Observation 2's effect: top-1 score/norm agreement minus its independence null."""
    ns = dynamic.norms_and_scores(lm, long_trace)
    return effects.obs2_effect(effects.top_choices(ns), ns.num_experts, seed=seed)[0]


def observation3(lm: LoadedModel, long_trace: Trace, seed: int = 0) -> tuple[list[Effect], dict[str, float]]:
    """Observation 3's two claims (weak and strong form) and the contrasts behind them."""
    table = effects.sequence_similarity(lm, long_trace, seed=seed)
    res = effects.obs3_effects(table)
    profile = effects.obs3_profile(table)
    values = [profile[l] for l in sorted(profile)]
    rho, p = M.exact_spearman(np.arange(len(values) - 1), values[:-1]) if len(values) > 3 else (NAN, NAN)
    extra = {
        "slope": res["slope"].effect,
        "slope_ci_low": res["slope"].ci_low,
        "slope_ci_high": res["slope"].ci_high,
        "last_residual": res["residual"].effect,
        "random_expert_residual": res["weak"].null,
        "last_minus_penultimate": float(values[-1] - values[-2]) if len(values) > 1 else NAN,
        "trend_rho": rho,
        "trend_p_exact": p,
        "mean_output_similarity": float(np.nanmean(values)) if values else NAN,
    }
    return [res["weak"], res["strong"], res["slope"], res["residual"]], extra


def topk_overlap(topk_a: Any, topk_b: Any) -> float:
    """Mean over tokens of |top-k set of a  intersect  top-k set of b| / k (router saturation)."""
    a, b = np.asarray(topk_a), np.asarray(topk_b)
    if a.shape != b.shape:
        raise ShapeError(
            f"top-k index arrays differ in shape: {a.shape} vs {b.shape}; pass two traces of the same tokens"
        )
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
