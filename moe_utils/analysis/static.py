"""Weight-only analyses (observation 1 and the weight half of observation 3).

They read one MoE layer's canonical weights at a time, in the stored dtype (from a loaded model
without copying, or streamed from safetensors without building the model: a private memory map
of the layer's bytes, never a float32 copy; a quantized checkpoint's expert matrices stay
encoded on their maps and each block is decoded when a pass reads it), and return tidy
DataFrames. Every metric walks the matrices in bounded float32 blocks (:mod:`moe_utils.metrics.blocks`), so the working memory on top of the
layer is a few hundred MB at Mixtral width, and each matrix is read once for the matrix-level
similarity, the matrix-level PCA and the neuron averages together. Expert labels are the
expert indices as strings; "F" is the dense baseline's FFN of the same layer index and "SE" the
shared expert(s), which only enter comparisons where their shapes allow (neuron averaging).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from .. import metrics as M
from ..core.errors import ArgumentError, NonFiniteError
from ..core.finite import unwrap
from ..core.progress import progress
from ..metrics.neurons import COSINE_BLOCK_ELEMENTS, resolve_neuron_axis
from ..metrics.projection import (
    SketchStart,
    flattened_pass,
    matrix_pca_from_gram,
    neuron_pca_randomized,
    sketch_matrix,
    sketch_width,
)
from ..models.weights import (
    EXPERT_MATRICES,
    DenseMLPWeights,
    MoELayerWeights,
    WeightSource,
    dense_mlp_weights,
    iter_layer_weights,
    screen_layer,
)
from .parallel import run_jobs

T = TypeVar("T")
MATRICES = ("W_act", "W_up", "W_down")
_ATTR = {"W_act": "w_act", "W_up": "w_up", "W_down": "w_down"}
_KIND = {"W_act": "act", "W_up": "up", "W_down": "down"}


@dataclass
class LayerMatrices:
    """The three expert matrices of one layer plus the optional F and SE matrices."""

    layer: int
    experts: dict[str, torch.Tensor]  # matrix name -> [E, I, H] or [E, H, I]
    dense: dict[str, torch.Tensor] | None  # matrix name -> [I, H] / [H, I] of the F baseline
    shared: dict[str, torch.Tensor] | None  # matrix name -> shared expert matrix
    router: torch.Tensor  # [E, H]
    ids: list[int] | None = None  # original expert indices (some may have been excluded)
    # when the expert matrices' finiteness check was deferred: the layer screened in full
    # (raises NonFiniteError, or leaves the offending experts out and records them)
    rescreen: Callable[[], LayerMatrices] | None = None

    @property
    def num_experts(self) -> int:
        return int(self.router.shape[0])

    @property
    def labels(self) -> list[str]:
        """Expert labels: the original expert indices as strings."""
        return [str(i) for i in (self.ids if self.ids is not None else range(self.num_experts))]


def _matrices(w: MoELayerWeights | DenseMLPWeights) -> dict[str, torch.Tensor]:
    return {m: getattr(w, _ATTR[m]) for m in MATRICES if getattr(w, _ATTR[m]) is not None}


def layer_matrices(
    source: WeightSource,
    layers: Sequence[int] | None = None,
    dense_baseline: WeightSource | None = None,
    defer_screen: bool = False,
) -> Iterable[LayerMatrices]:
    """Yield each analysed MoE layer's matrices (stored dtype; a quantized checkpoint's expert
    matrices kept encoded, :class:`~moe_utils.models.weights.LazyExperts`), one layer at a time.

    Non-finite weights raise, unless the sources are ``ScreenedSource``s: excluded experts (and an
    invalid F) are then left out and recorded on the screen. With ``defer_screen`` the expert
    matrices are not checked on reading (a separate read of the whole layer); the caller's first
    pass must show them finite, else call ``rescreen()`` before using any result.
    """
    deferred = EXPERT_MATRICES if defer_screen else frozenset()
    layer_screen = unwrap(source)[1]
    for w in iter_layer_weights(source, layers=layers, dtype=None, deferred=deferred, lazy=True):
        dense = None
        if dense_baseline is not None:
            try:
                dense = _matrices(dense_mlp_weights(dense_baseline, w.layer, dtype=None))
            except NonFiniteError as err:
                screen = unwrap(dense_baseline)[1]
                if screen is None:
                    raise
                screen.record(err)
        shared = _matrices(w.shared) if w.shared is not None else None
        rescreen: Callable[[], LayerMatrices] | None = None
        if deferred:

            def screened(w: MoELayerWeights = w, dense: dict | None = dense) -> LayerMatrices:
                full = screen_layer(w, layer_screen)
                sh = _matrices(full.shared) if full.shared is not None else None
                return LayerMatrices(full.layer, _matrices(full), dense, sh, full.router, full.ids)

            rescreen = screened
            del screened  # only the LayerMatrices may keep the layer alive

        item = LayerMatrices(w.layer, _matrices(w), dense, shared, w.router, w.ids, rescreen)
        del w, dense, shared, rescreen
        yield item
        del item  # before the next layer is read: a streamed layer is freed first


def each_layer(
    source: WeightSource,
    layers: Sequence[int] | None,
    dense_baseline: WeightSource | None,
    fn: Callable[[LayerMatrices], T],
) -> list[T]:
    """``[fn(lm) for lm in layer_matrices(...)]``, dropping each layer before the next is read
    (a comprehension would keep it alive during the read: two streamed layers in memory)."""
    out = []
    for lm in layer_matrices(source, layers, dense_baseline):
        out.append(fn(lm))
        del lm
    return out


def _pairs_frame(layer: int, matrix: str, level: str, labels: Sequence[str], sim: np.ndarray) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame(
        {
            "layer": layer,
            "matrix": matrix,
            "level": level,
            "expert_i": np.repeat(labels, n),
            "expert_j": np.tile(labels, n),
            "similarity": np.asarray(sim, dtype=float).reshape(-1),
        }
    )


def _same_shape_dense(lm: LayerMatrices, m: str, stack: torch.Tensor) -> torch.Tensor | None:
    """F's matrix ``m`` when it has the experts' shape (matrix-level comparisons need that)."""
    f = lm.dense.get(m) if lm.dense else None
    return f if f is not None and tuple(f.shape) == tuple(stack.shape[1:]) else None


@dataclass
class MatrixStats:
    """What one pass over one expert matrix kind gives: Gram matrices of the flattened experts
    (+F when same-shaped), raw and standardised per element, the neuron averages and, when the
    neuron-level PCA is the randomized one, its first pass."""

    labels: list[str]  # items of the Gram matrices
    gram: np.ndarray  # <W_i, W_j>
    std_gram: np.ndarray  # Gram of the per-element standardised items (matrix-level PCA)
    averages: np.ndarray  # [E, H] neuron-averaged experts
    extra_averages: dict[str, np.ndarray]  # "F" / "SE" neuron averages
    sketch: SketchStart | None = None  # first pass of the randomized neuron PCA (experts + F)


#: Components of the neuron- and matrix-level PCA plots.
PCA_COMPONENTS = 2


def matrix_stats(lm: LayerMatrices, m: str, seed: int = 0) -> MatrixStats:
    """One read of matrix kind ``m`` of a layer (see :class:`MatrixStats`): every element is
    converted to float32 once for the Gram matrices, the neuron averages and the first pass of
    the neuron-level PCA together (:func:`~moe_utils.metrics.projection.flattened_pass`)."""
    stack = lm.experts[m]
    f = _same_shape_dense(lm, m, stack)
    axis = resolve_neuron_axis(_KIND[m], 2)
    items = [stack[e] for e in range(lm.num_experts)] + ([f] if f is not None else [])
    n_rows, d = len(items) * int(stack.shape[1 + axis]), int(stack.shape[2 - axis])
    omega = (
        sketch_matrix(d, sketch_width(n_rows, d, PCA_COMPONENTS), seed) if neuron_pca_randomized(n_rows, d) else None
    )
    res = flattened_pass(items, axis, standardize=True, omega=omega)
    count = int(stack.shape[1 + axis])
    extra = {}
    for tag, mats in (("F", lm.dense), ("SE", lm.shared)):
        if mats and m in mats:
            extra[tag] = (
                res.neuron_sums[-1] / count if tag == "F" and f is not None else M.neuron_average(mats[m], _KIND[m])
            )
    labels = lm.labels + (["F"] if f is not None else [])
    return MatrixStats(labels, res.gram, res.std_gram, res.neuron_sums[: lm.num_experts] / count, extra, res.sketch)


def _finite_stats(stats: dict[str, MatrixStats]) -> bool:
    """Whether every item's squared norm is finite: false as soon as one weight is NaN or
    infinite (or, for absurdly large weights, a float32 square overflowed)."""
    return all(bool(np.isfinite(np.diag(st.gram)).all()) for st in stats.values())


def _layer_stats(lm: LayerMatrices, seed: int = 0) -> dict[str, MatrixStats]:
    return {m: matrix_stats(lm, m, seed) for m in lm.experts}


def _similarity_rows(lm: LayerMatrices, stats: dict[str, MatrixStats] | None = None) -> list[pd.DataFrame]:
    stats = stats or _layer_stats(lm)
    labels = lm.labels
    frames = []
    for m, st in stats.items():
        frames.append(_pairs_frame(lm.layer, m, "matrix", st.labels, M.cosine_from_gram(st.gram)))
        vecs = [st.averages] + [v[None] for v in st.extra_averages.values()]
        nlabels = labels + list(st.extra_averages)
        frames.append(_pairs_frame(lm.layer, m, "neuron", nlabels, M.cosine_matrix(np.concatenate(vecs))))
    return frames


GATE_NULL_DRAWS = 2000


def _gate_rows(
    lm: LayerMatrices, stats: dict[str, MatrixStats] | None = None, seed: int = 0
) -> tuple[list[dict], list[dict], dict]:
    """Per-matrix correlation rows, the expert-pair points behind them, and the layer's row of
    observation 1's label-permutation null (:func:`moe_utils.metrics.gate_permutation_null`)."""
    x = M.gate_similarity(lm.router)
    corr, points = [], []
    ys = {}
    for m, stack in lm.experts.items():
        y = M.cosine_matrix(stats[m].averages) if stats is not None else M.neuron_level_similarity(stack, _KIND[m])
        ys[m] = y
        res = M.gate_expert_regression(x, y)
        corr.append({"layer": lm.layer, "matrix": m, "r": float(res.r), "r2": float(res.r2), "n_pairs": res.n_pairs})
        for i, j in combinations(range(lm.num_experts), 2):
            points.append(
                {
                    "layer": lm.layer,
                    "matrix": m,
                    "pair": f"{lm.labels[j]}-{lm.labels[i]}",
                    "gate_similarity": float(x[j, i]),
                    "expert_similarity": float(y[j, i]),
                }
            )
    null = M.gate_permutation_null(x, ys, n_perm=GATE_NULL_DRAWS, seed=seed + lm.layer)
    return corr, points, {"layer": lm.layer, **null.as_dict()}


