"""Split one pass over neuron blocks between threads.

The passes over a real-width layer are bound by memory traffic and thin matrix products, which
one BLAS call spreads poorly over cores. Giving each core its own contiguous range of neurons
(each thread with single-threaded math libraries, which release the GIL) keeps every core busy.
The ranges depend only on their number, so a result is reproducible for a given thread count.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import TypeVar

from ..core.cpus import cpu_cores, single_threaded_math

T = TypeVar("T")


def pass_threads(threads: int | None = None) -> int:
    """Threads for a pass: ``threads``, or the cores this process may run on."""
    return max(1, int(threads)) if threads is not None else cpu_cores()


def split_range(total: int, parts: int, step: int = 1) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``0:total`` (fewer when ``total`` is small), with
    inner boundaries on multiples of ``step``."""
    blocks = -(-int(total) // max(1, int(step)))
    parts = max(1, min(int(parts), blocks))
    edges = [min(int(total), (blocks * k // parts) * step) for k in range(parts + 1)]
    edges[-1] = int(total)
    return [(a, b) for a, b in pairwise(edges) if b > a]


def run_split(fn: Callable[[int, int], T], total: int, step: int = 1, threads: int | None = None) -> list[T]:
    """``[fn(a, b) for (a, b) in split_range(total, threads, step)]``, the ranges run in parallel
    threads; results in range order. Math libraries run single-threaded meanwhile, with one
    range as with several: their own threads would only contend for the cores, and spin-waiting
    OpenMP threads make the many small products of a pass several times slower on a busy machine."""
    ranges = split_range(total, pass_threads(threads), step)
    with single_threaded_math():
        if len(ranges) == 1:
            return [fn(*ranges[0])]
        with ThreadPoolExecutor(len(ranges)) as pool:
            return list(pool.map(lambda r: fn(*r), ranges))
