"""Identity of a checkpoint: content hashes of its files (cached across processes) and the short
fingerprint that results files carry, so results computed on other weights are never taken for
these; the Hugging Face cache's own hashes and revisions are used where the folder is one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moe_utils.core import paths
from moe_utils.core.files import atomic_write_text
from moe_utils.core.files import file_sha256 as content_sha256
from moe_utils.models.checkpoint import WeightFiles

_HEX64 = frozenset("0123456789abcdef")


def hash_cache_path() -> Path:
    """JSON file caching file hashes by (path, size, mtime): ``file-hashes.json`` in the package
    cache folder (:func:`moe_utils.core.paths.cache_dir`)."""
    return paths.cache_dir() / "file-hashes.json"


_HASHES: dict[str, str] = {}


def _load_hash_cache() -> dict[str, str]:
    try:
        data = json.loads(hash_cache_path().read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_hash_cache(entries: dict[str, str]) -> None:
    path = hash_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**_load_hash_cache(), **entries}))
    except OSError:
        pass  # a cache only: a read-only home folder costs a rehash next time


def _hub_blob_sha256(path: Path) -> str | None:
    """The SHA-256 that names a Hugging Face cache blob (LFS files), read from the symlink."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    name = target.name
    if target.parent.name == "blobs" and len(name) == 64 and set(name) <= _HEX64:
        return name
    return None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content; cached by (absolute path, size, mtime) across processes.

    A file of the Hugging Face cache is named by its hash already (its etag); that name is used
    without reading the file.
    """
    path = Path(path)
    blob = _hub_blob_sha256(path)
    if blob is not None:
        return blob
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _HASHES:
        return _HASHES[key]
    cached = _load_hash_cache().get(key)
    if cached is None:
        cached = content_sha256(path)
        _save_hash_cache({key: cached})
    _HASHES[key] = cached
    return cached


def hub_revision(folder: str | Path) -> str | None:
    """The commit of a Hugging Face cache snapshot folder (``.../snapshots/<commit>``), else None."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and len(folder.name) == 40 and set(folder.name) <= _HEX64:
        return folder.name
    return None


def checkpoint_fingerprint(config: dict, files: WeightFiles | None) -> str:
    """Short stable hash of config.json content plus each weight file's name and content hash.

    Changing a single byte of any weight file changes it; content hashes are cached by
    (path, size, mtime), so only new or modified files are read.
    """
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    if files is not None:
        for path in sorted(files.files, key=lambda p: p.name):
            digest.update(f"{path.name}:{path.stat().st_size}:{file_sha256(path)}".encode())
    return digest.hexdigest()[:16]
