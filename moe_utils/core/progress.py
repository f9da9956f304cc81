"""Progress bars for long passes that stay out of the published pages.

Inside ``moe-book run`` the notebook kernels get ``MOE_BOOK_PROGRESS`` naming a log file; bars
are written there (never to the cell outputs that are saved into the book) and the runner relays
the file to its own stderr while the notebook executes (:func:`relay`). Outside a book run the
bars go to stderr as usual, and ``TQDM_DISABLE=1`` switches them off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _std_tqdm

from moe_utils.core.background import beside

PROGRESS_ENV = "MOE_BOOK_PROGRESS"


class _FileBar(_std_tqdm):
    """A plain-text bar that owns (and closes) the file it writes to."""

    _owned_file: TextIO | None  # set by progress() after construction; read with getattr in close

    def close(self) -> None:
        super().close()
        fp = getattr(self, "_owned_file", None)
        if fp is not None and not fp.closed:
            fp.close()


def progress(
    iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, unit: str = "it", **kwargs: Any
) -> _std_tqdm:
    """A tqdm bar: into the file named by ``MOE_BOOK_PROGRESS`` when set, else the usual one."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        fp = open(path, "a", buffering=1, encoding="utf-8")
        bar = _FileBar(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            file=fp,
            disable=False,
            ascii=True,
            ncols=100,
            mininterval=1.0,
            **kwargs,
        )
        bar._owned_file = fp
        return bar
    return _auto_tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, **kwargs)


@contextlib.contextmanager
def relay(path: Path, stream: IO[str] | None = None, interval: float = 0.5) -> Iterator[None]:
    """Copy what is appended to ``path`` onto ``stream`` (default: stderr) until the block ends."""
    out = stream if stream is not None else sys.stderr
    path = Path(path)
    path.touch()

    def pump(stop: threading.Event) -> None:
        with open(path, encoding="utf-8", errors="replace") as f:
            while True:
                chunk = f.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                elif stop.is_set():
                    return
                else:
                    stop.wait(interval)

    with beside(pump):
        yield
