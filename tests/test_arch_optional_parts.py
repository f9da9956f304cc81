"""Config variants that flip one optional part of a family relative to a base config."""

from __future__ import annotations

from moe_utils.arch.optional_parts import config_variants


def test_each_part_is_flipped_once_by_its_most_specific_key():
    base = {
        "n_shared_experts": 2,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "hidden_size": 64,
    }
    got = dict(config_variants(base))
    assert got == {
        "shared experts": {"n_shared_experts": 0},
        "dense layers": {"mlp_layer_types": ["sparse", "sparse", "sparse"]},
        "top-k renormalisation": {"norm_topk_prob": False},
    }


def test_parts_switched_on_where_the_base_has_them_off():
    got = dict(config_variants({"num_shared_experts": 0, "mlp_only_layers": [], "moe_renormalize": False}))
    assert got == {
        "shared experts": {"num_shared_experts": 1},
        "dense layers": {"mlp_only_layers": [0]},
        "top-k renormalisation": {"moe_renormalize": True},
    }
    assert dict(config_variants({"decoder_sparse_step": 1})) == {"dense layers": {"decoder_sparse_step": 2}}
    assert dict(config_variants({"mlp_layer_types": ["sparse", "sparse"]})) == {
        "dense layers": {"mlp_layer_types": ["dense", "sparse"]}
    }


def test_a_config_without_optional_parts_has_no_variant():
    assert config_variants({"num_local_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": None}) == ()
