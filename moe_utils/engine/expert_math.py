"""Evaluate experts and dense MLPs from canonical weights, in float32, chunked over tokens.

All functions compute on the device of the weights and return float32 tensors on the CPU.
Per-expert outputs and activations that come out non-finite raise
:class:`~moe_utils.core.errors.NonFiniteError` naming the layer and expert.
Chunking over tokens (``chunk_tokens``) bounds the working memory to one chunk's
intermediate activations; only the requested result is ever fully materialised.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from moe_utils.arch import activation
from moe_utils.core.finite import check_finite
from moe_utils.engine.canonical import DenseMLPWeights, MoELayerWeights

Tensor = torch.Tensor


def _bias(b: Tensor | None, e: int) -> Tensor | None:
    return None if b is None else b[e].float()


def _expert_hidden(w: MoELayerWeights, x: Tensor, e: int, glu: bool) -> Tensor:
    """glu(W_act x, W_up x) (``glu=True``) or act(W_act x) for expert ``e``; x is fp32 [n,H]."""
    act = activation(w.activation)
    if w.w_act is None:  # gate-less expert: act(W_up x)
        return act(F.linear(x, w.w_up[e].float(), _bias(w.b_up, e)))
    gate = F.linear(x, w.w_act[e].float(), _bias(w.b_act, e))
    if not glu:
        return act(gate)
    up = F.linear(x, w.w_up[e].float(), _bias(w.b_up, e))
    return act.glu(gate, up)


def _expert_out(w: MoELayerWeights, x: Tensor, e: int) -> Tensor:
    hidden = _expert_hidden(w, x, e, glu=True)
    return F.linear(hidden, w.w_down[e].float(), _bias(w.b_down, e))


def _chunks(n: int, size: int):
    size = max(int(size), 1)
    for start in range(0, n, size):
        yield start, min(start + size, n)


def expert_outputs(weights: MoELayerWeights, x: Tensor, chunk_tokens: int = 1024) -> Tensor:
    """Every expert's output on every token: [N,E,H] (float32, CPU), biases included."""
    x = x.reshape(-1, weights.hidden_size)
    out = torch.empty(x.shape[0], weights.num_experts, weights.hidden_size, dtype=torch.float32)
    with torch.no_grad():
        for a, b in _chunks(x.shape[0], chunk_tokens):
            xc = x[a:b].to(weights.device, torch.float32)
            for e in range(weights.num_experts):
                out[a:b, e] = _expert_out(weights, xc, e).cpu()
                check_finite(out[a:b, e], weights.layer, weights.ids[e], "expert output on the captured inputs")
    return out


def expert_intermediates(
    weights: MoELayerWeights,
    x: Tensor,
    chunk_tokens: int = 1024,
    experts: Sequence[int] | None = None,
    max_neurons: int | None = None,
) -> Tensor:
    """Activations act(W_act x) on every token: [N, len(experts), I'] (float32, CPU).

    ``experts`` (default: all) and ``max_neurons`` (default: all I, else the first ones) bound the
    result; only one chunk x one expert of full width exists at a time otherwise. At Mixtral width
    all experts on 1,100 tokens would be 0.5 GB, so callers that reduce over neurons ask for one
    expert at a time (:func:`iter_expert_intermediates`).
    """
    x = x.reshape(-1, weights.hidden_size)
    chosen = list(range(weights.num_experts)) if experts is None else [int(e) for e in experts]
    width = weights.intermediate_size if max_neurons is None else min(int(max_neurons), weights.intermediate_size)
    out = torch.empty(x.shape[0], len(chosen), width, dtype=torch.float32)
    with torch.no_grad():
        for a, b in _chunks(x.shape[0], chunk_tokens):
            xc = x[a:b].to(weights.device, torch.float32)
            for slot, e in enumerate(chosen):
                out[a:b, slot] = _expert_hidden(weights, xc, e, glu=False)[:, :width].cpu()
                check_finite(out[a:b, slot], weights.layer, weights.ids[e], "act(W_act x) on the captured inputs")
    return out


def iter_expert_intermediates(
    weights: MoELayerWeights, x: Tensor, chunk_tokens: int = 1024
) -> Iterator[tuple[int, Tensor]]:
    """``(expert, act(W_act x) [N, I])`` one expert at a time (float32, CPU)."""
    for e in range(weights.num_experts):
        yield e, expert_intermediates(weights, x, chunk_tokens, experts=[e])[:, 0]


def apply_experts(
    weights: MoELayerWeights, x: Tensor, index: Tensor, weight: Tensor, scale_input: bool = False
) -> Tensor:
    """Routed output ``sum_k weight_k * expert_{index_k}(x)`` [N,H] (or ``expert(weight_k*x)``).

    Only the selected (token, expert) pairs are computed, like the model does.
    """
    x = x.reshape(-1, weights.hidden_size)
    out = torch.zeros(x.shape[0], weights.hidden_size, dtype=torch.float32)
    with torch.no_grad():
        for e in range(weights.num_experts):
            tok, pos = torch.where(index == e)
            if tok.numel() == 0:
                continue
            w = weight[tok, pos].float().unsqueeze(-1)
            inp = x[tok].float()
            if scale_input:
                y = _expert_out(weights, (inp * w).to(weights.device), e).cpu()
            else:
                y = _expert_out(weights, inp.to(weights.device), e).cpu() * w
            out.index_add_(0, tok, y)
    return out


def dense_intermediates(weights: DenseMLPWeights, x: Tensor, chunk_tokens: int = 4096) -> Tensor:
    """act(W_act x) of a dense MLP: [N,I] (float32, CPU)."""
    act = activation(weights.activation)
    x = x.reshape(-1, weights.hidden_size)
    out = torch.empty(x.shape[0], weights.intermediate_size, dtype=torch.float32)
    gate_w = weights.w_act if weights.w_act is not None else weights.w_up
    with torch.no_grad():
        for a, b in _chunks(x.shape[0], chunk_tokens):
            xc = x[a:b].to(gate_w.device, torch.float32)
            out[a:b] = act(F.linear(xc, gate_w.float())).cpu()
    check_finite(out, weights.layer, None, "dense MLP act(W_act x) on the captured inputs")
    return out


def dense_outputs(weights: DenseMLPWeights, x: Tensor, chunk_tokens: int = 4096) -> Tensor:
    """Output W_down glu(W_act x, W_up x) of a dense MLP: [N,H] (float32, CPU)."""
    act = activation(weights.activation)
    x = x.reshape(-1, weights.hidden_size)
    out = torch.empty(x.shape[0], weights.hidden_size, dtype=torch.float32)
    with torch.no_grad():
        for a, b in _chunks(x.shape[0], chunk_tokens):
            xc = x[a:b].to(weights.w_up.device, torch.float32)
            up = F.linear(xc, weights.w_up.float())
            hidden = act(up) if weights.w_act is None else act.glu(F.linear(xc, weights.w_act.float()), up)
            out[a:b] = F.linear(hidden, weights.w_down.float()).cpu()
    check_finite(out, weights.layer, None, "dense MLP output on the captured inputs")
    return out


def shared_expert_output(weights: MoELayerWeights, x: Tensor) -> Tensor | None:
    """The shared experts' contribution to the block output [N,H] (after a sigmoid gate when the
    family has one, as Qwen2-MoE); None when the layer has no shared expert."""
    if weights.shared is None:
        return None
    out = dense_outputs(weights.shared, x)
    if weights.shared_gate is not None:
        out = torch.sigmoid(x.float() @ weights.shared_gate.float().cpu().T) * out
    return out
