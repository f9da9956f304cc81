"""Fixtures shared by the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds pyproject.toml, _config.yml, notebooks/)."""
    return REPO_ROOT
