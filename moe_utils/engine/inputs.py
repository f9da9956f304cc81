"""Input texts for the dynamic analyses: presets, user text files and Hugging Face datasets.

``load_inputs(spec, tokenizer)`` accepts

* ``"short"``: the paper's short prompt, one sequence;
* ``"routing"``: the paper's ~64-token prompt used for the routing-pattern figure, one sequence;
* ``"long"``: ten held-out paragraphs shipped as package data
  (``moe_utils/inputs_data/long_heldout.txt``, paragraphs separated by a line holding only
  ``---``), one sequence per paragraph; it plays the role of the paper's ten WikiText-103
  paragraphs;
* a path to a UTF-8 text file: paragraphs separated by ``---`` lines if the file has any, else by
  blank lines; each paragraph is one sequence, kept verbatim (inner newlines and indentation
  included);
* ``"hf:DATASET[:CONFIG]:SPLIT[:COLUMN]"``: rows of a dataset via the optional ``datasets``
  package, one sequence per non-empty row. Two fields mean DATASET:SPLIT, three
  DATASET:CONFIG:SPLIT; give a column without a config as ``hf:DATASET::SPLIT:COLUMN``. Slices
  such as ``test[:100]`` are allowed. The column defaults to ``text``.

Every sequence starts with the tokenizer's BOS token when ``add_bos`` is true and the tokenizer
has one (Grok's has none, as in the paper); no EOS is added.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moe_utils.core.errors import InputSpecError, OfflineError
from moe_utils.core.files import file_sha256

# Short prompt of the paper (Lo et al., 2024, arXiv 2406.18219, §5), which credits it to the MoE
# survey of Cai et al. (2024), "A Survey on Mixture of Experts".
SHORT_PROMPT = "As an open source alternative to"

# The ~64-token prompt of the paper's routing-pattern experiment (Lo et al., 2024,
# arXiv 2406.18219, App. I, "Chosen experts"), quoted as the paper's reference code feeds it.
ROUTING_PROMPT = (
    "As an open source alternative to Chat GPT, I do not have personal opinions. However, I can "
    "provide objective information about Chat GPT's capabilities and limitations based on its "
    "architecture and training data. Chat GPT is a powerful language model based on the GPT "
    "(Generative Pre-trained Transformer"
)

PRESETS = ("short", "routing", "long")
SEPARATOR_LINE = "---"
#: Package data file of the "long" preset (generated from the zoo's held-out corpus split).
LONG_HELDOUT_FILE = Path(__file__).resolve().parents[1] / "inputs_data" / "long_heldout.txt"

_SPEC_HELP = (
    "use one of the presets 'short', 'routing', 'long', a path to a UTF-8 text file, or "
    "'hf:DATASET[:CONFIG]:SPLIT[:COLUMN]'"
)


@dataclass
class Inputs:
    """Tokenised input sequences and the texts they came from.

    ``texts[i]`` is the text of ``sequences[i]`` (for a sequence cut short by ``max_tokens``, the
    decoded kept tokens). ``note`` says what truncation did, if anything.
    """

    name: str
    sequences: list[list[int]]
    texts: list[str]
    truncated: bool = False
    note: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Total number of tokens over all sequences (BOS tokens included)."""
        return sum(len(s) for s in self.sequences)

    @property
    def n_sequences(self) -> int:
        return len(self.sequences)

    def seq_index(self) -> np.ndarray:
        """Sequence number of every token, in the order a trace concatenates them."""
        return np.repeat(np.arange(len(self.sequences)), [len(s) for s in self.sequences])


