"""Gram matrices of flattened expert matrices, streamed in row chunks.

For matrix-level expert similarity only the inner products ``<W_i, W_j>`` of the flattened
matrices are needed. ``expert_grams`` accumulates ``G += X X^T`` over row blocks ``X [E, r*c]``
read straight from the (memory-mapped) checkpoint, so no full-size float32 copy of a layer is
ever made: memory stays at one chunk per expert, and each byte is read once. Any element order
works as long as it is the same for all experts, so blocks are read in stored orientation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from moe_utils.arch import require_moe
from moe_utils.weights import FolderSource, check_layer, open_source, pick_format, tensor_name

Tensor = torch.Tensor
Reader = Callable[[int, int], dict[str, Tensor]]


def _passes(src, fmt, layer: int, num_experts: int, wanted: set[str]) -> list[tuple[int, Reader]]:
    """(rows, reader) pairs; each reader returns {matrix: [E, r, c]} for rows [r0, r1)."""
    ex = fmt.moe.experts
    E = num_experts

    def name(rel: str) -> str:
        return tensor_name(fmt, layer, rel)

    passes: list[tuple[int, Reader]] = []
    if ex.layout == "per_expert":
        for matrix, template in (("act", ex.act), ("up", ex.up), ("down", ex.down)):
            if matrix in wanted and template is not None:
                names = [name(template.format(e=e)) for e in range(E)]
                rows = src.shape(names[0])[0]
                passes.append((rows, lambda a, b, m=matrix, ns=names: {
                    m: torch.stack([src.part(n, (slice(a, b),)) for n in ns])}))
        return passes

    if ex.gate_up is not None and wanted & {"act", "up"}:
        gu = name(ex.gate_up)
        shape = src.shape(gu)
        if ex.in_transposed:                    # [E, H, 2I]: one read gives both halves
            def read(a, b, gu=gu, half=shape[2] // 2):
                block = src.part(gu, (slice(None), slice(a, b)))
                if ex.order == "interleaved":
                    return {"act": block[..., 0::2], "up": block[..., 1::2]}
                return {"act": block[..., :half], "up": block[..., half:]}
            passes.append((shape[1], read))
        elif ex.order == "interleaved":         # [E, 2I, H], alternating rows
            passes.append((shape[1] // 2, lambda a, b, gu=gu: (lambda blk: {
                "act": blk[:, 0::2], "up": blk[:, 1::2]})(src.part(gu, (slice(None), slice(2 * a, 2 * b))))))
        else:                                   # [E, 2I, H], gate rows then up rows
            half = shape[1] // 2
            for matrix, off in (("act", 0), ("up", half)):
                if matrix in wanted:
                    passes.append((half, lambda a, b, m=matrix, off=off, gu=gu: {
                        m: src.part(gu, (slice(None), slice(off + a, off + b)))}))
    else:
        for matrix, rel in (("act", ex.act), ("up", ex.up)):
            if matrix in wanted and rel is not None:
                passes.append(_fused_single(src, name(rel), matrix, ex.flat, E))
    if "down" in wanted:
        passes.append(_fused_single(src, name(ex.down), "down", ex.flat, E))
    return passes


def _fused_single(src, full: str, matrix: str, flat: bool, E: int) -> tuple[int, Reader]:
    shape = src.shape(full)
    if flat:                                    # [E*R, C]: expert e owns rows e*R .. (e+1)*R
        rows = shape[0] // E
        return rows, lambda a, b: {matrix: torch.stack(
            [src.part(full, (slice(e * rows + a, e * rows + b),)) for e in range(E)])}
    return shape[1], lambda a, b: {matrix: src.part(full, (slice(None), slice(a, b)))}


def expert_grams(source: Any, layer: int, matrices: Iterable[str] = ("act", "up", "down"),
                 chunk_mb: float = 256.0, allow_pickle: bool = False) -> dict[str, Tensor]:
    """``{matrix: G [E,E]}`` with ``G[i,j] = <W_i, W_j>`` (float64) for flattened expert matrices.

    ``matrices`` names the paper's three matrices: ``act`` (W_act / gate), ``up``, ``down``.
    ``chunk_mb`` bounds the float32 working block (E experts x rows x columns).
    """
    src, spec = open_source(source, allow_pickle)
    require_moe(spec, "expert_grams")
    cfg = src.config
    check_layer(spec, cfg, layer, "moe")
    E = spec.num_experts(cfg)
    wanted = set(matrices)
    fmt = pick_format(src, spec, layer, "moe")
    grams: dict[str, Tensor] = {}
    try:
        for rows, read in _passes(src, fmt, layer, E, wanted):
            probe = read(0, 1)
            cols = {m: t[0].numel() for m, t in probe.items()}
            per_row = E * max(cols.values()) * 4 * max(len(cols), 1)
            step = max(1, int(chunk_mb * 2 ** 20 // per_row))
            for a in range(0, rows, step):
                for m, block in read(a, min(a + step, rows)).items():
                    if m not in wanted:
                        continue
                    x = block.reshape(E, -1).float()
                    g = (x @ x.T).double()
                    grams[m] = g if m not in grams else grams[m] + g
    finally:
        if isinstance(src, FolderSource):
            src.release()
    return grams


def cosine_from_gram(gram: Tensor) -> Tensor:
    """Cosine similarity matrix from a Gram matrix (zero-norm rows give similarity 0)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(gram.dtype).tiny),
                       torch.zeros_like(gram))
