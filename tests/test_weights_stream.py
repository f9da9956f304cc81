"""Streamed checkpoint weights equal the loaded model's weights, for every family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import NATIVE_MOE, save, tiny

from moe_utils.metrics import cosine_from_gram
from moe_utils.models.expert_gram import expert_grams
from moe_utils.models.weights import dense_mlp_weights, iter_layer_weights, layer_weights

FIELDS = (
    "router",
    "w_act",
    "w_up",
    "w_down",
    "b_act",
    "b_up",
    "b_down",
    "router_bias",
    "score_correction_bias",
    "shared_gate",
)


def assert_same(a, b):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape and torch.equal(x, y), name
    assert (a.shared is None) == (b.shared is None)
    if a.shared is not None:
        for name in ("w_act", "w_up", "w_down"):
            assert torch.equal(getattr(a.shared, name), getattr(b.shared, name)), f"shared.{name}"
    assert a.activation == b.activation


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(family, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = save(tiny(family), tmp_path_factory.mktemp(family), **kwargs)
        return cache[key]

    return get


@pytest.mark.parametrize("family", NATIVE_MOE)
def test_streamed_equals_loaded(family, saved):
    lm = tiny(family)
    folder = saved(family)
    streamed = list(iter_layer_weights(folder))
    assert [w.layer for w in streamed] == lm.moe_layers
    for w in streamed:
        loaded = layer_weights(lm, w.layer)
        assert_same(w, loaded)
        E, I, H = loaded.w_up.shape
        assert loaded.router.shape == (E, H) and loaded.w_down.shape == (E, H, I)
        assert lm.spec.num_experts(lm.config.to_dict()) == E
    for layer in lm.spec.dense_layers(lm.config):
        a, b = dense_mlp_weights(lm, layer), dense_mlp_weights(folder, layer)
        assert torch.equal(a.w_up, b.w_up) and torch.equal(a.w_down, b.w_down)


def test_fused_names_on_disk(saved):
    """save_original_format=False writes the fused in-memory names; both namings stream equal."""
    folder = saved("mixtral", save_original_format=False)
    assert_same(layer_weights(folder, 1), layer_weights(tiny("mixtral"), 1))


def test_canonical_orientation_against_expert_module():
    """Independent check of the layout: run the model's experts module on one expert at a time."""
    from moe_utils.engine.expert_math import expert_outputs

    for family in ("mixtral", "gpt_oss", "llama4"):
        lm = tiny(family)
        spec, layer = lm.spec, lm.moe_layers[0]
        experts = lm.model.get_submodule(f"{spec.modules.layers}.{layer}.{spec.modules.block}.{spec.modules.experts}")
        w = layer_weights(lm, layer)
        x = torch.randn(5, w.hidden_size, generator=torch.Generator().manual_seed(0))
        ours = expert_outputs(w, x)
        with torch.no_grad():
            for e in range(w.num_experts):
                if family == "llama4":  # runs every expert on its own slice of the batch
                    inp = torch.zeros(w.num_experts, 5, w.hidden_size)
                    inp[e] = x
                    ref = experts(inp.reshape(-1, w.hidden_size)).reshape(w.num_experts, 5, -1)[e]
                else:
                    idx = torch.full((5, 1), e)
                    ref = experts(x, idx, torch.ones(5, 1))
                torch.testing.assert_close(ours[:, e], ref, rtol=1e-5, atol=1e-6)


def test_bf16_checkpoint_streams_bitwise(tmp_path):
    lm = tiny("qwen2_moe", dtype="bfloat16")
    save(lm, tmp_path)
    for layer in lm.moe_layers:
        raw = layer_weights(tmp_path, layer, dtype=torch.bfloat16)
        assert raw.w_up.dtype == torch.bfloat16
        assert_same(raw, layer_weights(lm, layer, dtype=torch.bfloat16))
        as32 = layer_weights(tmp_path, layer)
        assert as32.w_up.dtype == torch.float32 and torch.equal(as32.w_up, raw.w_up.float())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "dbrx", "llama4", "qwen2_moe"])
