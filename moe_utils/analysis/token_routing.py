"""Token-level routing tables for the token explorer page: which expert each token goes to, the
path of a token across layers, how often experts are chosen together, and what each expert is
chosen for.

Everything but :func:`routing_record` (which reads the layer weights to get expert output norms),
:func:`shipped_snapshot_similarity` (which reads the shipped study results) and
:func:`explorer_report` (which traces the inputs) is a pure function of a :class:`RoutingRecord`,
the numpy arrays of one forward pass:

* :func:`coactivation` / :func:`coactivation_frame`: per layer, how many tokens chose experts *i*
  and *j* together, and the lift against independence, ``P(i and j) / (P(i) P(j))``;
* :func:`expert_token_counts` / :func:`expert_cards`: per layer and expert, the tokens it is
  chosen for most and a few short contexts;
* :func:`explorer_tokens`: a few hundred tokens laid out as lines of text, each with its top-1
  expert per layer and its full path (chosen experts, gate scores, output norms), reduced to
  rounded compact arrays so that the page stays small.

"Chosen" means in the token's top-k; the top-1 expert is the chosen expert with the largest
routing weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.paths import ZOO_STUDY_DIR
from ..engine.inputs import Inputs
from ..models.trace import Trace, router_scores
from .context import Study
from .dynamic import norms_and_scores
from .results import iter_results

ANALYSIS = "token_explorer"  # the page, and the name of its results file
LIFT_CLIP = 3.0  # log2 lift shown within [-3, 3] (1/8x .. 8x); the tables keep the exact lift
MIN_EXPECTED = 5.0  # the strongest pair named on the page is one expected at least this often
WEIGHT_SIMILARITY_MARK = "weight_similarity"  # an emergence quantity whose name holds this is one


@dataclass
class RoutingRecord:
    """The routing of one forward pass as numpy arrays, one entry per traced MoE layer.

    ``chosen[l]`` and ``weights[l]`` are ``[N, k]``, sorted by routing weight (largest first), so
    column 0 is the top-1 expert; ``scores[l]`` is ``[N, E]``, the softmax of the router logits
    over all experts (the paper's gate scores); ``norms[l]``, when present, the ``[N, E]`` L2 norms
    of every expert's output on the token's block input.
    """

    model: str
    token_ids: np.ndarray
    tokens: list[str]
    seq: np.ndarray
    position: np.ndarray
    layers: list[int]
    chosen: dict[int, np.ndarray]
    weights: dict[int, np.ndarray]
    scores: dict[int, np.ndarray]
    norms: dict[int, np.ndarray] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.scores[self.layers[0]].shape[1])

    @property
    def top_k(self) -> int:
        return int(self.chosen[self.layers[0]].shape[1])

    def top1(self, layer: int) -> np.ndarray:
        """``[N]`` the top-1 expert of every token at ``layer``."""
        return self.chosen[layer][:, 0]


def record_from_trace(tr: Trace, norms: dict[int, np.ndarray] | None = None) -> RoutingRecord:
    """A :class:`RoutingRecord` of ``tr`` (its chosen experts sorted by routing weight)."""
    chosen, weights, scores = {}, {}, {}
    for layer in tr.layers:
        lt = tr[layer]
        idx = lt.routed_index.cpu().numpy().astype(np.int64)
        wt = lt.routed_weight.float().cpu().numpy()
        order = np.argsort(-wt, axis=1, kind="stable")
        chosen[layer] = np.take_along_axis(idx, order, axis=1)
        weights[layer] = np.take_along_axis(wt, order, axis=1)
        scores[layer] = router_scores(lt).cpu().numpy()
    return RoutingRecord(
        model=tr.model_name,
        token_ids=tr.token_ids.cpu().numpy(),
        tokens=list(tr.tokens) or [str(int(i)) for i in tr.token_ids.tolist()],
        seq=tr.seq_index.cpu().numpy(),
        position=tr.position.cpu().numpy(),
        layers=list(tr.layers),
        chosen=chosen,
        weights=weights,
        scores=scores,
        norms=norms,
    )


def routing_record(study: Study, tr: Trace) -> RoutingRecord:
    """:func:`record_from_trace` with every expert's output norm (reads each layer's weights)."""
    return record_from_trace(tr, norms=norms_and_scores(study.lm, tr).norms)


# --------------------------------------------------------------------------- co-activation


def chosen_mask(chosen: np.ndarray, num_experts: int) -> np.ndarray:
    """``[N, E]`` booleans: True where the expert is among the token's chosen ones."""
    mask = np.zeros((chosen.shape[0], num_experts), dtype=bool)
    np.put_along_axis(mask, chosen, True, axis=1)
    return mask


