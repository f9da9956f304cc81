"""The quantized formats' decoders: each stored matrix kept encoded, decoded window by window.

- fine-grained FP8 (DeepSeek-V3/R1, Qwen3-FP8, ...): ``X.weight`` in float8 with
  ``X.weight_scale_inv`` per ``weight_block_size`` block (partial edge blocks allowed); the
  scales may be float32/bf16, or UE8M0 exponents (``scale_fmt: ue8m0``, uint8 or float8_e8m0fnu);
- MXFP4 (gpt-oss): ``X_blocks`` (two e2m1 codes per byte, low nibble first, 32 values per group)
  and ``X_scales`` (one exponent byte per group, bias 127), decoded to the layout
  ``transformers.integrations.mxfp4.convert_moe_packed_tensors`` returns, ``[E, in, out]``;
- compressed-tensors ``pack-quantized`` integers: ``X.weight_packed`` (int32 words),
  ``X.weight_scale`` per group, optional ``X.weight_zero_point``, ``X.weight_shape``.

Each format is an :class:`EncodedMatrix` (views of the memory-mapped codes and scales) that
decodes any window of rows and columns (a range of rows, a contiguous range of columns) exactly
as the whole matrix decodes there: the whole-matrix decoders are loops of windows over row bands
of bounded float32 scratch, and the lazy expert stacks (:mod:`~moe_utils.models.lazy_experts`)
decode the windows the weight passes ask for.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from moe_utils.core.errors import CheckpointError
from moe_utils.models.quant_schemes import QuantScheme

Tensor = torch.Tensor

#: The 16 values of an e2m1 (FP4) code, indexed by the code (sign bit 8).
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

#: Bytes of float32 scratch a decoder uses per band of rows.
BAND_BYTES = 16 * 2**20


def band_rows(cols: int, multiple: int = 1) -> int:
    """Rows per band so that a band of float32 fits in :data:`BAND_BYTES`, a multiple of ``multiple``."""
    rows = max(1, BAND_BYTES // (4 * max(cols, 1)))
    return max(multiple, rows // multiple * multiple)


def ue8m0_to_float(scales: Tensor) -> Tensor:
    """Float32 values of scales: UE8M0 exponents (uint8, bias 127, or float8_e8m0fnu) become
    ``2**(s - 127)``; float scales are widened."""
    if scales.dtype == torch.uint8:
        return (scales.to(torch.float32) - 127.0).exp2()
    return scales.to(torch.float32)


def _by_group(values: Tensor, per_group: Tensor, group: int, c0: int, op: Callable[[Tensor, Tensor], Tensor]) -> None:
    """``op(values[:, k], per_group[:, g(k)])`` in place for every column ``k`` of a window starting
    at column ``c0``, where ``g(k)`` is the group of column ``c0 + k`` counted from the window's first
    group: runs of whole groups broadcast one value over each group, partial groups one column."""
    c, stop = c0, c0 + values.shape[1]
    first = c0 // group
    while c < stop:
        j = c // group
        if c == j * group and stop - c >= group:
            whole = (stop - c) // group
            op(
                values[:, c - c0 : c - c0 + whole * group].unflatten(-1, (whole, group)),
                per_group[:, j - first : j - first + whole, None],
            )
            c += whole * group
        else:
            end = min(stop, (j + 1) * group)
            op(values[:, c - c0 : end - c0], per_group[:, j - first, None])
            c = end


def take_rows(t: Tensor, rows: range) -> Tensor:
    """``t[rows]`` for a range with a positive step (a view)."""
    return t[rows.start : rows.stop : rows.step] if len(rows) else t[:0]


class EncodedMatrix(ABC):
    """One stored 2-D matrix ``[rows, cols]`` of a quantized checkpoint, kept encoded (views of its
    memory-mapped bytes and scales) and decoded window by window to ``dtype``."""

    shape: tuple[int, int]
    dtype: torch.dtype

    @abstractmethod
    def window(self, rows: range, c0: int, c1: int) -> Tensor:
        """The window ``W[rows, c0:c1]`` as the format computes it (float32; pack-quantized: the
        scale's dtype), before the one rounding to ``dtype`` that :meth:`decode` and
        :class:`LazyMatrix` apply."""

    def decode(self, out: Tensor | None = None) -> Tensor:
        """The whole matrix in ``dtype``, decoded in row bands of bounded float32 scratch (into ``out`` when given)."""
        rows, cols = self.shape
        out = torch.empty((rows, cols), dtype=self.dtype) if out is None else out
        step = band_rows(cols, self.row_multiple)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out[r0:r1] = self.window(range(r0, r1), 0, cols)
        return out

    #: Rows per band of :meth:`decode` are a multiple of this (the format's row block).
    row_multiple: int = 1


def _byte_values(dtype: torch.dtype) -> np.ndarray:
    """The float32 value of every byte read as the 8-bit float ``dtype`` (a lookup table)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).to(torch.float32).numpy()


