"""Activation registry: names resolve to the functions transformers uses."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from moe_utils.arch import activation


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"])
def test_plain_activations_match_transformers(name):
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(activation(name)(x), ACT2FN[name](x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(activation(name).glu(x, 2 * x), ACT2FN[name](x) * 2 * x)


def test_gpt_oss_swiglu_matches_model_code():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(GptOssConfig(hidden_size=8, intermediate_size=4, num_local_experts=2))
    gate_up = torch.linspace(-12, 12, 40).reshape(5, 8)  # interleaved gate/up columns
    act = activation(f"gpt_oss_swiglu(alpha={experts.alpha},limit={experts.limit})")
    torch.testing.assert_close(act.glu(gate_up[:, 0::2], gate_up[:, 1::2]), experts._apply_gate(gate_up))


def test_unknown_activation():
    with pytest.raises(ValueError, match="activations.py"):
        activation("swoosh")