def coactivation(chosen: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, lift)``, both ``[E, E]``, from the ``[N, k]`` chosen experts of one layer.

    ``counts[i, j]`` is the number of tokens that chose both *i* and *j* (the diagonal: the tokens
    that chose *i*). ``lift[i, j] = (counts[i, j] / N) / (p_i p_j)`` with ``p_i = counts[i, i] / N``:
    1 when the two are chosen together as often as if they were chosen independently, NaN on the
    diagonal and where an expert is never chosen.
    """
    m = chosen_mask(chosen, num_experts).astype(np.int64)
    counts = m.T @ m
    n = max(int(chosen.shape[0]), 1)
    p = np.diag(counts) / n
    expected = np.outer(p, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(expected > 0, (counts / n) / expected, np.nan)
    np.fill_diagonal(lift, np.nan)
    return counts, lift


def random_routing_lift(num_experts: int, top_k: int) -> float:
    """The lift of every pair under uniformly random top-k routing: ``(k-1) E / (k (E-1))``.

    An expert is never chosen twice for one token, so even random routing puts a pair together
    less often than independence would (0.57 for 2 of 8 experts); 0 when ``k = 1``.
    """
    if num_experts < 2:
        return float("nan")
    return (top_k - 1) * num_experts / (top_k * (num_experts - 1))


def coactivation_frame(record: RoutingRecord) -> pd.DataFrame:
    """One row per layer and ordered expert pair: ``count``, ``expected`` (count under
    independence, ``N p_i p_j``), ``lift`` and ``log2_lift`` (clipped to +-:data:`LIFT_CLIP`;
    NaN on the diagonal)."""
    e = record.num_experts
    n = record.num_tokens
    ii, jj = np.meshgrid(np.arange(e), np.arange(e), indexing="ij")
    frames = []
    for layer in record.layers:
        counts, lift = coactivation(record.chosen[layer], e)
        p = np.diag(counts) / max(n, 1)
        with np.errstate(divide="ignore"):
            log2 = np.clip(np.log2(lift), -LIFT_CLIP, LIFT_CLIP)
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "expert_i": ii.ravel(),
                    "expert_j": jj.ravel(),
                    "count": counts.ravel(),
                    "expected": (n * np.outer(p, p)).ravel(),
                    "lift": lift.ravel(),
                    "log2_lift": log2.ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- expert cards


_CONTROL = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\n\t"} | {0x7F: "\u2421"}


def printable(text: str) -> str:
    """``text`` with control characters (other than newline and tab) as their Unicode pictures
    (``\\x0e`` -> ``␎``): a byte-level tokenizer's pieces may hold them, and a chart cannot draw them."""
    return text.translate(_CONTROL)


def visible(text: str) -> str:
    """A token as shown in a card: newlines as ``↵``, tabs as ``→``, spaces as ``·``."""
    return printable(text).replace("\n", "↵").replace("\t", "→").replace(" ", "·")


def _flat(text: str) -> str:
    """Text on one line: newlines as ``↵``, tabs as ``→``."""
    return printable(text).replace("\n", "↵").replace("\t", "→")


