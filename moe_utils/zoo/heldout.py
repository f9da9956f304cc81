"""The "long input" preset: ten held-out paragraphs (prose and code), ~1,100 zoo tokens in all.

It replaces the paper's ten WikiText-103 paragraphs. Paragraphs come only from held-out
documents (never trained on), are chosen by a hash order (deterministic), and alternate
prose (docstrings) and code (source). Provenance goes into a sidecar ``long_heldout.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from moe_utils.engine.inputs import SEPARATOR_LINE  # one definition for writer and reader (split_paragraphs)
from moe_utils.zoo.corpus import Corpus

N_PROSE = 5
N_CODE = 5
MIN_TOKENS, MAX_TOKENS = 95, 125


def _blocks(text: str) -> list[str]:
    """Blank-line separated blocks of a text."""
    return [b.strip("\n") for b in text.split("\n\n") if b.strip()]


def candidate_paragraphs(text: str, count_tokens, lo: int = MIN_TOKENS, hi: int = MAX_TOKENS) -> list[str]:
    """Runs of consecutive blocks whose token count lies in ``[lo, hi]`` (non-overlapping, greedy)."""
    out, cur = [], []
    for block in _blocks(text):
        cur.append(block)
        n = count_tokens("\n\n".join(cur))
        if n > hi:
            cur = [block] if count_tokens(block) <= hi else []
            n = count_tokens("\n\n".join(cur)) if cur else 0
        if lo <= n <= hi:
            para = "\n\n".join(cur)
            if not any(ln.strip() == SEPARATOR_LINE for ln in para.splitlines()):
                out.append(para)
            cur = []
    return out


def is_code(par: str) -> bool:
    """A code paragraph: defines something and does not open with a docstring or a comment."""
    first = par.lstrip().splitlines()[0] if par.strip() else ""
    defines = re.search(r"^\s*(async\s+def|def|class)\s", par, re.M) is not None
    return defines and not first.startswith(('"' * 3, "'" * 3, "#"))


def select_paragraphs(corpus: Corpus, tokenizer) -> tuple[list[str], list[str]]:
    """Pick prose and code paragraphs from held-out documents, one per document, interleaved."""

    def count(t: str) -> int:
        return len(tokenizer(t, add_special_tokens=False)["input_ids"])

    used_keys: set[str] = set()

    def pick(kind: str, n: int, accept) -> list[tuple[str, str]]:
        docs = sorted(
            (d for d in corpus.heldout if d.kind == kind), key=lambda d: hashlib.sha256(d.name.encode()).hexdigest()
        )
        chosen = []
        for d in docs:
            if d.key in used_keys:
                continue
            cands = [c for c in candidate_paragraphs(d.text, count) if accept(c)]
            if cands:
                chosen.append((cands[0], d.name))
                used_keys.add(d.key)
            if len(chosen) == n:
                break
        return chosen

    prose = pick("docstrings", N_PROSE, lambda c: True)
    code = pick("source", N_CODE, is_code)
    paras, sources = [], []
    for i in range(max(len(prose), len(code))):
        for group in (prose, code):
            if i < len(group):
                paras.append(group[i][0])
                sources.append(group[i][1])
    return paras, sources


def write_long_heldout(
    path: Path, paragraphs: list[str], sources: list[str], corpus_meta: dict, tokenizer=None
) -> None:
    """Write the preset (paragraphs separated by a ``---`` line) and its provenance sidecar."""
    path = Path(path)
    path.write_text(f"\n{SEPARATOR_LINE}\n".join(paragraphs) + "\n", encoding="utf-8")
    side = {
        "description": "Long input preset of moe_utils: ten paragraphs of text the zoo models never "
        "trained on (held-out split of the CPython documentation/docstrings/source corpus), "
        "prose and code alternating, separated by lines holding only '---'. Stands in for "
        "the paper's ten WikiText-103 paragraphs.",
        "sources": sources,
        "selection": f"first blank-line-separated run of {MIN_TOKENS}-{MAX_TOKENS} zoo tokens in each held-out "
        "document, documents ordered by sha256 of their name",
        "corpus_sha256_heldout": corpus_meta.get("sha256_heldout"),
        "python_version": corpus_meta.get("python_version"),
    }
    path.with_suffix(".json").write_text(json.dumps(side, indent=2) + "\n")
