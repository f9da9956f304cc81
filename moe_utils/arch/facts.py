"""A model's facts, resolved once from its family spec and config.

A :class:`~moe_utils.arch.spec.FamilySpec` says *where* each number lives in a config (key
aliases, defaults, layer rules, routing keys). :func:`facts_for` reads them all once and returns a
frozen :class:`ModelFacts`: the number of experts and experts per token, sizes, which layers are
MoE and which dense, the activation and the concrete routing parameters (:class:`RouteParams`).
A loaded model carries its facts (``LoadedModel.facts``), so analyses read numbers instead of
re-reading config dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from moe_utils.arch.config import config_dict, get_path, is_missing
from moe_utils.arch.spec import FamilySpec
from moe_utils.core.errors import LayerIndexError, NotMoEModelError, UsageError

RoutingMethod = Literal[
    "softmax_topk", "topk_softmax", "sigmoid_topk", "topk_sigmoid_input", "sparsemixer", "sqrtsoftplus_topk"
]


@dataclass(frozen=True)
class RouteParams:
    """Concrete routing parameters of one model (see RoutingSpec for the methods).

    ``method`` names the score function and the order of scoring and top-k; ``renormalize``
    (``norm_topk_prob``) divides the top-k weights by their ``norm_p``-norm; ``scale`` is the
    routed scaling factor; ``group``/``n_group``/``topk_group`` describe group-limited routing.
    """

    method: RoutingMethod
    num_experts: int
    top_k: int
    renormalize: bool = False
    norm_p: float = 1.0
    scale: float = 1.0
    group: Literal["max", "top2_sum"] | None = None
    n_group: int = 1
    topk_group: int = 1
    jitter_eps: float = 0.0
    renorm_eps: float = 0.0
    routed_output_scale: float = 1.0
    shared_output_scale: float = 1.0
    bias_on_logits: bool = False

    @property
    def scales_input(self) -> bool:
        """True when the routing weight multiplies the expert input, not its output (Llama4)."""
        return self.method == "topk_sigmoid_input"


@dataclass(frozen=True)
class ModelFacts:
    """What the analyses need to know about one model, read once from its spec and config.

    Dense models have ``num_experts == top_k == 0``, no MoE layers and ``routing`` None. Sizes a
    config does not state are None (``dense_intermediate_size`` too when no layer is dense). ``router_bias``/``correction_bias`` say whether the family's
    MoE blocks have a router bias and a score-correction bias (the "expert bias" of
    DeepSeek-V3-style routers, which shifts the choice only).
    """

    family: str
    derived: bool
    is_moe: bool
    num_layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    activation: str
    expert_intermediate_size: int | None
    shared_expert_intermediate_size: int | None
    dense_intermediate_size: int | None
    max_positions: int | None
    routing: RouteParams | None
    router_bias: bool
    correction_bias: bool


def _optional_int(spec: FamilySpec, cfg: dict, keys: tuple[str, ...]) -> int | None:
    value = spec.value(cfg, keys, "", required=False)
    if value is None or isinstance(value, (list, tuple, dict)):
        return None
    return int(value)


def _shared_size(spec: FamilySpec, cfg: dict, expert_size: int | None) -> int | None:
    """Width of the shared expert(s): a key of its own, else ``count x expert width``."""
    moe = spec.memory.moe
    if moe is None or moe.shared is None:
        return None
    own = _optional_int(spec, cfg, spec.keys.shared_intermediate)
    if own is not None:
        return own
    count = _optional_int(spec, cfg, spec.keys.num_shared)
    return None if expert_size is None else expert_size * (1 if count is None else count)


def route_params(spec: FamilySpec, config: Any) -> RouteParams:
    """Resolve a family's RoutingSpec against a config (dict or PretrainedConfig)."""
    cfg = config_dict(config)
    rs = spec.routing
    if rs is None:
        raise NotMoEModelError(
            f"{spec.name} is a dense family; it has no routing function. Route an MoE model's config instead"
        )

    def value(key: str | None, fallback: Any) -> Any:
        if key is None:
            return fallback
        got = get_path(cfg, key)
        if is_missing(got):
            return spec.defaults.get(key, fallback)
        return got

    renormalize = bool(value(rs.renormalize_key, rs.renormalize))
    norm_p = 1.0
    if rs.norm_p_key:
        raw_p = value(rs.norm_p_key, 1.0)
        # DBRX: an explicit null disables the normalisation entirely.
        explicit_null = _explicit_null(cfg, rs.norm_p_key)
        renormalize = renormalize and not explicit_null
        norm_p = float(raw_p)
    group = rs.group
    if group and rs.group_when is not None:
        key, wanted = rs.group_when
        if value(key, None) != wanted:
            group = None
    n_group = int(value(rs.n_group_key, 1)) if group else 1
    topk_group = int(value(rs.topk_group_key, n_group)) if group else 1
    return RouteParams(
        method=rs.method,
        num_experts=spec.num_experts(cfg),
        top_k=spec.top_k(cfg),
        renormalize=renormalize,
        norm_p=norm_p,
        scale=float(value(rs.scale_key, rs.scale)),
        group=group,
        n_group=n_group,
        topk_group=topk_group,
        jitter_eps=float(value(rs.jitter_key, 0.0)),
        renorm_eps=rs.renorm_eps,
        routed_output_scale=rs.routed_output_scale,
        shared_output_scale=rs.shared_output_scale,
        bias_on_logits=rs.bias_on_logits,
    )


