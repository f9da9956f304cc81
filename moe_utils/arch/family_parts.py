"""Pieces several family specs share: tensor-name layouts of transformers' experts and MLPs, and
the tiny sizes of random test models. The specs themselves are in :mod:`moe_utils.arch.families`."""

from __future__ import annotations

from moe_utils.arch.spec import ExpertTensors, MLPTensors

# Shared tiny sizes for random test models (vocab fits the 259-token byte-level tokenizer).
TINY_SIZES = dict(
    vocab_size=320,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
)

# Fused in-memory experts of transformers 5: gate_up [E,2I,H] (gate rows first), down [E,H,I].
FUSED_EXPERTS = ExpertTensors("fused", gate_up="experts.gate_up_proj", down="experts.down_proj")
# Per-expert Linear names written by save_pretrained for Qwen/DeepSeek/OLMoE/Jamba and hub files.
PER_EXPERT_LINEARS = ExpertTensors(
    "per_expert",
    act="experts.{e}.gate_proj.weight",
    up="experts.{e}.up_proj.weight",
    down="experts.{e}.down_proj.weight",
)
LLAMA_MLP = MLPTensors("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def under(block: str, experts: ExpertTensors) -> ExpertTensors:
    """Prefix every name of an ExpertTensors with the block path (``"mlp."``)."""

    def p(name: str | None) -> str | None:
        return None if name is None else f"{block}.{name}"

    return ExpertTensors(
        experts.layout,
        down=f"{block}.{experts.down}",
        gate_up=p(experts.gate_up),
        act=p(experts.act),
        up=p(experts.up),
        order=experts.order,
        in_transposed=experts.in_transposed,
        down_transposed=experts.down_transposed,
        flat=experts.flat,
        gate_up_bias=p(experts.gate_up_bias),
        down_bias=p(experts.down_bias),
    )


def mlp_tensors(prefix: str) -> MLPTensors:
    """The gated MLP (gate/up/down Linear weights) under ``prefix`` (``"mlp"``, ``"mlp.shared_experts"``)."""
    return MLPTensors(f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight")
