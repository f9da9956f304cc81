"""Intervene on the routing of a loaded MoE and measure held-out loss: the paper's advice, tested.

Each MoE block's forward is replaced, for the duration of a ``with routed(...)`` block, by one
that evaluates every routed expert on the block's input (from the canonical weights, as the trace
engine does), chooses experts with a *policy* and mixes their outputs; the shared experts, if
any, are added unchanged. Policies:

* ``learned`` - the model's own router (top-k of the softmax; a different ``k`` for the top-k
  sweep), weights renormalised over the chosen experts exactly when the model renormalises;
* ``norm`` - the k experts whose outputs have the largest L2 norm (the paper's suggested
  "norm-based routing"), mixed with the router's softmax probabilities renormalised over them;
* ``random`` - k distinct experts drawn uniformly per token (seeded), mixed like ``norm``;
* ablation ``top_score`` / ``top_norm`` / ``random`` - the learned top-k minus one of them (the
  highest-scored, the one with the largest output norm, or a random one); the remaining weights
  are rescaled to the sum the full top-k had.

Only softmax-routed families (``softmax_topk``) are supported: the policies mix with softmax
probabilities. Losses are next-token NLL in nats, pooled over every predicted token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import metrics as M
from ..arch.facts import RouteParams
from ..engine.expert_math import apply_experts, expert_outputs, shared_expert_output
from ..models.loading import LoadedModel
from ..models.weights import MoELayerWeights, layer_weights
from .verdicts import versus_baseline

ROUTING_POLICIES = ("learned", "norm", "random")
ABLATIONS = ("top_score", "top_norm", "random")


@dataclass(frozen=True)
class Policy:
    """How experts are chosen: ``kind`` is learned | norm | random | ablate."""

    kind: str
    k: int | None = None  # experts per token; None: the model's top-k
    remove: str | None = None  # ablate: which of the learned top-k to drop
    seed: int = 0

    @property
    def label(self) -> str:
        if self.kind == "ablate":
            return f"ablate {self.remove}"
        return self.kind if self.k is None else f"{self.kind} k={self.k}"


def _renorm(w: Tensor) -> Tensor:
    return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def select(
    policy: Policy, probs: Tensor, norms: Tensor, top_k: int, renormalize: bool, gen: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Expert indices [N,k'] and mixing weights [N,k'] for one policy (a pure function of its inputs).

    ``probs`` [N,E] are the router's softmax probabilities, ``norms`` [N,E] the L2 norms of every
    expert's output on each token.
    """
    n, e = probs.shape
    k = top_k if policy.k is None else int(policy.k)
    if not 1 <= k <= e:
        raise ValueError(f"k must be between 1 and the number of experts {e}; got {k}")
    if policy.kind == "learned":
        weight, index = torch.topk(probs, k, dim=-1)
        return index, (_renorm(weight) if renormalize else weight)
    if policy.kind == "norm":
        index = torch.topk(norms, k, dim=-1).indices
        return index, _renorm(probs.gather(1, index))
    if policy.kind == "random":
        index = torch.topk(torch.rand(n, e, generator=gen), k, dim=-1).indices
        return index, _renorm(probs.gather(1, index))
    if policy.kind == "ablate":
        if k < 2:
            raise ValueError("ablation needs top-k >= 2 (one expert is removed)")
        weight, index = torch.topk(probs, k, dim=-1)
        if renormalize:
            weight = _renorm(weight)
        if policy.remove == "top_score":
            drop = torch.zeros(n, dtype=torch.long)  # topk is sorted: position 0 has the highest score
        elif policy.remove == "top_norm":
            drop = norms.gather(1, index).argmax(dim=-1)
        elif policy.remove == "random":
            drop = torch.randint(0, k, (n,), generator=gen)
        else:
            raise ValueError(f"unknown ablation {policy.remove!r}; choose from {ABLATIONS}")
        keep = torch.ones(n, k, dtype=torch.bool)
        keep[torch.arange(n), drop] = False
        kept_i = index[keep].reshape(n, k - 1)
        kept_w = weight[keep].reshape(n, k - 1)
        total = weight.sum(dim=-1, keepdim=True)
        return kept_i, _renorm(kept_w) * total
    raise ValueError(f"unknown policy {policy.kind!r}")


