"""Array conversion shared by the metric modules (torch tensors or numpy arrays in, numpy out)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

ArrayLike = Any  # numpy array, torch tensor, a LazyMatrix, or anything np.asarray accepts


@runtime_checkable
class LazyMatrix(Protocol):
    """A 2-D matrix kept encoded (an expert of a quantized checkpoint) that decodes only the part it
    is indexed with: ``m[a:b]`` (rows) and ``m[:, a:b]`` (columns) are torch tensors of ``dtype``,
    ``decoded()`` the whole matrix. The block walks read it block by block like a tensor."""

    shape: Any
    dtype: Any

    def __getitem__(self, index: Any) -> Any: ...
    def decoded(self) -> Any: ...


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def is_lazy(x: Any) -> bool:
    """Whether ``x`` is a :class:`LazyMatrix` (decoded where it is indexed), not an array."""
    return not _is_torch(x) and not isinstance(x, np.ndarray) and isinstance(x, LazyMatrix)


def to_numpy(x: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    """Return ``x`` as a numpy array of ``dtype`` (``None`` keeps the dtype).

    Torch tensors are detached and moved to the CPU; bfloat16/float16 tensors are widened in
    torch first because numpy cannot represent bfloat16. A :class:`LazyMatrix` is decoded whole
    (one matrix) first.
    """
    if is_lazy(x):
        x = x.decoded()
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
