"""Tiny configs of any transformers MoE family, made from its config class.

:func:`tiny_config` shrinks every size of a config (hidden width, heads, expert widths, number of
layers, vocabulary) while keeping what decides the architecture and the routing: which layers
are MoE, the layer-type pattern of hybrid stacks, the routing switches (``norm_topk_prob``,
``n_group``, scoring function, ...). Per-layer lists are resampled so each kind of layer still
appears. A few families need extra values their config validators insist on; they are listed
in ``_FAMILY_OVERRIDES`` with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Sizes applied wherever the config class has the key.
_SIZES: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "moe_shared_expert_intermediate_size": 48,
    "shared_intermediate_size": 48,
    "dense_intermediate_size": 96,
    "ffn_hidden_size": 96,
    "expert_ffn_hidden_size": 32,
    "intermediate_size_mlp": 96,
    "share_expert_dim": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "qk_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4,
    "mamba_d_state": 8,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_dt_rank": 4,
    "mamba_n_heads": 4,
    "mamba_d_head": 32,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 16,
    "ssm_state_size": 8,
    "mamba_num_heads": 4,
    "mamba_head_dim": 32,
    "n_groups": 1,
    "chunk_size": 16,
    "conv_kernel": 4,
    "router_hidden_size": 32,
    "moe_hidden_size": 64,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 8,
    "sliding_window": 16,
    "attention_chunk_size": 16,
    "num_nextn_predict_layers": 0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}
# Experts and top-k: enough experts for group routing (2 groups of 4), top-2.
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "moe_top_k", "top_k_experts")
_LORA_KEYS = ("q_lora_rank",)

# Values a family's config validator insists on, beyond the generic sizes (with the reason).
_FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    # layer_types / mlp_layer_types default to None and the model indexes them per layer.
    "lfm2_moe": {"num_hidden_layers": 4, "layer_types": ["conv", "full_attention"] * 2},
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"]},
    # the MoE block is off by default (the dense Gemma 4 models); the MoE variants switch it on
    "gemma4_text": {"enable_moe_block": True},
    # the model hard-codes its multimodal rotary sections (8, 12, 12): head width 128
    "glm4v_moe_text": {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1},
    # num_hidden_layers is derived: two sub-layers per decoder layer
    "longcat_flash": {"num_layers": 2, "zero_expert_num": 2},
    # sliding_window defaults to None but its sliding-attention layers require one.
    "step3p5": {"sliding_window": 16},
    # DbrxConfig() defaults cannot build a model: attn_config lacks rope_theta and clip_qkv=None
    # crashes clamp; real checkpoints carry both.
    "dbrx": {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 256,
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
    },
}


def _default_instance(config_class):
    return config_class()


def _resample(values: list, n: int) -> list:
    """``n`` entries following ``values`` but making sure every distinct kind appears."""
    distinct = list(dict.fromkeys(str(v) for v in values))
    by_str = {str(v): v for v in values}
    if len(distinct) <= 1:
        return [values[0]] * n
    # keep the original order of the first n entries, then force in the kinds that are missing
    out = (
        list(values[:n]) if n <= len(values) else [values[i * len(values) // n] for i in range(n)]
    )  # stretched to a deeper stack
    missing = [k for k in distinct if k not in {str(v) for v in out}]
    for slot, kind in zip(range(n - 1, -1, -1), missing, strict=False):
        out[slot] = by_str[kind]
    return out


def _per_layer_heads(key: str, n: int, out: Mapping[str, Any]) -> list:
    """A per-layer head count for ``n`` tiny layers: the tiny model's own (its attention is shrunk)."""
    heads = out.get("num_key_value_heads") if "key_value" in key else None
    return [heads or out.get("num_attention_heads", 4)] * n


