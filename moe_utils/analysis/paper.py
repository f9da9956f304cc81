"""Published values from Lo et al., "A Closer Look into Mixture-of-Experts in Large Language Models"
(arXiv 2406.18219v3, Findings of NAACL 2025), quoted beside our own results.

These are the paper's numbers for the paper's models, never ours. Each entry records where it
comes from, and whether it is printed in the paper or read off a figure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperValue:
    """One published number with its provenance."""

    value: float | None
    model: str
    source: str
    note: str = ""

    def label(self) -> str:
        text = "n/a" if self.value is None else f"{self.value:g}"
        return f"{text} ({self.model}, paper {self.source}{'; ' + self.note if self.note else ''})"


PAPER_MODELS = ("Mixtral 8x7B", "Mixtral 8x22B", "DeepSeekMoE 16B", "Grok-1")

# Routed experts per MoE layer of the paper's models where a random baseline 1/E is quoted
# (Mixtral 8x7B sends each token to 2 of its 8 experts).
NUM_EXPERTS = {"Mixtral 8x7B": 8}

# Table 3: average over layers of per-layer r^2 (rounded to 2 dp first) between gate-embedding
# similarity and neuron-averaged expert-weight similarity.
GATE_R2 = {
    "Mixtral 8x7B": {"W_up": 0.06, "W_act": 0.33, "W_down": 0.07},
    "Mixtral 8x22B": {"W_up": 0.13, "W_act": 0.26, "W_down": 0.13},
    "DeepSeekMoE 16B": {"W_up": 0.00, "W_act": 0.40, "W_down": 0.00},
    "Grok-1": {"W_up": 0.04, "W_act": 0.15, "W_down": 0.04},
}

# Table 5: per-layer Pearson r between gate similarity and W_act neuron-averaged similarity.
GATE_ACT_R_PER_LAYER = {
    "Mixtral 8x7B": [
        0.82,
        -0.44,
        0.26,
        0.54,
        0.48,
        0.70,
        0.84,
        0.74,
        0.42,
        0.66,
        0.53,
        0.32,
        0.14,
        0.51,
        0.66,
        0.40,
        0.39,
        0.53,
        0.35,
        0.17,
        0.51,
        0.63,
        0.36,
        0.51,
        0.48,
        0.66,
        0.81,
        0.63,
        0.73,
        0.75,
        0.84,
        0.57,
    ],
    "DeepSeekMoE 16B": [
        0.75,
        0.78,
        0.71,
        0.77,
        0.77,
        0.69,
        0.73,
        0.66,
        0.66,
        0.63,
        0.60,
        0.54,
        0.60,
        0.56,
        0.58,
        0.53,
        0.55,
        0.57,
        0.57,
        0.58,
        0.62,
        0.62,
        0.62,
        0.68,
        0.62,
        0.58,
        0.46,
    ],
    "Grok-1": [
        0.89,
        -0.10,
        -0.28,
        0.66,
        0.52,
        0.37,
        0.28,
        0.17,
        0.51,
        0.84,
        0.28,
        0.30,
        0.46,
        0.14,
        0.00,
        0.54,
        0.32,
        0.30,
        0.10,
        -0.17,
        0.24,
        0.58,
        0.46,
        0.14,
        0.10,
        0.00,
        -0.10,
        -0.26,
        -0.66,
        -0.41,
        -0.83,
        -0.76,
        -0.24,
        -0.53,
        -0.46,
        0.14,
        0.17,
        -0.46,
        -0.17,
        -0.26,
        -0.70,
        0.17,
        0.00,
        -0.17,
        -0.22,
        0.14,
        -0.47,
        -0.44,
        -0.17,
        -0.14,
        0.17,
        0.22,
        0.10,
        0.33,
        -0.24,
        -0.57,
        -0.24,
        -0.37,
        0.00,
        -0.69,
        -0.17,
        0.35,
        0.30,
        0.10,
    ],
}
GATE_ACT_R_FIRST_LAYER = {"DeepSeekMoE 16B": 1, "Mixtral 8x7B": 0}

# Table 2: average Kendall tau of the neuron permutation found by linear assignment.
KENDALL_TAU = {
    "Mixtral 8x7B": PaperValue(0.75, "Mixtral 8x7B", "Table 2"),
    "DeepSeekMoE 16B": PaperValue(-0.0002, "DeepSeekMoE 16B", "Table 2"),
    "Grok-1": PaperValue(-0.0003, "Grok-1", "Table 2"),
}

# Section 4.1.1 / 4.3: matrix-level weight similarity (text approximations).
MATRIX_SIMILARITY = {
    "Mixtral 8x7B": PaperValue(0.3, "Mixtral 8x7B", "Sec. 4.1.1", "experts vs experts, mostly 0.2-0.4"),
    "Mixtral 8x7B vs F": PaperValue(0.6, "Mixtral 8x7B", "Sec. 4.1.1", "experts vs the Mistral 7B FFN"),
    "DeepSeekMoE 16B": PaperValue(0.0, "DeepSeekMoE 16B", "Sec. 4.1.1", "approximately 0"),
    "Grok-1": PaperValue(0.0, "Grok-1", "Sec. 4.1.1", "approximately 0"),
}


def matrix_similarity_experts() -> dict[str, float | None]:
    """Sec. 4.1.1's expert-vs-expert matrix-level similarity per paper model."""
    return {v.model: v.value for k, v in MATRIX_SIMILARITY.items() if not k.endswith(" vs F")}


