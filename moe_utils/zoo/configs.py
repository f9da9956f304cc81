"""Architectures and training budgets of the model organisms (one place, so cards and code agree)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import MistralConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

VOCAB_SIZE = 4096
SEQ_LEN = 256  # tokens per training sample, <s> included; also the context length
SHAPE: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,  # dense FFN width == expert width (as Mistral 7B / Mixtral 8x7B)
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ_LEN,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    initializer_range=0.02,
)
NUM_EXPERTS = 8
TOP_K = 2
ROUTER_AUX_LOSS_COEF = 0.01
SPECIAL_TOKENS: dict[str, Any] = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE_TRAINING: dict[str, Any] = dict(
    router_aux_loss_coef=ROUTER_AUX_LOSS_COEF, output_router_logits=True, **SPECIAL_TOKENS
)


def dense_config(vocab_size: int = VOCAB_SIZE, **overrides: Any) -> MistralConfig:
    """Mistral-architecture config of ``tiny-dense`` (the dense "F" baseline)."""
    from transformers import MistralConfig

    kw: dict[str, Any] = dict(SHAPE, vocab_size=vocab_size, sliding_window=None, **SPECIAL_TOKENS)
    kw.update(overrides)
    return MistralConfig(**kw)


def moe_config(vocab_size: int = VOCAB_SIZE, **overrides: Any) -> MixtralConfig:
    """Mixtral-architecture config shared by ``tiny-moe-upcycled`` and ``tiny-moe-scratch``."""
    from transformers import MixtralConfig

    kw: dict[str, Any] = dict(
        SHAPE,
        vocab_size=vocab_size,
        sliding_window=None,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        router_jitter_noise=0.0,
        **MOE_TRAINING,
    )
    kw.update(overrides)
    return MixtralConfig(**kw)


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings of one training run."""

    steps: int
    batch_size: int = 8
    seq_len: int = SEQ_LEN
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens"] = self.tokens
        return d


# Token budget T for each MoE model: scratch trains T; upcycled = dense T/2 + continued T/2.
TOTAL_STEPS = 1200
TRAIN_SPECS = {
    "tiny-dense": TrainSpec(steps=TOTAL_STEPS // 2, lr=2e-3, warmup_steps=60, seed=1),
    "tiny-moe-upcycled": TrainSpec(steps=TOTAL_STEPS // 2, lr=1e-3, warmup_steps=30, seed=2),
    "tiny-moe-scratch": TrainSpec(steps=TOTAL_STEPS, lr=2e-3, warmup_steps=60, seed=3),
}


# Fine-grained organism (DeepSeekMoE's recipe at the organisms' scale): every MoE layer holds the
# same 2,048 FFN neurons as tiny-moe-scratch (8 x 256), split into one shared expert of 128 neurons
# (two fine experts' worth, as DeepSeekMoE 16B keeps 2 shared experts) and 30 routed experts of 64;
# top-6 routed + the shared one gives 6 x 64 + 128 = 512 active neurons, as top-2 of 8 x 256 does.
# The first layer is a dense FFN of 512 neurons, as wide as the active part of an MoE layer
# (DeepSeekMoE 16B's dense first layer is likewise about as wide as its active experts).
FINE_EXPERT_WIDTH = 64
FINE_SHARED_WIDTH = 128
FINE_NUM_EXPERTS = 30
FINE_TOP_K = 6
FINE_DENSE_LAYERS = (0,)
FINE_DENSE_WIDTH = FINE_SHARED_WIDTH + FINE_TOP_K * FINE_EXPERT_WIDTH


def fine_config(vocab_size: int = VOCAB_SIZE, **overrides: Any) -> Qwen2MoeConfig:
    """Qwen2-MoE-architecture config of ``tiny-moe-fine`` (shared expert, 30 narrow routed experts,
    top-6, dense first layer); attention as in the other organisms (no q/k/v bias)."""
    from transformers import Qwen2MoeConfig

    kw: dict[str, Any] = dict(
        SHAPE,
        vocab_size=vocab_size,
        intermediate_size=FINE_DENSE_WIDTH,
        moe_intermediate_size=FINE_EXPERT_WIDTH,
        shared_expert_intermediate_size=FINE_SHARED_WIDTH,
        num_experts=FINE_NUM_EXPERTS,
        num_experts_per_tok=FINE_TOP_K,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=list(FINE_DENSE_LAYERS),
        qkv_bias=False,
        use_sliding_window=False,
        **MOE_TRAINING,
    )
    kw.update(overrides)
    return Qwen2MoeConfig(**kw)


def placement_config(dense_layer: int | None, vocab_size: int = VOCAB_SIZE, **overrides: Any) -> Qwen3MoeConfig:
    """Qwen3-MoE-architecture config of a dense-layer placement organism (Table 6 of the paper).

    Smaller than the other organisms (see ``PLACEMENT_SHAPE``); every layer is MoE (8 experts,
    top-2) except ``dense_layer``, whose dense FFN is ``top_k`` experts wide so that the active FFN
    parameters per token are the same in every variant (the router's E x H weights aside).
    """
    from transformers import Qwen3MoeConfig

    kw: dict[str, Any] = dict(
        PLACEMENT_SHAPE,
        vocab_size=vocab_size,
        moe_intermediate_size=PLACEMENT_EXPERT_WIDTH,
        intermediate_size=TOP_K * PLACEMENT_EXPERT_WIDTH,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[] if dense_layer is None else [int(dense_layer)],
        **MOE_TRAINING,
    )
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


PLACEMENT_SHAPE: dict[str, Any] = dict(SHAPE, hidden_size=64, num_hidden_layers=6, head_dim=16)
PLACEMENT_EXPERT_WIDTH = 128
PLACEMENT_STEPS = 400
