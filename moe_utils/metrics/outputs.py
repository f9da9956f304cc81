"""Similarity of expert outputs (paper §5.1, Figs. 2, 3, 9).

* Short input: one cosine map per token between all experts' raw outputs (``token_similarity``).
* Long input: per token the **angular** similarity between all experts, summed over all tokens of
  all sequences and divided by the total token count (``mean_token_similarity``).
* Per token, the mean angular similarity over distinct expert pairs (``token_mean_similarity``),
  which observation 3's per-sequence sums and its random-expert null are made of.

A reference output (the dense model's FFN "F" from its own forward pass, or a shared expert) is
appended as an extra item with ``stack_with_reference(outputs, f, axis=1)`` first.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.errors import ShapeError
from ._arrays import ArrayLike, to_numpy
from .similarity import angular_similarity


def _cos_batch(x: np.ndarray) -> np.ndarray:
    nrm = np.linalg.norm(x, axis=-1)
    xn = x / np.where(nrm > 0, nrm, 1.0)[..., None]
    cos = np.clip(np.einsum("neh,nfh->nef", xn, xn), -1.0, 1.0)
    idx = np.arange(x.shape[1])
    cos[:, idx, idx] = 1.0
    zero = nrm == 0  # [n, E]: undefined direction
    cos[zero[:, :, None] | zero[:, None, :]] = np.nan
    return cos


def token_similarity(outputs: ArrayLike, angular: bool = False, chunk_tokens: int = 256) -> np.ndarray:
    """Per-token similarity between experts: ``[N, E, H]`` -> ``[N, E, E]`` (cosine or angular).

    A zero output vector has undefined similarity (NaN); the diagonal is exactly 1 otherwise.
    """
    if len(outputs.shape) != 3:
        raise ShapeError(f"expected outputs of shape [N, E, H]; got {tuple(outputs.shape)}")
    n = int(outputs.shape[0])
    parts = []
    for s in range(0, n, chunk_tokens):
        c = _cos_batch(to_numpy(outputs[s : s + chunk_tokens]))
        parts.append(angular_similarity(c) if angular else c)
    e = int(outputs.shape[1])
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, e, e))


def mean_token_similarity(outputs: ArrayLike, angular: bool = True, chunk_tokens: int = 256) -> np.ndarray:
    """Average per-token similarity map over all N tokens -> ``[E, E]`` (angular by default, as Fig. 3).

    Pass the tokens of all sequences concatenated (BOS tokens included, as the reference code does).
    A pair with a zero output on any token is undefined (NaN), never silently averaged as 0.
    """
    n = int(outputs.shape[0])
    if n == 0:
        raise ShapeError("no tokens: the mean similarity is undefined")
    e = int(outputs.shape[1])
    total = np.zeros((e, e))
    for s in range(0, n, chunk_tokens):
        c = _cos_batch(to_numpy(outputs[s : s + chunk_tokens]))
        total += (angular_similarity(c) if angular else c).sum(axis=0)
    return total / n


def token_mean_similarity(outputs: torch.Tensor) -> np.ndarray:
    """Per token: mean angular similarity over distinct expert pairs, ``[N, E, H]`` -> ``[N]``
    (NaN where an expert's output is 0: its direction is undefined)."""
    y = outputs.float()
    n = y.norm(dim=-1, keepdim=True)
    u = torch.where(n > 0, y / n.clamp_min(1e-30), torch.full_like(y, float("nan")))
    cos = torch.einsum("neh,nfh->nef", u, u).clamp(-1, 1)
    ang = 1 - torch.arccos(cos) / math.pi
    e = y.shape[1]
    off = ~torch.eye(e, dtype=torch.bool)
    return ang[:, off].mean(dim=1).cpu().numpy()
