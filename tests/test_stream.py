"""The layer stream (one decoder layer in memory) against the whole-model path: same captures,
same tables and summaries, and the quantized checkpoints' numbers equal their decoded twins'."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import NATIVE_MOE, save, sequences, tiny

import moe_utils.models.stream as stream_module
from moe_utils.analysis import dynamic, obs2_norms, obs3_depth
from moe_utils.analysis.context import open_study
from moe_utils.core.errors import UsageError
from moe_utils.models.checkpoint import CheckpointReader
from moe_utils.models.layer_load import StreamUnsupportedError
from moe_utils.models.loading import load_model
from moe_utils.models.stream import SweptLayer, stream_check, stream_traces, streamable
from moe_utils.models.trace import trace, verify_trace

COVERAGE = Path(__file__).resolve().parent.parent / "book" / "coverage.json"


def _passing_families() -> list[str]:
    """The families the coverage page lists as passing (hand-written specs by their spec name)."""
    rows = json.loads(COVERAGE.read_text())["rows"]
    return sorted({r["spec_name"] or r["family"] for r in rows if r.get("trace_ok") and r.get("dynamic_ok")})


def _assert_same_traces(ref, got) -> None:
    assert got.layers == ref.layers
    assert torch.equal(got.token_ids, ref.token_ids) and torch.equal(got.seq_index, ref.seq_index)
    for layer in ref.layers:
        a, b = ref[layer], got[layer]
        scale = a.block_output.abs().max()
        assert float((a.block_output - b.block_output).abs().max() / scale) <= 1e-5, layer
        assert float((a.x - b.x).abs().max() / a.x.abs().max()) <= 1e-5, layer
        assert torch.equal(a.routed_index, b.routed_index), layer
        assert torch.allclose(a.routed_weight, b.routed_weight, rtol=1e-5, atol=1e-6), layer
        assert torch.allclose(a.router_logits, b.router_logits, rtol=1e-5, atol=1e-5), layer


@pytest.mark.parametrize("family", NATIVE_MOE)
def test_stream_equals_whole_model_trace(family, tmp_path):
    """Every hand-written family: the stream of the saved checkpoint equals the loaded model's trace."""
    lm = tiny(family)
    seqs = sequences(lengths=(9, 5))
    folder = save(lm, tmp_path)
    got = stream_traces(streamable(str(folder)), {"a": seqs})["a"]
    _assert_same_traces(trace(lm, seqs), got)


@pytest.mark.parametrize("family", _passing_families())
def test_coverage_families_stream_or_say_why(family):
    """Each family the coverage page passes is streamed with the whole path's captures, or falls
    back with one line saying why (the coverage page's stream column)."""
    why = stream_check(f"random:{family}")
    assert "\n" not in why
    if why:
        assert why.startswith("cannot be streamed: "), why


@pytest.mark.parametrize("family", ["glm_moe_dsa", "hy_v4", "mistral_large4_text"])
def test_layers_that_pass_values_on_stream_like_the_whole_model(family):
    """Sparse-attention layers return their top-k key indices with the hidden states and the model
    hands them to the next layer: the stream passes them on and its captures equal the whole model's."""
    from moe_utils.models.stream import output_arity

    lm = load_model(f"random:{family}")
    decoder = lm.model.get_submodule(lm.spec.modules.layers)
    assert output_arity(decoder[0]) == 2
    assert stream_check(f"random:{family}") == ""


@pytest.mark.parametrize(
    ("family", "joined"),
    [("kimi_linear", "self_attn.conv1d.weight"), ("bailing_hybrid", "self_attn.conv1d.weight"), ("lara_mini", None)],
)
def test_tensors_transformers_joins_at_load_stream_like_the_whole_model(family, joined, tmp_path):
    """Linear-attention hybrids store some tensors split (q/k/v convolutions) or fused (one input
    projection) where transformers joins or splits them at load: the stream rebuilds each from the
    checkpoint, equal to the loaded model's, and its captures equal the whole model's."""
    from moe_utils.models.layer_load import Joined, disk_names, read_disk
    from moe_utils.models.sources import FolderSource

    lm = load_model(f"random:{family}")
    built = lm.built()
    built.save_pretrained(tmp_path)
    src = FolderSource(tmp_path)
    refs = {k: v for k, v in disk_names(built, src).items() if isinstance(v, Joined)}
    assert refs, "the checkpoint holds no tensor transformers joins or splits"
    if joined is not None:
        assert f"{lm.spec.modules.layers}.0.{joined}" in refs
    state = built.state_dict()
    for name, ref in refs.items():
        assert torch.equal(read_disk(src, ref), state[name]), name
    assert stream_check(f"random:{family}") == ""


