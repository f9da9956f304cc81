"""Expert stacks of a quantized checkpoint kept encoded: the decoded layer is never held whole.

The weight passes of observation 1 read a few neurons of every expert at a time.
:class:`LazyExperts` stands in for an ``[E, rows, cols]`` stack of decoded experts and
:class:`LazyMatrix` for one expert's matrix: each indexing decodes only the window it asks for,
through the format's :class:`~moe_utils.models.quant_codecs.EncodedMatrix`, equal bit for bit to
the same part of the eager decode.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from moe_utils.core.errors import CheckpointError
from moe_utils.models.quant_codecs import EncodedMatrix, band_rows

Tensor = torch.Tensor


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
        step = band_rows(cols)
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


__all__ = ["LAZY_BAND_ELEMENTS", "LazyExperts", "LazyMatrix"]
