"""Published quantized checkpoint formats, decoded to float tensors.

Hub checkpoints of large MoE models often store their experts quantized. This module reads the
formats that carry enough information to recover the published weights exactly, as transformers
itself would load them on a CPU:

- fine-grained FP8 (DeepSeek-V3/R1, Qwen3-FP8, ...): ``X.weight`` in float8 with
  ``X.weight_scale_inv`` per ``weight_block_size`` block (partial edge blocks allowed); the
  scales may be float32/bf16, or UE8M0 exponents (``scale_fmt: ue8m0``, uint8 or float8_e8m0fnu);
- MXFP4 (gpt-oss): ``X_blocks`` (two e2m1 codes per byte, low nibble first, 32 values per group)
  and ``X_scales`` (one exponent byte per group, bias 127), decoded to the layout
  ``transformers.integrations.mxfp4.convert_moe_packed_tensors`` returns, ``[E, in, out]``;
- compressed-tensors ``pack-quantized`` integers: ``X.weight_packed`` (int32 words),
  ``X.weight_scale`` per group, optional ``X.weight_zero_point``, ``X.weight_shape``.

Any other ``quantization_config`` is refused with :class:`UnsupportedQuantizationError` by
:func:`quant_scheme`, before a tensor is read. Each format is an :class:`EncodedMatrix` (views of
the memory-mapped codes and scales) that decodes any window of rows and columns exactly as the
whole matrix decodes there. A whole tensor is decoded in row bands of bounded float32 scratch,
fused MXFP4 tensors expert by expert (:meth:`QuantizedTensors.expert_pieces`), so nothing beyond
the decoded result is held; the weight passes keep the experts encoded instead
(:class:`LazyExperts`, :class:`LazyMatrix`) and decode each block of neurons when they read it.
"""

from __future__ import annotations

import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from moe_utils.core.errors import CheckpointError, UnsupportedQuantizationError

Tensor = torch.Tensor

#: The 16 values of an e2m1 (FP4) code, indexed by the code (sign bit 8).
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

#: Bytes of float32 scratch a decoder uses per band of rows.
BAND_BYTES = 16 * 2**20

_FP8_STORED = ("F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2")
_NAMES = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "gguf": "GGUF",
    "bitsandbytes": "bitsandbytes",
    "bitsandbytes_4bit": "bitsandbytes 4-bit",
    "bitsandbytes_8bit": "bitsandbytes 8-bit",
    "hqq": "HQQ",
    "eetq": "EETQ",
    "aqlm": "AQLM",
    "quanto": "Quanto",
    "torchao": "torchao",
    "exl2": "EXL2",
    "bitnet": "BitNet",
    "fbgemm_fp8": "FBGEMM FP8",
}
_SUPPORTED = "fine-grained FP8, MXFP4 and compressed-tensors pack-quantized INT"
_WHAT_TO_DO = "use the model's unquantized (bf16) release, or dequantize it once and save it as safetensors"


@dataclass(frozen=True)
class QuantScheme:
    """What config.json's ``quantization_config`` says about how weights are stored."""

    method: str  # "fp8" | "mxfp4" | "pack-quantized"
    block: tuple[int, int] | None = None  # FP8: weight_block_size (None: one scale per tensor)
    num_bits: int = 4  # pack-quantized: bits per value
    group_size: int | None = None  # pack-quantized: values per scale (None: one per row)
    symmetric: bool = True  # pack-quantized: False when a zero point is stored


def _refuse(what: str) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(
        f"this checkpoint is quantized as {what}, which moe_utils cannot decode (it reads {_SUPPORTED}); {_WHAT_TO_DO}"
    )


