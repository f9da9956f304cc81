"""Single-pass tracing reproduces every family's block outputs and routing exactly (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import NATIVE_MOE, save, sequences, tiny

from moe_utils.core.cpus import small_model_threads
from moe_utils.core.errors import InputTooLongError, LayerIndexError, NotMoEModelError
from moe_utils.engine.expert_math import dense_outputs
from moe_utils.models.trace import expert_intermediates, expert_outputs, router_scores, trace, trace_dense, verify_trace
from moe_utils.models.weights import dense_mlp_weights, layer_weights


@pytest.mark.parametrize("family", NATIVE_MOE)
def test_trace_reconstructs_block_output(family):
    lm = tiny(family)
    seqs = sequences(lengths=(9, 5))
    tr = trace(lm, seqs)
    assert tr.layers == lm.moe_layers and tr.num_tokens == 14
    assert tr.seq_index.tolist() == [0] * 9 + [1] * 5
    assert tr.position.tolist() == list(range(9)) + list(range(5))
    assert tr.token_ids.tolist() == seqs[0] + seqs[1]
    for check in verify_trace(lm, tr):
        assert check.max_rel_error <= 1e-5, check
        assert check.indices_equal, check
        assert check.max_weight_error <= 1e-6, check
    lt = tr[lm.moe_layers[0]]
    E = lm.spec.num_experts(lm.config.to_dict())
    assert lt.x.dtype == torch.float32 and lt.x.device.type == "cpu"
    assert lt.router_logits.shape == (14, E) and lt.topk_index.shape[0] == 14


def test_router_logits_equal_output_router_logits():
    """Independent truth: transformers' own output_router_logits."""
    lm = tiny("mixtral")
    ids = sequences(lengths=(7,))
    tr = trace(lm, ids)
    with torch.no_grad(), small_model_threads(lm.facts.hidden_size):  # the thread count the trace ran with
        out = lm.model(torch.tensor(ids), output_router_logits=True, use_cache=False)
    for layer, logits in zip(lm.moe_layers, out.router_logits):
        assert torch.equal(tr[layer].router_logits, logits.float())


def test_verify_with_weights_streamed_from_disk(tmp_path):
    lm = tiny("deepseek_v3")
    folder = save(lm, tmp_path)
    checks = verify_trace(lm, trace(lm, sequences()), source=folder)
    assert all(c.max_rel_error <= 1e-5 and c.indices_equal for c in checks)


def test_expert_outputs_against_naive_loop():
    lm = tiny("qwen2_moe")
    w = layer_weights(lm, 2)
    x = trace(lm, sequences())[2].x
    Y = expert_outputs(w, x, chunk_tokens=4)
    Z = expert_intermediates(w, x, chunk_tokens=1000)
    for n in (0, 7, 13):
        for e in range(w.num_experts):
            h = F.silu(w.w_act[e] @ x[n]) * (w.w_up[e] @ x[n])
            torch.testing.assert_close(Y[n, e], w.w_down[e] @ h, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(Z[n, e], F.silu(w.w_act[e] @ x[n]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Y, expert_outputs(w, x, chunk_tokens=1024), rtol=1e-6, atol=1e-9)


def test_router_scores_is_softmax():
    lt = trace(tiny("olmoe"), sequences())[0]
    scores = router_scores(lt)
    torch.testing.assert_close(scores.sum(-1), torch.ones(scores.shape[0]))
    assert torch.equal(scores.argmax(-1), lt.router_logits.argmax(-1))


def test_qwen2_shared_output_is_gated_contribution():
    lm = tiny("qwen2_moe")
    lt = trace(lm, sequences())[0]
    w = layer_weights(lm, 0)
    expected = torch.sigmoid(lt.x @ w.shared_gate.T) * dense_outputs(w.shared, lt.x)
    torch.testing.assert_close(lt.shared_output, expected, rtol=1e-5, atol=1e-6)


def test_trace_subset_of_layers_and_errors():
    lm = tiny("jamba")
    tr = trace(lm, sequences(), layers=[3])
    assert tr.layers == [3]
    with pytest.raises(LayerIndexError) as err:
        trace(lm, sequences(), layers=[2])
    assert "layer 2 is not a MoE layer" in str(err.value) and "Valid MoE layers: 1, 3" in str(err.value)
    with pytest.raises(LayerIndexError, match="does not exist.*4 layers.*Valid MoE layers: 1, 3"):
        layer_weights(lm, 7)
    with pytest.raises(LayerIndexError, match="not traced"):
        tr[1]


def test_input_too_long():
    lm = tiny("mixtral")  # max_position_embeddings = 128
    with pytest.raises(InputTooLongError) as err:
        trace(lm, [[0] * 129])
    assert "129 tokens" in str(err.value) and "128" in str(err.value)
    with pytest.raises(ValueError, match="empty"):
        trace(lm, [[]])


def test_text_inputs_are_tokenised():
    lm = tiny("mixtral")
    tr = trace(lm, ["ab", "cde"])
    assert tr.num_tokens == 2 + 1 + 3 + 1 and tr.tokens[:3] == ["<s>", "a", "b"]


def test_dense_trace_of_dense_model_and_dense_layer():
    lm = tiny("mistral")
    with pytest.raises(NotMoEModelError, match="trace_dense|dense"):
        trace(lm, sequences())
    tr = trace_dense(lm, sequences())
    assert tr.layers == [0, 1] and tr.kind == "dense"
    for layer in tr.layers:
        lt = tr[layer]
        out = dense_outputs(dense_mlp_weights(lm, layer), lt.x)
        torch.testing.assert_close(out, lt.block_output, rtol=1e-5, atol=1e-6)
    ds = tiny("deepseek_v2")  # layer 0 is a dense MLP
    tr = trace_dense(ds, sequences())
    assert tr.layers == [0]
    torch.testing.assert_close(
        dense_outputs(dense_mlp_weights(ds, 0), tr[0].x), tr[0].block_output, rtol=1e-5, atol=1e-6
    )
