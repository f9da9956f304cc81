"""Shapes of the paper's models and what running each notebook on them takes.

The shapes are copied from the models' published ``config.json`` files (Mixtral 8x7B and 8x22B,
Mistral 7B, DeepSeekMoE 16B base, Grok-1 as ported by hpcai-tech). The projections scale
figures *measured* by the benchmarks in ``benchmarks/`` (their results files) to these shapes;
they are estimates with stated assumptions, never measurements:

* observation 1 without reordering walks every expert matrix a fixed number of times, so its
  time scales with the bytes of expert weights and its peak memory with one layer's bytes;
* one reordered pair costs a cosine matrix (``2 I^2 H`` flops) and a linear assignment, whose
  cost grows like ``I^3`` at worst (used as the scaling, an upper bound); a worker needs the
  ``I x I`` float64 cost matrix plus two float32 copies of the pair;
* observations 2 and 3 evaluate every expert on every token, so their time per layer scales
  with ``E H I``; on a CPU the whole model has to be in memory (or offloaded to disk).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory and time (bf16 checkpoints: 2 bytes a weight)."""

    name: str
    layers: int
    moe_layers: int
    hidden: int
    intermediate: int  # per routed expert
    experts: int
    top_k: int
    vocab: int
    heads: int
    kv_heads: int
    shared_intermediate: int = 0  # all shared experts together
    dense_intermediate: int = 0  # FFN width of the dense (non-MoE) layers
    tied_embeddings: bool = False
    reordered_layers: int = 8  # layers the paper reorders (Table 2 uses 8 Mixtral layers)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def expert_params_per_layer(self) -> int:
        return 3 * self.experts * self.hidden * self.intermediate

    def layer_params(self, moe: bool = True) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        if moe:
            mlp = (
                self.expert_params_per_layer() + 3 * self.hidden * self.shared_intermediate + self.experts * self.hidden
            )
        else:
            mlp = 3 * self.hidden * self.dense_intermediate
        return attn + mlp + 2 * self.hidden

    def params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        dense = self.layers - self.moe_layers
        return emb + self.moe_layers * self.layer_params(True) + dense * self.layer_params(False) + self.hidden

    def weight_bytes(self, bytes_per_weight: int = 2) -> int:
        return self.params() * bytes_per_weight

    def expert_layer_bytes(self, bytes_per_weight: int = 2) -> int:
        return self.expert_params_per_layer() * bytes_per_weight

    def reorder_pairs_per_layer(self, with_dense: bool) -> int:
        """Pairs of one layer over the three matrices (experts, plus each expert vs F)."""
        e = self.experts
        return 3 * (e * (e - 1) // 2 + (e if with_dense else 0))


PAPER_MODEL_SHAPES: dict[str, ModelShape] = {
    "Mixtral 8x7B": ModelShape("Mixtral 8x7B", 32, 32, 4096, 14336, 8, 2, 32000, 32, 8),
    "Mixtral 8x22B": ModelShape("Mixtral 8x22B", 56, 56, 6144, 16384, 8, 2, 32000, 48, 8),
    "DeepSeekMoE 16B": ModelShape(
        "DeepSeekMoE 16B",
        28,
        27,
        2048,
        1408,
        64,
        6,
        102400,
        16,
        16,
        shared_intermediate=2 * 1408,
        dense_intermediate=10944,
    ),
    "Grok-1": ModelShape("Grok-1", 64, 64, 6144, 32768, 8, 2, 131072, 48, 8, tied_embeddings=True),
}
#: The paper's dense "F" for Mixtral 8x7B.
MISTRAL_7B = ModelShape("Mistral 7B", 32, 0, 4096, 0, 0, 0, 32000, 32, 8, dense_intermediate=14336)
#: The dense baselines the paper compares with (only Mixtral 8x7B has one of the same width).
DENSE_BASELINES = {"Mixtral 8x7B": MISTRAL_7B}


@dataclass(frozen=True)
class Measured:
    """Rates from one benchmark run (see ``benchmarks/results/``)."""

    obs1_seconds_per_expert_byte: float  # weight_report without reordering, cold
    obs1_peak_over_layer: float  # its peak RSS / one layer's expert bytes
    pair_seconds: float  # seconds per reordered pair at the reference width (throughput)
    pair_width: tuple[int, int]  # (I, H) of that pair
    workers: int  # processes the pairs were spread over (for memory)
    dynamic_seconds_per_layer: dict[str, float]  # notebook -> seconds for one layer at the reference width
    dynamic_excess_bytes: dict[str, float]  # notebook -> peak RSS minus the weights, at the reference width
    # (notebooks missing from these two: CPU time not projected, CPU memory = weights + activations)
    reference: tuple[int, int, int] = (8, 4096, 14336)  # (E, H, I) of the dynamic benchmark


def project(shape: ModelShape, m: Measured) -> list[dict]:
    """Per notebook: CPU hours and peak CPU memory (projected), and a GPU run's memory."""
    e0, h0, i0 = m.reference
    layer_bytes = shape.expert_layer_bytes()
    dense = DENSE_BASELINES.get(shape.name)
    dense_layer = 3 * dense.hidden * dense.dense_intermediate * 2 if dense else 0
    rows = []
    t_obs1 = m.obs1_seconds_per_expert_byte * layer_bytes * shape.moe_layers
    rows.append(
        {
            "model": shape.name,
            "notebook": "obs1 (no reordering)",
            "cpu_hours": t_obs1 / 3600,
            "cpu_peak_gb": (m.obs1_peak_over_layer * layer_bytes + dense_layer) / 1e9,
            "gpu_memory_gb": None,
            "note": "weights streamed layer by layer; a GPU does not help",
        }
    )
    i, h = shape.intermediate, shape.hidden
    pi, ph = m.pair_width
    pair = m.pair_seconds * max((i / pi) ** 3, (i / pi) ** 2 * (h / ph))
    pairs = shape.reorder_pairs_per_layer(with_dense=dense is not None) * shape.reordered_layers
    worker_bytes = 8 * i * i + 16 * i * h
    rows.append(
        {
            "model": shape.name,
            "notebook": f"obs1 reordering ({shape.reordered_layers} layers)",
            "cpu_hours": pair * pairs / 3600,
            "cpu_peak_gb": (layer_bytes + m.workers * worker_bytes) / 1e9,
            "gpu_memory_gb": None,
            "note": f"{pairs} pairs, {pair:.1f} s each, {m.workers} workers of {worker_bytes / 1e9:.1f} GB",
        }
    )
    scale = (shape.experts * h * i) / (e0 * h0 * i0)
    tokens = 1100
    activations = (
        shape.moe_layers * tokens * h * 4 * 2  # captured inputs and outputs, fp32
        + tokens * (shape.experts + 2) * h * 4  # all experts' outputs of one layer
        + tokens * i * 4 * 2  # one expert's hidden state
        + tokens * tokens * shape.heads * 2
    )  # eager attention scores of one layer
    for name in ("obs2_router_norms", "obs3_depth_diversity"):
        seconds = m.dynamic_seconds_per_layer.get(name)
        excess = m.dynamic_excess_bytes.get(name, activations)
        rows.append(
            {
                "model": shape.name,
                "notebook": name,
                "cpu_hours": None if seconds is None else seconds * scale * shape.moe_layers / 3600,
                "cpu_peak_gb": (shape.weight_bytes() + excess * (scale if name in m.dynamic_excess_bytes else 1)) / 1e9,
                "gpu_memory_gb": (shape.weight_bytes() + activations) / 1e9,
                "note": "whole model in memory (or offloaded); all experts on every token",
            }
        )
    return rows
