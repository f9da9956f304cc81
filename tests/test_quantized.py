"""Quantized hub checkpoints (fine-grained FP8, MXFP4, compressed-tensors INT4) read as their
decoded bf16 twins, bit for bit against the formats' own reference decoders; other quantization
formats are refused before a weight is read."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GptOssConfig
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moe_utils.analysis import static
from moe_utils.analysis.context import open_study
from moe_utils.analysis.results import read_result
from moe_utils.core.errors import LayerIndexError, UnsupportedQuantizationError
from moe_utils.metrics.blocks import neuron_blocks, neuron_rows
from moe_utils.metrics.neurons import neuron_average, reorder_neurons
from moe_utils.metrics.projection import flattened_pass, randomized_neuron_pca, sketch_matrix
from moe_utils.metrics.threads import pass_threads
from moe_utils.models import checkpoint, fingerprint
from moe_utils.models.checkpoint import CheckpointReader
from moe_utils.models.lazy_experts import LAZY_BAND_ELEMENTS, LazyExperts, LazyMatrix
from moe_utils.models.quant_codecs import (
    EncodedMatrix,
    FP8Matrix,
    MXFP4Matrix,
    PackedMatrix,
    dequantize_fp8,
    dequantize_mxfp4_expert,
    dequantize_packed,
)
from moe_utils.models.quant_schemes import QuantScheme, quant_scheme
from moe_utils.models.weights import FolderSource, iter_layer_weights, layer_weights

FIELDS = ("router", "w_act", "w_up", "w_down", "b_act", "b_up", "b_down", "router_bias", "score_correction_bias")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor (so -0.0 and NaN payloads count)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


# ---- quantizers (the test's own; the decoders are checked against the references) ----------------
def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style block FP8: one float32 scale per block (amax / 448), partial edge blocks."""
    rows, cols = w.shape
    bm, bn = block
    grid = (math.ceil(rows / bm), math.ceil(cols / bn))
    padded = torch.zeros(grid[0] * bm, grid[1] * bn)
    padded[:rows, :cols] = w.float()
    amax = padded.view(grid[0], bm, grid[1], bn).abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale = amax / 448.0
    full = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
    return (w.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def int_quantize(w: torch.Tensor, group: int, symmetric: bool = True):
    """Group-wise INT4 as llm-compressor writes it: int8 codes in [-8, 7], bf16 scales, int8 zero points."""
    rows, cols = w.shape
    g = w.float().view(rows, cols // group, group)
    if symmetric:
        scale = (g.abs().amax(-1) / 7.0).clamp_min(1e-8).to(torch.bfloat16)
        zero = torch.zeros(rows, cols // group, dtype=torch.int8)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15.0).clamp_min(1e-8).to(torch.bfloat16)
        zero = (-8 - torch.round(lo / scale.float())).clamp(-8, 7).to(torch.int8)
    q = torch.round(g / scale.float()[..., None]) + zero.float()[..., None]
    return q.clamp(-8, 7).to(torch.int8).view(rows, cols), scale, zero


def ct_reference(parts: dict[str, torch.Tensor], group: int, symmetric: bool = True) -> torch.Tensor:
    """The weight compressed-tensors itself decompresses from a module's packed tensors."""
    pytest.importorskip("compressed_tensors")  # Python >= 3.11
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return PackedQuantizationCompressor.decompress(dict(parts), scheme)["weight"]


def ct_pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool) -> dict[str, torch.Tensor]:
    """A module's tensors as compressed-tensors packs them (codes and zero points into int32 words)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    parts = {"weight_packed": pack_to_int32(q, 4), "weight_scale": scale, "weight_shape": torch.tensor(q.shape)}
    if not symmetric:
        parts["weight_zero_point"] = pack_to_int32(zero, 4, packed_dim=0)
    return parts


# ---- decoders against the references --------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "block"),
    [((576, 7168), (128, 128)), ((256, 384), (128, 128)), ((40, 72), (16, 32)), ((7, 130), (128, 128))],
)
def test_fp8_decoder_matches_transformers(shape, block) -> None:
    g = torch.Generator().manual_seed(shape[0])
    q, scale = fp8_quantize(torch.randn(shape, generator=g), block)
    # float32: transformers' backward-pass decoder (which handles partial blocks)
    assert same_bits(
        dequantize_fp8(q, scale, block, torch.float32), _dequantize_fp8_weight(q, scale, list(block), torch.float32)
    )
    mine = dequantize_fp8(q, scale, block, torch.bfloat16)
    assert same_bits(mine, _dequantize_fp8_weight(q, scale, list(block), torch.float32).to(torch.bfloat16))
    if shape[0] % block[0] == 0 and shape[1] % block[1] == 0:
        # the decoder transformers loads FP8 checkpoints with on a CPU (whole blocks only)
        assert same_bits(mine, Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.bfloat16))
    # UE8M0 scales: exponent bytes (bias 127) stored as uint8 or as float8_e8m0fnu
    exps = torch.randint(100, 140, scale.shape, generator=g, dtype=torch.uint8)
    ref = _dequantize_fp8_weight(q, exps.view(torch.float8_e8m0fnu), list(block), torch.float32)
    assert same_bits(dequantize_fp8(q, exps, block, torch.float32), ref)
    assert same_bits(dequantize_fp8(q, exps.view(torch.float8_e8m0fnu), block, torch.bfloat16), ref.to(torch.bfloat16))


def test_fp8_decoder_refuses_a_grid_that_does_not_fit() -> None:
    q, scale = fp8_quantize(torch.randn(576, 7168), (128, 128))
    with pytest.raises(Exception, match="5 x 56 scale grid"):
        dequantize_fp8(q, scale[:4], (128, 128))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_mxfp4_decoder_matches_transformers(dtype) -> None:
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 255, (3, 10, 4), generator=g, dtype=torch.uint8)  # every exponent but NaN's
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    mine = torch.stack([dequantize_mxfp4_expert(blocks[e], scales[e], dtype).t() for e in range(3)])
    assert same_bits(mine, ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("rows", "cols", "group"), [(48, 128, 32), (20, 64, 16)])
def test_pack_quantized_decoder_matches_compressed_tensors(rows, cols, group, symmetric) -> None:
    g = torch.Generator().manual_seed(rows)
    q, scale, zero = int_quantize(torch.randn(rows, cols, generator=g), group, symmetric)
    parts = ct_pack(q, scale, zero, symmetric)
    scheme = QuantScheme("pack-quantized", num_bits=4, group_size=group, symmetric=symmetric)
    mine = dequantize_packed(parts["weight_packed"], scale, cols, scheme, parts.get("weight_zero_point"))
    assert same_bits(mine, ct_reference(parts, group, symmetric))


# ---- lazy decoding: windows and block walks equal the eager decode ------------------------------
def fp8_matrix(rows: int, cols: int, block: tuple[int, int], seed: int = 0, ue8m0: bool = False) -> FP8Matrix:
    g = torch.Generator().manual_seed(seed)
    q, scale = fp8_quantize(torch.randn(rows, cols, generator=g), block)
    if ue8m0:
        scale = torch.randint(100, 140, scale.shape, generator=g, dtype=torch.uint8)
    return FP8Matrix(q, scale, block, torch.bfloat16)


def encoded_matrices() -> dict[str, EncodedMatrix]:
    """One matrix per format, each with partial edge blocks (a 576 x 7168 FP8 expert, scaled down:
    4.5 row blocks and 7.03 column blocks)."""
    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (36, 5, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(119, 129, (36, 5), generator=g, dtype=torch.uint8)
    q, scale, zero = int_quantize(torch.randn(36, 96, generator=g), 32, symmetric=False)
    packed = torch.zeros(36, 12, dtype=torch.int32)
    for k in range(8):  # eight 4-bit values per int32 word, offset 8, low bits first
        packed |= (q[:, k::8].to(torch.int32) + 8) << (4 * k)
    zeros = torch.zeros(5, 3, dtype=torch.int32)
    for k in range(8):  # zero points packed along the rows
        part = zero[k::8].to(torch.int32) + 8
        zeros[: part.shape[0]] |= part << (4 * k)
    asym = QuantScheme("pack-quantized", num_bits=4, group_size=32, symmetric=False)
    return {
        "fp8": fp8_matrix(36, 900, (8, 128)),
        "fp8-ue8m0": fp8_matrix(36, 900, (8, 128), ue8m0=True),
        "mxfp4": MXFP4Matrix(blocks, scales, torch.bfloat16),
        "int4": PackedMatrix(packed, scale, 96, asym, zeros, torch.bfloat16),
    }


@pytest.mark.parametrize("fmt", ["fp8", "fp8-ue8m0", "mxfp4", "int4"])
def test_lazy_windows_equal_the_eager_decode(fmt: str) -> None:
    enc = encoded_matrices()[fmt]
    whole = enc.decode()
    rows, cols = whole.shape
    m = LazyMatrix(enc)
    assert same_bits(m.decoded(), whole) and tuple(m.shape) == (rows, cols)
    for step in (1, 3, 5, 8, 13, rows):  # neuron blocks of every size, partial ones at the end
        for a in range(0, rows, step):
            assert same_bits(m[a : a + step], whole[a : a + step]), (step, a)
    for step in (1, 7, 32, 33, 130):
        for a in range(0, cols, step):
            assert same_bits(m[:, a : a + step], whole[:, a : a + step]), (step, a)
    g = torch.Generator().manual_seed(3)
    for _ in range(40):  # arbitrary windows, integers, strided rows
        r0, c0 = int(torch.randint(0, rows, (1,), generator=g)), int(torch.randint(0, cols, (1,), generator=g))
        r1, c1 = (
            r0 + int(torch.randint(1, rows, (1,), generator=g)),
            c0 + int(torch.randint(1, cols, (1,), generator=g)),
        )
        assert same_bits(m[r0:r1, c0:c1], whole[r0:r1, c0:c1])
        assert same_bits(m[r0, c0:c1], whole[r0, c0:c1]) and same_bits(m[r0:r1:3, c0], whole[r0:r1:3, c0])
    # the halves of a fused gate/up (every second row, or a contiguous half), and transposed views
    for offset, step, count in ((0, 2, rows // 2), (1, 2, rows // 2), (rows // 2, 1, rows // 2)):
        half = whole[offset::step][:count]
        lazy = LazyMatrix(enc, False, offset, step, count)
        assert (
            same_bits(lazy.decoded(), half)
            and same_bits(lazy[2:9], half[2:9])
            and same_bits(lazy[:, 5:40], half[:, 5:40])
        )
        rows_t = whole.t()[offset::step][:count]
        lazy_t = LazyMatrix(enc, True, offset, step, count)
        assert same_bits(lazy_t.decoded(), rows_t) and same_bits(lazy_t[3:11], rows_t[3:11])
        assert same_bits(lazy_t[:, 1:30], rows_t[:, 1:30])


def test_lazy_matrices_refuse_what_they_cannot_index() -> None:
    m = LazyMatrix(encoded_matrices()["fp8"])
    for bad in ((slice(None), slice(None), 0), (slice(None, None, -1),), ([0, 1],), (36,)):
        with pytest.raises(IndexError):
            m[bad if len(bad) > 1 else bad[0]]
    with pytest.raises(IndexError):
        LazyExperts([m])[0:1]  # type: ignore[index]


def twins(experts: int, rows: int, cols: int, block: tuple[int, int]) -> tuple[LazyExperts, torch.Tensor]:
    """A lazy FP8 expert stack and the same experts decoded (bf16)."""
    mats = [fp8_matrix(rows, cols, block, seed=e) for e in range(experts)]
    return LazyExperts([LazyMatrix(m) for m in mats]), torch.stack([m.decode() for m in mats])


@pytest.mark.parametrize("axis", [0, 1])
def test_block_walks_over_a_lazy_stack_equal_those_over_its_decoded_twin(axis: int) -> None:
    lazy, twin = twins(5, 40, 200, (16, 64))  # 2.5 x 3.1 blocks
    if axis == 1:
        lazy, twin = LazyExperts([LazyMatrix(m.stored, True) for m in lazy.matrices]), twin.transpose(1, 2)
    width = int(twin.shape[2 - axis])
    omega = sketch_matrix(width, 8, seed=1)
    for threads in (1, 2):
        # 3 neurons per block: blocks cross the quantization blocks and the decoded bands
        a = flattened_pass(list(lazy), axis, omega=omega, block_elements=3 * width * 5, threads=threads)
        b = flattened_pass(list(twin), axis, omega=omega, block_elements=3 * width * 5, threads=threads)
        for x, y in ((a.gram, b.gram), (a.std_gram, b.std_gram), (a.neuron_sums, b.neuron_sums)):
            assert np.array_equal(x, y)
        assert a.sketch is not None and b.sketch is not None
        assert np.array_equal(a.sketch.y, b.sketch.y) and np.array_equal(a.sketch.xty, b.sketch.xty)
    for e in range(5):
        got = [(i, x.copy()) for i, x in neuron_blocks(lazy[e], axis, block_elements=7 * width)]
        want = [(i, x.copy()) for i, x in neuron_blocks(twin[e], axis, block_elements=7 * width)]
        assert [i for i, _ in got] == [i for i, _ in want]
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(got, want))
        assert np.array_equal(neuron_rows(lazy[e], axis, 3, 31), neuron_rows(twin[e], axis, 3, 31))
    kind = "up" if axis == 0 else "down"
    assert np.array_equal(neuron_average(lazy, kind), neuron_average(twin, kind))
    pca = [randomized_neuron_pca([(m, axis) for m in s], 2, block_elements=11 * width) for s in (lazy, twin)]
    assert all(np.array_equal(x, y) for x, y in zip(*pca))
    r, t = reorder_neurons(lazy[0], lazy[3], kind), reorder_neurons(twin[0], twin[3], kind)
    assert np.array_equal(r.perm, t.perm) and (r.sim_before, r.sim_after, r.tau) == (t.sim_before, t.sim_after, t.tau)


class DecodeCounter:
    """Counts what :class:`LazyMatrix` decodes: elements per call, and the decoded elements alive at
    once (each decoded tensor counted until it is freed), at its peak."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[int] = []
        self.live = self.peak = 0
        self.lock = threading.Lock()
        window = LazyMatrix._window

        def counted(matrix: LazyMatrix, rows: range, cols: range) -> torch.Tensor:
            out = window(matrix, rows, cols)
            with self.lock:
                self.calls.append(out.numel())
                self.live += out.numel()
                self.peak = max(self.peak, self.live)
            weakref.finalize(out, self.freed, out.numel())
            return out

        monkeypatch.setattr(LazyMatrix, "_window", counted)

    def freed(self, n: int) -> None:
        with self.lock:
            self.live -= n


def test_a_block_walk_holds_one_band_of_each_expert_per_thread_not_the_layer(monkeypatch) -> None:
    experts, rows, cols = 8, 288, 7104  # a 576 x 7168 expert, scaled down: 2.25 row blocks, 55.5 column blocks
    lazy, twin = twins(experts, rows, cols, (128, 128))
    counter = DecodeCounter(monkeypatch)
    step = 5  # neurons per block of the walk; a band holds LAZY_BAND_ELEMENTS // cols of them
    band = LAZY_BAND_ELEMENTS // cols
    got = flattened_pass(list(lazy), 0, block_elements=step * cols * experts, threads=2)
    want = flattened_pass(list(twin), 0, block_elements=step * cols * experts, threads=2)
    assert np.array_equal(got.gram, want.gram) and np.array_equal(got.std_gram, want.std_gram)
    layer = experts * rows * cols
    assert max(counter.calls) <= band * cols  # no call decodes more than one band of one expert
    assert sum(counter.calls) < 2 * layer  # each neuron decoded about once (straddling blocks twice)
    # per thread: one band of each expert, the next band while it is decoded, one block crossing two bands
    assert counter.peak <= pass_threads(2) * ((experts + 1) * band + step) * cols
    assert counter.peak < layer / 4


def test_reading_a_quantized_layer_decodes_none_of_its_routed_experts(tmp_path: Path, monkeypatch) -> None:
    fp8, twin, _ = fp8_pair(tmp_path)
    counter = DecodeCounter(monkeypatch)
    decoded = []
    monkeypatch.setattr(EncodedMatrix, "decode", lambda self, out=None: decoded.append(self) or torch.empty(0))
    for lm in static.layer_matrices(str(fp8), defer_screen=True):  # as weight_report reads it
        assert all(isinstance(t, LazyExperts) for t in lm.experts.values())
        assert counter.calls == [] and len(decoded) == 3  # only the shared expert, decoded eagerly
        decoded.clear()
        for m in lm.experts.values():
            m[0][0:4]  # indexing decodes one band of one expert (here the whole small matrix)
        assert counter.calls == [32 * 64] * 3 and not decoded
        counter.calls.clear()


def test_a_nan_in_an_fp8_expert_is_screened_as_in_its_decoded_twin(tmp_path: Path) -> None:
    fp8, twin, _ = fp8_pair(tmp_path, nan_in="model.layers.2.mlp.experts.5.up_proj.weight")
    reports, screens = [], []
    for folder in (fp8, twin):
        study = open_study(str(folder), None, weights_only=True, allow_invalid=True)
        reports.append(static.weight_report(study.weights_source, study.layers, reorder_max_pairs=1, workers=1))
        screens.append(study.excluded)
    assert screens[0] == screens[1] == [{"layer": 2, "expert": 5, "tensor": "W_up", "n_nan": 1, "n_inf": 0}]
    for table in reports[0]:
        pd.testing.assert_frame_equal(reports[0][table], reports[1][table], check_exact=True)
    assert "5" not in set(reports[0]["similarity"].query("layer == 2")["expert_i"])


# ---- configs -------------------------------------------------------------------------------------
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 24]}