def quant_scheme(config: dict) -> QuantScheme | None:
    """The storage scheme config.json declares (None: unquantized); any other quantization raises
    :class:`UnsupportedQuantizationError`, in one line naming the format and what to do."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise _refuse(f"an unreadable quantization_config ({qc!r})")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt not in ("e4m3", "e5m2"):
            raise _refuse(f"FP8 with fmt {fmt!r}")
        size = qc.get("weight_block_size")
        block = None if size is None else (int(size[0]), int(size[1]))
        return QuantScheme("fp8", block=block)
    if method == "mxfp4":
        return QuantScheme("mxfp4")
    if method == "compressed-tensors":
        return _compressed_scheme(qc)
    name = _NAMES.get(method, repr(method) if method else "an unnamed quant_method")
    raise _refuse(f"{name} (quantization_config.quant_method {method!r})")


def _compressed_scheme(qc: dict) -> QuantScheme:
    """The weight arguments of a compressed-tensors config; only ``pack-quantized`` integers with
    one set of weight arguments, quantized per group or per output channel, are decoded."""
    groups = qc.get("config_groups") or {}
    formats = {str(g.get("format") or qc.get("format") or "") for g in groups.values()} or {str(qc.get("format"))}
    if formats != {"pack-quantized"}:
        raise _refuse(f"compressed-tensors format {', '.join(sorted(formats))}")
    args = [g.get("weights") for g in groups.values() if g.get("weights")]
    if not args or any(a != args[0] for a in args):
        raise _refuse("compressed-tensors pack-quantized with several different weight schemes")
    w = args[0]
    bits, kind, strategy = int(w.get("num_bits", 0)), str(w.get("type", "int")), str(w.get("strategy", "group"))
    if kind != "int" or bits not in (2, 4, 8) or strategy not in ("group", "channel"):
        raise _refuse(f"compressed-tensors pack-quantized {kind}{bits} per {strategy}")
    if w.get("actorder") not in (None, False, "static", "weight"):
        raise _refuse(f"compressed-tensors pack-quantized with actorder {w.get('actorder')!r} (a g_idx permutation)")
    group = int(w["group_size"]) if strategy == "group" else None
    return QuantScheme("pack-quantized", num_bits=bits, group_size=group, symmetric=bool(w.get("symmetric", True)))


# ---- decoders ------------------------------------------------------------------------------
# Each format decodes any window (a range of rows, a contiguous range of columns) of one stored
# matrix exactly as the whole matrix decodes there: the whole-matrix decoders below are loops of
# windows over row bands, and the lazy expert stacks (:class:`LazyMatrix`) decode the windows
# the weight passes ask for.
def _band_rows(cols: int, multiple: int = 1) -> int:
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


def _take_rows(t: Tensor, rows: range) -> Tensor:
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
        step = _band_rows(cols, self.row_multiple)
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
        band = _fp8_to_float(_take_rows(self.weight, rows)[:, c0:c1])
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
        codes = _take_rows(self.blocks, rows)[:, g0:g1].view(torch.uint8)
        n = codes.shape[0]
        values = torch.from_numpy(_PAIRS[codes.numpy()]).view(n, g1 - g0, self.group)
        power = (_take_rows(self.scales, rows)[:, g0:g1].view(torch.uint8).to(torch.float32) - 127.0).exp2()
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
        q = unpack_int(_take_rows(self.packed, rows)[:, w0:w1], self.bits, (w1 - w0) * per)
        q = q[:, c0 - w0 * per : c0 - w0 * per + max(0, c1 - c0)].to(torch.float32)
        g0, g1 = c0 // self.group, math.ceil(c1 / self.group)
        if self.zero is not None:
            _by_group(q, _take_rows(self.zero, rows)[:, g0:g1].to(torch.float32), self.group, c0, Tensor.sub_)
        _by_group(q, _take_rows(self.scale, rows)[:, g0:g1].to(torch.float32), self.group, c0, Tensor.mul_)
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


# ---- lazy expert stacks: the decoded layer never held whole ----------------------------------
def _positions(index: object, size: int, what: str) -> tuple[range, bool]:
    """The positions an index of one axis selects (a range with a positive step) and whether it
    drops the axis (an integer)."""
    if isinstance(index, int):
        i = index + size if index < 0 else index
        if not 0 <= i < size:
            raise IndexError(f"index {index} is out of range for a {what} of {size}")
        return range(i, i + 1), True
    if isinstance(index, slice):
        picked = range(*index.indices(size))
        if picked.step < 0:
            raise IndexError(f"a lazily decoded matrix is read forwards; got a {what} slice with step {picked.step}")
        return picked, False
    raise IndexError(f"a lazily decoded matrix takes integers and slices; got {type(index).__name__} for its {what}")


#: Decoded elements per band a :class:`LazyMatrix` keeps for the thread reading it (256 KiB of
#: bf16): a walk over one neuron at a time decodes each band once, not once per neuron.
LAZY_BAND_ELEMENTS = 128 * 1024


class LazyMatrix:
    """One expert matrix in the canonical orientation, decoded only where it is indexed.

    ``m[a:b]``, ``m[:, a:b]``, ``m[a:b, c:d]`` and integer indices return the decoded tensor
    (``dtype``), exactly that part of the matrix the eager reader would return; :meth:`decoded`
    is the whole matrix (one expert). The canonical matrix is rows ``offset, offset + step, ...``
    of the stored matrix (a half of a fused gate/up, or every second row of an interleaved one),
    transposed when ``transposed``.

    A block walk asks for a few neurons (rows ``m[a:b]`` or columns ``m[:, a:b]``) at a time, of
    every expert in turn. Each thread therefore keeps its last decoded band of neurons
    (:data:`LAZY_BAND_ELEMENTS`, thread-local, so the walks of a pass split between threads
    neither share nor evict bands, and a band goes with its thread) and serves the neurons inside
    it from there (a view: read-only by convention, like the blocks of a memory-mapped tensor); a
    larger request is decoded as it is."""

    def __init__(
        self, stored: EncodedMatrix, transposed: bool = False, offset: int = 0, step: int = 1, count: int | None = None
    ):
        self.stored, self.transposed, self.offset, self.step = stored, transposed, offset, step
        axis = stored.shape[1] if transposed else stored.shape[0]
        self.count = count if count is not None else len(range(offset, axis, step))
        other = stored.shape[0] if transposed else stored.shape[1]
        self.shape = torch.Size((self.count, other))
        self.dtype = stored.dtype
        self.device = torch.device("cpu")
        self._band = threading.local()

    def dim(self) -> int:
        return 2

    def _stored(self, picked: range) -> range:
        """The stored positions (rows, or columns when transposed) of canonical rows ``picked``."""
        if not len(picked):
            return range(0)
        first = self.offset + self.step * picked.start
        stride = self.step * picked.step
        return range(first, first + stride * len(picked), stride)

    def __getitem__(self, index: object) -> Tensor:
        if index is Ellipsis:
            index = slice(None)
        if isinstance(index, tuple) and len(index) != 2:
            raise IndexError(f"a lazily decoded matrix is 2-D; got the index {index!r}")
        rows_ix, cols_ix = index if isinstance(index, tuple) else (index, slice(None))
        rows, drop_r = _positions(rows_ix, self.shape[0], "row")
        cols, drop_c = _positions(cols_ix, self.shape[1], "column")
        out = self._from_band(rows, cols)
        if out is None:
            out = self._decode(rows, cols)
        if drop_c:
            out = out[:, 0]
        return out[0] if drop_r else out

    def _decode(self, rows: range, cols: range) -> Tensor:
        """Canonical rows ``rows`` and columns ``cols``, decoded."""
        along = self._stored(rows)
        if not self.transposed:
            return self._window(along, cols)
        return self._window(cols, along).t()  # canonical rows are stored columns

    def _from_band(self, rows: range, cols: range) -> Tensor | None:
        """A run of whole neurons (rows ``a:b`` or columns ``a:b`` of every row) from this thread's
        band, decoding the band that holds it first; None for any other request."""
        full_rows, full_cols = len(rows) == self.shape[0], len(cols) == self.shape[1]
        if full_rows == full_cols:
            return None
        axis, picked = (1, cols) if full_rows else (0, rows)
        span = max(1, LAZY_BAND_ELEMENTS // int(self.shape[1 - axis]))
        if picked.step != 1 or not 0 < len(picked) < span:
            return None
        lo = picked.start // span * span
        if picked.stop > lo + span:
            return None
        band = getattr(self._band, "held", None)
        if band is None or band[0] != (axis, lo):
            whole = range(lo, min(int(self.shape[axis]), lo + span))
            decoded = (
                self._decode(whole, range(self.shape[1])) if axis == 0 else self._decode(range(self.shape[0]), whole)
            )
            band = self._band.held = ((axis, lo), decoded)
        a, b = picked.start - lo, picked.stop - lo
        return band[1][a:b] if axis == 0 else band[1][:, a:b]

    def _window(self, rows: range, cols: range) -> Tensor:
        """The stored window ``W[rows, cols]`` in ``dtype`` (columns with a step are decoded as their span)."""
        if not len(cols):
            return torch.empty((len(rows), 0), dtype=self.dtype)
        c0, c1 = cols.start, cols[-1] + 1
        out = self.stored.window(rows, c0, c1)
        if cols.step != 1:
            out = out[:, :: cols.step]
        return out.to(self.dtype)

    def row_bands(self) -> Iterator[Tensor]:
        """The decoded matrix in bands of rows of bounded size (:data:`BAND_BYTES` of float32), in order."""
        rows, cols = self.shape
        step = _band_rows(cols)
        for r0 in range(0, rows, step):
            yield self[r0 : r0 + step]

    def decoded(self) -> Tensor:
        """The whole matrix, decoded (one expert's bytes in ``dtype``)."""
        if not self.transposed and self.offset == 0 and self.step == 1 and self.count == self.stored.shape[0]:
            return self.stored.decode()
        return self[:, :].contiguous()


class LazyExperts:
    """``[E, rows, cols]`` expert matrices kept encoded: ``stack[e]`` is expert ``e``'s
    :class:`LazyMatrix`, which decodes the blocks a weight pass reads when it reads them."""

    def __init__(self, matrices: list[LazyMatrix]):
        if not matrices:
            raise CheckpointError("a layer needs at least one expert; the checkpoint names none")
        self.matrices = matrices
        self.shape = torch.Size((len(matrices), *matrices[0].shape))
        self.dtype, self.device = matrices[0].dtype, matrices[0].device

    def __len__(self) -> int:
        return len(self.matrices)

    def dim(self) -> int:
        return 3

    def __getitem__(self, e: int) -> LazyMatrix:
        if not isinstance(e, int):
            raise IndexError(f"a lazily decoded expert stack is indexed by one expert; got {e!r}")
        return self.matrices[e]

    def index_select(self, dim: int, index: Tensor) -> LazyExperts:
        """The experts ``index`` (``dim`` 0), still encoded."""
        if dim != 0:
            raise IndexError(f"a lazily decoded expert stack selects experts (dim 0); got dim {dim}")
        return LazyExperts([self.matrices[int(i)] for i in index.tolist()])


# ---- a checkpoint's tensors, decoded by name ----------------------------------------------------
class StoredTensors(Protocol):
    """What :class:`QuantizedTensors` needs of a checkpoint reader."""

    def has(self, name: str) -> bool: ...
    def mapped(self, name: str) -> Tensor: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def stored_dtype(self, name: str) -> str: ...


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def ignored_layer(name: str, num_layers: int | None) -> bool:
    """Whether ``name`` belongs to a layer at index ``>= num_layers`` (e.g. DeepSeek-V3's
    multi-token-prediction layer 61), which transformers does not load."""
    if num_layers is None:
        return False
    match = _LAYER.search(name)
    return match is not None and int(match.group(1)) >= num_layers


class QuantizedTensors:
    """Logical tensor names of a quantized checkpoint, decoded on request.

    A name the checkpoint stores plainly is not quantized (routers, norms, biases, modules left
    out of quantization); ``X`` is quantized when the scheme's parts of it are stored:
    ``X`` in float8 plus ``X_scale_inv`` (FP8), ``X_blocks`` + ``X_scales`` (MXFP4), or
    ``X_packed`` + ``X_scale`` (pack-quantized, for ``X = ....weight``).
    """

    def __init__(self, reader: StoredTensors, scheme: QuantScheme, dtype: torch.dtype):
        self.reader, self.scheme, self.dtype = reader, scheme, dtype

    def _parts(self, name: str) -> dict[str, str] | None:
        r, method = self.reader, self.scheme.method
        if method == "fp8":
            if r.has(name) and r.stored_dtype(name) in _FP8_STORED:
                scale = f"{name}_scale_inv"
                return {"weight": name, "scale": scale} if r.has(scale) else {"weight": name}
        elif method == "mxfp4":
            blocks, scales = f"{name}_blocks", f"{name}_scales"
            if not r.has(name) and r.has(blocks) and r.has(scales):
                return {"blocks": blocks, "scales": scales}
        elif method == "pack-quantized":
            packed, scale = f"{name}_packed", f"{name}_scale"
            if not r.has(name) and r.has(packed) and r.has(scale):
                parts = {"packed": packed, "scale": scale}
                for extra in ("shape", "zero_point", "g_idx"):
                    if r.has(f"{name}_{extra}"):
                        parts[extra] = f"{name}_{extra}"
                return parts
        return None

    def is_quantized(self, name: str) -> bool:
        return self._parts(name) is not None

    def has(self, name: str) -> bool:
        """Whether ``name`` is stored, plainly or quantized."""
        return self.reader.has(name) or self._parts(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        """The decoded shape of ``name``."""
        parts = self._parts(name)
        if parts is None:
            return self.reader.shape(name)
        if "blocks" in parts:
            e, out, groups, width = self.reader.shape(parts["blocks"])
            return (e, groups * width * 2, out)
        if "packed" in parts:
            return (self.reader.shape(parts["packed"])[0], self._cols(parts))
        return self.reader.shape(name)

    def _cols(self, parts: dict[str, str]) -> int:
        if "shape" in parts:
            return int(self.reader.mapped(parts["shape"]).reshape(-1)[-1])
        scale = self.reader.shape(parts["scale"])
        if self.scheme.group_size is None:
            return self.reader.shape(parts["packed"])[-1] * (32 // self.scheme.num_bits)
        return scale[-1] * self.scheme.group_size

    def get(self, name: str) -> Tensor:
        """``name`` decoded to this checkpoint's dtype (a plain tensor is returned as stored)."""
        parts = self._parts(name)
        if parts is None:
            return self.reader.mapped(name)
        if "blocks" in parts:
            pieces = self.expert_pieces(name)
            assert pieces is not None
            e, inner, outer = self.shape(name)
            full = torch.empty((e, outer, inner), dtype=self.dtype)
            for i, piece in enumerate(pieces):
                full[i] = piece.t()
            return full.transpose(1, 2)
        return self._decode_2d(name, parts)

    def _decode_2d(self, name: str, parts: dict[str, str]) -> Tensor:
        return self._encoded_2d(parts).decode()

    def _encoded_2d(self, parts: dict[str, str]) -> EncodedMatrix:
        r = self.reader
        if "weight" in parts:  # float8 without a scale: the values as stored (exact in any float type)
            scale = r.mapped(parts["scale"]) if "scale" in parts else torch.ones(())
            return FP8Matrix(r.mapped(parts["weight"]), scale, self.scheme.block, self.dtype)
        if "g_idx" in parts:
            raise _refuse(f"compressed-tensors with an activation-order permutation ({parts['g_idx']})")
        zero = r.mapped(parts["zero_point"]) if "zero_point" in parts else None
        return PackedMatrix(
            r.mapped(parts["packed"]), r.mapped(parts["scale"]), self._cols(parts), self.scheme, zero, self.dtype
        )

    def encoded(self, name: str) -> list[EncodedMatrix] | EncodedMatrix | None:
        """``name`` kept encoded on its memory map: one :class:`EncodedMatrix` for a 2-D quantized
        tensor, one per expert (stored orientation ``[out, in]``) for a fused MXFP4 tensor; None
        when ``name`` is stored plainly."""
        parts = self._parts(name)
        if parts is None:
            return None
        if "blocks" not in parts:
            return self._encoded_2d(parts)
        blocks, scales = self.reader.mapped(parts["blocks"]), self.reader.mapped(parts["scales"])
        return [MXFP4Matrix(blocks[e], scales[e], self.dtype) for e in range(blocks.shape[0])]

    def expert_pieces(self, name: str) -> Iterator[Tensor] | None:
        """Expert by expert, the decoded ``name[e]`` of a fused MXFP4 tensor, in the layout
        transformers gives it (``[in, out]``, a transposed view); None when ``name`` is not one."""
        matrices = self.encoded(name)
        if not isinstance(matrices, list):
            return None
        return (m.decode().t() for m in matrices)


def model_dtype(config: dict) -> torch.dtype:
    """The dtype a quantized checkpoint decodes to: its config's ``torch_dtype`` (``dtype``) when
    that is a float type, else bfloat16 (what transformers loads such checkpoints in)."""
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = getattr(torch, str(name), None) if isinstance(name, str) else None
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
