"""Analyses that need a forward pass on text (observations 2 and 3).

Each function takes a :class:`~moe_utils.models.loading.LoadedModel` (or the layer stream's held
layer) and a :class:`~moe_utils.models.trace.Trace` from one ordinary forward pass, evaluates every expert on each MoE block's captured input, and
returns numpy arrays or tidy DataFrames. Nothing here re-runs the model. Weights are used in
the model's own dtype (no float32 copy of a layer; each expert is widened on the fly), and the
all-expert evaluations are chunked over tokens and experts, so no ``[N, E, I]`` float32 tensor
of all experts is ever built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from .. import metrics as M
from ..core.progress import progress
from ..engine.canonical import MoELayerWeights
from ..engine.expert_math import iter_expert_intermediates
from ..engine.inputs import Inputs
from ..models.loading import LoadedModel, as_dtype
from ..models.stream import StreamedLayer, stream_traces
from ..models.trace import (
    Trace,
    dense_intermediates,
    dense_outputs,
    expert_intermediates,
    expert_outputs,
    router_scores,
)
from ..models.weights import WeightSource, dense_mlp_weights, layer_weights


def each_traced_layer(
    study: Any, inputs: Mapping[str, Inputs], work: Callable[[WeightSource, dict[str, Trace]], None]
) -> dict[str, Trace]:
    """Trace each named input set and call ``work(source, traces)`` on the traced layers.

    A whole model (``study.stream_device`` None) is traced once per input set and ``work`` runs
    once, on every layer. A streamed model (:mod:`moe_utils.models.stream`) is read one decoder
    layer at a time: ``work`` then runs once per MoE layer, in order, on one-layer traces and the
    layer's held weights, so the analyses it calls (which loop over ``tr.layers``) give, concatenated,
    the tables of the whole-model path. Returns the full traces."""
    device = getattr(study, "stream_device", None)
    if device is None:
        traces = {name: study.trace(inp) for name, inp in inputs.items()}
        work(study.lm, traces)
        return traces

    def visit(layer: StreamedLayer) -> None:
        work(layer.held, layer.traces)

    return stream_traces(
        study.lm,
        {name: inp.sequences for name, inp in inputs.items()},
        layers=study.layers,
        device=device,
        dtype=as_dtype(study.params.get("dtype", "float32")),
        visit=visit,
    )


@dataclass
class NormsScores:
    """Per-layer ``[N, E]`` output norms and softmax gate scores, plus the chosen experts ``[N, k]``."""

    norms: dict[int, np.ndarray]
    scores: dict[int, np.ndarray]
    chosen: dict[int, np.ndarray]
    groups: np.ndarray  # sequence index of each token

    @property
    def layers(self) -> list[int]:
        return sorted(self.norms)

    def merged(self, other: NormsScores) -> NormsScores:
        """These layers and ``other``'s (the same tokens), as one :class:`NormsScores`."""
        return NormsScores(
            {**self.norms, **other.norms}, {**self.scores, **other.scores}, {**self.chosen, **other.chosen}, self.groups
        )

    @property
    def num_experts(self) -> int:
        return int(next(iter(self.norms.values())).shape[1])

    def chosen_mask(self, layer: int) -> np.ndarray:
        """``[N, E]`` booleans: True where the router chose the expert for the token."""
        mask = np.zeros(self.norms[layer].shape, dtype=bool)
        np.put_along_axis(mask, self.chosen[layer], True, axis=1)
        return mask


def token_labels(tr: Trace) -> list[str]:
    """A readable label per token: position in its sequence and the token text."""
    return [f"{int(p)}:{t!r}" for p, t in zip(tr.position.tolist(), tr.tokens, strict=True)]


