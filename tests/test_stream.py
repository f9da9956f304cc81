"""The layer stream (one decoder layer in memory) against the whole-model path: same captures,
same tables and summaries, and the quantized checkpoints' numbers equal their decoded twins'."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_models import NATIVE_MOE, save, sequences, tiny

from moe_utils.analysis import obs2_norms, obs3_depth
from moe_utils.analysis.context import open_study
from moe_utils.core.errors import UsageError
from moe_utils.models.layer_load import StreamUnsupportedError
from moe_utils.models.stream import stream_check, stream_traces, streamable
from moe_utils.models.trace import trace

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


def _reports(model: str, stream: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = open_study(model, stream=stream, inputs="long", max_tokens=96)
        return (
            obs2_norms.norms_report(study, inputs="long", max_tokens=96),
            obs3_depth.depth_report(study, inputs="long", max_tokens=96),
            study,
        )


def test_observation_reports_streamed_equal_whole(tmp_path):
    """Tables and summary numbers of observations 2 and 3: identical through the stream."""
    folder = save(tiny("deepseek_v3"), tmp_path)
    w2, w3, ws = _reports(str(folder), stream=False)
    s2, s3, ss = _reports(str(folder), stream=True)
    assert ws.stream_device is None and ss.stream_device == "cpu"
    _same_reports(w2, s2)
    _same_reports(w3, s3)
    assert s2.checks and all(c.indices_equal and c.max_rel_error <= 1e-5 for c in s2.checks)


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

    from moe_utils.models.loading import load_model

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


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_expert_by_expert_blocks_equal_whole_model(family, tmp_path):
    """A block too large to decode whole: its experts read one at a time and combined with the
    model's own routing give the whole model's captures, and the analyses see the same weights."""
    from moe_utils.analysis import dynamic

    lm = tiny(family)
    folder = save(lm, tmp_path)
    seqs = sequences()
    norms = {}

    def visit(layer):
        norms.update(dynamic.norms_and_scores(layer.held, layer.traces["a"]).norms)

    got = stream_traces(streamable(str(folder)), {"a": seqs}, by_expert=True, visit=visit)["a"]
    ref = trace(lm, seqs)
    _assert_same_traces(ref, got)
    whole = dynamic.norms_and_scores(lm, ref).norms
    for layer in ref.layers:
        assert abs(whole[layer] - norms[layer]).max() <= 1e-5 * abs(whole[layer]).max()
