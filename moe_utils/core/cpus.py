"""How many cores this process may use (the default for worker processes and pass threads)."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
