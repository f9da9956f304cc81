"""Tracing a remote-code-style per-expert model, a bf16 model, and an accelerate-dispatched one."""

from __future__ import annotations

import torch
from tiny_models import remote_style_loaded, save, sequences, tiny

from moe_utils.models.loading import load_model
from moe_utils.models.trace import trace, verify_trace
from moe_utils.models.weights import layer_weights


def test_per_expert_modulelist_model():
    lm = remote_style_loaded()
    assert lm.moe_layers == [1, 2]
    seqs = [[1, 5, 9, 3, 7, 2], [4, 4, 8]]
    tr = trace(lm, seqs)
    lt = tr[1]
    assert lt.routing_source == "router" and lt.topk_index.shape == (9, 3)
    for check in verify_trace(lm, tr):
        assert check.max_rel_error <= 1e-5 and check.indices_equal, check
    w = layer_weights(lm, 2)
    assert w.num_experts == 6 and w.shared.intermediate_size == 16
    # logits recomputed from the gate's input equal x @ W_g^T
    torch.testing.assert_close(lt.router_logits, lt.x @ layer_weights(lm, 1).router.T)


def test_bf16_model_is_captured_in_fp32():
    lm = tiny("mixtral", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    tr = trace(lm, sequences())
    for layer in tr.layers:
        lt = tr[layer]
        assert lt.x.dtype == lt.block_output.dtype == lt.router_logits.dtype == torch.float32
    for check in verify_trace(lm, tr):
        # the model computes in bf16, the reconstruction in fp32 from bf16-rounded inputs
        assert check.max_rel_error <= 3e-2 and check.indices_equal, check


OFFLOAD_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def test_device_map_dispatched_model(tmp_path):
    """accelerate dispatch with layer 1 offloaded to disk: hooks still capture on the CPU, and
    the offloaded weights are read from the checkpoint."""
    folder = save(tiny("qwen3_moe"), tmp_path / "model")
    lm = load_model(folder, device_map=OFFLOAD_MAP, offload_folder=tmp_path / "offload")
    assert lm.model.hf_device_map["model.layers.1"] == "disk"
    assert hasattr(lm.model.model.layers[1].mlp, "_hf_hook")
    assert lm.model.model.layers[1].mlp.gate.weight.device.type == "meta"
    tr = trace(lm, sequences())
    for check in verify_trace(lm, tr):
        assert check.max_rel_error <= 1e-5 and check.indices_equal, check
    ref = trace(tiny("qwen3_moe"), sequences())
    assert torch.equal(tr[1].block_output, ref[1].block_output)
    assert torch.equal(tr[1].router_logits, ref[1].router_logits)


def test_random_model_dispatched_with_accelerate(tmp_path):
    lm = load_model("random:olmoe", device_map=OFFLOAD_MAP, offload_folder=tmp_path)
    assert hasattr(lm.model, "_hf_hook")
    tr = trace(lm, sequences())
    assert torch.equal(tr[1].block_output, trace(tiny("olmoe"), sequences())[1].block_output)