def _policy_forward(w: MoELayerWeights, top_k: int, renormalize: bool, policy: Policy, gen: torch.Generator):
    router = w.router.float()
    bias = None if w.router_bias is None else w.router_bias.float()
    needs_norms = policy.kind == "norm" or (policy.kind == "ablate" and policy.remove == "top_norm")

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        shape, dtype = hidden_states.shape, hidden_states.dtype
        x = hidden_states.reshape(-1, shape[-1]).float()
        logits = x @ router.T + (0 if bias is None else bias)
        probs = torch.softmax(logits, dim=-1)
        if needs_norms:  # every expert on every token: the choice depends on all their outputs
            y = expert_outputs(w, x)  # [N,E,H]
            index, weight = select(policy, probs, y.norm(dim=-1), top_k, renormalize, gen)
            out = (y.gather(1, index.unsqueeze(-1).expand(-1, -1, y.shape[-1])) * weight.unsqueeze(-1)).sum(dim=1)
        else:  # only the chosen (token, expert) pairs, as the model itself computes them
            index, weight = select(policy, probs, probs, top_k, renormalize, gen)  # norms unused here
            out = apply_experts(w, x, index, weight)
        shared = shared_expert_output(w, x)
        if shared is not None:
            out = out + shared
        return out.to(dtype).reshape(shape)

    return forward


def _routing(lm: LoadedModel) -> RouteParams:
    if lm.facts.routing is None:
        raise ValueError(f"{lm.name} is a dense {lm.facts.family} model; routing interventions need an MoE")
    return lm.facts.routing


@contextlib.contextmanager
def routed(lm: LoadedModel, policy: Policy) -> Iterator[None]:
    """Within the block, every MoE block of ``lm`` routes by ``policy``."""
    params = _routing(lm)
    if params.method != "softmax_topk" or params.group or params.scale != 1.0:
        raise ValueError(
            f"routing interventions support plain softmax top-k routers; {lm.name} uses "
            f"{params.method}" + (" with group-limited choice" if params.group else "")
        )
    gen = torch.Generator().manual_seed(policy.seed)
    patched = []
    try:
        for layer in lm.moe_layers:
            paths = lm.spec.modules
            block = lm.built().get_submodule(f"{paths.layers}.{layer}.{paths.block}")
            w = layer_weights(lm, layer)
            block.forward = _policy_forward(w, params.top_k, params.renormalize, policy, gen)
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward  # back to the class's own forward


