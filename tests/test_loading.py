"""load_model: ids, fingerprints, config aliases, and every refusal with an actionable message."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import save, sequences, synthetic_deepseekmoe, synthetic_grok, tiny

from moe_utils.core import paths
from moe_utils.core.errors import (
    CheckpointError,
    NotMoEModelError,
    OfflineError,
    PickleRefusedError,
    RemoteCodeRequiredError,
    UnknownFamilyError,
)
from moe_utils.models.loading import load_model, resolve_model
from moe_utils.models.trace import trace
from moe_utils.models.weights import layer_weights


def test_random_ids_are_deterministic():
    a, b = load_model("random:mixtral"), load_model("random:mixtral")
    c = load_model("random:mixtral", seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(layer_weights(a, 0).w_up, layer_weights(b, 0).w_up)
    assert not torch.equal(layer_weights(a, 0).w_up, layer_weights(c, 0).w_up)
    assert not a.model.training and a.is_moe and a.moe_layers == [0, 1]
    assert a.model.config._experts_implementation == "grouped_mm"
    text = "naïve café"
    ids = a.tokenizer(text)["input_ids"]
    assert ids[0] == a.tokenizer.bos_token_id == 0
    assert a.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_local_folder_round_trip(tmp_path):
    lm = tiny("deepseek_v2")
    folder = save(lm, tmp_path)
    loaded = load_model(folder)
    assert loaded.spec.name == "deepseek_v2" and loaded.path == folder.resolve()
    assert loaded.fingerprint == load_model(str(folder)).fingerprint
    ids = torch.tensor(sequences(lengths=(6,)))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, lm.model(ids).logits)
    assert loaded.tokenizer("héllo")["input_ids"] == lm.tokenizer("héllo")["input_ids"]


def test_fingerprint_tracks_weights_and_config(tmp_path):
    folder = save(tiny("olmoe"), tmp_path)
    first = load_model(folder).fingerprint
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_model(folder).fingerprint != first


def test_old_mixtral_config_keys(tmp_path):
    folder = save(tiny("mixtral"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg.pop("num_experts_per_tok")
    cfg["num_experts_per_token"] = 1  # as in the paper code's config
    (folder / "config.json").write_text(json.dumps(cfg))
    lm = load_model(folder)
    assert lm.model.config.num_experts_per_tok == 1 and lm.model.config.num_local_experts == 4
    assert trace(lm, sequences())[0].topk_index.shape[1] == 1


def test_dense_model_loads_as_baseline():
    lm = load_model("random:mistral")
    assert not lm.is_moe and lm.moe_layers == []
    with pytest.raises(NotMoEModelError) as err:
        load_model("random:mistral", require_moe_model=True)
    msg = str(err.value)
    assert "dense" in msg and "mixtral" in msg and "qwen2_moe" in msg


def test_unknown_family(tmp_path):
    folder = save(tiny("olmoe"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "brand_new_moe", ["BrandNewMoeForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownFamilyError) as err:
        load_model(folder)
    assert "brand_new_moe" in str(err.value) and "moe_utils/arch/families.py" in str(err.value)
    with pytest.raises(UnknownFamilyError, match="known families"):
        load_model("random:brand_new_moe")


def test_remote_code_needs_opt_in_but_weights_stream(tmp_path):
    synthetic_deepseekmoe(tmp_path / "ds")
    with pytest.raises(RemoteCodeRequiredError) as err:
        load_model(tmp_path / "ds")
    msg = str(err.value)
    assert "trust_remote_code=True" in msg and "layer_weights" in msg
    assert layer_weights(tmp_path / "ds", 1).num_experts == 6  # no code needed
    synthetic_grok(tmp_path / "grok")
    with pytest.raises(RemoteCodeRequiredError, match="trust_remote_code=True"):
        load_model(tmp_path / "grok")
    with pytest.raises(RemoteCodeRequiredError, match="publisher's code"):
        load_model("random:deepseek")


def test_auto_map_on_a_known_type_needs_opt_in(tmp_path):
    folder = save(tiny("mixtral"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("raise SystemExit('executed')\n")
    with pytest.raises(RemoteCodeRequiredError, match="auto_map"):
        load_model(folder)


def test_missing_shard(tmp_path):
    folder = save(tiny("qwen3_moe"), tmp_path, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert shards[-1].name in str(err.value)


def test_pickle_weights(tmp_path):
    lm = tiny("olmoe")
    folder = save(lm, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(lm.model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        load_model(folder)
    loaded = load_model(folder, allow_pickle=True)
    assert torch.equal(layer_weights(loaded, 1).w_down, layer_weights(lm, 1).w_down)


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as err:
        load_model("some-org/some-moe-model-that-is-not-cached")
    assert "local folder" in str(err.value) and "cannot be downloaded" in str(err.value)


def test_not_a_folder_or_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither a model folder nor a hub id"):
        resolve_model(str(tmp_path / "missing" / "deeper"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(empty)


def test_zoo_ids(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "ZOO_MODELS_DIR", tmp_path)  # simulate missing model files
    with pytest.raises(CheckpointError, match="'tiny-moe-upcycled' is not installed"):
        resolve_model("zoo:tiny-moe-upcycled")
