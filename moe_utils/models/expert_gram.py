"""Gram matrices of flattened expert matrices, streamed in row chunks.

For matrix-level expert similarity only the inner products ``<W_i, W_j>`` of the flattened
matrices are needed. ``expert_grams`` accumulates ``G += X X^T`` over row blocks ``X [E, r*c]``
sliced from the memory-mapped checkpoint tensors: each block is converted into one reusable
float32 buffer and multiplied there, so no full-size float32 copy of a layer is
ever made, and each byte is read once. Any element order works as long as it is the same for all
experts, so blocks are read in stored orientation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from moe_utils.arch import require_moe
from moe_utils.arch.facts import check_layers
from moe_utils.core.errors import ArgumentError
from moe_utils.core.finite import check_finite
from moe_utils.models.weights import FolderSource, open_source, pick_format, tensor_name

Tensor = torch.Tensor
# A reader maps a row range [a, b) to {matrix: list of E tensors, each [b-a, cols]}.
Reader = Callable[[int, int], dict[str, list[Tensor]]]


def _passes(src, fmt, layer: int, num_experts: int, wanted: set[str]) -> list[tuple[int, Reader]]:
    """(rows, reader) pairs covering the wanted matrices.

    Readers fetch only the addressed rows (``src.part``: a slice read from the file map, which
    safetensors performs much faster than faulting the pages in through a tensor view).
    """
    ex = fmt.moe.experts
    E = num_experts

    def name(rel: str) -> str:
        return tensor_name(fmt, layer, rel)

    passes: list[tuple[int, Reader]] = []
    if ex.layout == "per_expert":
        for matrix, template in (("act", ex.act), ("up", ex.up), ("down", ex.down)):
            if matrix in wanted and template is not None:
                names = [name(template.format(e=e)) for e in range(E)]
                passes.append(
                    (
                        src.shape(names[0])[0],
                        lambda a, b, m=matrix, ns=names: {m: [src.part(n, (slice(a, b),)) for n in ns]},
                    )
                )
        return passes

    if ex.gate_up is not None and wanted & {"act", "up"}:
        gu = name(ex.gate_up)
        shape = src.shape(gu)
        if ex.flat:
            raise ArgumentError("flat fused gate_up layouts are not supported")  # none exist
        if ex.in_transposed:  # [E, H, 2I]: one read gives both halves
            half = shape[2] // 2

            def both(a, b, gu=gu, half=half):
                block = src.part(gu, (slice(None), slice(a, b)))
                if ex.order == "interleaved":
                    return {"act": list(block[..., 0::2]), "up": list(block[..., 1::2])}
                return {"act": list(block[..., :half]), "up": list(block[..., half:])}

            passes.append((shape[1], both))
        elif ex.order == "interleaved":  # [E, 2I, H], alternating rows

            def rows2(a, b, gu=gu):
                block = src.part(gu, (slice(None), slice(2 * a, 2 * b)))
                return {"act": list(block[:, 0::2]), "up": list(block[:, 1::2])}

            passes.append((shape[1] // 2, rows2))
        else:  # [E, 2I, H], gate rows then up rows
            half = shape[1] // 2
            for matrix, off in (("act", 0), ("up", half)):
                if matrix in wanted:
                    passes.append(
                        (
                            half,
                            lambda a, b, m=matrix, off=off, gu=gu: {
                                m: list(src.part(gu, (slice(None), slice(off + a, off + b))))
                            },
                        )
                    )
    else:
        for matrix, rel in (("act", ex.act), ("up", ex.up)):
            if matrix in wanted and rel is not None:
                passes.append(_stacked(src, name(rel), matrix, ex.flat, E))
    if "down" in wanted:
        passes.append(_stacked(src, name(ex.down), "down", ex.flat, E))
    return passes


def _stacked(src, full: str, matrix: str, flat: bool, E: int) -> tuple[int, Reader]:
    shape = src.shape(full)
    if flat:  # [E*R, C]: expert e owns rows e*R .. (e+1)*R
        rows = shape[0] // E
        return rows, lambda a, b: {matrix: [src.part(full, (slice(e * rows + a, e * rows + b),)) for e in range(E)]}
    return shape[1], lambda a, b: {matrix: list(src.part(full, (slice(None), slice(a, b))))}


def _layer_names(fmt, layer: int, E: int) -> list[str]:
    ex = fmt.moe.experts
    rels = [r for r in (ex.gate_up, ex.act, ex.up, ex.down) if r is not None]
    if ex.layout == "per_expert":
        rels = [r.format(e=e) for r in rels for e in range(E)]
    return [tensor_name(fmt, layer, r) for r in rels]


def _gram(x: Tensor) -> Tensor:
    """X X^T in float64 from a float32 [E, n] (numpy's matmul uses a symmetric BLAS kernel)."""
    arr = x.numpy()
    return torch.from_numpy(arr @ arr.T).double()


def expert_grams(
    source: Any,
    layer: int,
    matrices: Iterable[str] = ("act", "up", "down"),
    chunk_mb: float = 256.0,
    allow_pickle: bool = False,
    prefetch: bool = True,
) -> dict[str, Tensor]:
    """``{matrix: G [E,E]}`` with ``G[i,j] = <W_i, W_j>`` (float64) for flattened expert matrices.

    ``matrices`` names the paper's three matrices: ``act`` (W_act / gate), ``up``, ``down``.
    ``chunk_mb`` bounds each float32 working buffer (E experts x rows x columns).
    ``prefetch`` reads the layer's bytes in a background thread so disk reads overlap with the
    arithmetic (checkpoint folders only). A non-finite weight raises
    :class:`~moe_utils.core.errors.NonFiniteError` naming the layer, expert and matrix.
    """
    src, spec, facts = open_source(source, allow_pickle)
    require_moe(spec, "expert_grams")
    check_layers([layer], facts, "moe")
    E = facts.num_experts
    wanted = set(matrices)
    fmt = pick_format(src, spec, layer, "moe")
    stop = None
    if prefetch and isinstance(src, FolderSource):
        stop = src.reader.prefetch(_layer_names(fmt, layer, E))
    grams: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for rows, read in _passes(src, fmt, layer, E, wanted):
                probe = read(0, 1)
                cols = {m: views[0].numel() for m, views in probe.items() if m in wanted}
                step = max(1, int(chunk_mb * 2**20 // (E * max(cols.values()) * 4)))
                buffers = {m: torch.empty(E, step * c, dtype=torch.float32) for m, c in cols.items()}
                for a in range(0, rows, step):
                    b = min(a + step, rows)
                    for m, views in read(a, b).items():
                        if m not in buffers:
                            continue
                        block = buffers[m][:, : (b - a) * cols[m]]
                        for e, view in enumerate(views):
                            block[e].view(b - a, cols[m]).copy_(view)  # convert while copying
                            check_finite(block[e], layer, e, f"W_{m}")
                        g = _gram(block)
                        grams[m] = g if m not in grams else grams[m] + g
    finally:
        if stop is not None:
            stop.set()
        if isinstance(src, FolderSource):
            src.release()
    return grams
