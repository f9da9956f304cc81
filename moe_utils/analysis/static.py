"""Weight-only analyses (observation 1 and the weight half of observation 3).

They read one MoE layer's canonical weights at a time (from a loaded model, or streamed from
safetensors without building the model) and return tidy DataFrames. Expert labels are the
expert indices as strings; "F" is the dense baseline's FFN of the same layer index and "SE" the
shared expert(s), which only enter comparisons where their shapes allow (neuron averaging).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .. import metrics as M
from ..weights import DenseMLPWeights, MoELayerWeights, dense_mlp_weights, iter_layer_weights

MATRICES = ("W_act", "W_up", "W_down")
_ATTR = {"W_act": "w_act", "W_up": "w_up", "W_down": "w_down"}
_KIND = {"W_act": "act", "W_up": "up", "W_down": "down"}


@dataclass
class LayerMatrices:
    """The three expert matrices of one layer plus the optional F and SE matrices."""

    layer: int
    experts: dict[str, Any]            # matrix name -> [E, I, H] or [E, H, I]
    dense: dict[str, Any] | None       # matrix name -> [I, H] / [H, I] of the F baseline
    shared: dict[str, Any] | None      # matrix name -> shared expert matrix
    router: Any                        # [E, H]

    @property
    def num_experts(self) -> int:
        return int(self.router.shape[0])


def _matrices(w: MoELayerWeights | DenseMLPWeights) -> dict[str, Any]:
    return {m: getattr(w, _ATTR[m]) for m in MATRICES if getattr(w, _ATTR[m]) is not None}


def layer_matrices(source: Any, layers: Sequence[int] | None = None,
                   dense_baseline: Any | None = None) -> Iterable[LayerMatrices]:
    """Yield each analysed MoE layer's matrices, one layer in memory at a time."""
    for w in iter_layer_weights(source, layers=layers):
        dense = None
        if dense_baseline is not None:
            dense = _matrices(dense_mlp_weights(dense_baseline, w.layer))
        shared = _matrices(w.shared) if w.shared is not None else None
        yield LayerMatrices(w.layer, _matrices(w), dense, shared, w.router)


def _pairs_frame(layer: int, matrix: str, level: str, labels: Sequence[str], sim: np.ndarray) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({
        "layer": layer, "matrix": matrix, "level": level,
        "expert_i": np.repeat(labels, n), "expert_j": np.tile(labels, n),
        "similarity": np.asarray(sim, dtype=float).reshape(-1),
    })


def weight_similarity(source: Any, layers: Sequence[int] | None = None,
                      dense_baseline: Any | None = None) -> pd.DataFrame:
    """Matrix-level and neuron-averaged cosine similarity between experts (+F, +SE), per layer.

    Matrix level (paper Fig. 1) flattens whole matrices, so only same-shaped matrices take part:
    the experts and F (when F has the experts' width). Neuron level (App. D) averages over the
    neuron axis, giving one H-vector per expert, so F and the shared expert always take part.
    """
    frames = []
    for lm in layer_matrices(source, layers, dense_baseline):
        e = lm.num_experts
        labels = [str(i) for i in range(e)]
        for m, stack in lm.experts.items():
            f = lm.dense.get(m) if lm.dense else None
            f = f if f is not None and tuple(f.shape) == tuple(stack.shape[1:]) else None
            sim = M.matrix_level_similarity(stack, extra=f)
            frames.append(_pairs_frame(lm.layer, m, "matrix", labels + (["F"] if f is not None else []), sim))
            vecs = [M.neuron_average(stack, _KIND[m])]
            nlabels = list(labels)
            for tag, mats in (("F", lm.dense), ("SE", lm.shared)):
                if mats and m in mats:
                    vecs.append(M.neuron_average(np.asarray(mats[m])[None], _KIND[m]))
                    nlabels.append(tag)
            frames.append(_pairs_frame(lm.layer, m, "neuron", nlabels, M.cosine_matrix(np.concatenate(vecs))))
    return pd.concat(frames, ignore_index=True)


def offdiagonal_summary(sim: pd.DataFrame, groups: Sequence[str] = ("layer", "matrix", "level")) -> pd.DataFrame:
    """Mean similarity between distinct experts (S_ee) and between experts and F (S_ef) per group."""
    s = sim[sim.expert_i != sim.expert_j]
    is_expert_i = s.expert_i.str.isdigit()
    is_expert_j = s.expert_j.str.isdigit()
    ee = s[is_expert_i & is_expert_j].groupby(list(groups)).similarity.mean().rename("S_ee")
    ef = s[is_expert_i & (s.expert_j == "F")].groupby(list(groups)).similarity.mean().rename("S_ef")
    return pd.concat([ee, ef], axis=1).reset_index()