REORDER_COLUMNS = ["layer", "matrix", "expert_i", "expert_j", "sim_before", "sim_after", "gain", "tau"]


def _reorder_rows(
    lm: LayerMatrices, max_pairs: int | None, rng: np.random.Generator, workers: int | None = None
) -> list[dict]:
    """Reorder the chosen pairs of every matrix of one layer, spread over ``workers`` processes."""
    labels = lm.labels
    jobs, mats = [], {}
    for m, stack in lm.experts.items():
        mats[m] = {lab: stack[i] for i, lab in enumerate(labels)}
        f = _same_shape_dense(lm, m, stack)
        if f is not None:
            mats[m]["F"] = f
        pairs = list(combinations(list(mats[m]), 2))
        if max_pairs is not None and len(pairs) > max_pairs:
            pick = rng.choice(len(pairs), size=max_pairs, replace=False)
            pairs = [pairs[k] for k in sorted(pick)]
        jobs += [(m, a, b) for a, b in pairs]
    if not jobs:
        return []
    shape = tuple(next(iter(lm.experts.values())).shape[1:])
    n_neurons, width = max(shape), min(shape)
    # the cost matrix, two float32 copies of the pair and one block's float32 product
    job_bytes = 8 * n_neurons**2 + 16 * n_neurons * width + 4 * COSINE_BLOCK_ELEMENTS

    def reorder(job: tuple[str, str, str]) -> M.ReorderResult:
        m, a, b = job
        return M.reorder_neurons(mats[m][a], mats[m][b], _KIND[m])

    results = run_jobs(
        reorder, jobs, workers=workers, desc=f"layer {lm.layer}: reordering", unit="pair", job_bytes=job_bytes
    )
    return [
        {
            "layer": lm.layer,
            "matrix": m,
            "expert_i": a,
            "expert_j": b,
            "sim_before": float(res.sim_before),
            "sim_after": float(res.sim_after),
            "gain": float(res.sim_after - res.sim_before),
            "tau": float(res.tau),
        }
        for (m, a, b), res in zip(jobs, results, strict=True)
    ]