@torch.no_grad()
def window_nll(
    model: torch.nn.Module, windows: Sequence[Sequence[int]], batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Per window: summed next-token NLL (nats) and number of predicted tokens (``<s>`` excluded)."""
    sums = np.zeros(len(windows))
    counts = np.zeros(len(windows), dtype=np.int64)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = max(len(windows[i]) for i in idx)
        ids = torch.zeros(len(idx), length, dtype=torch.long)
        mask = torch.zeros(len(idx), length, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(windows[i])] = torch.tensor(windows[i])
            mask[row, : len(windows[i])] = 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
        for row, i in enumerate(idx):
            sums[i] = float(nll[row].sum())
            counts[i] = int(mask[row, 1:].sum())
    return sums, counts


@dataclass(frozen=True)
class PooledLoss:
    """Pooled NLL over windows with a bootstrap interval over windows."""

    nll: float
    ci_low: float
    ci_high: float
    tokens: int


def pooled_loss(sums: np.ndarray, counts: np.ndarray, seed: int = 0, n_boot: int = 2000) -> PooledLoss:
    """Total NLL / total tokens, with a 95% percentile bootstrap interval resampling windows."""
    ci = M.bootstrap_ratio_ci(sums, counts, seed=seed, n_boot=n_boot)
    return PooledLoss(ci.estimate, ci.low, ci.high, int(np.sum(counts)))


def paired_difference(
    sums: np.ndarray, base_sums: np.ndarray, counts: np.ndarray, seed: int = 0, n_boot: int = 2000
) -> PooledLoss:
    """Pooled NLL minus the baseline's on the same windows, bootstrap over windows (paired)."""
    return pooled_loss(sums - base_sums, counts, seed=seed, n_boot=n_boot)


def evaluate_policies(
    lm: LoadedModel, windows: Sequence[Sequence[int]], policies: Sequence[Policy], seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-window NLL sums and counts under each policy (label -> (sums, counts))."""
    out = {}
    for p in policies:
        with routed(lm, p):
            out[p.label] = window_nll(lm.built(), windows)
    return out


def intervention_tables(
    lm: LoadedModel,
    windows: Sequence[Sequence[int]],
    sweep_windows: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    organism: str | None = None,
) -> dict[str, pd.DataFrame]:
    """The ``routing``, ``ablation``, ``topk_sweep`` and ``per_window`` tables for one model.

    ``sweep_windows`` (default: ``windows``) are the windows of the top-k sweep, which needs one
    pass per k. ``own_forward`` holds the model's unmodified loss on ``windows``, which the
    ``learned`` policy must reproduce (a check that the intervention machinery is faithful).
    """
    name = organism or lm.name
    own_sums, counts = window_nll(lm.built(), windows)
    params = _routing(lm)
    E, k = params.num_experts, params.top_k
    policies = [Policy(kind, seed=seed) for kind in ROUTING_POLICIES]
    if k >= 2:
        policies += [Policy("ablate", remove=r, seed=seed) for r in ABLATIONS]
    res = evaluate_policies(lm, windows, policies)
    per_window = pd.concat(
        [
            pd.DataFrame({"organism": name, "policy": label, "window": np.arange(len(c)), "nll_sum": s, "tokens": c})
            for label, (s, c) in res.items()
        ],
        ignore_index=True,
    )
    routing = []
    for label in ROUTING_POLICIES:
        s, c = res[label]
        pl = pooled_loss(s, c, seed=seed)
        d = contrast(per_window, label, "learned", seed=seed)
        routing.append(
            {
                "organism": name,
                "policy": label,
                "nll": pl.nll,
                "ci_low": pl.ci_low,
                "ci_high": pl.ci_high,
                "delta_nll": d.nll,
                "delta_ci_low": d.ci_low,
                "delta_ci_high": d.ci_high,
                "tokens": pl.tokens,
            }
        )
    abl = []
    for r in ABLATIONS if k >= 2 else ():
        d = contrast(per_window, f"ablate {r}", "learned", seed=seed)
        s, c = res[f"ablate {r}"]
        abl.append(
            {
                "organism": name,
                "removed": r,
                "nll": float(s.sum() / c.sum()),
                "delta_nll": d.nll,
                "ci_low": d.ci_low,
                "ci_high": d.ci_high,
                "tokens": d.tokens,
            }
        )
    sweep_w = windows if sweep_windows is None else sweep_windows
    sw = evaluate_policies(lm, sweep_w, [Policy("learned", k=kk, seed=seed) for kk in range(1, E + 1)])
    sweep = []
    for kk in range(1, E + 1):
        pl = pooled_loss(*sw[f"learned k={kk}"], seed=seed)
        sweep.append(
            {
                "organism": name,
                "k": kk,
                "nll": pl.nll,
                "ci_low": pl.ci_low,
                "ci_high": pl.ci_high,
                "trained_k": kk == k,
                "tokens": pl.tokens,
            }
        )
    own = float(own_sums.sum() / counts.sum())
    return {
        "routing": pd.DataFrame(routing),
        "ablation": pd.DataFrame(abl),
        "topk_sweep": pd.DataFrame(sweep),
        "per_window": per_window,
        "own_forward": pd.DataFrame(
            [
                {
                    "organism": name,
                    "nll": own,
                    "learned_policy_nll": routing[0]["nll"],
                    "abs_difference": abs(own - routing[0]["nll"]),
                }
            ]
        ),
    }


def _sums(per_window: pd.DataFrame, policy: str) -> tuple[np.ndarray, np.ndarray]:
    g = per_window.loc[per_window.policy == policy].sort_values("window")
    if g.empty:
        raise KeyError(f"no per-window losses for policy {policy!r}")
    return g.nll_sum.to_numpy(), g.tokens.to_numpy()


def contrast(per_window: pd.DataFrame, a: str, b: str, seed: int = 0) -> PooledLoss:
    """Pooled NLL of policy ``a`` minus policy ``b`` on the same windows, paired bootstrap interval."""
    sa, c = _sums(per_window, a)
    sb, _ = _sums(per_window, b)
    return pooled_loss(sa - sb, c, seed=seed)


def recovery(
    per_window: pd.DataFrame,
    candidate: str = "norm",
    learned: str = "learned",
    floor: str = "random",
    seed: int = 0,
    n_boot: int = 2000,
) -> tuple[float, float, float]:
    """Share of the learned router's gain over ``floor`` that ``candidate`` recovers:
    (NLL_floor - NLL_candidate) / (NLL_floor - NLL_learned), with a paired bootstrap interval
    over windows. 1 means as good as the learned router, 0 no better than the floor."""
    s_c, n = _sums(per_window, candidate)
    s_l, _ = _sums(per_window, learned)
    s_f, _ = _sums(per_window, floor)

    def ratio(idx: np.ndarray | slice) -> float:
        f, c, l = s_f[idx].sum(), s_c[idx].sum(), s_l[idx].sum()
        return float((f - c) / (f - l)) if f != l else float("nan")

    est = ratio(slice(None))
    rng = np.random.default_rng(seed)
    reps = np.array([ratio(rng.integers(0, len(n), len(n))) for _ in range(n_boot)])
    lo, hi = np.nanquantile(reps, [0.025, 0.975])
    return est, float(lo), float(hi)


# Verdict rules on the paper's advice, fixed before any intervention was run.
NORM_RECOVERY_THRESHOLD = 0.5


def norm_routing_verdict(per_window: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """ "Norm-based routing is reasonable": routing by output norm recovers more than half of the
    learned router's gain over random routing (whole interval above 0.5: holds; below: does not
    hold; otherwise inconclusive). The note also says whether it matches the learned router."""
    est, lo, hi = recovery(per_window, seed=seed)
    verdict = versus_baseline(lo, hi, NORM_RECOVERY_THRESHOLD)
    d = contrast(per_window, "norm", "learned", seed=seed)
    worse = "worse than" if d.ci_low > 0 else "better than" if d.ci_high < 0 else "not distinguishable from"
    return {
        "value": est,
        "ci_low": lo,
        "ci_high": hi,
        "baseline": NORM_RECOVERY_THRESHOLD,
        "verdict": verdict,
        "note": f"share of the learned router's gain over random routing recovered by norm routing; norm routing "
        f"is {worse} the learned router (delta NLL {d.nll:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}])",
    }


def norm_causal_verdict(per_window: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """ "Large norm matters beyond the score": removing the chosen expert with the largest output
    norm costs more than removing the highest-scored one (paired interval above 0: holds; below
    0: does not hold; otherwise inconclusive)."""
    d = contrast(per_window, "ablate top_norm", "ablate top_score", seed=seed)
    r = contrast(per_window, "ablate top_norm", "ablate random", seed=seed)
    return {
        "value": d.nll,
        "ci_low": d.ci_low,
        "ci_high": d.ci_high,
        "baseline": 0.0,
        "verdict": versus_baseline(d.ci_low, d.ci_high, 0.0),
        "note": f"NLL(remove top-norm) - NLL(remove top-score); against removing a random chosen expert: "
        f"{r.nll:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]",
    }
