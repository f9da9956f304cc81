"""Synthetic checkpoints with the paper models' real tensor names and config keys."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import synthetic_deepseekmoe, synthetic_grok, synthetic_mistral, synthetic_mixtral

from moe_utils.arch import spec_for_config
from moe_utils.arch.config import read_config_json
from moe_utils.core.errors import CheckpointError, LayerIndexError, NotMoEModelError, PickleRefusedError
from moe_utils.models.expert_gram import expert_grams
from moe_utils.models.weights import dense_mlp_weights, iter_layer_weights, layer_weights


def test_mixtral_two_shards_split_expert(tmp_path):
    t = synthetic_mixtral(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    p = "model.layers.1.block_sparse_moe.experts.2."
    assert index[p + "w1.weight"] != index[p + "w3.weight"]  # one expert, two shards
    layers = list(iter_layer_weights(tmp_path, dtype=torch.bfloat16))
    assert [w.layer for w in layers] == [0, 1]
    for w in layers:
        p = f"model.layers.{w.layer}.block_sparse_moe."
        assert torch.equal(w.router, t[p + "gate.weight"])
        for e in range(4):
            assert torch.equal(w.w_act[e], t[p + f"experts.{e}.w1.weight"])
            assert torch.equal(w.w_up[e], t[p + f"experts.{e}.w3.weight"])
            assert torch.equal(w.w_down[e], t[p + f"experts.{e}.w2.weight"])
        assert w.activation == "silu" and w.shared is None
    spec = spec_for_config(read_config_json(tmp_path))
    assert spec.top_k(read_config_json(tmp_path)) == 2  # num_experts_per_token
    grams = expert_grams(tmp_path, 1, chunk_mb=0.001)
    X = torch.stack([t[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"] for e in range(4)])
    X = X.reshape(4, -1).double()
    torch.testing.assert_close(grams["down"], X @ X.T)


def test_deepseekmoe_dense_first_layer_and_shared(tmp_path):
    t = synthetic_deepseekmoe(tmp_path)
    with pytest.raises(LayerIndexError) as err:
        layer_weights(tmp_path, 0)
    assert "MoE layers: 1-2" in str(err.value) and "dense layers: 0" in str(err.value)
    dense = dense_mlp_weights(tmp_path, 0)
    assert torch.equal(dense.w_act, t["model.layers.0.mlp.gate_proj.weight"])
    assert dense.intermediate_size == 40
    w = layer_weights(tmp_path, 2)
    assert w.num_experts == 6 and w.intermediate_size == 8
    assert torch.equal(w.w_up[5], t["model.layers.2.mlp.experts.5.up_proj.weight"])
    assert w.shared.intermediate_size == 16  # 2 shared experts x I
    assert torch.equal(w.shared.w_down, t["model.layers.2.mlp.shared_experts.down_proj.weight"])
    with pytest.raises(LayerIndexError, match="dense layers: 0"):
        dense_mlp_weights(tmp_path, 1)


def test_grok_names_and_gelu(tmp_path):
    t = synthetic_grok(tmp_path)
    w = layer_weights(tmp_path, 1, dtype=torch.bfloat16)
    assert w.activation == "gelu"
    p = "model.layers.1.moe_block."
    assert torch.equal(w.router, t[p + "gate.weight"])
    assert torch.equal(w.w_act[3], t[p + "experts.3.linear.weight"])
    assert torch.equal(w.w_up[3], t[p + "experts.3.linear_v.weight"])
    assert torch.equal(w.w_down[3], t[p + "experts.3.linear_1.weight"])


def test_mistral_is_dense(tmp_path):
    t = synthetic_mistral(tmp_path)
    d = dense_mlp_weights(tmp_path, 1)
    assert torch.equal(d.w_down, t["model.layers.1.mlp.down_proj.weight"])
    with pytest.raises(NotMoEModelError) as err:
        layer_weights(tmp_path, 0)
    assert "dense" in str(err.value) and "mixtral" in str(err.value)


def test_missing_shard_is_named(tmp_path):
    synthetic_mixtral(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        layer_weights(tmp_path, 0)
    assert "model-00002-of-00002.safetensors" in str(err.value) and "missing" in str(err.value)


def test_tensor_absent_from_its_shard(tmp_path):
    synthetic_mixtral(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    index["weight_map"][name] = "model-00001-of-00002.safetensors"  # index points to the wrong shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        layer_weights(tmp_path, 0)
    assert name in str(err.value) and "partial" in str(err.value)


def test_tensor_missing_everywhere(tmp_path):
    synthetic_mixtral(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2\.weight.*missing"):
        layer_weights(tmp_path, 1)


def test_truncated_shard(tmp_path):
    synthetic_mixtral(tmp_path)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as err:
        layer_weights(tmp_path, 0)
    assert "model-00001-of-00002.safetensors" in str(err.value)


def test_pickle_refused_unless_allowed(tmp_path):
    t = synthetic_mistral(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(t, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError) as err:
        dense_mlp_weights(tmp_path, 0)
    assert "allow_pickle=True" in str(err.value) and "pytorch_model.bin" in str(err.value)
    d = dense_mlp_weights(tmp_path, 0, allow_pickle=True)
    assert torch.equal(d.w_up, t["model.layers.0.mlp.up_proj.weight"])


def test_no_weights_at_all(tmp_path):
    synthetic_mistral(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight files"):
        dense_mlp_weights(tmp_path, 0)


def test_loaded_model_without_module_streams_from_its_folder(tmp_path):
    """A weights-only LoadedModel (model=None) reads its checkpoint with its own spec."""
    from moe_utils.arch import get_spec
    from moe_utils.models.loading import LoadedModel

    t = synthetic_deepseekmoe(tmp_path)
    cfg = read_config_json(tmp_path)
    lm = LoadedModel(
        model=None, tokenizer=None, spec=get_spec("deepseek"), config=cfg, name="ds", path=tmp_path, fingerprint="x"
    )
    assert lm.moe_layers == [1, 2]
    assert [w.layer for w in iter_layer_weights(lm)] == [1, 2]
    assert torch.equal(layer_weights(lm, 1).router, t["model.layers.1.mlp.gate.weight"])
