"""Held-out evaluation of the model organisms: loss, unigram baseline, expert load.

Pure functions over token ids and models; no file I/O except the small loaders at the bottom.
Losses are in nats per predicted token. A window is ``[<s>] + up to seq_len-1 text tokens``; every
text token is predicted (from ``<s>`` and what precedes it), ``<s>`` itself is never a target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from moe_utils.arch import spec_for_config
from moe_utils.arch.facts import facts_for
from moe_utils.core.cpus import small_model_threads
from moe_utils.core.errors import MoEUtilsError, ShapeError
from moe_utils.core.paths import ZOO_MODELS_DIR

BOS_ID = 1


def _cut(docs_ids: Iterable[Sequence[int]], seq_len: int, bos_id: int) -> Iterator[tuple[int, list[int]]]:
    """(document index, window) for each window of :func:`make_windows`, in order."""
    step = seq_len - 1
    for d, ids in enumerate(docs_ids):
        ids = list(ids)
        for i in range(0, len(ids), step):
            chunk = ids[i : i + step]
            if len(chunk) >= 2:
                yield d, [bos_id] + chunk


def make_windows(docs_ids: Iterable[Sequence[int]], seq_len: int = 256, bos_id: int = BOS_ID) -> list[list[int]]:
    """Cut each document's ids (without ``<s>``) into consecutive windows, each led by ``<s>``."""
    return [w for _, w in _cut(docs_ids, seq_len, bos_id)]


def window_documents(docs_ids: Iterable[Sequence[int]], seq_len: int = 256) -> np.ndarray:
    """The index (in ``docs_ids`` order) of the document each window of :func:`make_windows` was cut
    from; windows of one document are consecutive and leave or stay together when resampled."""
    return np.asarray([d for d, _ in _cut(docs_ids, seq_len, BOS_ID)], dtype=np.int32)


def encode_docs(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Token ids of each text without special tokens."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def targets_of(windows: Sequence[Sequence[int]]) -> np.ndarray:
    """All predicted tokens of the windows (each window minus its leading ``<s>``), concatenated."""
    if not windows:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(w[1:], dtype=np.int64) for w in windows])


@torch.no_grad()
def _batches(windows: Sequence[Sequence[int]], batch_size: int):
    """Token windows as ``[B, T]`` tensors, windows of equal length batched together."""
    by_length: dict[int, list[list[int]]] = {}
    for w in windows:
        by_length.setdefault(len(w), []).append(list(w))
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            yield torch.tensor(group[start : start + batch_size], dtype=torch.long)


@torch.no_grad()
def model_nll(model, windows: Sequence[Sequence[int]], batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over the windows, one pass each
    (windows of equal length are batched together)."""
    model.eval()
    total, count = 0.0, 0
    with small_model_threads(model.config.hidden_size):
        for ids in _batches(windows, batch_size):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    return total / max(count, 1)


def unigram_counts(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token frequency counts (length ``vocab_size``)."""
    return np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]


def unigram_nll(counts: np.ndarray, targets: np.ndarray, alpha: float = 1.0) -> float:
    """Mean nats/token of an add-``alpha`` smoothed unigram model (fit on ``counts``) on ``targets``."""
    counts = np.asarray(counts, dtype=np.float64)
    logp = np.log(counts + alpha) - math.log(counts.sum() + alpha * len(counts))
    return float(-logp[np.asarray(targets, dtype=np.int64)].mean())


@torch.no_grad()
def expert_load(model, windows: Sequence[Sequence[int]], batch_size: int = 16) -> np.ndarray:
    """Top-k selection counts ``[MoE layers, experts]`` of an organism over the windows (every
    position is counted, the leading ``<s>`` included); rows follow the MoE layers in order.

    Uses the router logits the model returns with ``output_router_logits=True`` and takes the
    top-k of each token, exactly the experts the forward pass used (no jitter in eval mode).
    """
    facts = facts_for(spec_for_config(model.config), model.config)
    k, E, n_moe = facts.top_k, facts.num_experts, len(facts.moe_layers)
    counts = np.zeros((n_moe, E), dtype=np.int64)
    model.eval()
    with small_model_threads(model.config.hidden_size):
        for ids in _batches(windows, batch_size):
            out = model(input_ids=ids, use_cache=False, output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                top = torch.topk(logits.float().reshape(-1, E), k, dim=-1).indices
                counts[layer] += np.bincount(top.reshape(-1).numpy(), minlength=E)
    return counts


def perplexity(nll: float) -> float:
    """exp of a mean nats/token loss."""
    return float(math.exp(nll))


def save_windows(
    path: Path, windows: Sequence[Sequence[int]], documents: Sequence[int] | np.ndarray | None = None
) -> None:
    """Store windows compactly: concatenated uint16 ids plus lengths (``.npz``), and with
    ``documents`` the document index of each window (:func:`window_documents`)."""
    ids = np.concatenate([np.asarray(w, dtype=np.uint16) for w in windows])
    arrays = {"ids": ids, "lengths": np.asarray([len(w) for w in windows], dtype=np.int32)}
    if documents is not None:
        if len(documents) != len(windows):
            raise ShapeError(f"{len(documents)} document indices for {len(windows)} windows; pass one per window")
        arrays["documents"] = np.asarray(documents, dtype=np.int32)
    np.savez_compressed(path, **arrays)


def _heldout_path(path: Path | None) -> Path:
    return Path(path) if path is not None else ZOO_MODELS_DIR / "heldout_windows.npz"


def _subset(n: int, max_windows: int | None) -> list[int]:
    """Indices of the evenly spaced subset of ``n`` windows that the loaders return."""
    if max_windows is None or n <= max_windows:
        return list(range(n))
    step = n / max_windows
    return [int(i * step) for i in range(max_windows)]


def load_windows(path: Path | None = None, max_windows: int | None = None) -> list[list[int]]:
    """Shipped held-out windows (``models/heldout_windows.npz``), optionally an evenly spaced subset."""
    with np.load(_heldout_path(path)) as z:
        ids, lengths = z["ids"].astype(np.int64), z["lengths"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    windows = [ids[s : s + n].tolist() for s, n in zip(starts, lengths, strict=False)]
    return [windows[i] for i in _subset(len(windows), max_windows)]


def load_window_documents(path: Path | None = None, max_windows: int | None = None) -> np.ndarray:
    """The document index of each window :func:`load_windows` returns for the same arguments.

    Raises ``MoEUtilsError`` for a windows file written before documents were recorded."""
    path = _heldout_path(path)
    with np.load(path) as z:
        if "documents" not in z.files:
            raise MoEUtilsError(
                f"{path} has no 'documents' array (written before windows carried their document); "
                "rebuild it with `moe-book zoo train --prepare-only` or pass documents explicitly"
            )
        docs = z["documents"].astype(np.int64)
    return docs[_subset(len(docs), max_windows)]


def load_unigram_counts(path: Path | None = None) -> np.ndarray:
    """Shipped unigram counts of the training split (``models/unigram_counts.json``)."""
    path = Path(path) if path is not None else ZOO_MODELS_DIR / "unigram_counts.json"
    data = json.loads(Path(path).read_text())
    return np.asarray(data["counts"], dtype=np.int64)