def norms_and_scores(lm: WeightSource, tr: Trace, chunk_tokens: int = 1024) -> NormsScores:
    """L2 norm of every expert's output on each MoE block's real input, and the router's softmax
    scores over all experts (the paper's "gate scores", Sec. 5.2)."""
    norms, scores, chosen = {}, {}, {}
    for layer in progress(tr.layers, desc="expert output norms", unit="layer"):
        lt = tr.per_layer[layer]
        w = layer_weights(lm, layer, dtype=None)
        y = expert_outputs(w, lt.x, chunk_tokens=chunk_tokens)
        norms[layer] = y.float().norm(dim=-1).cpu().numpy()
        scores[layer] = router_scores(lt).float().cpu().numpy()
        chosen[layer] = lt.routed_index.cpu().numpy()
        del y, w  # an offloaded layer read from the checkpoint is freed before the next
    return NormsScores(norms, scores, chosen, tr.seq_index.cpu().numpy())


def rank_count_frame(ns: NormsScores) -> pd.DataFrame:
    """Per-layer rank counts (score rank x norm rank, ranks ascending 1..E), tidy."""
    rows = []
    e = ns.num_experts
    for layer in ns.layers:
        c = M.rank_counts(ns.norms[layer], ns.scores[layer])
        s_rank, n_rank = np.meshgrid(np.arange(1, e + 1), np.arange(1, e + 1), indexing="ij")
        rows.append(
            pd.DataFrame(
                {"layer": layer, "score_rank": s_rank.ravel(), "norm_rank": n_rank.ravel(), "count": c.ravel()}
            )
        )
    return pd.concat(rows, ignore_index=True)


def summed_rank_counts(per_layer: pd.DataFrame) -> pd.DataFrame:
    """The paper's Fig. 10 table: counts summed over layers, with each norm rank's diagonal share."""
    total = per_layer.groupby(["norm_rank", "score_rank"], as_index=False).agg(count=("count", "sum"))
    col = total.groupby("norm_rank")["count"].transform("sum")
    total["share_of_norm_rank"] = total["count"] / col
    return total


def agreement_table(ns: NormsScores, k: int = 1, seed: int = 0, n_boot: int = 2000) -> pd.DataFrame:
    """Top-1 score / top-k norm agreement per layer and pooled, with cluster-bootstrap intervals
    over sequences (tokens of one sequence are not independent)."""
    groups = ns.groups if len(np.unique(ns.groups)) > 1 else None
    return M.agreement_by_layer(ns.norms, ns.scores, groups=groups, k=k, seed=seed, n_boot=n_boot)


