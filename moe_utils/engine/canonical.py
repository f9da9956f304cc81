"""The canonical form of a layer's weights, which every family's tensors are brought into.

An MoE block is ``w_act/w_up [E,I,H]``, ``w_down [E,H,I]`` and a router ``[E,H]`` whatever the
family stores; :mod:`moe_utils.models.weights` reads them from a model or a checkpoint, and the
expert math and the trace compute with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class DenseMLPWeights:
    """A gated MLP: ``w_down · glu(w_act x, w_up x)``; w_act [I,H] (None if gate-less)."""

    layer: int
    w_act: Tensor | None
    w_up: Tensor
    w_down: Tensor
    activation: str

    @property
    def hidden_size(self) -> int:
        return self.w_up.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.w_up.shape[0]


@dataclass
class MoELayerWeights:
    """All weights of one MoE block in canonical orientation (``w_act/w_up [E,I,H]``, ``w_down [E,H,I]``, router ``[E,H]``)."""

    layer: int
    router: Tensor
    w_act: Tensor | None
    w_up: Tensor
    w_down: Tensor
    activation: str
    router_bias: Tensor | None = None
    score_correction_bias: Tensor | None = None
    b_act: Tensor | None = None
    b_up: Tensor | None = None
    b_down: Tensor | None = None
    shared: DenseMLPWeights | None = None
    shared_gate: Tensor | None = None
    expert_ids: list[int] | None = None  # original indices when invalid experts were excluded

    @property
    def num_experts(self) -> int:
        return self.w_up.shape[0]

    @property
    def ids(self) -> list[int]:
        """The original index of each expert held (0..E-1 unless some were excluded)."""
        return list(range(self.num_experts)) if self.expert_ids is None else list(self.expert_ids)

    @property
    def hidden_size(self) -> int:
        return self.w_up.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w_up.shape[1]

    @property
    def device(self) -> torch.device:
        return self.w_up.device

    def matrices(self) -> dict[str, Tensor]:
        """The three expert matrices by their paper names (``act``/``up``/``down``)."""
        out = {"up": self.w_up, "down": self.w_down}
        if self.w_act is not None:
            out = {"act": self.w_act, **out}
        return out
