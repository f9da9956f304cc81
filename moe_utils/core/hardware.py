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
    head_dim_override: int = 0  # config's head_dim where it is not hidden / heads
    attention_override: int = 0  # attention parameters per layer where they follow no q/k/v/o rule (MLA)
    expert_bytes_per_weight: float = 2.0  # as published: bf16 2, FP8 1 (+ scales), MXFP4 4.25 bits

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.heads

    def expert_params_per_layer(self) -> int:
        return 3 * self.experts * self.hidden * self.intermediate

    def layer_params(self, moe: bool = True) -> int:
        attn = self.attention_override or self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
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
#: Newer MoE models, from their published config.json (layers, hidden, expert width, experts, top-k,
#: vocabulary, heads, KV heads; shared experts, dense layers, MLA attention where they have them).
NEWER_MODEL_SHAPES: dict[str, ModelShape] = {
    "Qwen3-30B-A3B": ModelShape("Qwen3-30B-A3B", 48, 48, 2048, 768, 128, 8, 151936, 32, 4, head_dim_override=128),
    "Qwen3-235B-A22B": ModelShape("Qwen3-235B-A22B", 94, 94, 4096, 1536, 128, 8, 151936, 64, 4, head_dim_override=128),
    "gpt-oss-20b": ModelShape(
        "gpt-oss-20b", 24, 24, 2880, 2880, 32, 4, 201088, 64, 8, head_dim_override=64, expert_bytes_per_weight=4.25 / 8
    ),
    "gpt-oss-120b": ModelShape(
        "gpt-oss-120b",
        36,
        36,
        2880,
        2880,
        128,
        4,
        201088,
        64,
        8,
        head_dim_override=64,
        expert_bytes_per_weight=4.25 / 8,
    ),
    # MLA: q_a 7168x1536, q_b 1536 x heads*192, kv_a 7168x576, kv_b 512 x heads*256, o heads*128 x 7168
    "DeepSeek-V3": ModelShape(
        "DeepSeek-V3",
        61,
        58,
        7168,
        2048,
        256,
        8,
        129280,
        128,
        128,
        shared_intermediate=2048,
        dense_intermediate=18432,
        attention_override=7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168,
        expert_bytes_per_weight=1.0,
    ),
    "Kimi K2": ModelShape(
        "Kimi K2",
        61,
        60,
        7168,
        2048,
        384,
        8,
        163840,
        64,
        64,
        shared_intermediate=2048,
        dense_intermediate=18432,
        attention_override=7168 * 1536 + 1536 * 64 * 192 + 7168 * 576 + 512 * 64 * 256 + 64 * 128 * 7168,
        expert_bytes_per_weight=1.0,
    ),
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


@dataclass(frozen=True)
class MeasuredStream:
    """Rates from one run of ``benchmarks/stream_mixtral.py`` (observations 2-3 one layer at a time)
    and ``benchmarks/dynamic_model.py`` (all experts on the long input, one Mixtral-width layer)."""

    read_seconds_per_byte: float  # cold read of the checkpoint files
    seconds_per_layer: dict[str, float]  # notebook -> compute per layer at the reference width, long input
    peak_over_layer: dict[str, float]  # notebook -> peak RSS / (one layer's bytes + activations)
    reference: tuple[int, int, int] = (8, 4096, 14336)


def project_stream(shape: ModelShape, m: MeasuredStream, machine_gb: float = 24.0) -> list[dict]:
    """Per notebook, with the layer stream: CPU hours, peak CPU memory, whether it fits a
    ``machine_gb`` machine, and the GPU memory one layer at a time needs (bf16 layer + activations)."""
    e0, h0, i0 = m.reference
    scale = (shape.experts * shape.hidden * shape.intermediate) / (e0 * h0 * i0)
    stored = shape.expert_params_per_layer() * shape.expert_bytes_per_weight + 2 * (
        shape.layer_params(True) - shape.expert_params_per_layer()
    )
    in_memory = 2 * shape.layer_params(True)  # the layer as transformers holds it: bf16, quantized experts decoded
    tokens = 1100
    activations = shape.moe_layers * tokens * shape.hidden * 4 * 3 + tokens * (shape.experts + 2) * shape.hidden * 4
    rows = []
    for name, seconds in m.seconds_per_layer.items():
        peak = m.peak_over_layer[name] * (in_memory + activations)
        hours = shape.moe_layers * (seconds * scale + stored * m.read_seconds_per_byte) / 3600
        gpu = (in_memory + activations) / 1e9
        rows.append(
            {
                "model": shape.name,
                "notebook": name,
                "cpu_hours": hours,
                "cpu_peak_gb": peak / 1e9,
                "fits_cpu": peak / 1e9 <= machine_gb,
                "gpu_gb": gpu,
                "gpu_24": gpu <= 24 * 0.9,
                "gpu_80": gpu <= 80 * 0.9,
                "whole_model_gb": shape.weight_bytes() / 1e9,
            }
        )
    return rows