def _pca_rows(
    lm: LayerMatrices,
    level: str,
    max_neurons_per_expert: int,
    rng: np.random.Generator,
    stats: dict[str, MatrixStats] | None = None,
    seed: int = 0,
) -> list[dict]:
    if level not in ("matrix", "neuron"):
        raise ArgumentError(f"level must be 'matrix' or 'neuron'; got {level!r}")
    rows, ids = [], lm.labels
    for m, stack in lm.experts.items():
        f = _same_shape_dense(lm, m, stack)
        if level == "matrix":
            proj = (
                matrix_pca_from_gram(stats[m].std_gram, PCA_COMPONENTS, stats[m].labels)
                if stats is not None
                else M.matrix_pca(stack, extra=f, n_components=PCA_COMPONENTS)
            )
            keep = np.arange(len(proj.labels))
        else:
            sketch = stats[m].sketch if stats is not None else None
            proj = M.neuron_pca(stack, _KIND[m], extra=f, n_components=PCA_COMPONENTS, seed=seed, first_pass=sketch)
            labels = np.asarray(proj.labels)
            keep = np.concatenate(
                [
                    np.sort(
                        rng.choice(
                            np.flatnonzero(labels == lab),
                            size=min(max_neurons_per_expert, int((labels == lab).sum())),
                            replace=False,
                        )
                    )
                    for lab in dict.fromkeys(proj.labels)
                ]
            )
        for idx in keep:
            lab = proj.labels[idx]
            if lab.isdigit() and not (level == "matrix" and stats is not None):  # positional -> original id
                lab = ids[int(lab)]
            rows.append(
                {
                    "layer": lm.layer,
                    "matrix": m,
                    "kind": "F (dense)" if lab == "F" else "expert",
                    "label": lab,
                    "pc1": float(proj.coords[idx, 0]),
                    "pc2": float(proj.coords[idx, 1]),
                    "explained": float(proj.explained_variance_ratio[:2].sum()),
                }
            )
    return rows