def token_bars_frame(ns: NormsScores, tr: Trace, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Per token, layer and expert: output norm, gate score and whether the expert was chosen
    (the paper's Fig. 4). Meant for the short input."""
    labels = token_labels(tr)
    rows = []
    for layer in layers or ns.layers:
        n, e = ns.norms[layer].shape
        chosen = ns.chosen_mask(layer)
        rows.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "token_index": np.repeat(np.arange(n), e),
                    "token": np.repeat(labels, e),
                    "expert": np.tile(np.arange(e), n),
                    "norm": ns.norms[layer].ravel(),
                    "score": ns.scores[layer].ravel(),
                    "chosen": chosen.ravel(),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def mean_norm_by_layer(ns: NormsScores) -> pd.DataFrame:
    """Mean output norm per layer for chosen and not-chosen experts (norms grow with depth?)."""
    rows = []
    for layer in ns.layers:
        chosen = ns.chosen_mask(layer)
        for flag, name in ((True, "chosen"), (False, "not chosen")):
            rows.append({"layer": layer, "experts": name, "mean_norm": float(ns.norms[layer][chosen == flag].mean())})
    return pd.DataFrame(rows)


def activation_ratios(
    lm: WeightSource,
    tr: Trace,
    dense_lm: LoadedModel | None = None,
    dense_tr: Trace | None = None,
    threshold: float = M.ACTIVE_THRESHOLD,
) -> pd.DataFrame:
    """Share of intermediate activations act(W_act x) with |value| > threshold, per layer and
    expert (App. H). "F" rows come from the dense baseline's own forward pass."""
    rows = []
    for layer in progress(tr.layers, desc="activation ratios", unit="layer"):
        w = layer_weights(lm, layer, dtype=None)
        if w.w_act is None:
            continue
        for e, inter in iter_expert_intermediates(w, tr.per_layer[layer].x):
            r = M.activation_ratio(inter, threshold=threshold)
            rows.append({"layer": layer, "expert": str(e), "ratio": float(r.overall)})
        if dense_lm is not None and dense_tr is not None and layer in dense_tr.per_layer:
            dw = dense_mlp_weights(dense_lm, layer, dtype=None)
            rf = M.activation_ratio(dense_intermediates(dw, dense_tr.per_layer[layer].x), threshold=threshold)
            rows.append({"layer": layer, "expert": "F", "ratio": float(rf.overall)})
        del w  # an offloaded layer read from the checkpoint is freed before the next
    return pd.DataFrame(rows)


def intermediate_frame(
    lm: WeightSource,
    tr: Trace,
    layer: int,
    dense_lm: LoadedModel | None = None,
    dense_tr: Trace | None = None,
    max_neurons: int = 128,
) -> pd.DataFrame:
    """act(W_act x) for every token, expert (and F) of one layer, first ``max_neurons`` neurons
    (the paper's Fig. 12 heat map)."""
    w = layer_weights(lm, layer, dtype=None)
    inter = expert_intermediates(w, tr.per_layer[layer].x, max_neurons=max_neurons)
    dense = None
    if dense_lm is not None and dense_tr is not None and layer in dense_tr.per_layer:
        dense = dense_intermediates(dense_mlp_weights(dense_lm, layer, dtype=None), dense_tr.per_layer[layer].x)
    return intermediates_to_frame(layer, token_labels(tr), inter, dense, max_neurons)


def intermediates_to_frame(
    layer: int, labels: Sequence[str], inter: torch.Tensor, dense: torch.Tensor | None, max_neurons: int
) -> pd.DataFrame:
    """Long table (layer, token_index, token, expert, neuron, value) of one layer's expert
    intermediates [N, E, I] and, when given, the dense baseline's [N, F] as expert "F"; each keeps
    its own first ``max_neurons`` neurons, so a baseline of another width is drawn as it is."""
    parts = [(inter[:, :, :max_neurons], [str(k) for k in range(inter.shape[1])])]
    if dense is not None:
        parts.append((dense[:, None, :max_neurons], ["F"]))
    frames = []
    for values, names in parts:
        t = values.detach().cpu()
        v = (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()
        n, e, i = v.shape
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "token_index": np.repeat(np.arange(n), e * i),
                    "token": np.repeat(np.asarray(labels, dtype=object)[:n], e * i),
                    "expert": np.tile(np.repeat(names, i), n),
                    "neuron": np.tile(np.arange(i), n * e),
                    "value": v.ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _outputs_with_extras(
    lm: WeightSource, tr: Trace, layer: int, dense_lm: LoadedModel | None, dense_tr: Trace | None
) -> tuple[torch.Tensor, list[str], MoELayerWeights]:
    """[N, E(+F)(+SE), H] raw outputs of every expert, the F baseline and the shared expert, their
    labels, and the layer's weights."""
    lt = tr.per_layer[layer]
    w = layer_weights(lm, layer, dtype=None)
    y = expert_outputs(w, lt.x).float()
    labels = [str(e) for e in range(y.shape[1])]
    extra = []
    if dense_lm is not None and dense_tr is not None and layer in dense_tr.per_layer:
        extra.append(dense_outputs(dense_mlp_weights(dense_lm, layer, dtype=None), dense_tr.per_layer[layer].x).float())
        labels.append("F")
    if w.shared is not None:
        extra.append(dense_outputs(w.shared, lt.x).float())
        labels.append("SE")
    if extra:
        y = torch.cat([y] + [t[:, None, :] for t in extra], dim=1)
    return y, labels, w


def token_output_similarity(
    lm: WeightSource, tr: Trace, dense_lm: LoadedModel | None = None, dense_tr: Trace | None = None
) -> pd.DataFrame:
    """Cosine similarity between all experts' outputs (+F, +SE) for every token and layer
    (the paper's Fig. 2, short input)."""
    labels_tok = token_labels(tr)
    frames = []
    for layer in progress(tr.layers, desc="per-token output similarity", unit="layer"):
        y, labels, _ = _outputs_with_extras(lm, tr, layer, dense_lm, dense_tr)
        chosen = tr.per_layer[layer].routed_index.cpu().numpy()
        k = len(labels)
        sims = M.token_similarity(y, angular=False)
        for t in range(y.shape[0]):
            frames.append(
                pd.DataFrame(
                    {
                        "layer": layer,
                        "token_index": t,
                        "token": labels_tok[t],
                        "chosen_text": ",".join(str(int(c)) for c in chosen[t]),
                        "expert_i": np.repeat(labels, k),
                        "expert_j": np.tile(labels, k),
                        "similarity": sims[t].ravel(),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


class RandomExperts:
    """``[E, out, in]`` random N(0, ``std``) matrices made one expert at a time when indexed, equal
    to ``(torch.randn(shape, generator=g) * std).to(dtype)`` drawn in one call (which holds when an
    expert's element count is a multiple of 16, torch's block of normal draws): the generator's state
    at each expert's first draw is kept, so a layer of random experts never sits in memory whole."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, g: torch.Generator, std: float) -> None:
        self.shape, self.dtype, self.std = torch.Size(shape), dtype, std
        self.device = torch.device("cpu")
        self._states = []
        for _ in range(self.shape[0]):
            self._states.append(g.get_state())
            torch.randn(self.shape[1:], generator=g)  # advance the generator past this expert

    def __getitem__(self, e: int) -> torch.Tensor:
        h = torch.Generator()
        h.set_state(self._states[e])
        return (torch.randn(self.shape[1:], generator=h) * self.std).to(self.dtype)


def random_experts_like(w: MoELayerWeights, seed: int, std: float) -> MoELayerWeights:
    """The layer's experts replaced by random ones of the same shapes, N(0, std) (observation 3's
    input-geometry null: what experts that learned nothing give on the same inputs). Large layers'
    random experts are made one expert at a time (:class:`RandomExperts`), with the same values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if t.shape[1:].numel() % 16 == 0:
            return cast(torch.Tensor, RandomExperts(t.shape, t.dtype, g, std))  # indexed by expert like a tensor
        return (torch.randn(t.shape, generator=g) * std).to(t.dtype)

    return replace(w, w_act=rnd(w.w_act), w_up=rnd(w.w_up), w_down=rnd(w.w_down), b_act=None, b_up=None, b_down=None)


def init_std(config: Any) -> float:
    """The random-expert null's standard deviation: the model's ``initializer_range`` (0.02 when unset)."""
    value = config.get("initializer_range") if isinstance(config, dict) else getattr(config, "initializer_range", None)
    return float(value or 0.02)


def output_similarity(
    lm: WeightSource,
    tr: Trace,
    dense_lm: LoadedModel | None = None,
    dense_tr: Trace | None = None,
    seed: int = 0,
    std: float = 0.02,
    chunk: int = 256,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Observation 3's two long-input tables from one evaluation of every expert per layer.

    * the pooled map (the paper's Fig. 3): angular similarity between expert outputs (+F, +SE)
      per token, summed over all tokens and divided by their count;
    * per sequence and layer: the sum over tokens of the per-token mean angular similarity of
      distinct experts' outputs and the number of tokens with a defined value, for the trained
      experts (``experts = "trained"``) and for random experts of the same shapes, N(0, ``std``),
      on the same block inputs (``experts = "random"``, the input-geometry null)."""
    seqs = tr.seq_index.cpu().numpy()
    maps, rows = [], []
    for layer in progress(tr.layers, desc="output similarity", unit="layer"):
        y, labels, w = _outputs_with_extras(lm, tr, layer, dense_lm, dense_tr)
        pooled, trained = pooled_map_and_trained(layer, y, labels, w.num_experts, chunk)
        maps.append(pooled)
        del y  # the random experts' outputs come next: one layer's outputs at a time
        rows += trained_and_random_sums(layer, w, tr.per_layer[layer].x, seqs, trained, seed, std, chunk)
        del w
    return pd.concat(maps, ignore_index=True), pd.DataFrame(rows)


def similarity_map_frame(layer: int, labels: list[str], acc: np.ndarray) -> pd.DataFrame:
    """One layer's pooled map as rows (layer, expert_i, expert_j, similarity)."""
    k = len(labels)
    return pd.DataFrame(
        {"layer": layer, "expert_i": np.repeat(labels, k), "expert_j": np.tile(labels, k), "similarity": acc.ravel()}
    )


def pooled_map_and_trained(
    layer: int, y: torch.Tensor, labels: list[str], n_experts: int, chunk: int = 256
) -> tuple[pd.DataFrame, np.ndarray]:
    """From one layer's outputs ``y`` [T, columns, H] (the experts first, then F and the shared
    expert): the pooled map and, per token, the mean angular similarity of distinct experts."""
    pooled = similarity_map_frame(layer, labels, M.mean_token_similarity(y, angular=True))
    trained = np.concatenate(
        [M.token_mean_similarity(y[s : s + chunk, :n_experts]) for s in range(0, y.shape[0], chunk)]
    )
    return pooled, trained


def trained_and_random_sums(
    layer: int,
    w: MoELayerWeights,
    x: torch.Tensor,
    seqs: np.ndarray,
    trained: np.ndarray,
    seed: int = 0,
    std: float = 0.02,
    chunk: int = 256,
) -> list[dict[str, Any]]:
    """Per sequence: the sums and counts of the per-token values of the trained experts and of
    random experts shaped like ``w`` (N(0, ``std``), seeded by ``seed + layer``) on the block inputs ``x``."""
    rand = random_experts_like(w, seed + layer, std)
    null = np.concatenate(
        [M.token_mean_similarity(expert_outputs(rand, x[s : s + chunk])) for s in range(0, x.shape[0], chunk)]
    )
    rows = []
    for kind, vals in (("trained", trained), ("random", null)):
        ok = np.isfinite(vals)
        for g in np.unique(seqs):
            m = (seqs == g) & ok
            rows.append(
                {"layer": layer, "seq": int(g), "experts": kind, "sum": float(vals[m].sum()), "count": int(m.sum())}
            )
    return rows


def average_output_similarity(
    lm: WeightSource, tr: Trace, dense_lm: LoadedModel | None = None, dense_tr: Trace | None = None
) -> pd.DataFrame:
    """Angular similarity between expert outputs averaged over all tokens (the paper's Fig. 3,
    long input): per token 1 - arccos(cos)/pi, summed over tokens and divided by their count."""
    frames = []
    for layer in progress(tr.layers, desc="mean output similarity", unit="layer"):
        y, labels, _ = _outputs_with_extras(lm, tr, layer, dense_lm, dense_tr)
        frames.append(similarity_map_frame(layer, labels, M.mean_token_similarity(y, angular=True)))
    return pd.concat(frames, ignore_index=True)


def routing_frame(tr: Trace) -> pd.DataFrame:
    """One row per token, layer and chosen expert with its routing weight (App. I, Fig. 14)."""
    labels = token_labels(tr)
    frames = []
    for layer in tr.layers:
        lt = tr.per_layer[layer]
        idx = lt.routed_index.cpu().numpy()
        wt = lt.routed_weight.float().cpu().numpy()
        n, k = idx.shape
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "token_index": np.repeat(np.arange(n), k),
                    "token": np.repeat(labels, k),
                    "rank": np.tile(np.arange(1, k + 1), n),
                    "expert": idx.ravel(),
                    "weight": wt.ravel(),
                    "sequence": np.repeat(tr.seq_index.cpu().numpy(), k),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
