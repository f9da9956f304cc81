"""A quantized checkpoint's tensors by their logical names, decoded on request.

Hub checkpoints of large MoE models often store their experts quantized. The formats that carry
enough information to recover the published weights exactly, as transformers itself would load
them on a CPU, are read here: :mod:`~moe_utils.models.quant_schemes` says which format config.json
declares (and refuses every other, before a tensor is read), :mod:`~moe_utils.models.quant_codecs`
decodes each stored matrix window by window, and :mod:`~moe_utils.models.lazy_experts` keeps
expert stacks encoded for the weight passes. :class:`QuantizedTensors` ties them to a checkpoint
reader: a whole tensor is decoded in row bands of bounded float32 scratch, fused MXFP4 tensors
expert by expert (:meth:`QuantizedTensors.expert_pieces`), so nothing beyond the decoded result is
held.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol

import torch

from moe_utils.models.quant_codecs import EncodedMatrix, FP8Matrix, MXFP4Matrix, PackedMatrix
from moe_utils.models.quant_schemes import QuantScheme, refuse

Tensor = torch.Tensor

_FP8_STORED = ("F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2")


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
            raise refuse(f"compressed-tensors with an activation-order permutation ({parts['g_idx']})")
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


__all__ = ["QuantizedTensors", "StoredTensors", "ignored_layer"]
