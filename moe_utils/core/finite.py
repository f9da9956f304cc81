"""Checks that the weights and activations an analysis uses are finite.

A NaN or infinity in one expert silently turns similarities into 0, ranks into noise and verdicts
into "holds", so every place that reads weights (``models/weights.py``, ``models/expert_gram.py``)
or produces activations (``models/trace.py``, ``engine/expert_math.py``) checks them and raises
:class:`~moe_utils.core.errors.NonFiniteError` naming the layer, the expert and the tensor.

A :class:`ScreenedSource` wraps a weights source to opt in to the other behaviour for weight-only
analyses: experts with non-finite weights are left out of the layer (and recorded in
``excluded``) instead of stopping the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import NonFiniteError

Tensor = torch.Tensor


def nonfinite_counts(t: Tensor) -> tuple[int, int]:
    """``(number of NaN, number of +-inf)`` entries of ``t``."""
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def is_finite(t: Tensor) -> bool:
    """True when every entry of ``t`` is finite (integer tensors always are).

    Fast path: a NaN or infinity anywhere makes the plain sum NaN or infinite (IEEE arithmetic), so
    a finite sum proves every entry finite; only a non-finite sum (which may also be an overflow of
    large finite values) is checked entry by entry. A sum reads the tensor once without allocating,
    much faster than ``isfinite(t).all()``.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if t.dim() >= 3 and not t.is_contiguous() and t[0].is_contiguous():
        # a stack of matrices with gaps between them (experts mapped from a file): torch reduces
        # such a view ~20x slower than its contiguous parts
        return all(is_finite(part) for part in t)
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(t: Tensor | None, layer: int | None, expert: int | str | None, tensor: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` if ``t`` holds NaN or infinity (``None`` passes)."""
    if t is not None and not is_finite(t):
        raise NonFiniteError(layer, expert, tensor, *nonfinite_counts(t), hint=hint)


@dataclass
class ScreenedSource:
    """A weights source (LoadedModel, module or folder) whose invalid experts are excluded.

    Weight readers that receive it drop every expert with a non-finite router row, matrix or bias
    from the layer (an invalid shared expert or dense "F" MLP is dropped too) and append one
    record per offending tensor to ``excluded``: ``layer, expert, tensor, n_nan, n_inf``.
    """

    source: Any
    excluded: list[dict[str, Any]] = field(default_factory=list)

    def record(self, err: NonFiniteError) -> None:
        """Remember one excluded tensor."""
        self.excluded.append(
            {"layer": err.layer, "expert": err.expert, "tensor": err.tensor, "n_nan": err.n_nan, "n_inf": err.n_inf}
        )


def unwrap(source: Any) -> tuple[Any, ScreenedSource | None]:
    """``(underlying source, screen or None)``."""
    if isinstance(source, ScreenedSource):
        return source.source, source
    return source, None