def tiny_config_dict(
    config_class, base: Mapping[str, Any] | None = None, num_layers: int | None = None
) -> dict[str, Any]:
    """Keyword arguments for a tiny instance of ``config_class``.

    ``base`` (a real config's dict) keeps its routing switches; without it the class defaults
    are used. Every size key the class knows is shrunk.
    """
    default = _default_instance(config_class).to_dict()
    source = dict(default if base is None else base)
    known = set(default) | set(source)
    out: dict[str, Any] = {}
    for key, value in _SIZES.items():
        optional = key in ("sliding_window", "attention_chunk_size", "q_lora_rank")
        if key in known and (not optional or source.get(key) is not None):
            out[key] = value
    for keys, value in ((_EXPERT_KEYS, 8), (_TOPK_KEYS, 2)):
        present = [k for k in keys if k in default] or [k for k in keys if k in known]
        if present:  # one spelling only: aliases of one field must not disagree
            out[next((k for k in present if isinstance(source.get(k), int)), present[0])] = value
    for key in ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"):
        if key in known and (base is None or source.get(key)):  # a real config's 0 or None stays off
            out[key] = 1
    for key in _LORA_KEYS:
        if key in known:
            out[key] = 16
    if "qk_rope_head_dim" in known:  # MLA: the rotary part sets head_dim
        rope = source.get("rope_parameters") or {}
        partial = float(rope.get("partial_rotary_factor", 1.0)) if isinstance(rope, dict) else 1.0
        out["head_dim"] = int(out["qk_rope_head_dim"] / partial)
    if "kv_lora_rank" in known:  # MLA: one key/value head per query head
        out["num_key_value_heads"] = out["num_attention_heads"]
    for key in ("n_group", "num_expert_group"):
        if key in known and isinstance(source.get(key), int) and source[key] > 1:
            out[key], out["topk_group"] = 2, 1
    if "first_k_dense_replace" in known and source.get("first_k_dense_replace"):
        out["first_k_dense_replace"] = 1
    if "num_dense_layers" in known and source.get("num_dense_layers"):
        out["num_dense_layers"] = 1
    if "moe_layer_start_index" in known:
        out["moe_layer_start_index"] = min(int(source.get("moe_layer_start_index") or 0), 1)
        out["moe_layer_end_index"] = -1 if source.get("moe_layer_end_index") == -1 else 3
    old_layers = source.get("num_hidden_layers")
    hybrid = any(
        isinstance(v, list) and old_layers and len(v) == old_layers and len({str(x) for x in v}) > 1
        for v in source.values()
    )
    n = num_layers or (4 if hybrid else 2)
    if "num_hidden_layers" in known:
        out["num_hidden_layers"] = n
    if isinstance(old_layers, int):
        for key, value in source.items():
            if (
                isinstance(value, list)
                and len(value) == old_layers
                and value
                and (isinstance(value[0], (str, bool)) or value[0] is None)
            ):
                out[key] = _resample(value, n)
            elif "heads" in key and isinstance(value, list) and len(value) == old_layers and value:
                out[key] = _per_layer_heads(key, n, out)
    if "mlp_only_layers" in known and source.get("mlp_only_layers"):
        out["mlp_only_layers"] = [i for i in source["mlp_only_layers"] if i < n][:1]
    rope = source.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("mrope_section"):
        # multimodal rotary sections must add up to half the rotary width
        head_dim = out.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
        target = int(head_dim * float(rope.get("partial_rotary_factor", 1.0))) // 2
        sections = list(rope["mrope_section"])
        scaled = [max(1, round(v * target / sum(sections))) for v in sections]
        scaled[-1] += target - sum(scaled)
        out["rope_parameters"] = {**rope, "mrope_section": scaled}
    model_type = getattr(config_class, "model_type", "")
    for key, value in _FAMILY_OVERRIDES.get(model_type, {}).items():
        if isinstance(value, list) and key != "num_hidden_layers" and len(value) != out.get("num_hidden_layers", n):
            value = _resample(value, out.get("num_hidden_layers", n))  # per-layer list, other depth
        out[key] = value
    return out


def tiny_config(config_class, base: Mapping[str, Any] | None = None, num_layers: int | None = None):
    """A tiny instance of ``config_class`` (see :func:`tiny_config_dict`)."""
    kwargs = tiny_config_dict(config_class, base, num_layers)
    if base is not None:
        kwargs = {
            **{
                k: v
                for k, v in base.items()
                if k not in ("architectures", "transformers_version", "model_type", "auto_map")
            },
            **kwargs,
        }
    return config_class(**kwargs)
