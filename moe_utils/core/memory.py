"""Keep memory-mapped checkpoint pages from piling up in the resident set while a model loads.

``from_pretrained`` reads safetensors through memory maps. When it converts tensors (Mixtral's
per-expert ``w1/w2/w3`` become one fused tensor per layer) every expert byte ends up twice in
the process: once in the new tensor and once as a touched page of the file map, which stays
mapped as long as any tensor still views the file. :func:`shedding_file_pages` asks the kernel
(``madvise(MADV_PAGEOUT)``, Linux 5.4+) to drop the file pages of the given checkpoint files
from this process every fraction of a second while loading and once at the end. Only clean file
pages are dropped; a page that is needed again is read back from the page cache or the disk,
so nothing changes but the resident memory. Elsewhere (no ``/proc/self/maps``, other systems)
this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from moe_utils.core.background import beside

MADV_PAGEOUT = 21


def available_memory() -> int | None:
    """Bytes of memory available for new work (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _mapped_ranges(paths: set[str]) -> list[tuple[int, int]]:
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() in paths:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def release_file_pages(files: Iterable[str | Path]) -> int:
    """Advise the kernel to page out this process's mapped pages of ``files``; returns the bytes
    of the ranges advised (0 where unsupported)."""
    paths = {str(Path(f).resolve()) for f in files}
    ranges = _mapped_ranges(paths)
    if not ranges:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for start, end in ranges:
        if madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT) == 0:
            done += end - start
    return done


@contextlib.contextmanager
def shedding_file_pages(files: Iterable[str | Path], interval: float = 0.2) -> Iterator[None]:
    """Page out mapped pages of ``files`` periodically while the block runs, and once after."""
    files = list(files)

    def loop(stop: threading.Event) -> None:
        while not stop.wait(interval):
            release_file_pages(files)

    try:
        with beside(loop):
            yield
    finally:
        release_file_pages(files)
