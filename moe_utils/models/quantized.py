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
:func:`quant_scheme`, before a tensor is read. Decoding is streamed: a tensor is decoded in row
bands of bounded float32 scratch, and fused MXFP4 tensors expert by expert
(:meth:`QuantizedTensors.expert_pieces`), so nothing beyond the decoded result is held.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

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
    if weight.dim() != 2:
        raise CheckpointError(f"an FP8 weight must be 2-D; got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    scales = ue8m0_to_float(scale_inv)
    out = torch.empty((rows, cols), dtype=dtype) if out is None else out
    if scales.numel() == 1:
        s = scales.reshape(())
        step = _band_rows(cols)
        for r0 in range(0, rows, step):
            out[r0 : r0 + step] = (weight[r0 : r0 + step].to(torch.float32) * s).to(dtype)
        return out
    if scales.dim() != 2:
        raise CheckpointError(f"FP8 scales must be 2-D per block; got shape {tuple(scales.shape)}")
    grid_r, grid_c = scales.shape
    bm, bn = block if block is not None else (math.ceil(rows / grid_r), math.ceil(cols / grid_c))
    if (math.ceil(rows / bm), math.ceil(cols / bn)) != (grid_r, grid_c):
        raise CheckpointError(
            f"an FP8 weight of shape {rows} x {cols} with {bm} x {bn} blocks needs a "
            f"{math.ceil(rows / bm)} x {math.ceil(cols / bn)} scale grid, but weight_scale_inv is "
            f"{grid_r} x {grid_c}; weight_block_size in config.json does not match the checkpoint"
        )
    full = cols // bn
    step = _band_rows(cols, bm)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        row_scale = scales[r0 // bm : math.ceil(r1 / bm)].repeat_interleave(bm, dim=0)[: r1 - r0]
        band = weight[r0:r1].to(torch.float32)
        if full:  # whole column blocks: the scales broadcast over each block's columns
            band[:, : full * bn].unflatten(-1, (full, bn)).mul_(row_scale[:, :full, None])
        if cols > full * bn:  # the partial last column block
            band[:, full * bn :].mul_(row_scale[:, full:])
        out[r0:r1] = band
    return out


def dequantize_mxfp4_expert(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """One expert's MXFP4 matrix in stored orientation, ``[out, in]``: ``blocks [out, G, 16]``
    (uint8, value ``2j`` in the low nibble of byte ``j``), ``scales [out, G]`` (exponent + 127)."""
    if blocks.dim() != 3 or tuple(blocks.shape[:2]) != tuple(scales.shape):
        raise CheckpointError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
            "([out, groups, 16] and [out, groups]); the checkpoint is corrupt"
        )
    rows, groups, width = blocks.shape
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    pairs = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)  # byte -> (low, high) values
    out = torch.empty((rows, groups * width * 2), dtype=dtype)
    step = _band_rows(groups * width * 2)
    for r0 in range(0, rows, step):
        band = blocks[r0 : r0 + step].contiguous().view(torch.uint8)
        n = band.shape[0]
        values = pairs.index_select(0, band.reshape(-1).to(torch.int32)).view(n, groups, width * 2)
        power = (scales[r0 : r0 + step].view(torch.uint8).to(torch.float32) - 127.0).exp2()
        values.mul_(power[:, :, None])
        out[r0 : r0 + step] = values.view(n, -1)
    return out


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
    rows = packed.shape[0]
    group = scheme.group_size or cols
    if cols % group:
        raise CheckpointError(f"{cols} columns are not a whole number of groups of {group}")
    groups = cols // group
    if scale.numel() != rows * groups:
        raise CheckpointError(
            f"weight_scale has shape {tuple(scale.shape)}, but {rows} rows in groups of {group} need {rows} x {groups}"
        )
    scale = scale.reshape(rows, groups)
    zero = None
    if zero_point is not None and not scheme.symmetric:
        zero = unpack_int(zero_point.t().contiguous(), scheme.num_bits, rows).t().reshape(rows, groups)
    out_dtype = dtype or scale.dtype
    out = torch.empty((rows, cols), dtype=out_dtype)
    step = _band_rows(cols)
    for r0 in range(0, rows, step):
        q = unpack_int(packed[r0 : r0 + step], scheme.num_bits, cols).to(torch.float32).view(-1, groups, group)
        if zero is not None:
            q = q - zero[r0 : r0 + step, :, None].to(torch.float32)
        w = (q * scale[r0 : r0 + step, :, None].to(torch.float32)).to(scale.dtype)
        out[r0 : r0 + step] = w.reshape(-1, cols).to(out_dtype)
    return out


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
        r = self.reader
        if "weight" in parts and "scale" not in parts:  # float8 without a scale: the values as stored
            return r.mapped(parts["weight"]).to(self.dtype)
        if "weight" in parts:
            return dequantize_fp8(r.mapped(parts["weight"]), r.mapped(parts["scale"]), self.scheme.block, self.dtype)
        if "g_idx" in parts:
            raise _refuse(f"compressed-tensors with an activation-order permutation ({parts['g_idx']})")
        zero = r.mapped(parts["zero_point"]) if "zero_point" in parts else None
        return dequantize_packed(
            r.mapped(parts["packed"]), r.mapped(parts["scale"]), self._cols(parts), self.scheme, zero, self.dtype
        )

    def expert_pieces(self, name: str) -> Iterator[Tensor] | None:
        """Expert by expert, the decoded ``name[e]`` of a fused MXFP4 tensor, in the layout
        transformers gives it (``[in, out]``, a transposed view); None when ``name`` is not one."""
        parts = self._parts(name)
        if parts is None or "blocks" not in parts:
            return None
        blocks, scales = self.reader.mapped(parts["blocks"]), self.reader.mapped(parts["scales"])

        def pieces() -> Iterator[Tensor]:
            for e in range(blocks.shape[0]):
                yield dequantize_mxfp4_expert(blocks[e], scales[e], self.dtype).t()

        return pieces()


def model_dtype(config: dict) -> torch.dtype:
    """The dtype a quantized checkpoint decodes to: its config's ``torch_dtype`` (``dtype``) when
    that is a float type, else bfloat16 (what transformers loads such checkpoints in)."""
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = getattr(torch, str(name), None) if isinstance(name, str) else None
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
