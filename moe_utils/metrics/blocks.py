"""Bounded float32 working blocks of (possibly bfloat16, possibly huge) expert matrices.

The metrics of a Mixtral-width layer (8 experts x 14336 x 4096) never convert a whole matrix:
they walk its *neurons* (rows of W_up / W_act, columns of W_down) a block at a time, each block
converted once into a C-contiguous float32 numpy array of at most ``BLOCK_ELEMENTS`` elements.
Torch tensors are converted in torch (numpy has no bfloat16); numpy arrays are cast directly.
float64 inputs are kept in float64. Every block is a fresh copy (callers modify it in place).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ._arrays import ArrayLike, _is_torch

#: float32 elements per working block (64 MiB).
BLOCK_ELEMENTS = 16 * 1024 * 1024


def _rows_f32(x: ArrayLike, start: int, stop: int, transposed: bool) -> np.ndarray:
    """Rows ``start:stop`` of ``x`` (or of ``x.T`` when ``transposed``) as C-contiguous float32
    (float64 inputs stay float64, so nothing is lost for them)."""
    if _is_torch(x):
        import torch

        part = x[:, start:stop].T if transposed else x[start:stop]
        part = part.detach()
        if part.device.type != "cpu":
            part = part.cpu()
        out = torch.empty(tuple(part.shape), dtype=torch.float64 if part.dtype == torch.float64 else torch.float32)
        out.copy_(part)                  # always a fresh block: callers work on it in place
        return out.numpy()
    a = np.asarray(x)
    part = a[:, start:stop].T if transposed else a[start:stop]
    return np.array(part, dtype=np.float64 if a.dtype == np.float64 else np.float32, order="C", copy=True)


def neuron_count(matrix: ArrayLike, axis: int) -> int:
    """Number of neurons of one ``[I, H]`` (axis 0) or ``[H, I]`` (axis 1) matrix."""
    return int(matrix.shape[axis])


def neuron_rows(matrix: ArrayLike, axis: int, start: int, stop: int) -> np.ndarray:
    """Neurons ``start:stop`` of one matrix as float32 rows ``[stop-start, H]``."""
    if axis not in (0, 1):
        raise ValueError(f"the neuron axis of one matrix is 0 or 1; got {axis}")
    return _rows_f32(matrix, start, stop, transposed=axis == 1)


def block_size(features: int, items: int = 1, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Neurons per block so that ``items`` blocks of ``features`` columns fit ``block_elements``."""
    return max(1, int(block_elements) // max(1, int(features) * int(items)))


def neuron_blocks(matrix: ArrayLike, axis: int,
                  block_elements: int = BLOCK_ELEMENTS) -> Iterator[tuple[int, np.ndarray]]:
    """``(first neuron, float32 [n, H])`` blocks covering every neuron of one matrix in order."""
    n = neuron_count(matrix, axis)
    step = block_size(int(matrix.shape[1 - axis]), 1, block_elements)
    for start in range(0, n, step):
        yield start, neuron_rows(matrix, axis, start, min(n, start + step))
