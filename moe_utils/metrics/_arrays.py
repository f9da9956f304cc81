"""Array conversion shared by the metric modules (torch tensors or numpy arrays in, numpy out)."""

from __future__ import annotations

from typing import Any

import numpy as np

ArrayLike = Any  # numpy array, torch tensor, or anything np.asarray accepts


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy(x: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    """Return ``x`` as a numpy array of ``dtype`` (``None`` keeps the dtype).

    Torch tensors are detached and moved to the CPU; bfloat16/float16 tensors are widened in
    torch first because numpy cannot represent bfloat16.
    """
    if _is_torch(x):
        import torch

        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if dtype is not None:
            if np.dtype(dtype) == np.float64:
                t = t.to(torch.float64)
            elif np.dtype(dtype) == np.float32 or t.dtype in (torch.bfloat16, torch.float16):
                t = t.to(torch.float32)
        elif t.dtype in (torch.bfloat16,):
            t = t.to(torch.float32)
        arr = t.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)
    arr = np.asarray(x)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def flatten_rows(x: ArrayLike) -> ArrayLike:
    """Reshape ``[n, ...]`` to ``[n, prod(...)]`` without copying when the input is contiguous."""
    if _is_torch(x):
        return x.reshape(x.shape[0], -1)
    arr = np.asarray(x)
    return arr.reshape(arr.shape[0], -1)


def column_chunk(x: ArrayLike, start: int, stop: int) -> np.ndarray:
    """Columns ``start:stop`` of a 2-D tensor/array as a float64 numpy array (the only copy made)."""
    return to_numpy(x[:, start:stop], np.float64)
