"""How a model id is named: the folder its runs and results go to, and the label pages show."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from moe_utils.core.errors import MoEUtilsError
from moe_utils.core.paths import BOOK_FOLDER


def looks_local(text: str) -> bool:
    """Whether a model id names a local folder (a path, or an existing directory)."""
    return text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().is_dir()


def _clean(slug: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", slug).strip("-.")


def model_slug(model: str | os.PathLike[str], revision: str | None = None) -> str:
    """Folder name for a model id (and hub revision); two different checkpoints never share one.

    ``zoo:tiny-moe-upcycled`` -> ``tiny-moe-upcycled``; ``random:mixtral`` -> ``random-mixtral``;
    hub id ``org/Name`` -> ``org--Name`` (``org--Name--rev-abc123`` with a revision); a local
    folder -> its base name plus 8 hex digits of a hash of its absolute location, so ``a/hf`` and
    ``b/hf`` get different folders. Characters outside ``[A-Za-z0-9._-]`` become ``-``.
    """
    text = os.fspath(model).strip()
    if not text:
        raise MoEUtilsError("empty model id: pass a zoo name (zoo:NAME), a hub id or a local folder")
    if looks_local(text):
        where = Path(text).expanduser().resolve()
        digest = hashlib.sha256(os.fsencode(where)).hexdigest()[:8]
        slug = f"{_clean(where.name) or 'model'}-{digest}"
    elif text.startswith("zoo:"):
        slug = text[len("zoo:") :]
    else:
        slug = text.replace("/", "--").replace(":", "-")
    if revision:
        slug += f"--rev-{_clean(str(revision))[:40]}"
    slug = _clean(slug)
    if not slug:
        raise MoEUtilsError(f"cannot make a folder name from model id {text!r}")
    if slug == BOOK_FOLDER:
        slug = f"{BOOK_FOLDER}-model"
    return slug


def model_label(model: str | os.PathLike[str]) -> str:
    """How pages name a model: the id as given, but a local folder by its name only.

    Published pages never show a local absolute path (``/home/me/ckpt/hf`` is shown as ``hf``).
    """
    text = os.fspath(model).strip()
    if looks_local(text):
        return Path(text).expanduser().resolve().name or text
    return text
