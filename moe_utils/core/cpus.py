"""How many cores this process may use (the default for worker processes and pass threads)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


#: Below this hidden size a model's matrix products are too small for several threads to help:
#: their threads spin-wait for one another, and on a machine with other work running that made
#: each product tens of times slower (``benchmarks/README.md``, "Threads and small models").
SMALL_MODEL_WIDTH = 512


@contextlib.contextmanager
def single_threaded_math(enabled: bool = True) -> Iterator[None]:
    """Inside the block, torch and the BLAS/OpenMP pools run one thread each (no-op when not
    ``enabled``); the previous settings come back afterwards."""
    if not enabled:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def small_model_threads(hidden_size: int) -> contextlib.AbstractContextManager[None]:
    """:func:`single_threaded_math` for a model narrower than :data:`SMALL_MODEL_WIDTH`, else nothing."""
    return single_threaded_math(int(hidden_size) < SMALL_MODEL_WIDTH)
