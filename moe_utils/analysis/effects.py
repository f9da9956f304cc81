"""Each claim's effect against its computed null, with an interval, a floor and an outcome.

The rules are those of the pre-registration page (``book/preregistration.md``) and of
:mod:`moe_utils.metrics.nulls`; the floors and the paper's effect sizes live in
:mod:`moe_utils.analysis.claims`. Every function returns :class:`Effect` rows, which the
observation pages, the study's replicates and the summary all show the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
from scipy import stats

from .. import metrics as M
from ..metrics.nulls import NAN, UNDEFINED, Interval
from ..models.loading import LoadedModel
from ..models.trace import Trace
from . import dynamic
from .claims import CLAIMS, Claim


@dataclass(frozen=True)
class Effect:
    """One claim on one model: observed statistic, null, effect = observed - null, interval."""

    claim: str
    observation: int
    quantity: str
    observed: float
    null: float
    effect: float
    se: float
    df: float
    ci_low: float
    ci_high: float
    interval: str
    floor: float
    p_value: float
    verdict: str
    power: float
    note: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)

    def summary_entry(self, paper_values: Mapping[str, float] | None = None) -> dict[str, Any]:
        """The entry of a results file's summary (value = the effect, baseline = 0 after the null)."""
        return {
            "value": self.effect,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "baseline": 0.0,
            "verdict": self.verdict,
            "paper": dict(paper_values or {}),
            "note": self.note,
            "observed": self.observed,
            "null": self.null,
            "floor": self.floor,
            "se": self.se,
            "df": self.df,
            "p_value": self.p_value,
            "power": self.power,
            "interval": self.interval,
        }


def judge(claim: Claim, observed: float, null: float, iv: Interval, p: float, note: str) -> Effect:
    """An :class:`Effect` for ``claim`` from its effect interval (already observed - null)."""
    sign = claim.direction
    low, high = (iv.low, iv.high) if sign > 0 else (-iv.high, -iv.low)
    if claim.kind == "noninferior":
        verdict = M.noninferior_outcome(low, high, claim.floor)
    else:
        verdict = M.outcome(low, high, claim.floor)
    if verdict == UNDEFINED and not note:
        note = "no finite interval: too few layers, sequences or defined values"
    power = M.power_to_hold(claim.paper_effect, claim.floor, iv.se, iv.df) if claim.kind != "noninferior" else NAN
    return Effect(
        claim.key,
        claim.observation,
        claim.quantity,
        float(observed),
        float(null),
        float(iv.estimate),
        float(iv.se),
        float(iv.df),
        float(iv.low),
        float(iv.high),
        iv.method,
        float(claim.floor),
        float(p),
        verdict,
        float(power),
        note,
    )


def _t_p(iv: Interval, direction: int) -> float:
    if not (math.isfinite(iv.se) and iv.se > 0 and math.isfinite(iv.df)):
        return NAN
    return float(stats.t.sf(direction * iv.estimate / iv.se, iv.df))


# ---- observation 1 ------------------------------------------------------------------------------


def obs1_effect(gate_null: pd.DataFrame) -> Effect:
    """Mean over layers of (statistic - its permutation null mean), Student-t over layers.

    ``gate_null`` has one row per layer with ``observed`` and ``null_mean`` (from
    :func:`moe_utils.analysis.static.gate_null_table`)."""
    claim = CLAIMS["obs1"]
    g = gate_null.dropna(subset=["observed", "null_mean"]) if len(gate_null) else gate_null
    if len(g) == 0:
        iv = M.undefined_interval("t over layers")
        return judge(claim, NAN, NAN, iv, NAN, "the experts have no W_act or too few experts")
    per_layer = (g.observed - g.null_mean).to_numpy(dtype=float)
    iv = M.t_mean_interval(per_layer)
    iv = Interval(iv.estimate, iv.se, iv.low, iv.high, iv.df, "t over layers")
    n_sig = int((g.p_greater < 0.05).sum())
    note = (
        f"{len(g)} layers; statistic {g.observed.mean():+.3f} against a label-permutation null of "
        f"{g.null_mean.mean():+.3f}; {n_sig} of {len(g)} layers beyond their own null (p < 0.05)"
    )
    return judge(claim, float(g.observed.mean()), float(g.null_mean.mean()), iv, _t_p(iv, 1), note)


# ---- observation 2 ------------------------------------------------------------------------------


