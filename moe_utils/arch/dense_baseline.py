"""The dense baseline ("F" in the paper): Mistral/Llama-style decoders whose MLP is one SwiGLU, the
model each MoE is compared with. Listed in :data:`moe_utils.arch.families.FAMILIES`."""

from __future__ import annotations

from moe_utils.arch.family_parts import LLAMA_MLP, TINY_SIZES
from moe_utils.arch.spec import FamilySpec, LayerRule, WeightFormat

MISTRAL_DENSE = FamilySpec(
    name="mistral",
    model_types=("mistral", "llama", "qwen2", "qwen3", "olmo", "olmo2"),
    architectures=(
        "MistralForCausalLM",
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
    ),
    description="Dense Mistral/Llama-style SwiGLU MLP (the paper's dense baseline F)",
    is_moe=False,
    layer_rule=LayerRule("none"),
    memory=WeightFormat("memory", dense=LLAMA_MLP),
    config_class="MistralConfig",
    tiny_config=dict(TINY_SIZES, intermediate_size=48, num_hidden_layers=2),
)
