"""The hand-written :class:`FamilySpec` of each transformers MoE family, and ``FAMILIES``, the
registry of every hand-written spec.

Facts come from the transformers 5 modelling code (module paths, fused layouts, routers) and from
the public checkpoints' tensor names (see each spec's ``disk`` formats). To add a family, copy the
closest spec, adjust its fields, append it to ``FAMILIES`` at the bottom, and add its expected MoE
layers to ``tests/test_arch_families.py``. Families that need their publisher's code are in
:mod:`~moe_utils.arch.remote_code_families`, the dense baseline in
:mod:`~moe_utils.arch.dense_baseline`, the tensor-name layouts and tiny sizes the specs share in
:mod:`~moe_utils.arch.family_parts`.
"""

from __future__ import annotations

from moe_utils.arch.dense_baseline import MISTRAL_DENSE
from moe_utils.arch.family_parts import FUSED_EXPERTS, LLAMA_MLP, PER_EXPERT_LINEARS, TINY_SIZES, mlp_tensors, under
from moe_utils.arch.remote_code_families import DEEPSEEK_MOE, GROK1
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

MIXTRAL = FamilySpec(
    name="mixtral",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    description="Mixtral 8x7B / 8x22B: 8 SwiGLU experts, softmax top-2 renormalised, every layer MoE",
    defaults={"num_local_experts": 8, "num_experts_per_tok": 2},
    memory=WeightFormat("memory", moe=MoETensors("mlp.gate.weight", under("mlp", FUSED_EXPERTS))),
    disk=(
        WeightFormat(
            "original",
            moe=MoETensors(
                "block_sparse_moe.gate.weight",
                ExpertTensors(
                    "per_expert",
                    act="block_sparse_moe.experts.{e}.w1.weight",
                    up="block_sparse_moe.experts.{e}.w3.weight",
                    down="block_sparse_moe.experts.{e}.w2.weight",
                ),
            ),
        ),
    ),
    routing=RoutingSpec("softmax_topk", renormalize=True),
    config_class="MixtralConfig",
    tiny_config=dict(TINY_SIZES, intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
)

QWEN2_MOE = FamilySpec(
    name="qwen2_moe",
    quirks=(
        "a shared expert behind a sigmoid gate runs on every token and is added to the routed output",
        "with norm_topk_prob false the chosen softmax weights do not sum to 1",
    ),
    model_types=("qwen2_moe",),
    architectures=("Qwen2MoeForCausalLM",),
    description="Qwen1.5/Qwen2-MoE: fine-grained experts + one shared expert behind a sigmoid gate",
    defaults={"norm_topk_prob": False, "decoder_sparse_step": 1},
    keys=ConfigKeys(expert_intermediate=("moe_intermediate_size",)),
    layer_rule=LayerRule("sparse_step"),
    modules=ModulePaths(shared="shared_expert", shared_gate="shared_expert_gate"),
    memory=WeightFormat(
        "memory",
        moe=MoETensors(
            "mlp.gate.weight",
            under("mlp", FUSED_EXPERTS),
            shared=mlp_tensors("mlp.shared_expert"),
            shared_gate="mlp.shared_expert_gate.weight",
        ),
        dense=LLAMA_MLP,
    ),
    disk=(
        WeightFormat(
            "original",
            moe=MoETensors(
                "mlp.gate.weight",
                under("mlp", PER_EXPERT_LINEARS),
                shared=mlp_tensors("mlp.shared_expert"),
                shared_gate="mlp.shared_expert_gate.weight",
            ),
            dense=LLAMA_MLP,
        ),
    ),
    routing=RoutingSpec("softmax_topk", renormalize_key="norm_topk_prob"),
    config_class="Qwen2MoeConfig",
    tiny_config=dict(
        TINY_SIZES,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=3,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
    ),
)

QWEN3_MOE = FamilySpec(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    description="Qwen3-MoE: 128 fine-grained experts, softmax top-8 (renormalised when norm_topk_prob)",
    defaults={"norm_topk_prob": False, "decoder_sparse_step": 1},
    keys=ConfigKeys(expert_intermediate=("moe_intermediate_size",)),
    layer_rule=LayerRule("sparse_step"),
    memory=WeightFormat("memory", moe=MoETensors("mlp.gate.weight", under("mlp", FUSED_EXPERTS)), dense=LLAMA_MLP),
    disk=(
        WeightFormat("original", moe=MoETensors("mlp.gate.weight", under("mlp", PER_EXPERT_LINEARS)), dense=LLAMA_MLP),
    ),
    routing=RoutingSpec("softmax_topk", renormalize_key="norm_topk_prob"),
    config_class="Qwen3MoeConfig",
    tiny_config=dict(
        TINY_SIZES,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        norm_topk_prob=True,
    ),
)

OLMOE = FamilySpec(
    name="olmoe",
    model_types=("olmoe",),
    architectures=("OlmoeForCausalLM",),
    description="OLMoE: 64 experts, softmax top-8 (renormalised only when norm_topk_prob)",
    defaults={"norm_topk_prob": False},
    memory=WeightFormat("memory", moe=MoETensors("mlp.gate.weight", under("mlp", FUSED_EXPERTS))),
    disk=(WeightFormat("original", moe=MoETensors("mlp.gate.weight", under("mlp", PER_EXPERT_LINEARS))),),
    routing=RoutingSpec("softmax_topk", renormalize_key="norm_topk_prob"),
    config_class="OlmoeConfig",
    tiny_config=dict(TINY_SIZES, intermediate_size=24, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2),
)

_DEEPSEEK_KEYS = ConfigKeys(expert_intermediate=("moe_intermediate_size",))
_DEEPSEEK_MEMORY = WeightFormat(
    "memory",
    moe=MoETensors("mlp.gate.weight", under("mlp", FUSED_EXPERTS), shared=mlp_tensors("mlp.shared_experts")),
    dense=LLAMA_MLP,
)
_DEEPSEEK_DISK = WeightFormat(
    "original",
    moe=MoETensors("mlp.gate.weight", under("mlp", PER_EXPERT_LINEARS), shared=mlp_tensors("mlp.shared_experts")),
    dense=LLAMA_MLP,
)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)

