"""A model's facts, resolved once from its spec and config, checked against the model itself.

Independent truth: the config class's own attributes (named per family below, not through the
spec's key aliases) and the shapes of the built model's modules (embedding width, router rows,
parameter counts of the experts, shared-expert and dense MLP modules).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import NATIVE_MOE, remote_style_loaded, tiny
from torch import nn

from moe_utils.arch import SPECS
from moe_utils.arch.config import get_path
from moe_utils.arch.facts import ModelFacts, facts_for
from moe_utils.core.errors import CheckpointError
from moe_utils.metrics import cosine_from_gram
from moe_utils.models.specs import get_spec

# (config attribute of the number of routed experts, of the experts per token), per family
CONFIG_NAMES = {
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
    "qwen2_moe": ("num_experts", "num_experts_per_tok"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok"),
    "olmoe": ("num_experts", "num_experts_per_tok"),
    "deepseek_v2": ("n_routed_experts", "num_experts_per_tok"),
    "deepseek_v3": ("n_routed_experts", "num_experts_per_tok"),
    "gpt_oss": ("num_local_experts", "num_experts_per_tok"),
    "phimoe": ("num_local_experts", "num_experts_per_tok"),
    "granitemoe": ("num_local_experts", "num_experts_per_tok"),
    "jamba": ("num_experts", "num_experts_per_tok"),
    "dbrx": ("ffn_config.moe_num_experts", "ffn_config.moe_top_k"),
    "llama4": ("num_local_experts", "num_experts_per_tok"),
    "qwen3_next": ("num_experts", "num_experts_per_tok"),
    "hunyuan_v1_moe": ("num_experts", "moe_topk"),
}


def _matrix_params(module: nn.Module) -> int:
    """Number of weight-matrix entries of a module (biases and norms left out)."""
    return sum(
        p.numel() for name, p in module.named_parameters() if p.dim() >= 2 and "bias" not in name.rsplit(".", 1)[-1]
    )


def _block(model: nn.Module, spec, layer: int) -> nn.Module:
    return model.get_submodule(f"{spec.modules.layers}.{layer}.{spec.modules.block}")


def _has_experts(model: nn.Module, spec, layer: int) -> bool:
    try:
        _block(model, spec, layer).get_submodule(spec.modules.experts)
    except AttributeError:
        return False
    return True


def test_every_native_family_is_named_here():
    assert set(NATIVE_MOE) == set(CONFIG_NAMES)


@pytest.mark.parametrize("family", NATIVE_MOE)
def test_facts_match_config_and_modules(family):
    lm = tiny(family)
    f, spec, model, config = lm.facts, lm.spec, lm.model, lm.config
    experts_attr, topk_attr = CONFIG_NAMES[family]
    assert f.family == family and f.is_moe and not f.derived
    assert f.num_experts == get_path(config, experts_attr)
    assert f.top_k == get_path(config, topk_attr)

    layers = model.get_submodule(spec.modules.layers)
    assert f.num_layers == len(layers)
    assert f.hidden_size == model.get_input_embeddings().weight.shape[1]
    assert f.moe_layers == tuple(i for i in range(len(layers)) if _has_experts(model, spec, i))
    assert f.dense_layers == tuple(i for i in range(len(layers)) if i not in f.moe_layers)
    assert lm.moe_layers == list(f.moe_layers)
    assert f.max_positions == (get_path(config, "max_position_embeddings") or get_path(config, "max_seq_len"))

    H = f.hidden_size
    for layer in f.moe_layers:
        block = _block(model, spec, layer)
        router = block.get_submodule(spec.modules.router).get_parameter(spec.modules.router_weight)
        assert tuple(router.shape) == (f.num_experts, H)
        # every gated expert holds three I x H matrices (fused, transposed or one Linear each)
        assert (
            _matrix_params(block.get_submodule(spec.modules.experts))
            == 3 * f.num_experts * f.expert_intermediate_size * H
        )
        if spec.modules.shared:
            shared = block.get_submodule(spec.modules.shared)
            assert _matrix_params(shared) == 3 * f.shared_expert_intermediate_size * H
        else:
            assert f.shared_expert_intermediate_size is None
    for layer in f.dense_layers:
        mlp = model.get_submodule(f"{spec.modules.layers}.{layer}.{spec.modules.dense_mlp}")
        assert _matrix_params(mlp) == 3 * f.dense_intermediate_size * H
    if not f.dense_layers:
        assert f.dense_intermediate_size is None

    r = f.routing
    assert r is not None and (r.num_experts, r.top_k) == (f.num_experts, f.top_k)
    if hasattr(config, "norm_topk_prob") and spec.routing.renormalize_key == "norm_topk_prob":
        assert r.renormalize == bool(config.norm_topk_prob)
    if spec.activation_keys == ("hidden_act",):
        assert f.activation == config.hidden_act
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert f.correction_bias == any("correction_bias" in n for n in names)


def test_dense_model_facts():
    lm = tiny("mistral")
    f = lm.facts
    assert (f.is_moe, f.num_experts, f.top_k, f.routing, f.moe_layers) == (False, 0, 0, None, ())
    assert f.dense_layers == tuple(range(lm.config.num_hidden_layers))
    mlp = lm.model.get_submodule("model.layers.0.mlp")
    assert (
        _matrix_params(mlp)
        == 3 * f.dense_intermediate_size * f.hidden_size
        == 3 * lm.config.intermediate_size * lm.config.hidden_size
    )


def test_facts_are_frozen():
    f = tiny("mixtral").facts
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.num_experts = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.routing.top_k = 1  # type: ignore[union-attr, misc]
    assert isinstance(f.moe_layers, tuple) and hash(f) == hash(dataclasses.replace(f))


def test_facts_resolved_once_from_the_spec():
    lm = tiny("qwen2_moe")
    assert lm.facts == facts_for(lm.spec, lm.config) == facts_for(lm.spec, lm.config.to_dict())
    assert lm.facts is lm.facts  # stored, not recomputed per access


def test_remote_style_model_facts():
    """A family without transformers code (DeepSeekMoE): facts from its config dict, checked
    against the hand-built module."""
    lm = remote_style_loaded()
    f = lm.facts
    cfg = lm.config
    assert (f.num_experts, f.top_k, f.hidden_size) == (
        cfg["n_routed_experts"],
        cfg["num_experts_per_tok"],
        cfg["hidden_size"],
    )
    assert f.moe_layers == tuple(range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]))
    shared = lm.model.get_submodule(f"model.layers.{f.moe_layers[0]}.mlp.shared_experts")
    assert _matrix_params(shared) == 3 * f.shared_expert_intermediate_size * f.hidden_size
    assert f.shared_expert_intermediate_size == cfg["n_shared_experts"] * cfg["moe_intermediate_size"]


def test_derived_family_facts():
    """A family with no hand-written spec (GLM-4-MoE): its derived spec gives the facts, which
    match the config and the model transformers builds."""
    lm = tiny("glm4_moe")
    f, config, model = lm.facts, lm.config, lm.model
    assert f.derived and f.family == "glm4_moe" and lm.spec is get_spec("glm4_moe")
    assert (f.num_experts, f.top_k) == (config.n_routed_experts, config.num_experts_per_tok)
    assert f.hidden_size == model.get_input_embeddings().weight.shape[1] == config.hidden_size
    assert f.moe_layers == tuple(i for i in range(config.num_hidden_layers) if i >= config.first_k_dense_replace)
    assert f.routing is not None and f.routing.top_k == config.num_experts_per_tok
    assert f.correction_bias  # GLM-4-MoE routes with an expert bias that shifts the choice only


def test_config_without_a_needed_number_names_the_key():
    spec = SPECS["mixtral"]
    cfg = {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2}
    with pytest.raises(CheckpointError, match="hidden size.*hidden_size"):
        facts_for(spec, cfg)
    assert isinstance(facts_for(spec, {**cfg, "hidden_size": 8}), ModelFacts)


# ---- one Gram-to-cosine function -------------------------------------------------------------
def _naive_cosine(x: np.ndarray) -> np.ndarray:
    n = len(x)
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            ni, nj = np.linalg.norm(x[i]), np.linalg.norm(x[j])
            if ni > 0 and nj > 0:
                out[i, j] = float(x[i] @ x[j]) / (ni * nj)
    return out


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_cosine_from_gram_matches_naive_cosine(kind):
    x = np.random.default_rng(0).normal(size=(5, 7))
    x[2] = 0.0  # no direction: NaN everywhere, diagonal too
    x[3] = -2.5 * x[0]  # opposite direction: -1
    g = x @ x.T
    cos = cosine_from_gram(torch.from_numpy(g) if kind == "torch" else g)
    assert isinstance(cos, np.ndarray) and cos.dtype == np.float64
    np.testing.assert_allclose(cos, _naive_cosine(x), rtol=0, atol=1e-12)
    assert np.isnan(cos[2]).all() and np.isnan(cos[:, 2]).all()
    assert -1.0 <= cos[0, 3] < -1.0 + 1e-12 and cos[1, 1] == 1.0
    assert np.nanmax(np.abs(cos)) <= 1.0  # clipped: rounding never leaves [-1, 1]


def test_check_layers_is_the_one_check_of_layer_numbers() -> None:
    from moe_utils.arch.facts import check_layers
    from moe_utils.core.errors import LayerIndexError, UsageError

    facts = facts_for(get_spec("jamba"), get_spec("jamba").tiny_config)
    moe, dense = list(facts.moe_layers), list(facts.dense_layers)
    assert check_layers(None) is None and check_layers((1, 3)) == [1, 3]
    assert check_layers(None, facts) == moe and check_layers(None, facts, "dense") == dense
    for bad in ("34", 3, [1.0], [True]):
        with pytest.raises(UsageError, match="layers must be a list of ints or None"):
            check_layers(bad)
    with pytest.raises(LayerIndexError, match=f"layer {dense[0]} is not a MoE layer"):
        check_layers([moe[0], dense[0]], facts)
    with pytest.raises(LayerIndexError, match=f"layers {facts.num_layers}-{facts.num_layers + 1} do not exist"):
        check_layers([facts.num_layers, facts.num_layers + 1], facts)
