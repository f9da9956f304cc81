"""Small typed helpers for pandas code whose inline annotations are looser than its behaviour."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np


def int_key(key: Hashable) -> int:
    """A ``groupby`` key of an integer column (e.g. ``layer``) as an ``int``; pandas types group
    keys as ``Hashable``. Converts as ``int(key)`` does; raises TypeError for anything else."""
    if isinstance(key, (int, float, str, np.integer, np.floating)):
        return int(key)
    raise TypeError(f"expected a numeric group key, got {key!r} ({type(key).__name__})")


__all__ = ["int_key"]
