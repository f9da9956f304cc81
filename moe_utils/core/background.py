"""Run a loop in a daemon thread beside a block of code, stopped and joined when the block ends."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def beside(work: Callable[[threading.Event], None], join_timeout: float = 5.0) -> Iterator[None]:
    """Start ``work(stop)`` in a daemon thread; on exit set ``stop`` and wait for it (bounded)."""
    stop = threading.Event()
    thread = threading.Thread(target=work, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=join_timeout)
