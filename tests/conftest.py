"""Fixtures shared by the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds pyproject.toml, _config.yml, notebooks/)."""
    return REPO_ROOT


def pytest_configure(config: pytest.Config) -> None:
    """A fresh cache folder per test run (derived family specs, file hashes), shared with the
    notebook kernels the tests start: a spec cached by an earlier version of the code must not
    stand in for deriving it now."""
    import os
    import tempfile

    os.environ["MOE_UTILS_CACHE"] = tempfile.mkdtemp(prefix="moe-utils-cache-")
