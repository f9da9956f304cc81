"""How an exception is quoted inside another message."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (the type alone when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
