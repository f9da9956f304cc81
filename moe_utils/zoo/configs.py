"""Architectures and training budgets of the model organisms (one place, so cards and code agree)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

VOCAB_SIZE = 4096
SEQ_LEN = 256  # tokens per training sample, <s> included; also the context length
SHAPE = dict(
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


def dense_config(vocab_size: int = VOCAB_SIZE, **overrides):
    """Mistral-architecture config of ``tiny-dense`` (the dense "F" baseline)."""
    from transformers import MistralConfig

    kw = dict(SHAPE, vocab_size=vocab_size, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return MistralConfig(**kw)


def moe_config(vocab_size: int = VOCAB_SIZE, **overrides):
    """Mixtral-architecture config shared by ``tiny-moe-upcycled`` and ``tiny-moe-scratch``."""
    from transformers import MixtralConfig

    kw = dict(
        SHAPE,
        vocab_size=vocab_size,
        sliding_window=None,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        router_aux_loss_coef=ROUTER_AUX_LOSS_COEF,
        output_router_logits=True,
        router_jitter_noise=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
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
