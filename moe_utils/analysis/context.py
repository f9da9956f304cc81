"""What every observation notebook does first: load the model (and its dense "F" baseline), read
the inputs, trace them, and know where to write results.

Keeping this here keeps the notebooks thin and makes the checks (MoE model required, the F model
must share the tokenizer) the same on every page.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
import transformers

from ..errors import NotMoEModelError
from ..inputs import Inputs, fit_context, load_inputs
from ..arch import spec_for_config
from ..arch.config import read_config_json
from ..checkpoint import checkpoint_fingerprint, find_weight_files
from ..loading import LoadedModel, load_model, resolve_model
from ..results import write_result
from ..trace import Trace, trace, trace_dense


@dataclass
class Study:
    """One model under study, its optional dense baseline, and where its results go."""

    lm: LoadedModel
    dense: LoadedModel | None
    results_dir: Path
    layers: list[int] | None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.lm.name

    @property
    def num_experts(self) -> int:
        return int(self.lm.spec.num_experts(self.lm.config_dict))

    @property
    def top_k(self) -> int:
        return int(self.lm.spec.top_k(self.lm.config_dict))

    @property
    def weights_source(self) -> LoadedModel:
        """Where weight-only analyses read from: the loaded model, or (``weights_only``) its
        checkpoint, streamed one layer at a time."""
        return self.lm

    @property
    def dense_weights_source(self) -> LoadedModel | None:
        return self.dense

    def describe(self) -> pd.DataFrame:
        """A one-row-per-fact description of the model, for the top of each page."""
        rows = [("model", self.lm.name), ("family (spec)", self.lm.spec.name),
                ("MoE layers", f"{len(self.lm.moe_layers)} ({self.lm.moe_layers[0]}..{self.lm.moe_layers[-1]})"),
                ("layers analysed", "all" if self.layers is None else str(self.layers)),
                ("dense baseline (F)", self.dense.name if self.dense is not None else "none")]
        rows += [("experts per MoE layer", self.num_experts), ("experts chosen per token (top-k)", self.top_k),
                 ("hidden size", self.lm.spec.hidden_size(self.lm.config_dict)),
                 ("activation", self.lm.spec.activation_name(self.lm.config_dict))]
        spec = self.lm.spec
        rows.append(("family spec", "derived from the model transformers builds (see the coverage "
                                    "page)" if spec.derived else "hand-written"))
        rows += [(f"how to read ({i})", quirk) for i, quirk in enumerate(spec.quirks, 1)]
        rows.append(("fingerprint", self.lm.fingerprint))
        return pd.DataFrame(rows, columns=["", "value"]).set_index("")

    def inputs(self, spec: str, max_tokens: int | None = None) -> Inputs:
        """Tokenised inputs for a preset name, a text file or a dataset spec."""
        loaded = load_inputs(spec, self.lm.tokenizer, max_tokens=max_tokens)
        limit = self.lm.spec.max_positions(self.lm.config_dict)
        if limit is not None:
            loaded = fit_context(loaded, int(limit), self.lm.tokenizer.bos_token_id)
            if loaded.note:
                warnings.warn(loaded.note, stacklevel=2)
        return loaded

    def trace(self, inputs: Inputs) -> Trace:
        """One ordinary forward pass per sequence, capturing every analysed MoE layer."""
        return trace(self.lm, inputs.sequences, layers=self.layers)

    def dense_trace(self, inputs: Inputs) -> Trace | None:
        """The F model's own forward pass on the same tokens (None without a usable baseline)."""
        if self.dense is None:
            return None
        layers = [l for l in (self.layers or self.lm.moe_layers) if l < self.dense.config.num_hidden_layers]
        return trace_dense(self.dense, inputs.sequences, layers=layers)

    def save(self, analysis: str, tables: Mapping[str, pd.DataFrame], summary: Mapping[str, Any],
             params: Mapping[str, Any] | None = None) -> Path:
        """Write this analysis's results file atomically and return its path."""
        return write_result(self.results_dir, analysis, self.lm.name, self.lm.fingerprint,
                            {**self.params, **(params or {})}, dict(tables), dict(summary))


def checkpoint_only(model: str, revision: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Describe a checkpoint without building the model (``model`` attribute None), for analyses
    that stream weights one layer at a time. ``random:`` ids have no checkpoint, so they are built."""
    ref = resolve_model(model, revision)
    if ref.path is None:
        return load_model(model)
    cfg = read_config_json(ref.path)
    spec = spec_for_config(cfg)
    files = find_weight_files(ref.path, allow_pickle=allow_pickle)
    return LoadedModel(model=None, tokenizer=None, spec=spec, config=cfg, name=ref.name, path=ref.path,
                       fingerprint=checkpoint_fingerprint(cfg, files), moe_layers=spec.moe_layers(cfg),
                       is_moe=spec.is_moe)


def _same_tokenizer(a: LoadedModel, b: LoadedModel) -> bool:
    probe = "As an open source alternative to\n    def forward(self, x):  # 1234"
    return a.tokenizer(probe)["input_ids"] == b.tokenizer(probe)["input_ids"]


def open_study(model: str, dense_baseline: str | None = None, layers: Sequence[int] | None = None,
               dtype: str = "float32", device_map: Any = None, trust_remote_code: bool = False,
               results_dir: str | Path | None = None, seed: int = 0, weights_only: bool = False,
               **params: Any) -> Study:
    """Load the model under study (it must be an MoE) and, if given, its dense baseline.

    ``weights_only`` skips building the models: weight analyses then stream the safetensors one
    layer at a time, so even Mixtral 8x7B fits a machine with a few GB of memory. The baseline is
    dropped with a warning when its tokenizer splits text differently, because F outputs are
    compared token by token (the paper checks the same for Mistral and Mixtral).
    """
    torch.manual_seed(seed)
    transformers.logging.disable_progress_bar()

    def load(name: str) -> LoadedModel:
        if weights_only:
            return checkpoint_only(name)
        return load_model(name, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)

    lm = load(model)
    if not lm.is_moe:
        raise NotMoEModelError(f"{model!r} is a dense model; the observation notebooks need a Mixture-of-Experts "
                               f"model. Pass a dense model as dense_baseline instead.")
    dense = None
    if dense_baseline:
        dense = load(dense_baseline)
        if dense.is_moe:
            raise NotMoEModelError(f"dense_baseline {dense_baseline!r} is itself an MoE model; pass a dense model "
                                   f"(for Mixtral 8x7B that is Mistral 7B) or None.")
        if not weights_only and not _same_tokenizer(lm, dense):
            warnings.warn(f"{dense_baseline!r} tokenizes text differently from {model!r}; the F baseline is "
                          f"left out of this page.", stacklevel=2)
            dense = None
    if results_dir is None:
        from ..runner import model_slug
        results_dir = Path("results") / model_slug(model)
    chosen = None if layers is None else [int(l) for l in layers]
    if chosen is not None:
        bad = [l for l in chosen if l not in lm.moe_layers]
        if bad:
            from ..errors import LayerIndexError
            raise LayerIndexError(f"layers {bad} are not MoE layers of {model!r}; its MoE layers are {lm.moe_layers}.")
    run_params = {"model": model, "dense_baseline": dense_baseline, "layers": chosen, "dtype": dtype,
                  "seed": seed, **params}
    return Study(lm, dense, Path(results_dir), chosen, run_params)