DEEPSEEK_V2 = FamilySpec(
    name="deepseek_v2",
    quirks=(
        "the chosen softmax weights are not renormalised (and are multiplied by routed_scaling_factor), so they do not sum to 1",
        "the first first_k_dense_replace layers are dense and are skipped",
    ),
    model_types=("deepseek_v2",),
    architectures=("DeepseekV2ForCausalLM",),
    description="DeepSeek-V2(-Lite): softmax, greedy or group-limited top-k, not renormalised, "
    "x routed_scaling_factor, shared experts, first layers dense",
    defaults={"first_k_dense_replace": 0, "routed_scaling_factor": 1.0, "topk_method": "greedy"},
    keys=_DEEPSEEK_KEYS,
    layer_rule=LayerRule("first_k_dense"),
    modules=ModulePaths(shared="shared_experts"),
    memory=_DEEPSEEK_MEMORY,
    disk=(_DEEPSEEK_DISK,),
    routing=RoutingSpec(
        "softmax_topk",
        scale_key="routed_scaling_factor",
        group="max",
        group_when=("topk_method", "group_limited_greedy"),
    ),
    config_class="DeepseekV2Config",
    tiny_config=dict(
        TINY_SIZES,
        **_MLA,
        q_lora_rank=None,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        topk_method="group_limited_greedy",
        routed_scaling_factor=1.5,
    ),
)