def gate_correlation(source: Any, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Per layer and matrix: Pearson r and r^2 between gate-row similarity and neuron-averaged
    expert similarity over the strictly lower triangle (paper Tables 3 and 5). F and SE excluded."""
    rows = []
    for lm in layer_matrices(source, layers):
        x = M.gate_similarity(lm.router)
        for m, stack in lm.experts.items():
            y = M.neuron_level_similarity(stack, _KIND[m])
            res = M.gate_expert_correlation(x, y)
            rows.append({"layer": lm.layer, "matrix": m, "r": float(res.r), "r2": float(res.r2),
                         "n_pairs": lm.num_experts * (lm.num_experts - 1) // 2})
    return pd.DataFrame(rows)


def gate_scatter(source: Any, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """The points behind :func:`gate_correlation`: one row per expert pair, layer and matrix."""
    rows = []
    for lm in layer_matrices(source, layers):
        x = M.gate_similarity(lm.router)
        for m, stack in lm.experts.items():
            y = M.neuron_level_similarity(stack, _KIND[m])
            for i, j in combinations(range(lm.num_experts), 2):
                rows.append({"layer": lm.layer, "matrix": m, "pair": f"{j}-{i}",
                             "gate_similarity": float(x[j, i]), "expert_similarity": float(y[j, i])})
    return pd.DataFrame(rows)


def reordering(source: Any, layers: Sequence[int] | None = None, dense_baseline: Any | None = None,
               max_pairs: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Neuron reordering by linear assignment for expert pairs (paper Table 2).

    For every pair (and each matrix separately) the neurons of the second matrix are permuted to
    best match the first; the result has the cosine before/after and Kendall's tau of the
    permutation. ``max_pairs`` samples pairs (seeded) for models with many experts.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for lm in layer_matrices(source, layers, dense_baseline):
        labels = [str(i) for i in range(lm.num_experts)]
        for m, stack in lm.experts.items():
            mats = {lab: np.asarray(stack[i]) for i, lab in enumerate(labels)}
            if lm.dense and m in lm.dense and tuple(lm.dense[m].shape) == tuple(stack.shape[1:]):
                mats["F"] = np.asarray(lm.dense[m])
            pairs = list(combinations(list(mats), 2))
            if max_pairs is not None and len(pairs) > max_pairs:
                pick = rng.choice(len(pairs), size=max_pairs, replace=False)
                pairs = [pairs[k] for k in sorted(pick)]
            for a, b in pairs:
                res = M.reorder_neurons(mats[a], mats[b], _KIND[m])
                rows.append({"layer": lm.layer, "matrix": m, "expert_i": a, "expert_j": b,
                             "sim_before": float(res.sim_before), "sim_after": float(res.sim_after),
                             "gain": float(res.sim_after - res.sim_before), "tau": float(res.tau)})
    return pd.DataFrame(rows)


def pca_projections(source: Any, layers: Sequence[int] | None = None, dense_baseline: Any | None = None,
                    level: str = "matrix", max_neurons_per_expert: int = 64, seed: int = 0) -> pd.DataFrame:
    """2-D PCA of expert matrices (level="matrix", App. C.1) or of neurons (level="neuron", App. C.2).

    Features are standardised across the stacked rows before PCA, as in the paper's code. At
    neuron level the PCA uses every neuron; a seeded sample of ``max_neurons_per_expert``
    neurons per expert is returned to keep the chart readable.
    """
    if level not in ("matrix", "neuron"):
        raise ValueError(f"level must be 'matrix' or 'neuron'; got {level!r}")
    rng = np.random.default_rng(seed)
    rows = []
    for lm in layer_matrices(source, layers, dense_baseline):
        for m, stack in lm.experts.items():
            f = lm.dense.get(m) if lm.dense else None
            f = f if f is not None and tuple(f.shape) == tuple(stack.shape[1:]) else None
            if level == "matrix":
                proj = M.matrix_pca(stack, extra=f)
                keep = np.arange(len(proj.labels))
            else:
                proj = M.neuron_pca(stack, _KIND[m], extra=f)
                labels = np.asarray(proj.labels)
                keep = np.concatenate([
                    np.sort(rng.choice(np.flatnonzero(labels == lab),
                                       size=min(max_neurons_per_expert, int((labels == lab).sum())),
                                       replace=False))
                    for lab in dict.fromkeys(proj.labels)])
            for idx in keep:
                lab = proj.labels[idx]
                rows.append({"layer": lm.layer, "matrix": m, "kind": "F (dense)" if lab == "F" else "expert",
                             "label": lab, "pc1": float(proj.coords[idx, 0]), "pc2": float(proj.coords[idx, 1]),
                             "explained": float(proj.explained_variance_ratio[:2].sum())})
    return pd.DataFrame(rows)