_FP8_VALUES = {dtype: _byte_values(dtype) for dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}


def _fp8_to_float(q: Tensor) -> Tensor:
    """``q.to(torch.float32)`` of float8 codes, bit for bit, by table lookup (several times faster
    than torch's float8 conversion on a CPU)."""
    table = _FP8_VALUES.get(q.dtype)
    if table is None:
        return q.to(torch.float32)
    return torch.from_numpy(table[q.view(torch.uint8).numpy()])


class FP8Matrix(EncodedMatrix):
    """A fine-grained FP8 matrix: ``W[i, j] = float(q[i, j]) * scale_inv[i // bm, j // bn]`` (one
    scale for the whole matrix when ``scale_inv`` has one entry)."""

    def __init__(self, weight: Tensor, scale_inv: Tensor, block: tuple[int, int] | None, dtype: torch.dtype):
        if weight.dim() != 2:
            raise CheckpointError(f"an FP8 weight must be 2-D; got shape {tuple(weight.shape)}")
        rows, cols = weight.shape
        self.weight, self.scales = weight, ue8m0_to_float(scale_inv)
        self.shape, self.dtype = (int(rows), int(cols)), dtype
        self.block: tuple[int, int] | None = None
        if self.scales.numel() == 1:
            return
        if self.scales.dim() != 2:
            raise CheckpointError(f"FP8 scales must be 2-D per block; got shape {tuple(self.scales.shape)}")
        grid_r, grid_c = self.scales.shape
        bm, bn = block if block is not None else (math.ceil(rows / grid_r), math.ceil(cols / grid_c))
        if (math.ceil(rows / bm), math.ceil(cols / bn)) != (grid_r, grid_c):
            raise CheckpointError(
                f"an FP8 weight of shape {rows} x {cols} with {bm} x {bn} blocks needs a "
                f"{math.ceil(rows / bm)} x {math.ceil(cols / bn)} scale grid, but weight_scale_inv is "
                f"{grid_r} x {grid_c}; weight_block_size in config.json does not match the checkpoint"
            )
        self.block, self.row_multiple = (bm, bn), bm

    def window(self, rows: range, c0: int, c1: int) -> Tensor:
        band = _fp8_to_float(take_rows(self.weight, rows)[:, c0:c1])
        if self.block is None:
            return band.mul_(self.scales.reshape(()))
        if not len(rows) or c1 <= c0:
            return band
        bm, bn = self.block
        grid = self.scales[:, c0 // bn : math.ceil(c1 / bn)]
        if rows.step == 1:
            g0 = rows.start // bm
            row_scale = grid[g0 : math.ceil(rows.stop / bm)].repeat_interleave(bm, dim=0)
            row_scale = row_scale[rows.start - g0 * bm : rows.stop - g0 * bm]
        else:
            row_scale = grid.index_select(0, torch.arange(rows.start, rows.stop, rows.step) // bm)
        _by_group(band, row_scale, bn, c0, Tensor.mul_)
        return band


def _fp4_pairs() -> np.ndarray:
    """Byte -> (low nibble, high nibble) e2m1 values, float32 ``[256, 2]``."""
    lut = np.asarray(FP4_E2M1, dtype=np.float32)
    return np.stack((np.tile(lut, 16), np.repeat(lut, 16)), axis=-1)


_PAIRS = _fp4_pairs()


class MXFP4Matrix(EncodedMatrix):
    """One expert's MXFP4 matrix in stored orientation ``[out, in]``: ``blocks [out, G, 16]`` (uint8,
    value ``2j`` in the low nibble of byte ``j``), ``scales [out, G]`` (exponent + 127)."""

    def __init__(self, blocks: Tensor, scales: Tensor, dtype: torch.dtype):
        if blocks.dim() != 3 or tuple(blocks.shape[:2]) != tuple(scales.shape):
            raise CheckpointError(
                f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
                "([out, groups, 16] and [out, groups]); the checkpoint is corrupt"
            )
        rows, groups, width = blocks.shape
        self.blocks, self.scales, self.group = blocks, scales, int(width) * 2
        self.shape, self.dtype = (int(rows), int(groups) * self.group), dtype

    def window(self, rows: range, c0: int, c1: int) -> Tensor:
        g0, g1 = c0 // self.group, max(c0 // self.group, math.ceil(c1 / self.group))
        codes = take_rows(self.blocks, rows)[:, g0:g1].view(torch.uint8)
        n = codes.shape[0]
        values = torch.from_numpy(_PAIRS[codes.numpy()]).view(n, g1 - g0, self.group)
        power = (take_rows(self.scales, rows)[:, g0:g1].view(torch.uint8).to(torch.float32) - 127.0).exp2()
        values.mul_(power[:, :, None])
        lead = c0 - g0 * self.group
        return values.view(n, -1)[:, lead : lead + max(0, c1 - c0)]


class PackedMatrix(EncodedMatrix):
    """A compressed-tensors ``pack-quantized`` matrix ``[rows, cols]``: ``(q - z) * scale`` per group
    of columns, rounded to the scale's dtype (as the format computes it), then to ``dtype``.

    ``zero_point`` is the packed one of asymmetric checkpoints (``[ceil(rows / per), groups]``,
    packed along rows), unpacked here once (one small integer per group)."""

    def __init__(
        self,
        packed: Tensor,
        scale: Tensor,
        cols: int,
        scheme: QuantScheme,
        zero_point: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ):
        rows = packed.shape[0]
        group = scheme.group_size or cols
        if cols % group:
            raise CheckpointError(f"{cols} columns are not a whole number of groups of {group}")
        groups = cols // group
        if scale.numel() != rows * groups:
            raise CheckpointError(
                f"weight_scale has shape {tuple(scale.shape)}, but {rows} rows in groups of {group} need {rows} x {groups}"
            )
        self.packed, self.scale, self.bits, self.group = packed, scale.reshape(rows, groups), scheme.num_bits, group
        self.zero = None
        if zero_point is not None and not scheme.symmetric:
            self.zero = unpack_int(zero_point.t().contiguous(), scheme.num_bits, rows).t().reshape(rows, groups)
        self.shape, self.dtype = (int(rows), int(cols)), dtype or scale.dtype

    def window(self, rows: range, c0: int, c1: int) -> Tensor:
        per = 32 // self.bits
        w0, w1 = c0 // per, max(c0 // per, math.ceil(c1 / per))
        q = unpack_int(take_rows(self.packed, rows)[:, w0:w1], self.bits, (w1 - w0) * per)
        q = q[:, c0 - w0 * per : c0 - w0 * per + max(0, c1 - c0)].to(torch.float32)
        g0, g1 = c0 // self.group, math.ceil(c1 / self.group)
        if self.zero is not None:
            _by_group(q, take_rows(self.zero, rows)[:, g0:g1].to(torch.float32), self.group, c0, Tensor.sub_)
        _by_group(q, take_rows(self.scale, rows)[:, g0:g1].to(torch.float32), self.group, c0, Tensor.mul_)
        return q.to(self.scale.dtype)


def dequantize_fp8(
    weight: Tensor,
    scale_inv: Tensor,
    block: tuple[int, int] | None,
    dtype: torch.dtype = torch.bfloat16,
    out: Tensor | None = None,
) -> Tensor:
    """``W[i, j] = float(q[i, j]) * scale_inv[i // bm, j // bn]`` in float32, rounded once to ``dtype``.

    ``weight`` is ``[rows, cols]`` float8; ``scale_inv`` has one entry per ``block`` (the grid
    is ``ceil(rows / bm) x ceil(cols / bn)``: edge blocks may be partial) or a single entry.
    ``block=None`` derives the block from the grid. Written into ``out`` when given, band by band.
    """
    return FP8Matrix(weight, scale_inv, block, dtype).decode(out)


def dequantize_mxfp4_expert(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """One expert's MXFP4 matrix in stored orientation, ``[out, in]``: ``blocks [out, G, 16]``
    (uint8, value ``2j`` in the low nibble of byte ``j``), ``scales [out, G]`` (exponent + 127)."""
    return MXFP4Matrix(blocks, scales, dtype).decode()


def unpack_int(packed: Tensor, num_bits: int, cols: int) -> Tensor:
    """Signed integers (int8 ``[rows, cols]``) from rows of int32 words holding ``32 // num_bits``
    values each, value ``k`` in bits ``k * num_bits`` up, stored with offset ``2**(num_bits-1)``."""
    if packed.dtype != torch.int32:
        raise CheckpointError(f"packed integer weights must be int32; got {packed.dtype}")
    per = 32 // num_bits
    shifts = torch.arange(per, dtype=torch.int32) * num_bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    values = values.reshape(packed.shape[0], -1)[:, :cols]
    return (values - (1 << (num_bits - 1))).to(torch.int8)


def dequantize_packed(
    packed: Tensor,
    scale: Tensor,
    cols: int,
    scheme: QuantScheme,
    zero_point: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """compressed-tensors ``pack-quantized`` weight ``[rows, cols]``: ``(q - z) * scale`` per group,
    rounded to the scale's dtype (as the format computes it), then to ``dtype``.

    ``zero_point`` is the packed one of asymmetric checkpoints (``[ceil(rows / per), groups]``,
    packed along rows)."""
    return PackedMatrix(packed, scale, cols, scheme, zero_point, dtype).decode()


__all__ = [
    "BAND_BYTES",
    "FP4_E2M1",
    "EncodedMatrix",
    "FP8Matrix",
    "MXFP4Matrix",
    "PackedMatrix",
    "band_rows",
    "dequantize_fp8",
    "dequantize_mxfp4_expert",
    "dequantize_packed",
    "take_rows",
    "ue8m0_to_float",
    "unpack_int",
]
