"""Family specs of checkpoints that need their publisher's code (``trust_remote_code``): not part of
transformers, so only the weights-only analyses run on them (no model is built). Listed in
:data:`moe_utils.arch.families.FAMILIES`."""

from __future__ import annotations

from moe_utils.arch.family_parts import LLAMA_MLP, PER_EXPERT_LINEARS, mlp_tensors, under
from moe_utils.arch.spec import (
    ConfigKeys,
    ExpertTensors,
    FamilySpec,
    LayerRule,
    ModulePaths,
    MoETensors,
    RouterCapture,
    RoutingSpec,
    WeightFormat,
)

DEEPSEEK_MOE = FamilySpec(
    name="deepseek",
    model_types=("deepseek",),
    architectures=("DeepseekForCausalLM",),
    description="DeepSeekMoE 16B (remote code): dense layer 0, 64 routed + 2 shared experts "
    "(one MLP of width 2*I), softmax top-6 not renormalised",
    native=False,
    defaults={"first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False},
    keys=ConfigKeys(num_experts=("n_routed_experts",), expert_intermediate=("moe_intermediate_size",)),
    layer_rule=LayerRule("first_k_dense", freq_key="moe_layer_freq"),
    modules=ModulePaths(shared="shared_experts"),
    memory=WeightFormat(
        "remote-code",
        moe=MoETensors("mlp.gate.weight", under("mlp", PER_EXPERT_LINEARS), shared=mlp_tensors("mlp.shared_experts")),
        dense=LLAMA_MLP,
    ),
    routing=RoutingSpec("softmax_topk", renormalize_key="norm_topk_prob", renorm_eps=1e-20),
    capture=RouterCapture("index_weights_aux"),
)

GROK1 = FamilySpec(
    name="grok1",
    model_types=("grok-1", "grok1"),
    architectures=("Grok1ModelForCausalLM", "Grok1ForCausalLM"),
    detect_keys=("attn_output_multiplier", "embedding_multiplier_scale", "num_experts"),
    description="Grok-1 (hpcai-tech port, remote code): 8 GELU experts, softmax top-2 not "
    "renormalised; config has no model_type",
    native=False,
    defaults={"num_experts": 8, "num_experts_per_tok": 2},
    modules=ModulePaths(block="moe_block"),
    memory=WeightFormat(
        "remote-code",
        moe=MoETensors(
            "moe_block.gate.weight",
            ExpertTensors(
                "per_expert",
                act="moe_block.experts.{e}.linear.weight",
                up="moe_block.experts.{e}.linear_v.weight",
                down="moe_block.experts.{e}.linear_1.weight",
            ),
        ),
    ),
    activation="gelu",
    activation_keys=(),
    routing=RoutingSpec("softmax_topk"),
    capture=RouterCapture("logits"),
)
