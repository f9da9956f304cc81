"""Plain-word readings of one model's numbers: the box that opens each observation page.

Each function takes the summary entries an observation page writes (its results file's
``summary``) and returns a short markdown admonition saying what the page finds on that model,
in words chosen from the numbers (not the same text for every model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeGuard

from .claims import CLAIMS

Entry = Mapping[str, Any]


def _ok(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _box(name: str, sentences: list[str]) -> str:
    body = " ".join(s for s in sentences if s)
    return f":::{{admonition}} What this page finds on {name}\n:class: tip\n\n{body}\n:::\n"


def _size(effect: Any, floor: float, paper: float) -> str:
    """How an effect compares with the floor and the paper's effect, in words."""
    if not _ok(effect):
        return "cannot be measured here"
    if effect <= 0:
        return "absent (not above its null)"
    if effect < floor:
        return "above its null but smaller than the smallest effect that counts"
    if _ok(paper) and effect >= paper:
        return "at least as large as on the paper's Mixtral 8x7B"
    return f"{effect / paper:.0%} of the paper's Mixtral effect" if _ok(paper) else "above the floor"


def obs1_box(summary: Mapping[str, Entry], name: str) -> str:
    """Observation 1: do the router's rows and the W_act rows carry the same similarity structure?"""
    v = summary.get("router_act_alignment")
    if v is None:
        return _box(name, ["This model's experts have no gate projection W_act, so the claim is not tested here."])
    claim = CLAIMS["obs1"]
    eff, obs, null = v.get("value"), v.get("observed"), v.get("null")
    sent = [
        f"Router similarity tracks W_act similarity {'more' if _ok(eff) and eff > 0 else 'no more'} than W_up or "
        f"W_down similarity once chance is taken out: the statistic is {obs:+.3f} where shuffled router labels give "
        f"{null:+.3f}."
        if _ok(obs) and _ok(null)
        else "",
        f"The effect is {_size(eff, claim.floor, claim.paper_effect)}, and the verdict is **{v['verdict']}**.",
    ]
    if v["verdict"] in ("inconclusive", "undefined") and _ok(v.get("power")):
        sent.append(
            f"With this many layers an effect as large as Mixtral's would be detected with probability "
            f"{v['power']:.0%}, so an inconclusive result here says more about the claim than about the design."
            if v["power"] > 0.8
            else f"With this many layers even a Mixtral-sized effect would be detected only {v['power']:.0%} of the time."
        )
    m = summary.get("matrix_similarity_experts")
    if m and _ok(m.get("value")):
        sim = m["value"]
        sent.append(
            f"Its experts' weights are {'close copies of one another' if sim > 0.6 else 'moderately alike' if sim > 0.15 else 'nearly unrelated'} "
            f"(mean matrix-level cosine {sim:.2f}; the paper reports about 0.3 for Mixtral and about 0 for DeepSeekMoE and Grok-1)."
        )
    return _box(name, sent)


def obs2_box(summary: Mapping[str, Entry], name: str) -> str:
    """Observation 2: does the router prefer the expert with the largest output?"""
    v = summary.get("norm_preference")
    if v is None:
        return _box(name, ["No agreement between gate scores and output norms was measured on this model."])
    claim = CLAIMS["obs2"]
    obs, null, eff = v.get("observed"), v.get("null"), v.get("value")
    ratio = obs / null if _ok(obs) and _ok(null) and null > 0 else float("nan")
    sent = [
        f"The top-scored expert is also the one with the largest output in {obs:.0%} of (token, layer) pairs, "
        f"where independent choices with this model's own routing frequencies would coincide in {null:.0%}"
        + (f" ({ratio:.1f} times that)" if _ok(ratio) else "")
        + "; the paper's Mixtral panel shows about 69% against 1/8."
        if _ok(obs) and _ok(null)
        else "",
        f"The preference is {_size(eff, claim.floor, claim.paper_effect)}: **{v['verdict']}**.",
    ]
    top1 = summary.get("top1_norm_agreement")
    if top1 and _ok(top1.get("baseline")) and _ok(null) and null < top1["baseline"]:
        sent.append(
            "Because this model spreads its tokens unevenly over its experts, the fair comparison is the independence "
            "null, not 1/E."
        )
    act = summary.get("activation_ratio")
    if act and _ok(act.get("value")):
        a = act["value"]
        sent.append(
            f"Almost every expert neuron is active on every token (activation ratio {a:.1%}), as with SiLU in Mixtral."
            if a > 0.95
            else f"Only {a:.0%} of the expert neurons' activations are non-negligible, as with Grok-1's GELU (25%)."
        )
    return _box(name, sent)


def obs3_box(summary: Mapping[str, Entry], name: str) -> str:
    """Observation 3: does diversity grow with depth, with the last layer as the exception?"""
    weak, strong = summary.get("depth_pattern_weak"), summary.get("last_layer_as_early")
    slope, resid = summary.get("depth_slope"), summary.get("last_layer_residual")
    if weak is None:
        return _box(name, ["The depth pattern was not measured on this model."])
    sent = []
    if slope and _ok(slope.get("value")):
        s = slope["value"]
        sent.append(
            f"Expert outputs become {'less' if s < 0 else 'more'} alike with depth (slope {s:+.3f} of angular "
            "similarity across the depth)"
            + (
                f", and the last layer sits {resid['value']:+.3f} {'above' if resid['value'] > 0 else 'below'} the "
                "line of the other layers."
                if resid and _ok(resid.get("value"))
                else "."
            )
        )
    sent.append(f"The weak form (falls with depth, except the last layer) **{weak['verdict']}**.")
    if strong:
        sent.append(
            f"The strong form (the last layer as alike as the first ones) **{strong['verdict']}**"
            + (
                f": the last layer is {strong['value']:+.3f} from the early layers."
                if _ok(strong.get("value"))
                else "."
            )
        )
    if weak.get("note") and "input geometry: yes" in weak["note"]:
        sent.append("Random experts on the same inputs show no such rise, so the rise belongs to the trained experts.")
    elif weak.get("note") and "input geometry: no" in weak["note"]:
        sent.append(
            "Random experts on the same inputs rise as much, so the rise may come from the inputs, not the experts."
        )
    return _box(name, sent)