def split_paragraphs(text: str) -> list[str]:
    """Split a text into paragraphs: at ``---`` lines if there are any, else at blank lines.

    Paragraphs keep their inner newlines and indentation; only surrounding newlines are removed.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if any(ln.strip() == SEPARATOR_LINE for ln in lines):
        parts, cur = [], []
        for ln in lines:
            if ln.strip() == SEPARATOR_LINE:
                parts.append("\n".join(cur))
                cur = []
            else:
                cur.append(ln)
        parts.append("\n".join(cur))
    else:
        parts = re.split(r"\n[ \t]*\n", text)
    return [p.strip("\n") for p in parts if p.strip()]


def _encode(tokenizer: Any, text: str) -> list[int]:
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = enc.ids if hasattr(enc, "ids") else enc
    return [int(i) for i in ids]


def _decode(tokenizer: Any, ids: list[int], fallback: str) -> str:
    try:
        return str(tokenizer.decode(ids, skip_special_tokens=True))
    except Exception:  # a tokenizer without decode: keep the source text
        return fallback


def _tokenize(texts: Iterable[str], tokenizer: Any, max_tokens: int | None, add_bos: bool, name: str) -> Inputs:
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    prefix = [int(bos)] if bos is not None else []
    seqs: list[list[int]] = []
    kept: list[str] = []
    total = 0
    note = ""
    truncated = False
    n_seen = 0
    for text in texts:
        body = _encode(tokenizer, text)
        if not body:
            continue
        n_seen += 1
        ids = prefix + body
        if max_tokens is not None and total + len(ids) > max_tokens:
            room = max_tokens - total
            truncated = True
            if room > len(prefix):
                seqs.append(ids[:room])
                kept.append(_decode(tokenizer, ids[len(prefix) : room], text))
                total += room
                note = (
                    f"max_tokens={max_tokens}: kept {len(seqs) - 1} whole sequence(s) and the first "
                    f"{room} tokens of sequence {len(seqs)}; later text was dropped"
                )
            else:
                note = f"max_tokens={max_tokens}: kept {len(seqs)} whole sequence(s); later text was dropped"
            break
        seqs.append(ids)
        kept.append(text)
        total += len(ids)
    if not seqs:
        raise InputSpecError(f"inputs {name!r} produced no tokens: the text is empty or max_tokens is too small")
    if truncated:
        warnings.warn(f"inputs {name!r} truncated to {total} tokens ({note}).", stacklevel=3)
    return Inputs(name=name, sequences=seqs, texts=kept, truncated=truncated, note=note)


def _read_long_preset() -> list[str]:
    path = Path(LONG_HELDOUT_FILE)
    if not path.is_file():
        raise InputSpecError(
            f"the 'long' preset needs the package data file {path}, which is missing. Reinstall "
            f"moe_utils, regenerate it with the zoo corpus tools, or pass your own text file instead."
        )
    paras = split_paragraphs(path.read_text(encoding="utf-8"))
    if not paras:
        raise InputSpecError(f"{path} holds no paragraphs")
    return paras


def _split_outside_brackets(s: str) -> list[str]:
    parts, cur, depth = [], [], 0
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        if ch == ":" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_hf_spec(spec: str) -> tuple[str, str | None, str, str | None]:
    """``"hf:DATASET[:CONFIG]:SPLIT[:COLUMN]"`` -> ``(dataset, config, split, column)``."""
    if not spec.startswith("hf:"):
        raise InputSpecError(f"{spec!r} is not a dataset spec; expected 'hf:DATASET[:CONFIG]:SPLIT[:COLUMN]'")
    parts = _split_outside_brackets(spec[3:])
    if len(parts) == 2:
        ds, cfg, split, col = parts[0], None, parts[1], None
    elif len(parts) == 3:
        ds, cfg, split, col = parts[0], parts[1], parts[2], None
    elif len(parts) == 4:
        ds, cfg, split, col = parts
    else:
        raise InputSpecError(
            f"cannot read dataset spec {spec!r}: expected 'hf:DATASET:SPLIT', 'hf:DATASET:CONFIG:SPLIT' or "
            f"'hf:DATASET:CONFIG:SPLIT:COLUMN' (use an empty CONFIG, 'hf:DATASET::SPLIT:COLUMN', for none)"
        )
    if not ds or not split:
        raise InputSpecError(f"dataset spec {spec!r} needs both a dataset name and a split")
    return ds, (cfg or None), split, (col or None)


_OFFLINE_HINT = re.compile(r"connect|offline|timeout|timed out|not ?found|resolve|http|network", re.I)


def _hf_texts(spec: str) -> Iterator[str]:
    ds_name, config, split, column = parse_hf_spec(spec)
    try:
        datasets = importlib.import_module("datasets")  # optional dependency, not installed by default
    except ImportError as exc:
        raise OfflineError(
            f"inputs {spec!r} need the optional 'datasets' package, which is not installed. Install it with "
            f'`pip install "moe-utils[datasets]"` (or `pip install datasets`), or save the texts to a file '
            f"(paragraphs separated by blank lines) and pass its path."
        ) from exc
    try:
        data = datasets.load_dataset(ds_name, config, split=split)
    except Exception as exc:
        offline = isinstance(exc, (ConnectionError, TimeoutError, OSError)) or _OFFLINE_HINT.search(
            f"{type(exc).__name__} {exc}"
        )
        if offline or os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise OfflineError(
                f"could not load dataset {ds_name!r} (config {config!r}, split {split!r}): {exc}. The machine "
                f"may be offline or the dataset is not in the local cache. Load it once on a connected machine "
                f"(it is cached under ~/.cache/huggingface/datasets) and set HF_DATASETS_OFFLINE=1, or save the "
                f"texts to a file and pass its path."
            ) from exc
        raise InputSpecError(f"could not load dataset {ds_name!r} (config {config!r}, split {split!r}): {exc}") from exc
    columns = list(getattr(data, "column_names", []) or [])
    if column is None:
        column = "text" if "text" in columns else None
        if column is None:
            raise InputSpecError(
                f"dataset {ds_name!r} has no 'text' column; name one in the spec, e.g. "
                f"'hf:{ds_name}:{config or ''}:{split}:COLUMN'. Columns: {columns}"
            )
    elif columns and column not in columns:
        raise InputSpecError(f"dataset {ds_name!r} has no column {column!r}; columns: {columns}")
    for row in data:
        value = row[column]
        if isinstance(value, str) and value.strip():
            yield value


def check_inputs_spec(spec: Any) -> None:
    """Validate an inputs spec without a tokenizer (before any model is loaded).

    Presets and ``hf:`` specs are checked for form; a file must exist, be readable UTF-8 text
    and hold at least one paragraph. Raises :class:`InputSpecError` naming the problem.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputSpecError(f"inputs must be a non-empty string; got {spec!r}: {_SPEC_HELP}")
    if spec in PRESETS:
        return
    if spec.startswith("hf:"):
        parse_hf_spec(spec)
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputSpecError(f"unknown inputs {spec!r} (no such preset or file): {_SPEC_HELP}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputSpecError(f"inputs file {path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise InputSpecError(f"inputs file {path} cannot be read: {exc}") from exc
    if not split_paragraphs(text):
        raise InputSpecError(f"inputs file {path} holds no text")


def inputs_label(spec: str) -> str:
    """How pages and results name an inputs spec: a file by its name and SHA-256, not its path."""
    path = Path(str(spec)).expanduser()
    if spec in PRESETS or str(spec).startswith("hf:") or not path.is_file():
        return str(spec)
    return f"{path.name} (sha256 {file_sha256(path)})"


def load_inputs(spec: str, tokenizer: Any, max_tokens: int | None = None, add_bos: bool = True) -> Inputs:
    """Tokenise the texts named by ``spec`` (see the module docstring) into one sequence each.

    ``tokenizer`` is a Hugging Face tokenizer or a ``tokenizers.Tokenizer``. With ``max_tokens``
    the total token count (BOS included) is capped: whole sequences are kept in order while they
    fit, then the next one is cut to the remaining budget; ``Inputs.note`` and a warning say so.
    """
    if max_tokens is not None and int(max_tokens) < 1:
        raise InputSpecError(f"max_tokens must be a positive number of tokens or None; got {max_tokens}")
    spec = str(spec)
    if spec == "short":
        texts: Iterable[str] = [SHORT_PROMPT]
        source = "paper short prompt (Lo et al., 2024; from Cai et al., 2024)"
    elif spec == "routing":
        texts = [ROUTING_PROMPT]
        source = "paper routing prompt (Lo et al., 2024, App. I)"
    elif spec == "long":
        texts = _read_long_preset()
        source = f"package data {LONG_HELDOUT_FILE.name}"
    elif spec.startswith("hf:"):
        texts = _hf_texts(spec)
        source = spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputSpecError(f"unknown inputs {spec!r} (no such preset or file): {_SPEC_HELP}")
        try:
            texts = split_paragraphs(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise InputSpecError(f"{path} is not UTF-8 text: {exc}") from exc
        if not texts:
            raise InputSpecError(f"{path} holds no text")
        source = inputs_label(spec)
    res = _tokenize(texts, tokenizer, None if max_tokens is None else int(max_tokens), add_bos, spec)
    res.source = source
    return res


def fit_context(inputs: Inputs, max_len: int, bos_id: int | None = None) -> Inputs:
    """Split every sequence longer than ``max_len`` tokens into consecutive windows that fit.

    A window after the first starts with ``bos_id`` (when given) so that each window looks like a
    fresh sequence to the model, as each paper input paragraph did. Sequences that fit are kept
    unchanged; ``note`` says how many were split.
    """
    if max_len < 2:
        raise InputSpecError(f"max_len must be at least 2 tokens; got {max_len}")
    out_seqs: list[list[int]] = []
    out_texts: list[str] = []
    split = 0
    for seq, text in zip(inputs.sequences, inputs.texts, strict=True):
        if len(seq) <= max_len:
            out_seqs.append(list(seq))
            out_texts.append(text)
            continue
        split += 1
        prefix = [bos_id] if bos_id is not None and seq and seq[0] == bos_id else []
        body = seq[1:] if prefix else list(seq)
        step = max_len - 1 if prefix else max_len
        for start in range(0, len(body), step):
            window = body[start : start + step]
            out_seqs.append(prefix + window)
            out_texts.append(text if start == 0 else "")
    if not split:
        return inputs
    note = (
        f"{split} sequence(s) longer than the model's context of {max_len} tokens were split into windows; "
        + inputs.note
    ).strip()
    return replace(inputs, sequences=out_seqs, texts=out_texts, note=note)