def token_context(record: RoutingRecord, index: int, left: int = 6, right: int = 3) -> str:
    """The token at ``index`` in ``[...]`` with up to ``left``/``right`` tokens of its own sequence
    around it, on one line."""
    seq = record.seq[index]
    lo, hi = index, index
    while lo > 0 and index - lo < left and record.seq[lo - 1] == seq:
        lo -= 1
    while hi < record.num_tokens - 1 and hi - index < right and record.seq[hi + 1] == seq:
        hi += 1
    before = "".join(record.tokens[lo:index])
    after = "".join(record.tokens[index + 1 : hi + 1])
    return _flat(f"{before}[{record.tokens[index]}]{after}")


def expert_token_counts(record: RoutingRecord, layer: int) -> pd.DataFrame:
    """One row per (expert, token id) chosen together at ``layer``: ``count`` (tokens of that id
    that chose the expert), ``occurrences`` (tokens of that id in the text) and ``share``; sorted
    by expert, count (descending) and first occurrence."""
    mask = chosen_mask(record.chosen[layer], record.num_experts)
    tok, exp = np.nonzero(mask)
    ids = record.token_ids[tok]
    df = pd.DataFrame({"expert": exp, "token_id": ids, "first": tok})
    out = df.groupby(["expert", "token_id"], as_index=False).agg(count=("first", "size"), first=("first", "min"))
    occ = pd.Series(record.token_ids).value_counts()
    out["occurrences"] = out.token_id.map(occ).astype(int)
    out["share"] = out["count"] / out["occurrences"]
    out["token"] = [visible(record.tokens[i]) for i in out["first"]]
    out = out.sort_values(["expert", "count", "first"], ascending=[True, False, True], ignore_index=True)
    return pd.DataFrame(out[["expert", "token_id", "token", "count", "occurrences", "share", "first"]])


@dataclass
class ExpertCards:
    """The three tables of the expert cards: ``load`` (one row per layer and expert), ``tokens``
    (its top tokens by count) and ``contexts`` (the tokens it gives its highest gate scores)."""

    load: pd.DataFrame
    tokens: pd.DataFrame
    contexts: pd.DataFrame


def expert_cards(record: RoutingRecord, top_tokens: int = 8, contexts: int = 3) -> ExpertCards:
    """Per layer and expert: how many tokens chose it (``load``), the ``top_tokens`` token ids it is
    chosen for most (``tokens``, ranked 1..) and the ``contexts`` tokens with the largest gate
    score for it among those that chose it (``contexts``, ranked 1..)."""
    n = record.num_tokens
    loads, toks, ctxs = [], [], []
    for layer in record.layers:
        mask = chosen_mask(record.chosen[layer], record.num_experts)
        top1 = np.bincount(record.top1(layer), minlength=record.num_experts)
        chosen_n = mask.sum(axis=0)
        loads.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "expert": np.arange(record.num_experts),
                    "tokens": chosen_n,
                    "share": chosen_n / max(n, 1),
                    "top1": top1,
                }
            )
        )
        counts = expert_token_counts(record, layer)
        top = counts.groupby("expert", sort=True).head(top_tokens).copy()
        top["rank"] = top.groupby("expert").cumcount() + 1
        top.insert(0, "layer", layer)
        toks.append(top.drop(columns=["first"]))
        scores = record.scores[layer]
        for e in range(record.num_experts):
            where = np.nonzero(mask[:, e])[0]
            if where.size == 0:
                continue
            best = where[np.argsort(-scores[where, e], kind="stable")[:contexts]]
            for rank, i in enumerate(best, start=1):
                ctxs.append(
                    {
                        "layer": layer,
                        "expert": e,
                        "rank": rank,
                        "token_index": int(i),
                        "gate": float(scores[i, e]),
                        "context": token_context(record, int(i)),
                    }
                )
    ctx_cols = ["layer", "expert", "rank", "token_index", "gate", "context"]
    return ExpertCards(
        load=pd.concat(loads, ignore_index=True),
        tokens=pd.concat(toks, ignore_index=True),
        contexts=pd.DataFrame(ctxs, columns=ctx_cols),
    )


# --------------------------------------------------------------------------- the coloured text