def matrix_similarity_vs_dense() -> dict[str, float | None]:
    """Sec. 4.1.1's expert-vs-F (dense FFN) matrix-level similarity per paper model."""
    return {v.model: v.value for k, v in MATRIX_SIMILARITY.items() if k.endswith(" vs F")}


# Appendix G, Fig. 10 (Mixtral panel): share of (token, layer) pairs where the expert with the
# largest output norm also gets the highest gate score. Read off the published figure.
TOP1_NORM_AGREEMENT = PaperValue(
    0.69, "Mixtral 8x7B", "Fig. 10", "read off the published figure, not printed in the text"
)
TOP2_NORM_AGREEMENT = PaperValue(
    0.84, "Mixtral 8x7B", "Fig. 10", "top-norm expert among the two highest scores; read off the figure"
)

# Appendix H: share of intermediate activations act(W_act x) with |value| > 1e-3.
ACTIVATION_RATIO = {
    "Mixtral 8x7B": PaperValue(0.996, "Mixtral 8x7B", "App. H", "SiLU"),
    "DeepSeekMoE 16B": PaperValue(0.997, "DeepSeekMoE 16B", "App. H", "SiLU"),
    "Grok-1": PaperValue(0.253, "Grok-1", "App. H", "GELU"),
}

# Sec. 4.1.1 and 5.1 (Figs. 2-3): output similarity by depth, stated qualitatively. Many
# per-token cosine similarities between expert outputs in Mixtral's last layers exceed this mark.
LAST_LAYER_HIGH_SIMILARITY = 0.8
DEPTH_FINDING = (
    "lower similarity in deep layers (Mixtral 8x7B layers 22-27 for outputs) and many output "
    f"similarities above {LAST_LAYER_HIGH_SIMILARITY:g} in the last layers of Mixtral 8x7B, with the "
    "same pattern in DeepSeekMoE and high similarity everywhere for Grok-1"
)

# Section 6, Table 6: the paper's training experiment (24-layer, 3.6B MoE; one dense layer moved).
DENSE_LAYER_EXPERIMENT = {
    "none": (8.51, 39.84),
    1: (8.50, 39.42),
    6: (8.49, 38.55),
    12: (8.51, 38.21),
    18: (8.59, 37.99),
    24: (8.58, 38.94),
}

SHORT_PROMPT_SOURCE = "the paper's short input (Sec. 5), which the paper attributes to an MoE survey (Cai et al., 2024)"