def _explicit_null(cfg: dict, dotted: str) -> bool:
    node: Any = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict) and parts[-1] in node and node[parts[-1]] is None


def facts_for(spec: FamilySpec, config: Any) -> ModelFacts:
    """The facts of a model of family ``spec`` with ``config`` (dict, PretrainedConfig or folder).

    Raises :class:`~moe_utils.core.errors.CheckpointError` naming the missing key when the config
    lacks a number the family needs (layers, hidden size; experts and top-k for MoE families).
    """
    cfg = config_dict(config)
    moe_layers = tuple(spec.moe_layers(cfg))
    moe = spec.memory.moe
    expert_size = _optional_int(spec, cfg, spec.keys.expert_intermediate) if spec.is_moe else None
    return ModelFacts(
        family=spec.name,
        derived=spec.derived,
        is_moe=spec.is_moe,
        num_layers=spec.num_layers(cfg),
        hidden_size=spec.hidden_size(cfg),
        num_experts=spec.num_experts(cfg) if spec.is_moe else 0,
        top_k=spec.top_k(cfg) if spec.is_moe else 0,
        moe_layers=moe_layers,
        dense_layers=tuple(i for i in range(spec.num_layers(cfg)) if i not in moe_layers),
        activation=spec.activation_name(cfg),
        expert_intermediate_size=expert_size,
        shared_expert_intermediate_size=_shared_size(spec, cfg, expert_size) if spec.is_moe else None,
        dense_intermediate_size=(
            _optional_int(spec, cfg, spec.keys.dense_intermediate) if len(moe_layers) < spec.num_layers(cfg) else None
        ),
        max_positions=spec.max_positions(cfg),
        routing=route_params(spec, cfg) if spec.is_moe and spec.routing is not None else None,
        router_bias=bool(moe is not None and moe.router_bias),
        correction_bias=bool(moe is not None and moe.correction_bias),
    )


def _ranges(idx: Sequence[int]) -> str:
    """Compact ``0-3, 5, 7-9`` rendering of sorted indices."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b != a else f"{a}" for a, b in runs)


@overload
def check_layers(layers: Any, facts: None = None, kind: Literal["moe", "dense"] = "moe") -> list[int] | None: ...
@overload
def check_layers(layers: Any, facts: ModelFacts, kind: Literal["moe", "dense"] = "moe") -> list[int]: ...
def check_layers(
    layers: Any, facts: ModelFacts | None = None, kind: Literal["moe", "dense"] = "moe"
) -> list[int] | None:
    """The one check of requested layer numbers: ``layers`` must be a list (or tuple) of ints or
    None (:class:`UsageError`; a string or a float is refused, not split). With ``facts`` each must
    be a ``kind`` layer of the model (:class:`LayerIndexError` naming the valid ones), and None means
    every ``kind`` layer; without them (before a model is loaded) None stays None."""
    if layers is not None:
        ok = isinstance(layers, (list, tuple)) and all(isinstance(l, int) and not isinstance(l, bool) for l in layers)
        if not ok:
            raise UsageError(f"layers must be a list of ints or None; got {layers!r} ({type(layers).__name__})")
        layers = [int(l) for l in layers]
    if facts is None:
        return layers
    valid = list(facts.moe_layers if kind == "moe" else facts.dense_layers)
    if layers is None:
        return valid
    bad = [l for l in layers if l not in valid]
    if bad:
        total = facts.num_layers
        other = list(facts.dense_layers if kind == "moe" else facts.moe_layers)
        missing = [l for l in bad if not 0 <= l < total]
        several = len(missing or bad) > 1
        what = (
            f"layer{'s' if several else ''} {_ranges(missing)} {'do' if several else 'does'} not exist: "
            f"this {facts.family} model has {total} layers"
            if missing
            else f"layer{'s' if several else ''} {_ranges(bad)} {'are not' if several else 'is not a'} "
            f"{'MoE' if kind == 'moe' else 'dense-MLP'} layer{'s' if several else ''} of this "
            f"{facts.family} model ({total} layers)"
        )
        raise LayerIndexError(
            f"{what}. Valid {'MoE' if kind == 'moe' else 'dense'} layers: {_ranges(valid) or 'none'}; "
            f"{'dense' if kind == 'moe' else 'MoE'} layers: {_ranges(other) or 'none'}."
        )
    return layers


__all__ = ["ModelFacts", "RouteParams", "RoutingMethod", "check_layers", "facts_for", "route_params"]