def shown_tokens(record: RoutingRecord, max_tokens: int) -> np.ndarray:
    """Indices of the tokens the text view shows: whole sequences from the first while they fit
    in ``max_tokens``, and at least the start of the first sequence."""
    if record.num_tokens == 0 or max_tokens <= 0:
        return np.arange(0)
    lengths = np.bincount(record.seq)
    total = 0
    for length in lengths:
        if total + length > max_tokens:
            break
        total += int(length)
    return np.arange(total if total else min(max_tokens, int(lengths[0])))


def layout(tokens: Sequence[str], seq: Sequence[int], width: int = 84) -> pd.DataFrame:
    """Monospace layout of ``tokens``: one row per token with its ``line`` and first column
    ``col``, its ``cols`` (characters it covers, at least 1) and ``text`` (what is drawn: the token
    without newlines and leading spaces, which start at ``text_col``).

    A newline inside a token ends the line after the token (drawn as ``↵``), a token that would
    pass ``width`` starts a new line, and a new sequence starts after a blank line.
    """
    rows = []
    line, col = 0, 0
    prev_seq = None
    for tok, s in zip(tokens, seq, strict=True):
        if prev_seq is not None and s != prev_seq:
            line, col = line + 2 if col else line + 1, 0
        prev_seq = s
        shown = printable(tok).replace("\n", "↵").replace("\t", "    ")
        cols = max(len(shown), 1)
        if col and col + cols > width:
            line, col = line + 1, 0
        stripped = shown.lstrip(" ")
        rows.append(
            {
                "line": line,
                "col": col,
                "cols": cols,
                "text_col": col + len(shown) - len(stripped),
                "text": stripped,
            }
        )
        col += cols
        if "\n" in tok:
            line, col = line + 1, 0
    return pd.DataFrame(rows, columns=["line", "col", "cols", "text_col", "text"])


def _rounded(values: np.ndarray, digits: int) -> list:
    return [round(float(v), digits) for v in values]


def explorer_tokens(record: RoutingRecord, max_tokens: int = 300, width: int = 84) -> pd.DataFrame:
    """The text view's data: one row per shown token (:func:`shown_tokens`) with its layout
    (:func:`layout`), its ``context``, and compact per-layer arrays indexed by layer position:
    ``top1`` (top-1 expert), ``g1`` (its gate score); and the path, entry ``j`` for layer position
    ``j // k`` and rank ``j % k + 1``: ``pe`` (expert), ``pg`` (gate score) and ``pn`` (output
    norm; absent without norms). Floats are rounded to 3 decimals.
    """
    idx = shown_tokens(record, max_tokens)
    lay = layout([record.tokens[i] for i in idx], record.seq[idx].tolist(), width=width)
    lay.insert(0, "i", idx)
    lay["position"] = record.position[idx]
    lay["context"] = [token_context(record, int(i)) for i in idx]
    top1, g1, pe, pg, pn = [], [], [], [], []
    for i in idx:
        chosen = [record.chosen[layer][i] for layer in record.layers]
        gates = [record.scores[layer][i, c] for layer, c in zip(record.layers, chosen, strict=True)]
        top1.append([int(c[0]) for c in chosen])
        g1.append(_rounded(np.array([g[0] for g in gates]), 3))
        pe.append([int(e) for c in chosen for e in c])
        pg.append(_rounded(np.concatenate(gates), 3))
        if record.norms is not None:
            norms = [record.norms[layer][i, c] for layer, c in zip(record.layers, chosen, strict=True)]
            pn.append(_rounded(np.concatenate(norms), 3))
    lay["top1"] = top1
    lay["g1"] = g1
    lay["pe"] = pe
    lay["pg"] = pg
    if record.norms is not None:
        lay["pn"] = pn
    return lay


# --------------------------------------------------------------------------- training snapshots


@dataclass
class SnapshotSimilarity:
    """Expert-to-expert weight similarity across training snapshots, from the shipped study
    results: ``table`` (empty when none are shipped) and ``note`` (what is there, for the page)."""

    organism: str
    table: pd.DataFrame
    note: str
    shipped: pd.DataFrame = field(default_factory=pd.DataFrame)


