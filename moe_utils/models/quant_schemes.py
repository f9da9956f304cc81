"""Which quantized formats a checkpoint declares, and the one-line refusal of every other.

:func:`quant_scheme` reads config.json's ``quantization_config`` before any tensor is read: the
formats :mod:`~moe_utils.models.quant_codecs` decodes exactly (fine-grained FP8, MXFP4 and
compressed-tensors ``pack-quantized`` integers) give a :class:`QuantScheme`; any other raises
:class:`~moe_utils.core.errors.UnsupportedQuantizationError` naming the format and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_utils.core.errors import UnsupportedQuantizationError

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


def refuse(what: str) -> UnsupportedQuantizationError:
    """The one-line error for a checkpoint quantized as ``what``."""
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
        raise refuse(f"an unreadable quantization_config ({qc!r})")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt not in ("e4m3", "e5m2"):
            raise refuse(f"FP8 with fmt {fmt!r}")
        size = qc.get("weight_block_size")
        block = None if size is None else (int(size[0]), int(size[1]))
        return QuantScheme("fp8", block=block)
    if method == "mxfp4":
        return QuantScheme("mxfp4")
    if method == "compressed-tensors":
        return _compressed_scheme(qc)
    name = _NAMES.get(method, repr(method) if method else "an unnamed quant_method")
    raise refuse(f"{name} (quantization_config.quant_method {method!r})")


def _compressed_scheme(qc: dict) -> QuantScheme:
    """The weight arguments of a compressed-tensors config; only ``pack-quantized`` integers with
    one set of weight arguments, quantized per group or per output channel, are decoded."""
    groups = qc.get("config_groups") or {}
    formats = {str(g.get("format") or qc.get("format") or "") for g in groups.values()} or {str(qc.get("format"))}
    if formats != {"pack-quantized"}:
        raise refuse(f"compressed-tensors format {', '.join(sorted(formats))}")
    args = [g.get("weights") for g in groups.values() if g.get("weights")]
    if not args or any(a != args[0] for a in args):
        raise refuse("compressed-tensors pack-quantized with several different weight schemes")
    w = args[0]
    bits, kind, strategy = int(w.get("num_bits", 0)), str(w.get("type", "int")), str(w.get("strategy", "group"))
    if kind != "int" or bits not in (2, 4, 8) or strategy not in ("group", "channel"):
        raise refuse(f"compressed-tensors pack-quantized {kind}{bits} per {strategy}")
    if w.get("actorder") not in (None, False, "static", "weight"):
        raise refuse(f"compressed-tensors pack-quantized with actorder {w.get('actorder')!r} (a g_idx permutation)")
    group = int(w["group_size"]) if strategy == "group" else None
    return QuantScheme("pack-quantized", num_bits=bits, group_size=group, symmetric=bool(w.get("symmetric", True)))


def model_dtype(config: dict) -> torch.dtype:
    """The dtype a quantized checkpoint decodes to: its config's ``torch_dtype`` (``dtype``) when
    that is a float type, else bfloat16 (what transformers loads such checkpoints in)."""
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = getattr(torch, str(name), None) if isinstance(name, str) else None
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


__all__ = ["QuantScheme", "model_dtype", "quant_scheme", "refuse"]
