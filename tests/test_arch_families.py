"""Family specs: registry, config detection with aliases, MoE-layer rules."""

from __future__ import annotations

import pytest
import torch
from tiny_models import NATIVE_MOE, tiny

from moe_utils.arch import SPECS, get_spec, spec_for_config, supported_families
from moe_utils.core.errors import UnknownFamilyError

# One line per family: the MoE layers of its tiny test config (worked out from the config by hand).
# Adding a family to moe_utils/arch/families.py requires adding its line here.
EXPECTED_MOE_LAYERS = {
    "mixtral": [0, 1],  # every layer
    "qwen2_moe": [0, 2],  # mlp_only_layers=[1]
    "qwen3_moe": [1],  # mlp_only_layers=[0]
    "olmoe": [0, 1],
    "deepseek_v2": [1],  # first_k_dense_replace=1
    "deepseek_v3": [1],
    "gpt_oss": [0, 1],
    "phimoe": [0, 1],
    "granitemoe": [0, 1],
    "jamba": [1, 3],  # i % 2 == 1 of 4 layers
    "dbrx": [0, 1],
    "llama4": [1],  # interleave_moe_layer_step=2
    "qwen3_next": [0, 1, 2, 3],
    "hunyuan_v1_moe": [0, 1],
    "mistral": [],  # dense baseline
    "deepseek": None,  # weights-only (no tiny_config); see test_paper_configs
    "grok1": None,
}


def test_every_family_has_an_expectation():
    assert set(SPECS) == set(EXPECTED_MOE_LAYERS)


@pytest.mark.parametrize("family", [f for f, v in EXPECTED_MOE_LAYERS.items() if v is not None])
def test_moe_layers_of_tiny_config(family):
    spec = get_spec(family)
    lm = tiny(family)
    assert spec.moe_layers(lm.config) == EXPECTED_MOE_LAYERS[family]
    assert spec.moe_layers(lm.config.to_dict()) == EXPECTED_MOE_LAYERS[family]  # config.json view
    # independent truth: which layers transformers actually built with a router
    layers = lm.model.get_submodule(spec.modules.layers)
    built = [
        i
        for i, layer in enumerate(layers)
        if spec.is_moe
        and isinstance(getattr(layer, spec.modules.block, None), torch.nn.Module)
        and hasattr(layer.get_submodule(spec.modules.block), spec.modules.router)
    ]
    assert built == EXPECTED_MOE_LAYERS[family]
    assert sorted(built + spec.dense_layers(lm.config)) == list(range(len(layers)))


@pytest.mark.parametrize("family", NATIVE_MOE + ["mistral"])
def test_spec_found_from_saved_config(family):
    assert spec_for_config(tiny(family).config.to_dict()) is get_spec(family)


# Small copies of the paper models' config.json keys (values shrunk where irrelevant).
MIXTRAL_PAPER_CODE = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mistral",
    "auto_map": {"AutoModelForCausalLM": "modeling_moe_mistral.MixtralForCausalLM"},
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_experts": 8,
    "num_experts_per_token": 1,
}
GROK = {
    "architectures": ["Grok1ModelForCausalLM"],
    "hidden_size": 6144,
    "num_hidden_layers": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "attn_output_multiplier": 0.088,
    "embedding_multiplier_scale": 78.38,
}
DEEPSEEKMOE = {
    "architectures": ["DeepseekForCausalLM"],
    "model_type": "deepseek",
    "num_hidden_layers": 28,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "moe_intermediate_size": 1408,
    "hidden_size": 2048,
    "norm_topk_prob": False,
}


def test_paper_configs():
    mixtral = spec_for_config(MIXTRAL_PAPER_CODE)
    assert mixtral.name == "mixtral"  # architectures win over model_type "mistral"
    assert (mixtral.num_experts(MIXTRAL_PAPER_CODE), mixtral.top_k(MIXTRAL_PAPER_CODE)) == (8, 1)
    assert mixtral.moe_layers(MIXTRAL_PAPER_CODE) == list(range(32))

    grok = spec_for_config(GROK)
    assert grok.name == "grok1" and grok.activation_name(GROK) == "gelu"
    no_arch = {k: v for k, v in GROK.items() if k != "architectures"}
    assert spec_for_config(no_arch).name == "grok1"  # detected from its characteristic keys

    ds = spec_for_config(DEEPSEEKMOE)
    assert ds.name == "deepseek" and not ds.native
    assert ds.moe_layers(DEEPSEEKMOE) == list(range(1, 28))
    assert ds.dense_layers(DEEPSEEKMOE) == [0]
    assert ds.num_experts(DEEPSEEKMOE) == 64


@pytest.mark.parametrize(
    "cfg,expected",
    [
        (
            {
                "model_type": "deepseek",
                "num_hidden_layers": 8,
                "n_routed_experts": 4,
                "first_k_dense_replace": 2,
                "moe_layer_freq": 3,
            },
            [3, 6],
        ),
        (
            {
                "model_type": "qwen2_moe",
                "num_hidden_layers": 8,
                "num_experts": 4,
                "decoder_sparse_step": 2,
                "mlp_only_layers": [3],
            },
            [1, 5, 7],
        ),
        ({"model_type": "jamba", "num_hidden_layers": 8, "expert_layer_period": 4, "expert_layer_offset": 2}, [2, 6]),
        ({"model_type": "llama4_text", "num_hidden_layers": 6, "interleave_moe_layer_step": 3}, [2, 5]),
        ({"model_type": "llama4_text", "num_hidden_layers": 6, "moe_layers": [0, 4]}, [0, 4]),
        ({"model_type": "deepseek_v3", "num_hidden_layers": 5}, [3, 4]),  # default first_k_dense=3
    ],
)
def test_layer_rules(cfg, expected):
    assert spec_for_config(cfg).moe_layers(cfg) == expected


def test_unknown_family_message():
    with pytest.raises(UnknownFamilyError) as err:
        spec_for_config({"model_type": "mystery_moe", "num_experts": 4})
    msg = str(err.value)
    assert "mystery_moe" in msg and "moe_utils/arch/families.py" in msg and "FAMILIES" in msg
    assert "mixtral" in msg
    with pytest.raises(UnknownFamilyError, match="known families"):
        get_spec("nope")


def test_supported_families_lists_moe_only():
    moe = supported_families(moe_only=True)
    assert "mixtral" in moe and "mistral" not in moe and "grok1" in moe