@pytest.mark.parametrize("family", ["deepseek_ocr2_text", "step3p5", "unlimited_ocr_text"])
def test_text_configs_no_auto_class_maps_stream_like_the_whole_model(family):
    """The text part of a multimodal model, whose config no auto class maps, is built empty from its
    own modeling module's class and streams with the whole model's captures."""
    from transformers import AutoModelForCausalLM

    from moe_utils.models.random_models import decoder_classes

    config = load_model(f"random:{family}").built().config
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_config(config)
    assert decoder_classes(config)
    assert stream_check(f"random:{family}") == ""


def test_output_arity_reads_the_return_annotation():
    from moe_utils.models.stream import output_arity

    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return x, None

    class Open(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (x,)

    class Bare(torch.nn.Module):
        def forward(self, x):
            return x

    assert [output_arity(m()) for m in (Plain, Pair, Open, Bare)] == [1, 2, 1, 1]
    assert output_arity(tiny("mixtral").model.model.layers[0]) == 1


def test_visit_sees_each_layer_once_with_its_weights(tmp_path):
    lm = tiny("qwen2_moe")
    folder = save(lm, tmp_path)
    seen = []

    def visit(layer):
        w = layer.held.get(layer.layer, None)
        seen.append(layer.layer)
        assert layer.traces["a"].layers == [layer.layer]
        assert torch.equal(w.w_up, layer_weights_of(lm, layer.layer).w_up)

    stream_traces(streamable(str(folder)), {"a": sequences()}, visit=visit)
    assert seen == lm.moe_layers


def layer_weights_of(lm, layer):
    from moe_utils.models.weights import layer_weights

    return layer_weights(lm, layer, dtype=None)


def test_random_model_cannot_be_streamed():
    with pytest.raises(UsageError, match="cannot be streamed"):
        open_study("random:mixtral", stream=True)


def test_unknown_layer_names_fall_back_with_one_line(tmp_path):
    lm = tiny("mixtral")
    folder = save(lm, tmp_path)
    from safetensors.torch import load_file, save_file

    path = next(folder.glob("*.safetensors"))
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_renamed.weight"] = tensors.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(tensors, str(path))
    with pytest.raises(StreamUnsupportedError, match="q_proj") as err:
        stream_traces(streamable(str(folder)), {"a": sequences()})
    assert "\n" not in str(err.value)


def _same_reports(a, b) -> None:
    assert set(a.tables) == set(b.tables)
    for name in a.tables:
        pd.testing.assert_frame_equal(
            a.tables[name].reset_index(drop=True), b.tables[name].reset_index(drop=True), rtol=1e-5, atol=1e-6
        )
    assert json.dumps(a.summary, sort_keys=True, default=str) == json.dumps(b.summary, sort_keys=True, default=str)


def _close(a, b, path: str = "summary") -> None:
    """Nested summaries equal, their numbers to within float32 rounding."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _reports(model: str, stream: bool, dense: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = open_study(model, dense, stream=stream, inputs="long", max_tokens=96)
        return (
            obs2_norms.norms_report(study, inputs="long", max_tokens=96, max_neurons=8),
            obs3_depth.depth_report(study, inputs="long", max_tokens=96),
            study,
        )


@pytest.fixture
def expert_by_expert(monkeypatch):
    """Every streamed MoE block computed expert by expert, as a block too large to decode whole is."""
    monkeypatch.setattr(stream_module, "_too_large", lambda lm, dtype: True)


def test_observation_reports_streamed_equal_whole(tmp_path, monkeypatch):
    """Tables and summary numbers of observations 2 and 3 (with a dense baseline F): identical
    through the stream; with the blocks computed expert by expert (the engine's sum of the experts
    instead of transformers', so later layers' inputs differ by float32 rounding), equal to within it."""
    folder = save(tiny("deepseek_v3"), tmp_path)
    w2, w3, ws = _reports(str(folder), stream=False, dense="random:mistral")
    s2, s3, ss = _reports(str(folder), stream=True, dense="random:mistral")
    assert ws.stream_device is None and ss.stream_device == "cpu"
    assert ws.dense is not None and (w2.tables["activation_ratio"].expert == "F").any()
    _same_reports(w2, s2)
    _same_reports(w3, s3)
    assert s2.checks and all(c.indices_equal and c.max_rel_error <= 1e-5 for c in s2.checks)
    monkeypatch.setattr(stream_module, "_too_large", lambda lm, dtype: True)
    b2, b3, _ = _reports(str(folder), stream=True, dense="random:mistral")
    for whole, by_expert in ((w2, b2), (w3, b3)):
        for name in whole.tables:
            pd.testing.assert_frame_equal(
                whole.tables[name].reset_index(drop=True),
                by_expert.tables[name].reset_index(drop=True),
                rtol=1e-5,
                atol=1e-6,
            )
        _close(whole.summary, by_expert.summary)
    assert w2.intermediate is not None and b2.intermediate is not None
    pd.testing.assert_frame_equal(w2.intermediate, b2.intermediate, rtol=1e-5, atol=1e-6)
    assert b2.checks and all(c.indices_equal and c.max_rel_error <= 1e-5 for c in b2.checks)


def _gpt_oss_full_pair(tmp: Path) -> tuple[Path, Path]:
    """:func:`gpt_oss_pair`'s MXFP4 experts and decoded twin, completed into whole models (the
    embeddings, attention and norms of a random gpt-oss of the same config, bf16)."""
    from safetensors.torch import load_file
    from test_quantized import gpt_oss_pair, write
    from transformers import GptOssConfig, GptOssForCausalLM

    mx, twin = gpt_oss_pair(tmp)
    cfg = json.loads((twin / "config.json").read_text())
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"}))
    model.save_pretrained(tmp / "_gpt_oss", save_original_format=True)
    rest = {n: t.to(torch.bfloat16) for p in (tmp / "_gpt_oss").glob("*.safetensors") for n, t in load_file(p).items()}
    rest = {n: t for n, t in rest.items() if ".mlp." not in n}

    def complete(folder: Path) -> Path:
        tensors = {n: t for p in folder.glob("*.safetensors") for n, t in load_file(p).items()}
        config = json.loads((folder / "config.json").read_text())
        return write(folder.with_name(folder.name + "-full"), config, {**rest, **tensors})

    return complete(mx), complete(twin)


@pytest.mark.parametrize("kind", ["fp8", "int4", "mxfp4"])
def test_quantized_checkpoints_stream_as_their_decoded_twins(kind, tmp_path):
    """FP8 (DeepSeek-V3 layout, multi-token-prediction layer included), compressed-tensors INT4 and
    gpt-oss MXFP4 checkpoints in the hub layouts: the stream decodes them and gives the captures of
    their decoded twins, which equal the twin loaded whole by transformers."""
    from test_quantized import fp8_pair, int4_pair

    if kind == "fp8":
        quant, twin, _ = fp8_pair(tmp_path)
    elif kind == "int4":
        quant, twin = int4_pair(tmp_path)
    else:
        quant, twin = _gpt_oss_full_pair(tmp_path)
    seqs = [[1, 5, 9, 3, 7, 2, 8, 11], [4, 6, 10]]
    got = stream_traces(streamable(str(quant)), {"a": seqs})["a"]
    decoded = stream_traces(streamable(str(twin)), {"a": seqs})["a"]
    _assert_same_traces(decoded, got)
    _assert_same_traces(trace(load_model(str(twin)), seqs), decoded)


def _swept_equals_reading_the_experts(held: SweptLayer, lm, tr, name: str) -> None:
    """The tables built from a layer's sweep equal, bit for bit, those the analyses compute by
    reading the layer's experts again (the held layer's weights, indexed expert by expert)."""
    i = held.layer
    ns, ref = obs2_norms.swept_norms(held, tr, name), dynamic.norms_and_scores(held, tr)
    for got, want in ((ns.norms, ref.norms), (ns.scores, ref.scores), (ns.chosen, ref.chosen)):
        np.testing.assert_array_equal(got[i], want[i])
    pairs = [
        (obs2_norms.swept_activation_ratios(held, name), dynamic.activation_ratios(held, tr)),
        (
            obs2_norms.swept_intermediate_frame(held, tr, name, max_neurons=8),
            dynamic.intermediate_frame(held, tr, i, max_neurons=8),
        ),
        (obs3_depth.swept_token_output_similarity(held, tr, name), dynamic.token_output_similarity(held, tr)),
        *zip(obs3_depth.swept_output_similarity(held, tr, name), dynamic.output_similarity(held, tr), strict=True),
    ]
    for got, want in pairs:
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    check, want = held.check(tr[i], name), verify_trace(lm, tr, source=held)[0]
    assert check.indices_equal and want.indices_equal and check.max_weight_error == want.max_weight_error
    assert check.max_rel_error <= 1e-5 and want.max_rel_error <= 1e-5


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_expert_by_expert_blocks_equal_whole_model(family, tmp_path):
    """A block too large to decode whole: its experts read once and combined with the model's own
    routing give the whole model's captures, and every per-expert table built from that one
    sweep equals the one the analyses compute by reading the experts themselves."""
    lm = tiny(family)
    folder = save(lm, tmp_path)
    streamed = streamable(str(folder))
    seqs = {"a": sequences(), "b": sequences(seed=1, lengths=(4, 7, 3))}
    norms = {}

    def visit(layer):
        assert isinstance(layer.held, SweptLayer)
        for name, tr in layer.traces.items():
            _swept_equals_reading_the_experts(layer.held, streamed, tr, name)
        norms.update(obs2_norms.swept_norms(layer.held, layer.traces["a"], "a").norms)

    got = stream_traces(streamed, seqs, by_expert=True, visit=visit)
    for name, s in seqs.items():
        _assert_same_traces(trace(lm, s), got[name])
    whole = dynamic.norms_and_scores(lm, trace(lm, seqs["a"])).norms
    assert sorted(norms) == lm.moe_layers
    for layer in lm.moe_layers:
        assert abs(whole[layer] - norms[layer]).max() <= 1e-5 * abs(whole[layer]).max()


def _count_reads(monkeypatch) -> Counter:
    """Count, by tensor name, every read of a checkpoint tensor (nested reads counted once)."""
    reads: Counter = Counter()
    depth = [0]

    def counting(method):
        def wrapper(self, name, *args, **kwargs):
            if depth[0] == 0:
                reads.update(name if isinstance(name, list) else [name])
            depth[0] += 1
            try:
                return method(self, name, *args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    for method in ("get", "read", "mapped", "mapped_stack", "read_into", "part"):
        monkeypatch.setattr(CheckpointReader, method, counting(getattr(CheckpointReader, method)))
    return reads


def _expert_tensors(folder: Path) -> set[str]:
    return {n for n in CheckpointReader(folder).names() if ".mlp.experts." in n}


def test_expert_by_expert_reads_each_expert_once(tmp_path, monkeypatch, expert_by_expert):
    """Observation 2 streamed with its blocks computed expert by expert: each expert tensor of
    each layer is read from the checkpoint exactly once (the block output, the routing, every
    expert's output norms and activations all come from the one sweep)."""
    lm = tiny("deepseek_v3")
    folder = save(lm, tmp_path)
    experts = _expert_tensors(folder)
    assert experts and all(any(f"layers.{i}." in n for i in lm.moe_layers) for n in experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = open_study(str(folder), stream=True, inputs="long", max_tokens=64)
        reads = _count_reads(monkeypatch)
        report = obs2_norms.norms_report(study, inputs="long", max_tokens=64)
    assert report.checks and all(c.indices_equal for c in report.checks)
    assert {n: reads[n] for n in experts} == dict.fromkeys(experts, 1)


def test_fp8_expert_by_expert_reads_each_expert_once(tmp_path, monkeypatch):
    """The same for an FP8 checkpoint in the hub's layout (DeepSeek-V3): each expert's weight and
    its block scales are read once, through the stream and the swept tables of observation 2."""
    from test_quantized import fp8_pair

    quant, _, _ = fp8_pair(tmp_path)
    experts = _expert_tensors(quant)
    assert any(n.endswith("_scale_inv") for n in experts)
    streamed = streamable(str(quant))
    reads = _count_reads(monkeypatch)
    seen = []

    def visit(layer):
        for name, tr in layer.traces.items():
            obs2_norms.swept_norms(layer.held, tr, name)
            obs2_norms.swept_activation_ratios(layer.held, name)
            layer.held.check(tr[layer.layer], name)
        seen.append(layer.layer)

    seqs = {"short": [[1, 5, 9, 3, 7, 2, 8, 11], [4, 6, 10]], "long": [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]}
    stream_traces(streamed, seqs, by_expert=True, visit=visit)
    assert seen == list(streamed.moe_layers)
    traced = {n for n in experts if any(f"layers.{i}." in n for i in seen)}
    assert traced and {n: reads[n] for n in traced} == dict.fromkeys(traced, 1)
