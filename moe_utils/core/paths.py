"""Where the package keeps its files: every path constant of the package is defined here.

Paths inside the installed package (shipped models, study results, input texts) work the same from
a clone and from an installed wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_utils.core.errors import CheckpointError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ZOO_MODELS_DIR = PACKAGE_DIR / "zoo" / "models"  # the shipped model organisms
ZOO_STUDY_DIR = PACKAGE_DIR / "zoo" / "study"  # shipped results of the organism study
INPUTS_DATA_DIR = PACKAGE_DIR / "inputs_data"
LONG_HELDOUT_FILE = INPUTS_DATA_DIR / "long_heldout.txt"
# The notebooks of a source checkout (next to the package; absent from an installed wheel).
NOTEBOOKS_DIR = PACKAGE_DIR.parent / "notebooks"
CACHE_ENV = "MOE_UTILS_CACHE"
# The run folder of the book-level notebooks (reserved: no model slug may use it).
BOOK_FOLDER = "book"

ZOO_MODELS: tuple[str, ...] = ("tiny-dense", "tiny-moe-upcycled", "tiny-moe-scratch", "tiny-moe-fine")


def cache_dir() -> Path:
    """The package's cache folder: ``$MOE_UTILS_CACHE``, else ``moe_utils`` in ``$XDG_CACHE_HOME``
    (default ``~/.cache``). Read when called, so a changed environment takes effect."""
    return Path(
        os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe_utils"
    )


def zoo_dir() -> Path:
    """Package folder holding the shipped models."""
    return ZOO_MODELS_DIR


def zoo_path(name: str) -> Path:
    """Folder of a shipped model (config.json, model.safetensors, tokenizer files, README.md).

    Accepts ``"tiny-dense"`` or ``"zoo:tiny-dense"``. Raises ``CheckpointError`` (a
    ``FileNotFoundError``) listing the known names when the name is unknown or the files are missing.
    """
    key = name[4:] if name.startswith("zoo:") else name
    if key not in ZOO_MODELS:
        raise CheckpointError(
            f"unknown zoo model {name!r}; the zoo holds: {', '.join(ZOO_MODELS)} (use e.g. 'zoo:{ZOO_MODELS[1]}')"
        )
    path = ZOO_MODELS_DIR / key
    if not (path / "model.safetensors").exists():
        raise CheckpointError(
            f"zoo model {key!r} is not installed in {path}; rebuild it with "
            f"'moe-book zoo train --models {key} --install' or reinstall the package"
        )
    return path