def weight_report(
    source: WeightSource,
    layers: Sequence[int] | None = None,
    dense_baseline: WeightSource | None = None,
    reorder_max_pairs: int | None = None,
    max_neurons_per_expert: int = 64,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, pd.DataFrame]:
    """Every weight analysis of observation 1 in one pass over the layers, so a streamed
    checkpoint is read once: tables ``similarity``, ``gate_correlation``, ``gate_pairs``, ``gate_null``,
    ``reordering``, ``pca_matrix`` and ``pca_neuron`` (see the single-analysis functions).

    ``reorder_max_pairs=0`` skips the reordering (its table is then empty); ``workers`` is the
    number of processes the reordering pairs are spread over (default: the cores, fewer if their
    memory would not fit). Progress per layer and per pair goes to :func:`moe_utils.core.progress.progress`.
    """
    rng_reorder, rng_pca = np.random.default_rng(seed), np.random.default_rng(seed)
    sim, corr, points, reorder, pca_m, pca_n, nulls = [], [], [], [], [], [], []
    bar = progress(total=len(layers) if layers is not None else None, desc="weights", unit="layer")
    try:
        for lm in layer_matrices(source, layers, dense_baseline, defer_screen=True):
            bar.set_description_str(f"weights: layer {lm.layer}")
            stats = _layer_stats(lm, seed)
            if lm.rescreen is not None and not _finite_stats(stats):
                # a NaN or infinity anywhere shows in the squared norms; screen exactly, then
                # recompute without the excluded experts (or raise, naming the first one)
                lm = lm.rescreen()
                stats = _layer_stats(lm, seed)
            sim += _similarity_rows(lm, stats)
            c, p, n = _gate_rows(lm, stats, seed)
            corr += c
            points += p
            nulls.append(n)
            pca_m += _pca_rows(lm, "matrix", max_neurons_per_expert, rng_pca, stats)
            pca_n += _pca_rows(lm, "neuron", max_neurons_per_expert, rng_pca, stats, seed=seed)
            reorder += _reorder_rows(lm, reorder_max_pairs, rng_reorder, workers)
            del lm, stats  # free a streamed layer before the next one is read
            bar.update(1)
    finally:
        bar.close()
    return {
        "similarity": pd.concat(sim, ignore_index=True),
        "gate_correlation": pd.DataFrame(corr),
        "gate_pairs": pd.DataFrame(points),
        "gate_null": pd.DataFrame(nulls, columns=GATE_NULL_COLUMNS),
        "reordering": pd.DataFrame(reorder, columns=REORDER_COLUMNS),
        "pca_matrix": pd.DataFrame(pca_m),
        "pca_neuron": pd.DataFrame(pca_n),
    }


