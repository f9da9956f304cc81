"""The long runs' enlarged stream: new documents only, never a held-out key, never a text twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_utils.zoo.corpus import build_corpus, is_heldout, keep_source
from moe_utils.zoo.long_corpus import candidate_documents, extension_documents, long_stream


def _name(pred, stem: str) -> str:
    """The first ``{stem}{i}.py`` whose path satisfies ``pred``."""
    return next(f"{stem}{i}.py" for i in range(10_000) if pred(f"{stem}{i}.py"))


def _byte_tokenizer(text: str, add_special_tokens: bool = False) -> dict:
    return {"input_ids": [3 + b % 200 for b in text.encode("utf-8")]}


def _fixture(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    stdlib, pkg = tmp_path / "lib", tmp_path / "site" / "fakepkg"
    stdlib.mkdir(parents=True)
    pkg.mkdir(parents=True)
    names = {
        "kept": _name(lambda n: keep_source(n) and not is_heldout(n), "kept"),
        "left": _name(lambda n: not keep_source(n) and not is_heldout(n), "left"),
        "held": _name(lambda n: not keep_source(n) and is_heldout(n), "held"),
        "pkg": _name(lambda n: not is_heldout(f"site-packages/fakepkg/{n}"), "mod"),
        "copy": _name(lambda n: not is_heldout(f"site-packages/fakepkg/{n}"), "vendored"),
    }
    (stdlib / names["kept"]).write_text('"""Kept doc."""\nx = 1\n')
    (stdlib / names["left"]).write_text('"""Left out of the sample."""\ny = 2\n')
    (stdlib / names["held"]).write_text('"""Held out."""\nz = 3\n')
    (pkg / names["pkg"]).write_text('"""Package doc."""\ndef f():\n    """F doc."""\n    return 1\n')
    (pkg / names["copy"]).write_text('"""Kept doc."""\nx = 1\n')  # a copy of a corpus file
    (pkg / "tests").mkdir()
    (pkg / "tests" / "test_a.py").write_text("assert True\n")
    return stdlib, pkg, names


def test_extension_adds_only_unseen_texts_of_training_keys_in_order(tmp_path: Path):
    stdlib, pkg, names = _fixture(tmp_path)
    base = build_corpus(root=stdlib, include_topics=False)
    cands = list(candidate_documents(stdlib, packages=("fakepkg",), package_roots={"fakepkg": pkg}))
    keys = [d.key for d in cands]
    assert names["kept"] not in keys  # its source is already in the organisms' corpus
    assert f"site-packages/fakepkg/{names['copy']}" in keys  # left out below as a repeated text
    assert names["held"] in keys and "site-packages/fakepkg/tests/test_a.py" not in keys
    added = list(extension_documents(base, cands))
    assert [d.name for d in added] == [
        f"source/{names['left']}",
        f"docstrings/site-packages/fakepkg/{names['pkg']}",
        f"source/site-packages/fakepkg/{names['pkg']}",
    ]
    assert added[1].text == "Package doc.\n\nF doc."


def test_long_stream_starts_with_the_base_and_stops_at_the_target(tmp_path: Path):
    stdlib, pkg, _ = _fixture(tmp_path)
    base = build_corpus(root=stdlib, include_topics=False)
    docs = list(extension_documents(base, candidate_documents(stdlib, ("fakepkg",), {"fakepkg": pkg})))
    base_stream = np.arange(10, dtype=np.uint16)
    first = len(docs[0].text.encode()) + 1
    stream, meta = long_stream(base_stream, docs, _byte_tokenizer, target_tokens=10 + first)
    assert np.array_equal(stream[:10], base_stream) and stream.dtype == np.uint16
    assert len(stream) == 10 + first and stream[-1] == 2  # one document, ended by </s>
    assert meta["added"] == {"stdlib": {"documents": 1, "tokens": first}} and meta["reached_target"]
    everything, meta = long_stream(base_stream, docs, _byte_tokenizer, target_tokens=10**6)
    assert not meta["reached_target"] and set(meta["added"]) == {"stdlib", "fakepkg"}
    assert len(everything) == 10 + sum(len(d.text.encode()) + 1 for d in docs)