def test_expert_grams_match_full_matrices(family, saved):
    lm = tiny(family)
    layer = lm.moe_layers[-1]
    w = layer_weights(lm, layer)
    for source in (lm, saved(family)):
        grams = expert_grams(source, layer, chunk_mb=0.002)  # many small chunks
        for m, W in w.matrices().items():
            X = W.reshape(W.shape[0], -1).double()
            torch.testing.assert_close(grams[m], X @ X.T, rtol=1e-5, atol=1e-9)
        cos = cosine_from_gram(grams["up"])
        X = w.w_up.reshape(w.num_experts, -1).double()
        torch.testing.assert_close(
            torch.from_numpy(cos), torch.nn.functional.cosine_similarity(X[:, None], X[None], dim=-1)
        )


def test_weight_analyses_hold_one_streamed_layer_at_a_time(saved, monkeypatch):
    """When the next layer is read from the checkpoint, the previous one has been freed (else a
    multi-layer run holds two layers: twice the memory the streaming promises)."""
    import gc
    import weakref

    from moe_utils.analysis import static
    from moe_utils.models import weights as W

    folder = saved("mixtral")
    alive: list[weakref.ref] = []
    real = W._layer_weights

    def tracked(src, spec, facts, layer, dtype, **options):
        gc.collect()
        assert all(r() is None for r in alive), f"a previous layer is still alive when layer {layer} is read"
        w = real(src, spec, facts, layer, dtype, **options)
        alive.append(weakref.ref(w.w_up))
        return w

    monkeypatch.setattr(W, "_layer_weights", tracked)
    n_layers = len(tiny("mixtral").moe_layers)
    assert n_layers >= 2
    report = static.weight_report(folder, reorder_max_pairs=1, workers=1)
    assert report["gate_correlation"]["layer"].nunique() == n_layers == len(alive)
    alive.clear()
    assert static.weight_similarity(folder)["layer"].nunique() == n_layers
    alive.clear()
    assert static.gate_correlation(folder)["layer"].nunique() == n_layers
    alive.clear()
    assert static.reordering(folder, max_pairs=1, workers=1)["layer"].nunique() == n_layers


def test_per_expert_tensors_stack_as_one_copy_on_write_view_of_the_file(saved):
    """Experts stored one after the other come back as one strided view of the mapped file,
    equal to reading each tensor; writing to it changes neither the file nor a later read."""
    from moe_utils.models.checkpoint import CheckpointReader

    folder = saved("mixtral")
    layer = tiny("mixtral").moe_layers[0]
    w = layer_weights(folder, layer, dtype=None)
    names = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight" for e in range(w.num_experts)]
    reader = CheckpointReader(folder)
    stack = reader.mapped_stack(names)
    assert stack is not None
    each = torch.stack([reader.read(n) for n in names])
    assert torch.equal(stack, each)
    assert stack.stride(0) > stack[0].numel()  # a view with the other matrices in between, no copy
    before = float(stack[1, 0, 0])
    stack[1, 0, 0] = before + 1.0
    assert float(CheckpointReader(folder).read(names[1])[0, 0]) == before
    assert torch.equal(w.w_act, each)  # Mixtral's w1 is the gate projection


def test_experts_out_of_order_on_disk_are_copied_into_a_stack(tmp_path):
    """Twelve experts sort as 0, 1, 10, 11, 2, ... in a safetensors file: not equally spaced in
    expert order, so no view is made and the stack is an ordinary copy, still in expert order."""
    from safetensors.torch import save_file

    from moe_utils.models.checkpoint import CheckpointReader

    g = torch.Generator().manual_seed(0)
    tensors = {f"experts.{e}.w1.weight": torch.randn(3, 5, generator=g) for e in range(12)}
    tensors.update({f"experts.{e}.w2.weight": torch.randn(5, 3, generator=g) for e in range(12)})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    names = [f"experts.{e}.w1.weight" for e in range(12)]
    assert reader.mapped_stack(names) is None
    assert reader.mapped_stack(names[:2]) is not None  # 0 and 1 are neighbours
    assert reader.mapped_stack(names + ["experts.99.w1.weight"]) is None  # a missing tensor
    for n in names:
        assert torch.equal(reader.mapped(n), tensors[n])
