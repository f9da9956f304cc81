"""The enlarged training stream of the ladder's long runs (the training-length axis).

The organisms see their training stream about 1.2 times. A run 4x as long on the same stream
would see it about 5 times, and any change of the observations with training length could then
be memorisation. The long runs therefore train on a stream 4x as large, so they see it as often
as the organisms see theirs. The stream is the organisms' stream followed by documents they never
saw, taken in a fixed order until the target length is reached:

1. the standard-library source files the organisms' corpus left out (its source sample keeps
   about half of them);
2. the docstrings and source of the Python packages installed with this project, package by
   package in :data:`EXTENSION_PACKAGES` order, files sorted by path.

No document is added whose key is held out by the organisms' split rule (a standard-library path
keeps its key, so a held-out file's source never enters), and no text is added twice or when it
equals a document already in the corpus (train or held out), since vendored copies are common in
site-packages. The tokenizer and the held-out split are the organisms' own: held-out losses stay
comparable across the whole study.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from moe_utils.zoo.corpus import (
    Corpus,
    Document,
    build_corpus,
    extract_docstrings,
    is_heldout,
    iter_stdlib_files,
    keep_source,
    read_source,
)

# Installed with the project (or with Python); large, documented, and written in Python.
EXTENSION_PACKAGES: tuple[str, ...] = (
    "numpy",
    "scipy",
    "pandas",
    "sklearn",
    "statsmodels",
    "transformers",
    "torch",
    "altair",
    "tokenizers",
    "safetensors",
    "accelerate",
)
LONG_STREAM_FILE = "train_ids_long.npy"
LONG_META_FILE = "train_ids_long.json"
#: The shipped copy of the long stream's :data:`LONG_META_FILE`, beside the replicates' results.
LONG_CORPUS_FILE = "long_corpus.json"


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def _package_root(name: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def candidate_documents(
    stdlib_root: Path | None = None, packages: Sequence[str] = EXTENSION_PACKAGES, package_roots: dict | None = None
) -> Iterator[Document]:
    """Every document the extension may use, in the order it is taken (before any filtering)."""
    for rel, path in iter_stdlib_files(stdlib_root):
        if keep_source(rel):
            continue  # already in the organisms' corpus
        text = read_source(path)
        if text and text.strip():
            yield Document(f"source/{rel}", "source", rel, text.strip())
    for name in packages:
        root = (package_roots or {}).get(name) or _package_root(name)
        if root is None:
            continue
        for rel, path in iter_stdlib_files(Path(root)):  # any root: sorted, test folders skipped
            text = read_source(path)
            if not text or not text.strip():
                continue
            key = f"site-packages/{name}/{rel}"
            docs = extract_docstrings(text)
            if docs:
                yield Document(f"docstrings/{key}", "docstrings", key, "\n\n".join(docs))
            yield Document(f"source/{key}", "source", key, text.strip())


def extension_documents(base: Corpus, candidates: Iterable[Document]) -> Iterator[Document]:
    """``candidates`` without held-out keys and without any text seen before (in ``base`` or earlier)."""
    seen = {_text_digest(d.text) for d in (*base.train, *base.heldout)}
    for doc in candidates:
        if is_heldout(doc.key):
            continue
        digest = _text_digest(doc.text)
        if digest in seen:
            continue
        seen.add(digest)
        yield doc


def long_stream(
    base_stream: np.ndarray, documents: Iterable[Document], tokenizer, target_tokens: int, eos_id: int = 2
) -> tuple[np.ndarray, dict]:
    """``base_stream`` followed by ``documents`` (each ended by ``</s>``) until ``target_tokens``.

    Returns the stream (uint16, like the organisms') and what it holds: documents and tokens per
    source (``stdlib`` or the package name), and whether the candidates ran out first.
    """
    parts = [np.asarray(base_stream, dtype=np.uint16)]
    total = len(base_stream)
    holds: dict[str, dict[str, int]] = {}
    for doc in documents:
        if total >= target_tokens:
            break
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        parts.append(np.asarray([*ids, eos_id], dtype=np.uint16))
        total += len(ids) + 1
        source = doc.key.split("/")[1] if doc.key.startswith("site-packages/") else "stdlib"
        entry = holds.setdefault(source, {"documents": 0, "tokens": 0})
        entry["documents"] += 1
        entry["tokens"] += len(ids) + 1
    stream = np.concatenate(parts)
    meta = {
        "base_tokens": len(base_stream),
        "tokens": len(stream),
        "target_tokens": int(target_tokens),
        "reached_target": len(stream) >= target_tokens,
        "added": holds,
    }
    return stream, meta


def prepare_long(prepared: Path, factor: int, tokenizer, log=print) -> np.ndarray:
    """The long runs' stream under ``prepared`` (built once, then reused), ``factor`` x the base."""
    prepared = Path(prepared)
    path, meta_path = prepared / LONG_STREAM_FILE, prepared / LONG_META_FILE
    if path.exists() and meta_path.exists():
        return np.load(path)
    base_stream = np.load(prepared / "train_ids.npy")
    corpus = build_corpus()
    log(f"enlarging the training stream {factor}x for the long runs ...")
    stream, meta = long_stream(
        base_stream, extension_documents(corpus, candidate_documents()), tokenizer, factor * len(base_stream)
    )
    versions = {}
    for name in EXTENSION_PACKAGES:
        dist = {"sklearn": "scikit-learn"}.get(name, name)
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    meta.update(
        factor=factor,
        package_versions=versions,
        sha256=hashlib.sha256(stream.tobytes()).hexdigest(),
        rules="standard-library sources left out of the organisms' sample, then the listed packages' "
        "docstrings and sources; held-out keys and repeated texts skipped",
    )
    np.save(path, stream)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return stream


def describe_long_stream(meta: dict) -> str:
    """What the long runs' stream holds, in one paragraph, from its manifest (:data:`LONG_META_FILE`)."""
    versions = meta.get("package_versions") or {}
    parts = []
    for source, entry in (meta.get("added") or {}).items():
        what = (
            "standard-library source files the organisms' sample left out"
            if source == "stdlib"
            else f"files of {source} {versions.get(source) or ''}".rstrip() + " (docstrings and sources)"
        )
        parts.append(f"{entry['documents']:,} {what}, {entry['tokens']:,} tokens")
    reached = "" if meta.get("reached_target") else " (the candidate documents ran out before the target)"
    return (
        f"The 4x runs' training stream holds {meta['tokens']:,} tokens{reached}: the organisms' "
        f"{meta['base_tokens']:,}, then " + "; ".join(parts) + f". Its SHA-256 is `{meta.get('sha256', '')[:16]}...`."
    )