def weight_similarity(
    source: WeightSource, layers: Sequence[int] | None = None, dense_baseline: WeightSource | None = None
) -> pd.DataFrame:
    """Matrix-level and neuron-averaged cosine similarity between experts (+F, +SE), per layer.

    Matrix level (paper Fig. 1) flattens whole matrices, so only same-shaped matrices take part:
    the experts and F (when F has the experts' width). Neuron level (App. D) averages over the
    neuron axis, giving one H-vector per expert, so F and the shared expert always take part.
    """
    return pd.concat(
        [f for frames in each_layer(source, layers, dense_baseline, _similarity_rows) for f in frames],
        ignore_index=True,
    )


def offdiagonal_summary(sim: pd.DataFrame, groups: Sequence[str] = ("layer", "matrix", "level")) -> pd.DataFrame:
    """Mean similarity between distinct experts (S_ee) and between experts and F (S_ef) per group."""
    s = sim.loc[sim["expert_i"] != sim["expert_j"]]
    is_expert_i = s["expert_i"].str.isdigit()
    is_expert_j = s["expert_j"].str.isdigit()
    ee = s.loc[is_expert_i & is_expert_j].groupby(list(groups))["similarity"].mean().rename("S_ee")
    ef = s.loc[is_expert_i & (s["expert_j"] == "F")].groupby(list(groups))["similarity"].mean().rename("S_ef")
    return pd.concat([ee, ef], axis=1).reset_index()


def gate_correlation(source: WeightSource, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Per layer and matrix: Pearson r and r^2 between gate-row similarity and neuron-averaged
    expert similarity over the strictly lower triangle (paper Tables 3 and 5). F and SE excluded."""
    rows = each_layer(source, layers, None, lambda lm: _gate_rows(lm)[0])
    return pd.DataFrame([row for layer_rows in rows for row in layer_rows])


GATE_NULL_COLUMNS = [
    "layer",
    "observed",
    "null_mean",
    "null_sd",
    "null_q025",
    "null_q975",
    "p_greater",
    "draws",
    "effect",
]


def gate_null_table(source: WeightSource, layers: Sequence[int] | None = None, seed: int = 0) -> pd.DataFrame:
    """Per layer: observation 1's statistic and its label-permutation null (see ``_gate_rows``)."""
    rows = each_layer(source, layers, None, lambda lm: _gate_rows(lm, None, seed)[2])
    return pd.DataFrame(rows, columns=GATE_NULL_COLUMNS)


def reordering(
    source: WeightSource,
    layers: Sequence[int] | None = None,
    dense_baseline: WeightSource | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> pd.DataFrame:
    """Neuron reordering by linear assignment for expert pairs (paper Table 2).

    For every pair (and each matrix separately) the neurons of the second matrix are permuted to
    best match the first; the result has the cosine before/after and Kendall's tau of the
    permutation. ``max_pairs`` samples pairs (seeded) for models with many experts.
    """
    rng = np.random.default_rng(seed)
    rows = each_layer(source, layers, dense_baseline, lambda lm: _reorder_rows(lm, max_pairs, rng, workers))
    return pd.DataFrame([row for layer_rows in rows for row in layer_rows], columns=REORDER_COLUMNS)
