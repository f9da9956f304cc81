"""Run independent jobs (expert pairs to reorder) over worker processes, with a progress bar.

Workers are forked, so they see the caller's arrays (a layer's weights) without copying or
pickling them; only job indices go in and small results come back. Each worker limits its own
math libraries to its share of the cores. Where ``fork`` is unavailable (Windows, some macOS
setups), or with one worker, the jobs run in this process. Results come back in job order, so
``workers=N`` gives exactly what ``workers=1`` gives.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from ..core.cpus import cpu_cores
from ..core.memory import available_memory
from ..core.progress import progress

_JOB: tuple[Callable[[Any], Any], Sequence[Any]] | None = None


def default_workers(job_bytes: int = 0, cap: int | None = None) -> int:
    """The machine's cores, fewer if ``job_bytes`` of working memory per job would not fit."""
    n = cpu_cores() if cap is None else min(cap, cpu_cores())
    mem = available_memory()
    if job_bytes > 0 and mem is not None:
        n = min(n, max(1, int(0.8 * mem) // int(job_bytes)))
    return max(1, n)


def _init_worker(threads: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def _run(index: int) -> tuple[int, Any, float]:
    if _JOB is None:
        raise RuntimeError("a worker process ran without a job: run_jobs sets _JOB before it forks")
    fn, items = _JOB
    t0 = time.perf_counter()
    out = fn(items[index])
    return index, out, time.perf_counter() - t0


def run_jobs(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int | None = None,
    desc: str = "jobs",
    unit: str = "job",
    job_bytes: int = 0,
) -> list[Any]:
    """``[fn(item) for item in items]``, spread over ``workers`` processes (default: the cores,
    capped by the memory ``job_bytes`` each job needs), with a progress bar showing seconds per job."""
    global _JOB
    items = list(items)
    if not items:
        return []
    if workers is None:
        workers = default_workers(job_bytes)
    workers = max(1, min(int(workers), len(items)))
    results: list[Any] = [None] * len(items)
    bar = progress(total=len(items), desc=desc, unit=unit)
    try:
        if workers == 1 or "fork" not in mp.get_all_start_methods():
            for i, item in enumerate(items):
                t0 = time.perf_counter()
                results[i] = fn(item)
                bar.set_postfix_str(f"{time.perf_counter() - t0:.1f} s/{unit}", refresh=False)
                bar.update(1)
            return results
        _JOB = (fn, items)
        threads = max(1, cpu_cores() // workers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
            with ProcessPoolExecutor(
                workers, mp_context=mp.get_context("fork"), initializer=_init_worker, initargs=(threads,)
            ) as pool:
                futures = [pool.submit(_run, i) for i in range(len(items))]
                for fut in as_completed(futures):
                    i, out, seconds = fut.result()
                    results[i] = out
                    bar.set_postfix_str(f"{seconds:.1f} s/{unit} in {workers} workers", refresh=False)
                    bar.update(1)
        return results
    finally:
        _JOB = None
        bar.close()