def top_choices(ns: Any) -> pd.DataFrame:
    """Per token and layer: the top-scored and the largest-norm expert, and the token's sequence
    (a :class:`~moe_utils.analysis.dynamic.NormsScores` in, a tidy table out)."""
    frames = []
    for layer in ns.layers:
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "token": np.arange(ns.scores[layer].shape[0]),
                    "seq": ns.groups,
                    "top_score": ns.scores[layer].argmax(axis=1),
                    "top_norm": ns.norms[layer].argmax(axis=1),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def obs2_effect(choices: pd.DataFrame, n_experts: int, seed: int = 0) -> tuple[Effect, M.PermutationNull]:
    """Agreement of the top-score and largest-norm experts minus the independence null, with a
    delete-one-sequence jackknife interval; the token-shuffle null is returned beside it."""
    claim = CLAIMS["obs2"]
    by_layer = {int(cast(int, l)): g.sort_values("token") for l, g in choices.groupby("layer")}
    ts = {l: g.top_score.to_numpy() for l, g in by_layer.items()}
    tn = {l: g.top_norm.to_numpy() for l, g in by_layer.items()}
    groups = next(iter(by_layer.values())).seq.to_numpy() if by_layer else np.zeros(0)
    obs, null, iv = M.agreement_effect(ts, tn, n_experts, groups)
    shuffle = M.shuffle_agreement_null(ts, tn, seed=seed)
    note = (
        f"agreement {obs:.3f}; independence null {null:.3f}; token-shuffle null {shuffle.null_mean:.3f} "
        f"(95% of draws below {shuffle.null_q975:.3f}); 1/E = {1 / n_experts:.3f} (the paper's reference); "
        f"{len(np.unique(groups))} sequences"
    )
    return judge(claim, obs, null, iv, _t_p(iv, 1), note), shuffle


# ---- observation 3 ------------------------------------------------------------------------------


def sequence_similarity(lm: LoadedModel, tr: Trace, seed: int = 0) -> pd.DataFrame:
    """Per sequence and MoE layer: the sums of the per-token mean angular similarity of distinct
    experts' outputs, trained and random (the ``sequences`` table of
    :func:`moe_utils.analysis.dynamic.output_similarity`, which computes it beside the pooled map
    in one evaluation of the experts)."""
    return dynamic.output_similarity(lm, tr, seed=seed, std=dynamic.init_std(lm.config))[1]


def _sums(table: pd.DataFrame, kind: str) -> tuple[np.ndarray, np.ndarray]:
    t = table[table.experts == kind]
    s = t.pivot(index="seq", columns="layer", values="sum").sort_index(axis=1)
    c = t.pivot(index="seq", columns="layer", values="count").sort_index(axis=1)
    return s.to_numpy(dtype=float), c.to_numpy(dtype=float)


def obs3_effects(table: pd.DataFrame) -> dict[str, Any]:
    """The weak form (slope and last-layer residual), the strong form (last layer vs the early
    ones), the last-minus-penultimate difference, and the input-geometry null of the residual.

    Returns ``{"weak": Effect, "strong": Effect, "contrasts": DataFrame}``."""
    s, c = _sums(table, "trained")
    rs, rc = _sums(table, "random")
    iv = M.depth_contrast_intervals(s, c)
    riv = M.depth_contrast_intervals(rs, rc)
    rows = []
    for k, v in iv.items():
        rows.append({"contrast": k, "experts": "trained", **v.as_dict()})
        rows.append({"contrast": k, "experts": "random", **riv[k].as_dict()})
    contrasts = pd.DataFrame(rows)
    slope = judge(CLAIMS["obs3_slope"], iv["slope"].estimate, 0.0, iv["slope"], _t_p(iv["slope"], -1), "")
    resid = judge(
        CLAIMS["obs3_residual"],
        iv["last_residual"].estimate,
        0.0,
        iv["last_residual"],
        _t_p(iv["last_residual"], 1),
        "",
    )
    weak_verdict = M.combine_outcomes(slope.verdict, resid.verdict)
    attributed = (
        "yes"
        if math.isfinite(iv["last_residual"].low)
        and math.isfinite(riv["last_residual"].estimate)
        and iv["last_residual"].low > riv["last_residual"].estimate
        else "no"
    )
    n_layers = s.shape[1]
    weak_note = (
        f"{n_layers} MoE layers; slope {slope.effect:+.4f} [{slope.ci_low:+.4f}, {slope.ci_high:+.4f}] ({slope.verdict}); "
        f"last-layer residual {resid.effect:+.4f} [{resid.ci_low:+.4f}, {resid.ci_high:+.4f}] ({resid.verdict}); "
        f"random experts on the same inputs give a residual of {riv['last_residual'].estimate:+.4f}; "
        f"rise beyond the input geometry: {attributed}; last minus penultimate "
        f"{iv['last_minus_penultimate'].estimate:+.4f}"
    )
    wc = CLAIMS["obs3_weak"]
    weak = Effect(
        wc.key,
        3,
        wc.quantity,
        resid.observed,
        riv["last_residual"].estimate,
        resid.effect,
        resid.se,
        resid.df,
        resid.ci_low,
        resid.ci_high,
        resid.interval,
        wc.floor,
        max(slope.p_value, resid.p_value) if math.isfinite(slope.p_value + resid.p_value) else NAN,
        weak_verdict,
        NAN,
        weak_note,
    )
    le = iv["last_minus_early"]
    strong = judge(
        CLAIMS["obs3_strong"],
        le.estimate,
        0.0,
        le,
        NAN,
        f"last layer minus the mean of the first third of the non-final layers: {le.estimate:+.4f}",
    )
    return {"weak": weak, "strong": strong, "slope": slope, "residual": resid, "contrasts": contrasts}


def obs3_profile(table: pd.DataFrame, experts: str = "trained") -> dict[int, float]:
    """Per-layer token-weighted mean similarity from a :func:`sequence_similarity` table."""
    t = table[table.experts == experts].groupby("layer")[["sum", "count"]].sum()
    return {int(l): float(r["sum"] / r["count"]) if r["count"] > 0 else NAN for l, r in t.iterrows()}
