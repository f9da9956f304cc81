"""Non-finite weights: which experts of a layer hold NaN or infinity, and what a reader does about
it (stop with the expert named, or leave the experts out and record them on a
:class:`~moe_utils.core.finite.ScreenedSource`)."""

from __future__ import annotations

import torch

from moe_utils.core.errors import ArgumentError, NonFiniteError
from moe_utils.core.finite import ScreenedSource, check_finite, is_finite, nonfinite_counts
from moe_utils.engine.canonical import DenseMLPWeights, MoELayerWeights
from moe_utils.models.lazy_experts import LazyExperts, LazyMatrix

Tensor = torch.Tensor

_PER_EXPERT = (
    ("router row", "router"),
    ("router bias", "router_bias"),
    ("score correction bias", "score_correction_bias"),
    ("W_act", "w_act"),
    ("W_up", "w_up"),
    ("W_down", "w_down"),
    ("b_act", "b_act"),
    ("b_up", "b_up"),
    ("b_down", "b_down"),
)


#: The expert matrices: a caller whose own first pass over them shows whether they are finite
#: can defer their check (``screen_layer(..., deferred=EXPERT_MATRICES)``).
EXPERT_MATRICES = frozenset({"w_act", "w_up", "w_down"})


def _finite(t: Tensor | LazyExperts | LazyMatrix) -> bool:
    """:func:`is_finite`, also of expert matrices kept encoded (decoded band by band, never whole)."""
    if isinstance(t, LazyExperts):
        return all(_finite(m) for m in t.matrices)
    if isinstance(t, LazyMatrix):
        return all(is_finite(band) for band in t.row_bands())
    return is_finite(t)


def _counts(t: Tensor | LazyMatrix) -> tuple[int, int]:
    """:func:`nonfinite_counts` of one expert's tensor (an encoded one band by band)."""
    if isinstance(t, LazyMatrix):
        nan = inf = 0
        for band in t.row_bands():
            n, i = nonfinite_counts(band)
            nan, inf = nan + n, inf + i
        return nan, inf
    return nonfinite_counts(t)


def nonfinite_experts(w: MoELayerWeights, skip: frozenset[str] = frozenset()) -> list[NonFiniteError]:
    """One error per (expert, tensor) of ``w`` holding NaN or infinity; the shared expert is "SE".
    Attributes named in ``skip`` are not checked."""
    found = []
    ids = w.ids
    for name, attr in _PER_EXPERT:
        t = getattr(w, attr)
        if t is None or attr in skip or _finite(t):  # one pass over the tensor in the common case
            continue
        for e in range(w.num_experts):
            if not _finite(t[e]):
                found.append(NonFiniteError(w.layer, ids[e], name, *_counts(t[e])))
    parts = (
        [("shared W_act", w.shared.w_act), ("shared W_up", w.shared.w_up), ("shared W_down", w.shared.w_down)]
        if w.shared is not None
        else []
    )
    for name, t in parts + [("shared-expert gate", w.shared_gate)]:
        if t is not None and not is_finite(t):
            found.append(NonFiniteError(w.layer, "SE", name, *nonfinite_counts(t)))
    return found


def without_experts(w: MoELayerWeights, drop: set[int]) -> MoELayerWeights:
    """A copy of ``w`` without the experts whose original index is in ``drop``."""
    keep = [i for i, e in enumerate(w.ids) if e not in drop]
    if not keep:
        raise ArgumentError(f"layer {w.layer}: cannot drop every expert ({sorted(drop)})")
    idx = torch.tensor(keep, dtype=torch.long, device=w.w_up.device)
    take = {
        attr: (None if getattr(w, attr) is None else getattr(w, attr).index_select(0, idx.to(getattr(w, attr).device)))
        for _, attr in _PER_EXPERT
    }
    out = MoELayerWeights(**{**w.__dict__, **take})
    out.expert_ids = [w.ids[i] for i in keep]
    return out


def screen_layer(
    w: MoELayerWeights, screen: ScreenedSource | None, deferred: frozenset[str] = frozenset()
) -> MoELayerWeights:
    """Raise on non-finite weights, or (with a screen) exclude and record the offending experts.

    ``deferred`` tensors are left unchecked: the caller's own pass over them must show that they
    are finite, or call ``screen_layer(w, screen)`` again in full before using any result."""
    found = nonfinite_experts(w, deferred)
    if not found:
        return w
    if screen is None:
        err = found[0]
        more = f"; {len(found) - 1} more tensor(s) of this layer are non-finite too" if len(found) > 1 else ""
        raise NonFiniteError(
            err.layer,
            err.expert,
            err.tensor,
            err.n_nan,
            err.n_inf,
            hint=f"{more}. Weight-only analyses can leave the offending experts out with the notebook "
            f"parameter allow_invalid = True (the page and its results are then marked "
            f"invalid); analyses that run the model cannot",
        )
    bad = {err.expert for err in found if isinstance(err.expert, int)}
    if len(bad) == w.num_experts:
        raise NonFiniteError(
            w.layer,
            None,
            "the weights of every expert",
            sum(e.n_nan for e in found),
            sum(e.n_inf for e in found),
            hint="; no expert of this layer is left to analyse, even with allow_invalid = True",
        )
    for err in found:
        screen.record(err)
    if any(err.expert == "SE" for err in found):
        w = MoELayerWeights(**{**w.__dict__, "shared": None, "shared_gate": None})
    return without_experts(w, bad) if bad else w


def check_dense(d: DenseMLPWeights) -> DenseMLPWeights:
    """Raise :class:`NonFiniteError` if a dense MLP's weights are not finite."""
    for name, t in (("W_act", d.w_act), ("W_up", d.w_up), ("W_down", d.w_down)):
        check_finite(t, d.layer, None, f"dense MLP {name}")
    return d