def emergence_tables(study_dir: str | Path | None = None) -> pd.DataFrame:
    """Every shipped ``study_emergence.json`` table, concatenated, with a ``replicate`` column."""
    root = ZOO_STUDY_DIR if study_dir is None else Path(study_dir)
    frames = []
    for pattern in ("*/study_emergence.json", "*/results/study_emergence.json"):
        for res in iter_results(root, pattern):
            table = res.tables.get("emergence")
            if table is not None and not table.empty:
                frames.append(table.assign(replicate=str(res.params.get("replicate", res.model))))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def snapshot_similarity(organism: str, emergence: pd.DataFrame) -> SnapshotSimilarity:
    """The rows of ``emergence`` that are expert-to-expert weight similarities of ``organism``
    (quantities whose name holds :data:`WEIGHT_SIMILARITY_MARK`), and a note saying what the
    shipped snapshot results hold when there are none."""
    if emergence.empty:
        shipped = pd.DataFrame(columns=["replicate", "organism", "snapshots", "quantities"])
    else:
        shipped = (
            emergence.groupby(["replicate", "organism"], as_index=False)
            .agg(snapshots=("step", "nunique"), quantities=("quantity", lambda q: ", ".join(sorted(set(q)))))
            .sort_values("replicate", ignore_index=True)
        )
    rows = (
        emergence[(emergence.organism == organism) & emergence.quantity.str.contains(WEIGHT_SIMILARITY_MARK)]
        if not emergence.empty
        else pd.DataFrame()
    )
    if not rows.empty:
        note = (
            f"Expert-to-expert weight similarity of {organism} at {rows.step.nunique()} training snapshots "
            f"(from the shipped study results: {', '.join(sorted(set(rows.replicate)))})."
        )
        return SnapshotSimilarity(organism, pd.DataFrame(rows).reset_index(drop=True), note, shipped)
    own = shipped[shipped.organism == organism] if not shipped.empty else shipped
    if own.empty:
        what = f"The shipped study results hold no training snapshots of {organism}"
    else:
        what = (
            f"The shipped training snapshots of {organism} ({', '.join(own.replicate)}) were measured for "
            f"{own.quantities.iloc[0]}, not for the similarity of expert weights"
        )
    others = shipped[shipped.organism != organism] if not shipped.empty else shipped
    also = (
        f"; the {'other ' if not own.empty else ''}shipped snapshot results are those of "
        + ", ".join(f"{r} ({o})" for r, o in zip(others.replicate, others.organism, strict=True))
        if not others.empty
        else ""
    )
    note = (
        f"**Not available:** {what}{also}. Expert-to-expert weight similarity across training snapshots "
        f"is therefore not shown here: the snapshot weights are not part of the package, and no such "
        f"measurement of them is."
    )
    return SnapshotSimilarity(organism, pd.DataFrame(), note, shipped)


def shipped_snapshot_similarity(organism: str, study_dir: str | Path | None = None) -> SnapshotSimilarity:
    """:func:`snapshot_similarity` on the study results shipped with the package."""
    return snapshot_similarity(organism, emergence_tables(study_dir))


# --------------------------------------------------------------------------- the page


