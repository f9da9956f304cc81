"""Expert activation functions, resolvable by name.

An expert computes ``W_down · glu(W_act x, W_up x)``. For ordinary gated MLPs
``glu(g, u) = act(g) * u``; GPT-OSS clamps both halves and adds 1 to the up projection. Names
may carry parameters, e.g. ``"gpt_oss_swiglu(alpha=1.702,limit=7.0)"``, so a trace stays
self-describing.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_utils.core.errors import UnknownActivationError

Tensor = torch.Tensor


# Activations transformers' ACT2FN does not name (all others are ACT2FN's own).
_NOT_IN_TRANSFORMERS: dict[str, Callable[[Tensor], Tensor]] = {"identity": lambda x: x}
# ACT2FN entries with learned parameters (a module's values, not a fixed function of a name).
_LEARNED = ("prelu", "xielu")


@functools.cache
def plain_activations() -> dict[str, Callable[[Tensor], Tensor]]:
    """Every fixed activation by name: transformers' ``ACT2FN`` (the functions the models
    themselves call), plus :data:`_NOT_IN_TRANSFORMERS`. Built on first use, since it imports
    transformers."""
    from transformers.activations import ACT2FN

    table: dict[str, Callable[[Tensor], Tensor]] = {n: ACT2FN[n] for n in ACT2FN if n not in _LEARNED}
    return {**table, **_NOT_IN_TRANSFORMERS}


@dataclass(frozen=True)
class Activation:
    """A named activation: ``act`` acts on the gate pre-activation, ``glu`` combines gate and up."""

    name: str
    act: Callable[[Tensor], Tensor]
    up_transform: Callable[[Tensor], Tensor] | None = None

    def __call__(self, gate: Tensor) -> Tensor:
        return self.act(gate)

    def glu(self, gate: Tensor, up: Tensor) -> Tensor:
        """Hidden state of a gated MLP from its gate and up pre-activations."""
        if self.up_transform is not None:
            up = self.up_transform(up)
        return self.act(gate) * up


def _gpt_oss(alpha: float, limit: float) -> Activation:
    def act(gate: Tensor) -> Tensor:
        gate = gate.clamp(max=limit)
        return gate * torch.sigmoid(gate * alpha)

    def up(u: Tensor) -> Tensor:
        return u.clamp(min=-limit, max=limit) + 1

    return Activation(f"gpt_oss_swiglu(alpha={alpha},limit={limit})", act, up)


_PARAM_RE = re.compile(r"^(?P<base>[a-z0-9_]+)\((?P<args>[^)]*)\)$")


def activation(name: str) -> Activation:
    """Resolve an activation name (``"silu"``, ``"gelu"``, ``"gpt_oss_swiglu(alpha=..,limit=..)"``)."""
    key = name.strip().lower()
    table = plain_activations()
    if key in table:
        return Activation(key, table[key])
    match = _PARAM_RE.match(key)
    if match and match["base"] == "gpt_oss_swiglu":
        params = dict(part.split("=", 1) for part in match["args"].split(",") if part)
        alpha = float(params.get("alpha", 1.702))
        limit = float(params.get("limit", 7.0))
        if not (math.isfinite(alpha) and limit > 0):
            raise UnknownActivationError(
                f"bad gpt_oss_swiglu parameters in {name!r}; alpha must be finite and limit positive"
            )
        return _gpt_oss(alpha, limit)
    known = ", ".join(sorted(table)) + ", gpt_oss_swiglu(alpha=..,limit=..)"
    raise UnknownActivationError(
        f"unknown activation {name!r}; known: {known}. Add it to moe_utils/arch/activations.py"
    )
