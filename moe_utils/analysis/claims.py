"""The registry of the book's observations and of the claims each one tests.

One entry per observation page (its notebook, its results file, the claims it issues) and one
per claim (the quantity, its effect floor, the paper's effect size and the direction the paper
predicts). The runner, the summary, the study and the tests read this registry, so adding an
observation is its notebook, its analysis module, an entry here and its tests. The floors are
fixed in advance on the pre-registration page (``book/preregistration.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import paper

NAN = float("nan")


@dataclass(frozen=True)
class Claim:
    """One claim of the paper as the book tests it."""

    key: str
    observation: int
    quantity: str  # the name of the effect in results files
    title: str  # the claim in words, for readers
    floor: float  # the smallest effect that counts (a margin for a "noninferior" claim)
    paper_effect: float  # the paper's effect size in the same units (NaN: the paper gives none)
    direction: int = 1  # +1: the paper predicts a positive effect; -1: a negative one
    kind: str = "effect"  # "effect", "noninferior" (as large as a reference) or "composite"
    issued: bool = True  # a verdict of the book (counted in the family of comparisons)


_MIXTRAL = paper.GATE_R2["Mixtral 8x7B"]
# Mixtral 8x7B's Table 3 contrast: r2(W_act) minus the larger of W_up and W_down.
OBS1_PAPER_EFFECT = _MIXTRAL["W_act"] - max(_MIXTRAL["W_up"], _MIXTRAL["W_down"])
# Mixtral 8x7B's top-1 agreement read off Fig. 10 minus chance for its 8 experts.
OBS2_PAPER_EFFECT = float(paper.TOP1_NORM_AGREEMENT.value or float("nan")) - 1 / 8

CLAIMS: dict[str, Claim] = {
    c.key: c
    for c in (
        Claim(
            "obs1",
            1,
            "router_act_alignment",
            "router rows line up with W_act more than with W_up or W_down (neurons act like experts)",
            floor=round(OBS1_PAPER_EFFECT / 4, 3),
            paper_effect=OBS1_PAPER_EFFECT,
        ),
        Claim(
            "obs2",
            2,
            "norm_preference",
            "the top-scored expert is the largest-norm expert more often than independence predicts",
            floor=round(OBS2_PAPER_EFFECT / 4, 2),
            paper_effect=OBS2_PAPER_EFFECT,
        ),
        Claim(
            "obs3_slope",
            3,
            "depth_slope",
            "expert outputs become less alike with depth (non-final layers)",
            floor=0.01,
            paper_effect=NAN,
            direction=-1,
            issued=False,
        ),
        Claim(
            "obs3_residual",
            3,
            "last_layer_residual",
            "the last layer is more alike than the depth trend predicts",
            floor=0.005,
            paper_effect=NAN,
            issued=False,
        ),
        Claim(
            "obs3_weak",
            3,
            "depth_pattern_weak",
            "diversity grows with depth except in the last layer (slope and last-layer residual)",
            floor=0.005,
            paper_effect=NAN,
            kind="composite",
        ),
        Claim(
            "obs3_strong",
            3,
            "last_layer_as_early",
            "the last layer's experts are as alike as the early layers' ones",
            floor=0.005,
            paper_effect=NAN,
            kind="noninferior",
        ),
    )
}


@dataclass(frozen=True)
class Observation:
    """One observation page: the notebook (and results file) name and the claims it issues."""

    number: int
    notebook: str
    title: str
    claims: tuple[str, ...]


OBSERVATIONS: tuple[Observation, ...] = (
    Observation(1, "obs1_neurons_as_experts", "Neurons act like fine-grained experts", ("obs1",)),
    Observation(2, "obs2_router_norms", "The router prefers experts with larger output norms", ("obs2",)),
    Observation(
        3,
        "obs3_depth_diversity",
        "Expert diversity grows with depth, except in the last layer",
        ("obs3_weak", "obs3_strong"),
    ),
)


def issued_claims() -> list[Claim]:
    """The claims the book issues a verdict on, in page order."""
    return [CLAIMS[k] for o in OBSERVATIONS for k in o.claims]


def observation(notebook: str) -> Observation | None:
    """The registry entry of an observation notebook, None for other notebooks."""
    return next((o for o in OBSERVATIONS if o.notebook == notebook), None)
