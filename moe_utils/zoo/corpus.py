"""Training corpus of the model organisms, built from text every CPython installation carries.

Three kinds of document, all read without importing any standard-library module:

* ``topics/<name>``     -- the documentation topics of ``pydoc_data.topics`` (English prose);
* ``docstrings/<path>`` -- the docstrings of one standard-library ``.py`` file (found with ``ast``);
* ``source/<path>``     -- the source code of one standard-library ``.py`` file.

Paths are walked in sorted order and test suites, IDLE and site-packages are skipped, so the
corpus is a deterministic function of the Python installation. A document is held out when a
hash of its *key* (topic name or file path, shared by a file's docstrings and source) falls in
the held-out bucket, so no held-out docstring is also seen inside a training source file.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__", "dist-packages"})
HELDOUT_PER_MILLE = 20  # ~2 % of documents are held out
SOURCE_PER_MILLE = 500  # share of source files kept (training-time budget; docs/docstrings all kept)


@dataclass(frozen=True)
class Document:
    """One corpus document: a stable name, its kind and its text."""

    name: str
    kind: str  # "topics" | "docstrings" | "source"
    key: str  # what the split hashes (topic name or file path)
    text: str


@dataclass
class Corpus:
    """A deterministic train / held-out split of the documents, with provenance."""

    train: list[Document]
    heldout: list[Document]
    meta: dict = field(default_factory=dict)

    def texts(self, split: str = "train") -> list[str]:
        """Texts of one split (``"train"`` or ``"heldout"``), in corpus order."""
        docs = self.train if split == "train" else self.heldout
        return [d.text for d in docs]


def _bucket(key: str) -> int:
    """A stable integer in [0, 1000) from a key (sha256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 1000


def is_heldout(key: str, per_mille: int = HELDOUT_PER_MILLE) -> bool:
    """Whether a document key belongs to the held-out split."""
    return _bucket(key) < per_mille


def keep_source(key: str, per_mille: int = SOURCE_PER_MILLE) -> bool:
    """Whether a source file is kept (an independent hash from the held-out one)."""
    return _bucket("source-sample:" + key) < per_mille


def stdlib_dir() -> Path:
    """Folder of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_files(root: Path | None = None) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix path, path)`` of standard-library ``.py`` files in sorted order."""
    root = Path(root) if root is not None else stdlib_dir()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        found.append((rel.as_posix(), path))
    yield from sorted(found)


def read_source(path: Path) -> str | None:
    """The file's text as UTF-8, or None when it does not decode (such files are skipped)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def extract_docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of a Python source text, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            out.append(doc.strip())
    return out


def topic_documents() -> list[Document]:
    """The pydoc documentation topics, one document per topic, sorted by name."""
    from pydoc_data.topics import topics  # data module: a dict of strings, no side effects

    return [
        Document(f"topics/{name}", "topics", f"topics/{name}", topics[name].strip())
        for name in sorted(topics)
        if topics[name].strip()
    ]


def stdlib_documents(
    root: Path | None = None,
    limit_files: int | None = None,
    source_per_mille: int = SOURCE_PER_MILLE,
) -> tuple[list[Document], list[Document]]:
    """Docstring documents and (sub-sampled) source documents of the standard library."""
    docstrings, sources = [], []
    for i, (rel, path) in enumerate(iter_stdlib_files(root)):
        if limit_files is not None and i >= limit_files:
            break
        text = read_source(path)
        if text is None:
            continue
        docs = extract_docstrings(text)
        if docs:
            docstrings.append(Document(f"docstrings/{rel}", "docstrings", rel, "\n\n".join(docs)))
        if text.strip() and keep_source(rel, source_per_mille):
            sources.append(Document(f"source/{rel}", "source", rel, text.strip()))
    return docstrings, sources


def content_hash(docs: Iterable[Document]) -> str:
    """sha256 over names and texts (length-prefixed), independent of the split."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d.name, d.text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "big"))
            h.update(b)
    return h.hexdigest()


def build_corpus(
    root: Path | None = None,
    limit_files: int | None = None,
    heldout_per_mille: int = HELDOUT_PER_MILLE,
    source_per_mille: int = SOURCE_PER_MILLE,
    include_topics: bool = True,
) -> Corpus:
    """Extract, split and describe the corpus (deterministic for a given Python installation).

    ``limit_files`` keeps only the first files in sorted order (tests use it for speed).
    """
    docs: list[Document] = topic_documents() if include_topics else []
    docstrings, sources = stdlib_documents(root, limit_files, source_per_mille)
    docs += docstrings + sources
    train = [d for d in docs if not is_heldout(d.key, heldout_per_mille)]
    heldout = [d for d in docs if is_heldout(d.key, heldout_per_mille)]

    def stats(ds: list[Document]) -> dict:
        return {
            "documents": len(ds),
            "characters": sum(len(d.text) for d in ds),
            "bytes_utf8": sum(len(d.text.encode("utf-8")) for d in ds),
        }

    meta = {
        "python_version": sys.version.split()[0],
        "stdlib_dir_name": stdlib_dir().name if root is None else Path(root).name,
        "heldout_per_mille": heldout_per_mille,
        "source_per_mille": source_per_mille,
        "limit_files": limit_files,
        "skip_dirs": sorted(SKIP_DIRS),
        "split_rule": "held out if int(sha256(key)[:8]) % 1000 < heldout_per_mille; key = topic name or file path",
        "source_rule": "source file kept if int(sha256('source-sample:' + path)[:8]) % 1000 < source_per_mille",
        "sha256_all": content_hash(docs),
        "sha256_train": content_hash(train),
        "sha256_heldout": content_hash(heldout),
        "train": {k: stats([d for d in train if d.kind == k]) for k in ("topics", "docstrings", "source")},
        "heldout": {k: stats([d for d in heldout if d.kind == k]) for k in ("topics", "docstrings", "source")},
    }
    meta["train"]["total"] = stats(train)
    meta["heldout"]["total"] = stats(heldout)
    return Corpus(train=train, heldout=heldout, meta=meta)


def write_corpus_json(corpus: Corpus, path: Path) -> None:
    """Write the corpus description (sizes, hashes, rules) as JSON."""
    Path(path).write_text(json.dumps(corpus.meta, indent=2, sort_keys=True) + "\n")
