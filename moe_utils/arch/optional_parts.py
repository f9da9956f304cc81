"""Config values that switch an optional part of an MoE family on or off.

Real checkpoints of one family differ in parts its tiny test config fixes: shared experts or
none, dense first layers or none, renormalised top-k weights or raw ones, a load-balancing
expert bias or none. For each part a config class has, :func:`config_variants` gives one config
override that flips it relative to a base config, so the coverage check can show that the spec
derived from each variant's own config still rebuilds its blocks and reads its checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


def _count_toggle(value: Any) -> Any:
    """A count that enables a part when positive: 0 becomes 1, anything positive becomes 0."""
    return 1 if not value else 0


def _flag_toggle(value: Any) -> Any:
    return not bool(value)


def _first_dense_toggle(value: Any) -> Any:
    """``mlp_only_layers``: a list of dense layer indices; none becomes ``[0]``, some become none."""
    return [0] if not value else []


def _sparse_step_toggle(value: Any) -> Any:
    """``decoder_sparse_step``: every layer sparse (1) becomes every second one, and back."""
    return 2 if value in (None, 1) else 1


def _layer_types_toggle(value: Any) -> Any:
    """``mlp_layer_types``: a dense layer 0 becomes sparse, or an all-sparse stack gets one."""
    kinds = list(value)
    if any(k == "dense" for k in kinds):
        return ["sparse" for _ in kinds]
    return ["dense", *kinds[1:]]


@dataclass(frozen=True)
class OptionalPart:
    """One optional part: its name on the coverage page and the config keys that switch it."""

    part: str
    keys: tuple[str, ...]  # tried in order; the first key the config has is the one flipped
    flip: Callable[[Any], Any]


# A part appears at most once per variant list; keys within a part are alternative spellings
# used by different families (the first present wins, so the more specific key comes first).
PARTS: tuple[OptionalPart, ...] = (
    OptionalPart("shared experts", ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), _count_toggle),
    OptionalPart("dense layers", ("mlp_layer_types",), _layer_types_toggle),
    OptionalPart("dense layers", ("first_k_dense_replace", "num_dense_layers"), _count_toggle),
    OptionalPart("dense layers", ("mlp_only_layers",), _first_dense_toggle),
    OptionalPart("dense layers", ("decoder_sparse_step",), _sparse_step_toggle),
    OptionalPart("top-k renormalisation", ("norm_topk_prob", "moe_renormalize"), _flag_toggle),
    OptionalPart("expert bias", ("use_expert_bias",), _flag_toggle),
)


def config_variants(config: Mapping[str, Any]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``(part, overrides)`` for every optional part ``config`` (a config's ``to_dict()``) has.

    Each override flips one part relative to ``config``; a part spelled by several keys (dense
    layers) is flipped once, by the most specific key present with a usable value.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for part in PARTS:
        if part.part in seen:
            continue
        for key in part.keys:
            if key in config and config[key] is not None:
                out.append((part.part, {key: part.flip(config[key])}))
                seen.add(part.part)
                break
    return tuple(out)