DEEPSEEK_V3 = FamilySpec(
    name="deepseek_v3",
    quirks=(
        "router scores are sigmoids, not a softmax: the paper's gate-score columns are a softmax over the router logits, which is not what picks experts",
        "a bias-based balancing term (e_score_correction_bias) shifts which experts are chosen, but not their weights",
        "group-limited routing: experts are first restricted to the best groups",
        "the chosen weights are multiplied by routed_scaling_factor, so they need not sum to 1",
        "the first first_k_dense_replace layers are dense and are skipped",
    ),
    model_types=("deepseek_v3",),
    architectures=("DeepseekV3ForCausalLM",),
    description="DeepSeek-V3/R1: sigmoid scores, correction bias used for the choice only, "
    "group-limited top-k, renormalised, x routed_scaling_factor, shared expert",
    defaults={
        "first_k_dense_replace": 3,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
    },
    keys=_DEEPSEEK_KEYS,
    layer_rule=LayerRule("first_k_dense"),
    modules=ModulePaths(shared="shared_experts"),
    memory=WeightFormat(
        "memory",
        moe=MoETensors(
            "mlp.gate.weight",
            under("mlp", FUSED_EXPERTS),
            correction_bias="mlp.gate.e_score_correction_bias",
            shared=mlp_tensors("mlp.shared_experts"),
        ),
        dense=LLAMA_MLP,
    ),
    disk=(
        WeightFormat(
            "original",
            moe=MoETensors(
                "mlp.gate.weight",
                under("mlp", PER_EXPERT_LINEARS),
                correction_bias="mlp.gate.e_score_correction_bias",
                shared=mlp_tensors("mlp.shared_experts"),
            ),
            dense=LLAMA_MLP,
        ),
    ),
    routing=RoutingSpec(
        "sigmoid_topk",
        renormalize_key="norm_topk_prob",
        scale_key="routed_scaling_factor",
        group="top2_sum",
        renorm_eps=1e-20,
    ),
    config_class="DeepseekV3Config",
    tiny_config=dict(
        TINY_SIZES,
        **_MLA,
        q_lora_rank=16,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
)

_GPT_OSS_EXPERTS = ExpertTensors(
    "fused",
    gate_up="mlp.experts.gate_up_proj",
    down="mlp.experts.down_proj",
    order="interleaved",
    in_transposed=True,
    down_transposed=True,
    gate_up_bias="mlp.experts.gate_up_proj_bias",
    down_bias="mlp.experts.down_proj_bias",
)
GPT_OSS = FamilySpec(
    name="gpt_oss",
    quirks=("the router has a bias, included in the router logits",),
    model_types=("gpt_oss",),
    architectures=("GptOssForCausalLM",),
    description="GPT-OSS: router with bias, top-k of logits then softmax over k, clamped SwiGLU "
    "experts with biases (transposed, interleaved gate/up)",
    defaults={"swiglu_alpha": 1.702, "swiglu_limit": 7.0},
    modules=ModulePaths(router="router"),
    memory=WeightFormat("memory", moe=MoETensors("mlp.router.weight", _GPT_OSS_EXPERTS, router_bias="mlp.router.bias")),
    activation="gpt_oss_swiglu(alpha={swiglu_alpha},limit={swiglu_limit})",
    activation_keys=(),
    routing=RoutingSpec("topk_softmax"),
    config_class="GptOssConfig",
    tiny_config=dict(
        TINY_SIZES,
        head_dim=8,
        intermediate_size=24,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
)

PHIMOE = FamilySpec(
    name="phimoe",
    quirks=(
        "sparsemixer routing: each of the two weights is a softmax over a masked set of logits, so they do not sum to 1",
    ),
    model_types=("phimoe",),
    architectures=("PhimoeForCausalLM",),
    description="Phi-3.5-MoE: 16 experts, sparsemixer top-2 routing",
    defaults={"router_jitter_noise": 0.01},
    modules=ModulePaths(router="router"),
    memory=WeightFormat("memory", moe=MoETensors("mlp.router.weight", under("mlp", FUSED_EXPERTS))),
    disk=(
        WeightFormat(
            "original",
            moe=MoETensors(
                "block_sparse_moe.gate.weight",
                ExpertTensors(
                    "per_expert",
                    act="block_sparse_moe.experts.{e}.w1.weight",
                    up="block_sparse_moe.experts.{e}.w3.weight",
                    down="block_sparse_moe.experts.{e}.w2.weight",
                ),
            ),
        ),
    ),
    routing=RoutingSpec("sparsemixer", jitter_key="router_jitter_noise"),
    config_class="PhimoeConfig",
    tiny_config=dict(TINY_SIZES, intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
)

GRANITEMOE = FamilySpec(
    name="granitemoe",
    model_types=("granitemoe",),
    architectures=("GraniteMoeForCausalLM",),
    description="Granite-MoE: top-k of logits then softmax over k; fused 3-D weights on disk",
    modules=ModulePaths(block="block_sparse_moe", router="router"),
    memory=WeightFormat(
        "memory", moe=MoETensors("block_sparse_moe.router.weight", under("block_sparse_moe", FUSED_EXPERTS))
    ),
    disk=(
        WeightFormat(
            "original",
            moe=MoETensors(
                "block_sparse_moe.router.layer.weight",
                ExpertTensors(
                    "fused",
                    gate_up="block_sparse_moe.input_linear.weight",
                    down="block_sparse_moe.output_linear.weight",
                ),
            ),
        ),
    ),
    routing=RoutingSpec("topk_softmax"),
    config_class="GraniteMoeConfig",
    tiny_config=dict(TINY_SIZES, intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
)

_JAMBA_DENSE = mlp_tensors("feed_forward")
JAMBA = FamilySpec(
    name="jamba",
    quirks=(
        "hybrid stack: Mamba and attention layers; MoE every expert_layer_period-th layer, the others are dense and skipped",
        "the chosen softmax weights are not renormalised, so they do not sum to 1",
    ),
    model_types=("jamba",),
    architectures=("JambaForCausalLM",),
    description="Jamba: Mamba/attention hybrid, MoE every expert_layer_period-th layer, softmax top-2 not renormalised",
    defaults={"expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 16},
    layer_rule=LayerRule("period"),
    modules=ModulePaths(block="feed_forward", router="router", dense_mlp="feed_forward"),
    memory=WeightFormat(
        "memory", moe=MoETensors("feed_forward.router.weight", under("feed_forward", FUSED_EXPERTS)), dense=_JAMBA_DENSE
    ),
    disk=(
        WeightFormat(
            "original",
            moe=MoETensors("feed_forward.router.weight", under("feed_forward", PER_EXPERT_LINEARS)),
            dense=_JAMBA_DENSE,
        ),
    ),
    routing=RoutingSpec("softmax_topk"),
    config_class="JambaConfig",
    tiny_config=dict(
        TINY_SIZES,
        intermediate_size=48,
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=4,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=4,
    ),
)

DBRX = FamilySpec(
    name="dbrx",
    model_types=("dbrx",),
    architectures=("DbrxForCausalLM",),
    description="DBRX: 16 experts top-4, softmax then p-norm normalisation, 2-D stacked weights",
    defaults={"ffn_config.moe_normalize_expert_weights": 1.0},
    keys=ConfigKeys(expert_intermediate=("ffn_config.ffn_hidden_size",)),
    modules=ModulePaths(layers="transformer.blocks", block="ffn", router="router", router_weight="layer.weight"),
    memory=WeightFormat(
        "memory",
        layer_prefix="transformer.blocks.{layer}.",
        moe=MoETensors(
            "ffn.router.layer.weight",
            ExpertTensors(
                "fused",
                act="ffn.experts.mlp.w1",
                up="ffn.experts.mlp.v1",
                down="ffn.experts.mlp.w2",
                flat=True,
                down_transposed=True,
            ),
        ),
    ),
    activation_keys=("ffn_config.ffn_act_fn.name",),
    routing=RoutingSpec("softmax_topk", renormalize=True, norm_p_key="ffn_config.moe_normalize_expert_weights"),
    capture=RouterCapture("logits", experts_args=True),
    config_class="DbrxConfig",
    tiny_config=dict(
        vocab_size=320,
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2, ffn_act_fn={"name": "silu"}),
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
    ),
)

LLAMA4 = FamilySpec(
    name="llama4",
    quirks=(
        "the sigmoid routing weight scales the expert input, not its output",
        "MoE layers interleave with dense layers, which are skipped",
    ),
    model_types=("llama4_text",),
    architectures=("Llama4ForCausalLM",),
    description="Llama 4 (text): top-k of logits, sigmoid weight scales the expert input, "
    "one shared expert, MoE layers listed or interleaved",
    defaults={"interleave_moe_layer_step": 1, "num_experts_per_tok": 1},
    keys=ConfigKeys(expert_intermediate=("intermediate_size",), dense_intermediate=("intermediate_size_mlp",)),
    layer_rule=LayerRule("listed", step_key="interleave_moe_layer_step"),
    modules=ModulePaths(block="feed_forward", router="router", shared="shared_expert", dense_mlp="feed_forward"),
    memory=WeightFormat(
        "memory",
        moe=MoETensors(
            "feed_forward.router.weight",
            ExpertTensors(
                "fused",
                gate_up="feed_forward.experts.gate_up_proj",
                down="feed_forward.experts.down_proj",
                in_transposed=True,
                down_transposed=True,
            ),
            shared=mlp_tensors("feed_forward.shared_expert"),
        ),
        dense=mlp_tensors("feed_forward"),
    ),
    routing=RoutingSpec("topk_sigmoid_input"),
    capture=RouterCapture("scores_logits"),
    config_class="Llama4TextConfig",
    tiny_config=dict(
        TINY_SIZES,
        head_dim=8,
        intermediate_size=24,
        intermediate_size_mlp=48,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
    ),
)

QWEN3_NEXT = FamilySpec(
    name="qwen3_next",
    quirks=(
        "hybrid stack: linear-attention (Gated DeltaNet) and full-attention layers",
        "a shared expert behind a sigmoid gate runs on every token and is added to the routed output",
    ),
    model_types=("qwen3_next",),
    architectures=("Qwen3NextForCausalLM",),
    description="Qwen3-Next: hybrid linear/full attention, 512 experts + gated shared expert",
    defaults={"norm_topk_prob": True, "decoder_sparse_step": 1},
    keys=ConfigKeys(expert_intermediate=("moe_intermediate_size",)),
    layer_rule=LayerRule("sparse_step"),
    modules=QWEN2_MOE.modules,
    memory=QWEN2_MOE.memory,
    disk=QWEN2_MOE.disk,
    routing=RoutingSpec("softmax_topk", renormalize_key="norm_topk_prob"),
    config_class="Qwen3NextConfig",
    tiny_config=dict(
        TINY_SIZES,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"] * 2,
    ),
)

_HUNYUAN_SHARED = mlp_tensors("mlp.shared_mlp")
HUNYUAN_MOE = FamilySpec(
    name="hunyuan_v1_moe",
    model_types=("hunyuan_v1_moe",),
    architectures=("HunYuanMoEV1ForCausalLM",),
    description="Hunyuan-MoE: fp32 router gate.wg, softmax top-k renormalised, one shared MLP",
    keys=ConfigKeys(top_k=("moe_topk", "num_experts_per_tok")),
    modules=ModulePaths(router="gate", router_weight="wg.weight", shared="shared_mlp"),
    memory=WeightFormat(
        "memory", moe=MoETensors("mlp.gate.wg.weight", under("mlp", FUSED_EXPERTS), shared=_HUNYUAN_SHARED)
    ),
    disk=(
        WeightFormat(
            "original", moe=MoETensors("mlp.gate.wg.weight", under("mlp", PER_EXPERT_LINEARS), shared=_HUNYUAN_SHARED)
        ),
    ),
    routing=RoutingSpec("softmax_topk", renormalize=True),
    config_class="HunYuanMoEV1Config",
    tiny_config=dict(TINY_SIZES, head_dim=8, intermediate_size=24, num_hidden_layers=2, num_experts=4, moe_topk=2),
)

# Families of the installed transformers without a spec here get a derived one
# (moe_utils/models/derive.py). The specs listed here stay hand-written where derivation cannot work or
# where public checkpoints need more than transformers shows:
#   dbrx          its MoE sizes are nested in ffn_config (no top-level experts-per-token key)
#   phimoe        sparsemixer routing is not one of the candidate routing functions
#   llama4        the experts run densely on router-scaled inputs, not experts(x, index, weights)
#   deepseek, grok1  publisher code, not part of transformers (weights-only analyses)
#   mistral       the dense baseline (no experts to derive)
#   the others    they pin the public checkpoints' on-disk names and config defaults (tested
#                 against them); the coverage page shows that derivation agrees with them.
FAMILIES: tuple[FamilySpec, ...] = (
    MIXTRAL,
    QWEN2_MOE,
    QWEN3_MOE,
    OLMOE,
    DEEPSEEK_V2,
    DEEPSEEK_V3,
    GPT_OSS,
    PHIMOE,
    GRANITEMOE,
    JAMBA,
    DBRX,
    LLAMA4,
    QWEN3_NEXT,
    HUNYUAN_MOE,
    DEEPSEEK_MOE,
    GROK1,
    MISTRAL_DENSE,
)
