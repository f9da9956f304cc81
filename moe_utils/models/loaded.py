"""A model ready for the analyses: the built module (or none), its tokenizer, spec, config and facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moe_utils.arch import FamilySpec
from moe_utils.arch.facts import ModelFacts, facts_for
from moe_utils.core.errors import UsageError
from moe_utils.models.spec_match import check_spec_matches


@dataclass
class LoadedModel:
    """A model ready for tracing, with everything the analyses need to know about it.

    ``model`` is None for a checkpoint described without building it (weight analyses then
    stream ``path``). ``facts`` is resolved once, from ``spec`` and ``config``, when the
    LoadedModel is made; a checkpoint described without building it (``model`` None, ``path`` set)
    is refused then if ``spec`` does not describe that folder's tensors (:func:`~moe_utils.models.spec_match.check_spec_matches`).
    """

    model: nn.Module | None
    tokenizer: Any
    spec: FamilySpec
    config: Any
    name: str
    path: Path | None
    fingerprint: str
    source: dict[str, Any] = field(default_factory=dict)
    facts: ModelFacts = field(init=False)

    def __post_init__(self) -> None:
        self.facts = facts_for(self.spec, self.config)
        if self.model is None and self.path is not None:  # the spec is applied to the files
            check_spec_matches(self.spec, self.facts, self.path, self.name)

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers (``facts.moe_layers`` as a list)."""
        return list(self.facts.moe_layers)

    @property
    def is_moe(self) -> bool:
        return self.facts.is_moe

    def built(self) -> nn.Module:
        """The built model; a model opened weights-only (``model`` None) cannot run."""
        if self.model is None:
            raise UsageError(
                f"{self.name} was opened without building the model (weights only), so "
                "it cannot run a forward pass; load it with load_model() instead"
            )
        return self.model