@dataclass
class ExplorerReport:
    """Everything the token explorer page shows, for one model."""

    model: str
    inputs: Inputs
    record: RoutingRecord
    tokens: pd.DataFrame
    coactivation: pd.DataFrame
    cards: ExpertCards
    snapshots: SnapshotSimilarity
    random_lift: float
    params: dict[str, Any]

    @property
    def layers(self) -> list[int]:
        return self.record.layers

    @property
    def num_experts(self) -> int:
        return self.record.num_experts

    @property
    def top_k(self) -> int:
        return self.record.top_k

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables written to the results file (the per-token arrays of the text view stay out)."""
        return {
            "coactivation": self.coactivation,
            "expert_load": self.cards.load,
            "expert_tokens": self.cards.tokens,
            "expert_contexts": self.cards.contexts,
        }

    def coactivation_note(self, label: str | None = None) -> str:
        """One Markdown sentence on the co-activation maps: the median lift of a pair against the
        random-routing value, and the pair chosen together most above independence (among pairs
        expected together at least :data:`MIN_EXPECTED` times, when there are any). ``label``
        names the model (default: its id)."""
        name = label or self.model
        if self.top_k < 2:
            return f"{name} routes each token to a single expert, so no two experts are ever chosen together."
        co = self.coactivation
        pairs = pd.DataFrame(co[(co.expert_i < co.expert_j) & co.lift.notna()])
        if pairs.empty:
            return f"{name}: no pair of experts was chosen together on these tokens."
        common = pd.DataFrame(pairs[pairs.expected >= MIN_EXPECTED])  # a lift on a handful of tokens says little
        best = (common if len(common) else pairs).sort_values(by=["lift", "count"], ascending=False).iloc[0]
        return (
            f"{name}: over {_count(len(self.layers), 'MoE layer')}, the median lift of a pair of experts is "
            f"**{pairs.lift.median():.2f}** (uniformly random top-{self.top_k} routing would give "
            f"{self.random_lift:.2f} to every pair); the strongest pair is experts {int(best.expert_i)} and "
            f"{int(best.expert_j)} in layer {int(best.layer)}, chosen together for {int(best['count'])} tokens, "
            f"{best.lift:.1f} times as often as independence predicts ({best.expected:.1f} tokens)."
        )

    def describe(self, label: str | None = None) -> str:
        """One Markdown sentence: what was traced and what the text view shows. ``label`` names
        the model (default: its id)."""
        shown = len(self.tokens)
        seqs = int(self.record.seq[self.tokens.i].max()) + 1 if shown else 0
        return (
            f"{label or self.model}: {self.inputs.n_sequences} held-out sequences, {self.record.num_tokens:,} tokens, "
            f"{_count(len(self.record.layers), 'MoE layer')} of {self.record.num_experts} experts with top-{self.record.top_k} "
            f"routing. The text view shows the first {shown} tokens ({seqs} sequence{'s' if seqs != 1 else ''}); "
            f"the co-activation maps and the expert cards count all {self.record.num_tokens:,}."
        )


def _count(n: int, noun: str) -> str:
    """``3 MoE layers``, ``1 MoE layer``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def organism_name(model: str) -> str:
    """``zoo:tiny-moe-upcycled`` -> ``tiny-moe-upcycled`` (the name study results use)."""
    return model[4:] if model.startswith("zoo:") else model


def snapshots_of(model: str) -> SnapshotSimilarity:
    """:func:`shipped_snapshot_similarity` for an organism (``zoo:NAME``); for any other model, a
    note that training snapshots exist only for the organisms."""
    if model.startswith("zoo:"):
        return shipped_snapshot_similarity(organism_name(model))
    note = (
        f"Training snapshots exist only for the organisms trained with this package (zoo:NAME models); "
        f"{model} is not one of them, so this section has nothing to show for it."
    )
    return SnapshotSimilarity(model, pd.DataFrame(), note)


def explorer_report(
    study: Study,
    inputs: str = "long",
    max_tokens: int | None = None,
    text_tokens: int = 350,
    top_tokens: int = 8,
    contexts: int = 3,
) -> ExplorerReport:
    """Trace ``inputs`` once and build every table of the token explorer page."""
    loaded = study.inputs(inputs, max_tokens=max_tokens)
    tr = study.trace(loaded)
    record = routing_record(study, tr)
    return ExplorerReport(
        model=study.name,
        inputs=loaded,
        record=record,
        tokens=explorer_tokens(record, max_tokens=text_tokens),
        coactivation=coactivation_frame(record),
        cards=expert_cards(record, top_tokens=top_tokens, contexts=contexts),
        snapshots=snapshots_of(study.name),
        random_lift=random_routing_lift(record.num_experts, record.top_k),
        params={"text_tokens": text_tokens, "top_tokens": top_tokens, "contexts": contexts},
    )
