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
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import metrics as M
from ..expert_math import dense_outputs, expert_outputs
from ..routing import route_params
from ..weights import MoELayerWeights, layer_weights

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


def select(policy: Policy, probs: Tensor, norms: Tensor, top_k: int, renormalize: bool,
           gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
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


def _shared(w: MoELayerWeights, x: Tensor) -> Tensor | None:
    if w.shared is None:
        return None
    out = dense_outputs(w.shared, x)
    if w.shared_gate is not None:
        out = torch.sigmoid(x @ w.shared_gate.float().T) * out
    return out


def _policy_forward(w: MoELayerWeights, top_k: int, renormalize: bool, policy: Policy, gen: torch.Generator):
    router = w.router.float()
    bias = None if w.router_bias is None else w.router_bias.float()

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        shape, dtype = hidden_states.shape, hidden_states.dtype
        x = hidden_states.reshape(-1, shape[-1]).float()
        logits = x @ router.T + (0 if bias is None else bias)
        probs = torch.softmax(logits, dim=-1)
        y = expert_outputs(w, x)  # [N,E,H]
        index, weight = select(policy, probs, y.norm(dim=-1), top_k, renormalize, gen)
        out = (y.gather(1, index.unsqueeze(-1).expand(-1, -1, y.shape[-1])) * weight.unsqueeze(-1)).sum(dim=1)
        shared = _shared(w, x)
        if shared is not None:
            out = out + shared
        return out.to(dtype).reshape(shape)

    return forward


@contextlib.contextmanager
def routed(lm: Any, policy: Policy) -> Iterator[None]:
    """Within the block, every MoE block of ``lm`` (a LoadedModel) routes by ``policy``."""
    params = route_params(lm.spec, lm.config_dict)
    if params.method != "softmax_topk" or params.group or params.scale != 1.0:
        raise ValueError(f"routing interventions support plain softmax top-k routers; {lm.name} uses "
                         f"{params.method}" + (" with group-limited choice" if params.group else ""))
    gen = torch.Generator().manual_seed(policy.seed)
    patched = []
    try:
        for layer in lm.moe_layers:
            paths = lm.spec.modules
            block = lm.model.get_submodule(f"{paths.layers}.{layer}.{paths.block}")
            w = layer_weights(lm, layer)
            block.forward = _policy_forward(w, params.top_k, params.renormalize, policy, gen)
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward  # back to the class's own forward


@torch.no_grad()
def window_nll(model: Any, windows: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per window: summed next-token NLL (nats) and number of predicted tokens (``<s>`` excluded)."""
    sums = np.zeros(len(windows))
    counts = np.zeros(len(windows), dtype=np.int64)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = max(len(windows[i]) for i in idx)
        ids = torch.zeros(len(idx), length, dtype=torch.long)
        mask = torch.zeros(len(idx), length, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(windows[i])] = torch.tensor(windows[i])
            mask[row, :len(windows[i])] = 1
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


def paired_difference(sums: np.ndarray, base_sums: np.ndarray, counts: np.ndarray, seed: int = 0,
                      n_boot: int = 2000) -> PooledLoss:
    """Pooled NLL minus the baseline's on the same windows, bootstrap over windows (paired)."""
    return pooled_loss(sums - base_sums, counts, seed=seed, n_boot=n_boot)


def evaluate_policies(lm: Any, windows: Sequence[Sequence[int]], policies: Sequence[Policy],
                      seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-window NLL sums and counts under each policy (label -> (sums, counts))."""
    out = {}
    for p in policies:
        with routed(lm, p):
            out[p.label] = window_nll(lm.model, windows)
    return out


def intervention_tables(lm: Any, windows: Sequence[Sequence[int]], seed: int = 0,
                        organism: str | None = None) -> dict[str, pd.DataFrame]:
    """The ``routing``, ``ablation`` and ``topk_sweep`` tables for one model.

    Also returns ``own_forward``: the model's unmodified loss on the same windows, which the
    ``learned`` policy must reproduce (a check that the intervention machinery is faithful).
    """
    name = organism or lm.name
    own_sums, counts = window_nll(lm.model, windows)
    params = route_params(lm.spec, lm.config_dict)
    E, k = params.num_experts, params.top_k
    res = evaluate_policies(lm, windows, [Policy("learned", seed=seed), Policy("norm", seed=seed),
                                          Policy("random", seed=seed)])
    base = res["learned"][0]
    routing = []
    for label in ROUTING_POLICIES:
        s, c = res[label]
        pl = pooled_loss(s, c, seed=seed)
        d = paired_difference(s, base, c, seed=seed)
        routing.append({"organism": name, "policy": label, "nll": pl.nll, "ci_low": pl.ci_low, "ci_high": pl.ci_high,
                        "delta_nll": d.nll, "delta_ci_low": d.ci_low, "delta_ci_high": d.ci_high, "tokens": pl.tokens})
    abl = []
    if k >= 2:
        ab = evaluate_policies(lm, windows, [Policy("ablate", remove=r, seed=seed) for r in ABLATIONS])
        for r in ABLATIONS:
            s, c = ab[f"ablate {r}"]
            d = paired_difference(s, base, c, seed=seed)
            abl.append({"organism": name, "removed": r, "nll": float(s.sum() / c.sum()), "delta_nll": d.nll,
                        "ci_low": d.ci_low, "ci_high": d.ci_high, "tokens": d.tokens})
    sweep = []
    sw = evaluate_policies(lm, windows, [Policy("learned", k=kk, seed=seed) for kk in range(1, E + 1)])
    for kk in range(1, E + 1):
        s, c = sw[f"learned k={kk}"]
        pl = pooled_loss(s, c, seed=seed)
        sweep.append({"organism": name, "k": kk, "nll": pl.nll, "ci_low": pl.ci_low, "ci_high": pl.ci_high,
                      "trained_k": kk == k})
    own = pooled_loss(own_sums, counts, seed=seed)
    return {"routing": pd.DataFrame(routing), "ablation": pd.DataFrame(abl), "topk_sweep": pd.DataFrame(sweep),
            "own_forward": pd.DataFrame([{"organism": name, "nll": own.nll, "learned_policy_nll": routing[0]["nll"],
                                          "abs_difference": abs(own.nll - routing[0]["nll"])}])}
