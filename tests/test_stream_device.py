"""The layer stream computing on a GPU (``device="cuda"``) against the whole model on the CPU.

Skipped where no CUDA device is present (CI and the 2-core machine); run it on a machine with
one: ``python -m pytest tests/test_stream_device.py``. The same code runs on both devices, so the
captures must agree to float32 rounding and choose the same experts, and the observation tables
must agree to the same tolerance.
"""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
from tiny_models import NATIVE_MOE, save, sequences, tiny

from moe_utils.analysis import obs2_norms, obs3_depth
from moe_utils.analysis.context import open_study
from moe_utils.models.stream import stream_traces, streamable
from moe_utils.models.trace import trace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
RTOL = 1e-4  # float32 on another device: other kernels, other summation orders


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in the GPU's float32 products, so that the tolerance above is about rounding only."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("family", NATIVE_MOE)
def test_stream_on_the_gpu_equals_the_cpu_trace(family, tmp_path) -> None:
    lm = tiny(family)
    seqs = sequences(lengths=(9, 5))
    got = stream_traces(streamable(str(save(lm, tmp_path))), {"a": seqs}, device="cuda")["a"]
    ref = trace(lm, seqs)
    assert got.layers == ref.layers
    for layer in ref.layers:
        a, b = ref[layer], got[layer]
        assert b.block_output.device.type == "cpu"  # captures come back to the CPU
        assert float((a.block_output - b.block_output).abs().max() / a.block_output.abs().max()) <= RTOL, layer
        assert torch.equal(a.routed_index, b.routed_index), layer
        assert torch.allclose(a.routed_weight, b.routed_weight, rtol=RTOL, atol=1e-5), layer


def _reports(model: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = open_study(model, inputs="long", max_tokens=96, **kw)
        return (
            obs2_norms.norms_report(study, inputs="long", max_tokens=96),
            obs3_depth.depth_report(study, inputs="long", max_tokens=96),
            study,
        )


def test_observation_tables_streamed_on_the_gpu_equal_the_cpu(tmp_path) -> None:
    folder = str(save(tiny("deepseek_v3"), tmp_path))
    cpu2, cpu3, _ = _reports(folder, stream=False)
    gpu2, gpu3, study = _reports(folder, stream=True, device="cuda")
    assert study.stream_device == "cuda"
    for a, b in ((cpu2, gpu2), (cpu3, gpu3)):
        assert set(a.tables) == set(b.tables)
        for name in a.tables:
            pd.testing.assert_frame_equal(
                a.tables[name].reset_index(drop=True), b.tables[name].reset_index(drop=True), rtol=RTOL, atol=1e-5
            )
