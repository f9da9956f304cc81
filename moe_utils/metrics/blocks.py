"""Bounded float32 working blocks of (possibly bfloat16, possibly huge) expert matrices.

The metrics of a Mixtral-width layer (8 experts x 14336 x 4096) never convert a whole matrix:
they walk its *neurons* (rows of W_up / W_act, columns of W_down) a block at a time, each block
converted once into float32 numpy rows of at most ``BLOCK_ELEMENTS`` elements. Torch tensors
are converted in torch (numpy has no bfloat16); numpy arrays are cast directly. float64 inputs
are kept in float64.

Two costs dominate such a pass on a CPU and are avoided here: copying a *transposed* bfloat16
view (W_down's neurons are columns; a strided copy costs about 15 ns per element against about
1 ns for a contiguous one), and first-touch page faults of a fresh buffer per block (about
4 ns per element). :class:`BlockReader` therefore copies the stored layout (a block of W_down's
columns is ``W[:, a:b]``, contiguous runs of ``b - a`` elements) into one reused buffer and hands
out the neuron rows as a transposed numpy *view*; numpy's BLAS products and reductions take such
views without copying. :func:`neuron_rows` still returns a fresh C-contiguous array (the
reordering keeps and permutes whole matrices), built from the contiguous copy by a float32
transpose.

A :class:`~moe_utils.metrics._arrays.LazyMatrix` (an expert of a quantized checkpoint) is read
the same way: each block is decoded from its encoded bytes when the walk reaches it
(:func:`block_source`), so a pass never holds more of it decoded than one block.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import ArgumentError
from ._arrays import ArrayLike, LazyMatrix, _is_torch, is_lazy

if TYPE_CHECKING:
    import torch

#: float32 elements per working block (4 MiB): small enough that the several operations a pass
#: applies to one block find it in the processor's cache, large enough that the per-block Python
#: overhead stays small (measured here on a Mixtral-width W_up, fused first pass and second PCA
#: pass: 1.9 s and 0.62 s at 4 MiB, 2.3 s and 0.91 s at 8 MiB, 2.0 s and 0.61 s at 2 MiB).
BLOCK_ELEMENTS = 1024 * 1024


def _wide(x: ArrayLike) -> bool:
    """Whether ``x`` is float64 (kept in float64, so nothing is lost for it)."""
    return str(x.dtype).endswith("float64")


def _native(x: ArrayLike, start: int, stop: int, transposed: bool) -> ArrayLike:
    """The stored block: rows ``start:stop`` or columns ``start:stop`` (no copy)."""
    part = x[:, start:stop] if transposed else x[start:stop]
    if _is_torch(part):
        part = part.detach()
        if part.device.type != "cpu":
            part = part.cpu()
    return part


class BlockReader:
    """Neuron blocks of matrices as float32 (float64) numpy views into one reused buffer.

    ``rows(matrix, axis, start, stop)`` returns neurons ``start:stop`` as ``[n, H]``: C-contiguous
    for axis 0, a transposed view of the contiguous ``[H, n]`` copy for axis 1. A float32 or
    float64 CPU matrix is not copied at all: the result is a (read-only by convention) view of
    the matrix itself. Otherwise the view is into the reused buffer, valid until the next call.
    """

    def __init__(self, block_elements: int = BLOCK_ELEMENTS):
        self.block_elements = int(block_elements)
        self._bufs: dict[bool, torch.Tensor] = {}

    def _buffer(self, numel: int, wide: bool) -> torch.Tensor:
        import torch

        buf = self._bufs.get(wide)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, self.block_elements), dtype=torch.float64 if wide else torch.float32)
            self._bufs[wide] = buf
        return buf

    def rows(self, matrix: ArrayLike, axis: int, start: int, stop: int) -> np.ndarray:
        if axis not in (0, 1):
            raise ArgumentError(f"the neuron axis of one matrix is 0 or 1; got {axis}")
        import torch

        part = _native(matrix, start, stop, transposed=axis == 1)
        if not _is_torch(part):
            part = torch.from_numpy(np.asarray(part))
        if part.dtype in (torch.float32, torch.float64) and part.stride(-1) == 1:
            arr = part.numpy()  # already in working precision: a view, nothing to convert
            return arr.T if axis == 1 else arr
        shape = tuple(part.shape)
        out = self._buffer(shape[0] * shape[1], _wide(part))[: shape[0] * shape[1]].view(shape)
        out.copy_(part)
        arr = out.numpy()
        return arr.T if axis == 1 else arr


def block_source(matrix: ArrayLike) -> torch.Tensor | LazyMatrix:
    """What a block walk copies its blocks from: a CPU torch tensor (a numpy array is wrapped,
    not copied), or a :class:`~moe_utils.metrics._arrays.LazyMatrix` as it is (decoded block by block)."""
    import torch

    if is_lazy(matrix):
        return matrix
    if _is_torch(matrix):
        return matrix.detach().cpu()
    return torch.from_numpy(np.asarray(matrix))


def neuron_count(matrix: ArrayLike, axis: int) -> int:
    """Number of neurons of one ``[I, H]`` (axis 0) or ``[H, I]`` (axis 1) matrix."""
    return int(matrix.shape[axis])


def neuron_rows(matrix: ArrayLike, axis: int, start: int, stop: int) -> np.ndarray:
    """Neurons ``start:stop`` of one matrix as a fresh C-contiguous float32 array ``[stop-start, H]``
    (float64 inputs stay float64)."""
    if axis not in (0, 1):
        raise ArgumentError(f"the neuron axis of one matrix is 0 or 1; got {axis}")
    import torch

    if not _is_torch(matrix) and not is_lazy(matrix):
        a = np.asarray(matrix)
        part = a[:, start:stop].T if axis == 1 else a[start:stop]
        return np.array(part, dtype=np.float64 if a.dtype == np.float64 else np.float32, order="C", copy=True)
    wide = _wide(matrix)
    n, width = stop - start, int(matrix.shape[1 - axis])
    out = torch.empty((n, width), dtype=torch.float64 if wide else torch.float32)
    if axis == 0:
        out.copy_(_native(matrix, start, stop, False))
        return out.numpy()
    # columns: contiguous copies of bounded column blocks, then a float32 transpose each
    reader = BlockReader()
    step = block_size(width, 1)
    for a in range(start, stop, step):
        b = min(stop, a + step)
        out[a - start : b - start].copy_(torch.from_numpy(reader.rows(matrix, 1, a, b)))
    return out.numpy()


def block_size(features: int, items: int = 1, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Neurons per block so that ``items`` blocks of ``features`` columns fit ``block_elements``."""
    return max(1, int(block_elements) // max(1, int(features) * int(items)))


def neuron_blocks(
    matrix: ArrayLike, axis: int, block_elements: int = BLOCK_ELEMENTS, reader: BlockReader | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first neuron, float32 [n, H])`` blocks covering every neuron of one matrix in order.

    The blocks are views into ``reader``'s buffer (one per call when not given), valid until the
    next block is produced."""
    reader = reader or BlockReader(block_elements)
    n = neuron_count(matrix, axis)
    step = block_size(int(matrix.shape[1 - axis]), 1, block_elements)
    for start in range(0, n, step):
        yield start, reader.rows(matrix, axis, start, min(n, start + step))