def ct_config(group: int) -> dict:
    """compressed-tensors' config as Kimi-K2-Thinking publishes it: routed experts only."""
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
        "kv_cache_scheme": None,
    }


def test_quant_scheme_reads_the_published_configs() -> None:
    assert quant_scheme({}) is None
    assert quant_scheme({"quantization_config": FP8_CONFIG}) == QuantScheme("fp8", block=(16, 24))
    assert quant_scheme({"quantization_config": {"quant_method": "mxfp4"}}) == QuantScheme("mxfp4")
    assert quant_scheme({"quantization_config": ct_config(32)}) == QuantScheme("pack-quantized", group_size=32)


@pytest.mark.parametrize(
    ("qc", "named"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "GPTQ"),
        ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "AWQ"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "gguf"}, "GGUF"),
        ({**ct_config(32), "format": "float-quantized", "config_groups": {}}, "float-quantized"),
    ],
)
def test_other_quantizations_are_refused_in_one_line(qc: dict, named: str) -> None:
    with pytest.raises(UnsupportedQuantizationError) as err:
        quant_scheme({"quantization_config": qc})
    text = str(err.value)
    assert named in text and "\n" not in text and "bf16" in text


# ---- tiny checkpoints in the hub layouts ---------------------------------------------------------
def deepseek_base(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A tiny DeepSeek-V3 saved with its hub tensor names, tensors in bf16 (the correction bias in
    float32, as published), and its config.json; MoE layers 1 and 2."""
    config = DeepseekV3Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.1)
    model.save_pretrained(folder / "_saved")
    tensors = {}
    for path in sorted((folder / "_saved").glob("*.safetensors")):
        for name, t in load_file(path).items():
            tensors[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    cfg = json.loads((folder / "_saved" / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "bfloat16"
    return cfg, tensors


def write(folder: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """config.json and ``shards`` safetensors files with an index, as the hub stores big models."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def fp8_pair(tmp: Path, nan_in: str | None = None) -> tuple[Path, Path, int]:
    """A DeepSeek-V3 FP8 checkpoint (every layer Linear except the router quantized, 16 x 24 blocks,
    plus a multi-token-prediction layer at index num_hidden_layers) and its decoded bf16 twin;
    ``nan_in`` names a tensor one of whose codes is e4m3's NaN in both."""
    cfg, base = deepseek_base(tmp)
    block = tuple(FP8_CONFIG["weight_block_size"])
    quant, twin = {}, {}
    for name, t in base.items():
        if name.startswith("model.layers.") and t.dim() == 2 and not name.endswith("mlp.gate.weight"):
            q, scale = fp8_quantize(t, block)
            if name == nan_in:
                q.view(torch.uint8)[3, 5] = 0x7F
            quant[name], quant[name + "_scale_inv"] = q, scale
            twin[name] = _dequantize_fp8_weight(q, scale, list(block), torch.float32).to(torch.bfloat16)
        else:
            quant[name] = twin[name] = t
    mtp = cfg["num_hidden_layers"]
    for name in [n for n in quant if n.startswith("model.layers.2.")]:  # DeepSeek-V3's layer 61
        quant[name.replace("model.layers.2.", f"model.layers.{mtp}.")] = torch.zeros(3, dtype=torch.bfloat16)
    quant[f"model.layers.{mtp}.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
    fp8 = write(tmp / "fp8", {**cfg, "quantization_config": FP8_CONFIG}, quant)
    return fp8, write(tmp / "fp8-twin", cfg, twin), mtp


def gpt_oss_pair(tmp: Path, experts: int = 4, hidden: int = 64, inter: int = 32) -> tuple[Path, Path]:
    """A gpt-oss MXFP4 checkpoint (hub names ``*_blocks``/``*_scales``, biases and router bf16) and
    its twin decoded by ``convert_moe_packed_tensors``."""
    config = GptOssConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=experts,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
    ).to_dict()
    config.pop("dtype", None)
    config["torch_dtype"] = "bfloat16"
    g = torch.Generator().manual_seed(2)
    quant, twin = {}, {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        for name, shape in ((p + "router.weight", (experts, hidden)), (p + "router.bias", (experts,))):
            quant[name] = twin[name] = torch.randn(shape, generator=g).to(torch.bfloat16)
        for proj, out, inn in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            blocks = torch.randint(0, 256, (experts, out, inn // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(119, 129, (experts, out, inn // 32), generator=g, dtype=torch.uint8)
            quant[f"{p}experts.{proj}_blocks"], quant[f"{p}experts.{proj}_scales"] = blocks, scales
            twin[f"{p}experts.{proj}"] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
            bias = torch.randn(experts, out, generator=g).to(torch.bfloat16)
            quant[f"{p}experts.{proj}_bias"] = twin[f"{p}experts.{proj}_bias"] = bias
    qc = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"]}
    mx = write(tmp / "mxfp4", {**config, "quantization_config": qc}, quant)
    return mx, write(tmp / "mxfp4-twin", config, twin)


def int4_pair(tmp: Path, group: int = 16) -> tuple[Path, Path]:
    """A Kimi-K2-Thinking-style checkpoint: DeepSeek-V3 with routed experts in compressed-tensors
    pack-quantized INT4, everything else bf16; and its twin decoded by compressed-tensors."""
    cfg, base = deepseek_base(tmp)
    quant, twin = {}, {}
    for name, t in base.items():
        if ".mlp.experts." in name:
            q, scale, zero = int_quantize(t, group)
            parts = ct_pack(q, scale, zero, True)
            stem = name.removesuffix("weight")
            quant.update({stem + key: v for key, v in parts.items()})
            twin[name] = ct_reference(parts, group)
        else:
            quant[name] = twin[name] = t
    ct = write(tmp / "int4", {**cfg, "quantization_config": ct_config(group)}, quant)
    return ct, write(tmp / "int4-twin", cfg, twin)


def assert_same_layers(a: Path, b: Path) -> None:
    """Every MoE layer reads the same (bit for bit, stored dtype) from both checkpoints."""
    left, right = list(iter_layer_weights(a, dtype=None)), list(iter_layer_weights(b, dtype=None))
    assert [w.layer for w in left] == [w.layer for w in right] and left
    for x, y in zip(left, right):
        for field in FIELDS:
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None), field
            if u is not None:
                assert same_bits(u, v), (x.layer, field)
        assert (x.shared is None) == (y.shared is None)
        if x.shared is not None:
            for field in ("w_act", "w_up", "w_down"):
                assert same_bits(getattr(x.shared, field), getattr(y.shared, field)), (x.layer, "shared", field)


def observation1(folder: Path) -> dict[str, pd.DataFrame]:
    """Observation 1's weight pass as its notebook runs it (weights only, streamed)."""
    study = open_study(str(folder), None, weights_only=True)
    return static.weight_report(
        study.weights_source, study.layers, study.dense_weights_source, reorder_max_pairs=1, workers=1
    )


def assert_same_report(a: Path, b: Path) -> None:
    left, right = observation1(a), observation1(b)
    assert left.keys() == right.keys()
    for table in left:
        pd.testing.assert_frame_equal(left[table], right[table], check_exact=True)
    assert len(left["similarity"]) and len(left["reordering"])


def test_fp8_deepseek_checkpoint_reads_as_its_decoded_twin(tmp_path: Path) -> None:
    fp8, twin, mtp = fp8_pair(tmp_path)
    assert_same_layers(fp8, twin)
    assert_same_report(fp8, twin)
    src = FolderSource(fp8)
    assert not src.has(f"model.layers.{mtp}.eh_proj.weight")  # the MTP layer is not seen
    with pytest.raises(LayerIndexError):
        layer_weights(fp8, mtp)
    assert [w.layer for w in iter_layer_weights(fp8, dtype=None)] == [1, 2]


def test_fp8_checkpoint_in_float32_is_its_bf16_twin_widened(tmp_path: Path) -> None:
    fp8, twin, _ = fp8_pair(tmp_path)
    w, t = layer_weights(fp8, 1, dtype=torch.float32), layer_weights(twin, 1, dtype=torch.float32)
    assert same_bits(w.w_down, t.w_down) and w.w_down.dtype == torch.float32
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    reader = CheckpointReader(fp8)
    assert reader.stored_dtype(name) == "F8_E4M3" and reader.mapped(name).dtype == torch.float8_e4m3fn
    assert reader.stored_dtype(name + "_scale_inv") == "F32"


def test_mxfp4_gpt_oss_checkpoint_reads_as_its_decoded_twin(tmp_path: Path) -> None:
    mx, twin = gpt_oss_pair(tmp_path)
    assert_same_layers(mx, twin)
    assert_same_report(mx, twin)
    assert FolderSource(mx).shape("model.layers.0.mlp.experts.gate_up_proj") == (4, 64, 64)


def test_int4_compressed_tensors_checkpoint_reads_as_its_decoded_twin(tmp_path: Path) -> None:
    ct, twin = int4_pair(tmp_path)
    assert_same_layers(ct, twin)
    assert_same_report(ct, twin)


def test_gptq_checkpoint_is_refused_before_any_tensor_is_read(tmp_path: Path, monkeypatch) -> None:
    cfg, _ = deepseek_base(tmp_path)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    folder = tmp_path / "gptq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"not read: a reader would call this file corrupt")

    def no_read(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    monkeypatch.setattr(fingerprint, "file_sha256", no_read)
    monkeypatch.setattr(checkpoint, "verify_safetensors", no_read)
    monkeypatch.setattr(CheckpointReader, "_open", no_read)
    for attempt in (
        lambda: layer_weights(folder, 1),
        lambda: open_study(str(folder), None, weights_only=True),
        lambda: observation1(folder),
    ):
        with pytest.raises(UnsupportedQuantizationError) as err:
            attempt()
        text = str(err.value)
        assert "GPTQ" in text and "\n" not in text and "bf16" in text


@pytest.mark.slow
def test_observation1_notebook_gives_the_same_results_on_an_fp8_checkpoint_and_its_twin(
    repo_root: Path, tmp_path: Path
) -> None:
    fp8, twin, _ = fp8_pair(tmp_path)
    found = []
    for folder in (fp8, twin):
        out = tmp_path / f"book-{folder.name}"
        run = subprocess.run(
            [sys.executable, "-m", "moe_utils.publish.cli", "run", "--model", str(folder)]
            + ["--notebooks", "obs1_neurons_as_experts", "-p", "reorder_max_pairs", "2"]
            + ["--out", str(out)],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        (path,) = out.rglob("obs1_neurons_as_experts.json")
        found.append(read_result(path))
    quantized, decoded = found
    assert quantized.tables.keys() == decoded.tables.keys() and quantized.tables
    for name, table in quantized.tables.items():
        pd.testing.assert_frame_equal(table, decoded.tables[name], check_exact=True)
    assert {k: v["value"] for k, v in quantized.summary.items()} == {k: v["value"] for k, v in decoded.summary.items()}
