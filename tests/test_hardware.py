"""moe_utils.core.hardware: the paper models' shapes give their published parameter counts."""

import pytest

from moe_utils.core.hardware import MISTRAL_7B, PAPER_MODEL_SHAPES, Measured, project


@pytest.mark.parametrize(
    "name, billions", [("Mixtral 8x7B", 46.7), ("Mixtral 8x22B", 140.6), ("DeepSeekMoE 16B", 16.4), ("Grok-1", 314.0)]
)
def test_parameter_counts_match_the_published_sizes(name, billions):
    assert PAPER_MODEL_SHAPES[name].params() / 1e9 == pytest.approx(billions, rel=0.01)


def test_mistral_and_layer_bytes():
    assert MISTRAL_7B.params() / 1e9 == pytest.approx(7.24, rel=0.01)
    assert PAPER_MODEL_SHAPES["Mixtral 8x7B"].expert_layer_bytes() == 8 * 3 * 4096 * 14336 * 2
    assert PAPER_MODEL_SHAPES["Grok-1"].expert_layer_bytes() == 8 * 3 * 6144 * 32768 * 2


def test_projection_scales_the_measured_rates():
    m = Measured(
        obs1_seconds_per_expert_byte=1e-9,
        obs1_peak_over_layer=1.2,
        pair_seconds=100.0,
        pair_width=(14336, 4096),
        workers=2,
        dynamic_seconds_per_layer={"obs2_router_norms": 60.0},
        dynamic_excess_bytes={"obs2_router_norms": 1e9},
    )
    rows = {r["notebook"]: r for r in project(PAPER_MODEL_SHAPES["Mixtral 8x7B"], m)}
    shape = PAPER_MODEL_SHAPES["Mixtral 8x7B"]
    assert rows["obs1 (no reordering)"]["cpu_hours"] == pytest.approx(shape.expert_layer_bytes() * 32e-9 / 3600)
    assert rows["obs1 reordering (8 layers)"]["cpu_hours"] == pytest.approx(100.0 * 108 * 8 / 3600)
    assert rows["obs2_router_norms"]["cpu_hours"] == pytest.approx(60.0 * 32 / 3600)
    assert rows["obs3_depth_diversity"]["cpu_hours"] is None
    assert rows["obs3_depth_diversity"]["gpu_memory_gb"] > shape.weight_bytes() / 1e9
