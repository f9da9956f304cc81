"""What every observation notebook does first: load the model (and its dense "F" baseline), read
the inputs, trace them, and know where to write results.

Keeping this here keeps the notebooks thin and makes the checks (MoE model required, the F model
must share the tokenizer) the same on every page.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import transformers

from ..analysis.results import write_result
from ..arch.config import read_config_json
from ..arch.facts import check_layers
from ..core.errors import CheckpointError, NotMoEModelError
from ..core.finite import ScreenedSource
from ..core.names import model_slug
from ..engine.inputs import Inputs, check_inputs_spec, fit_context, inputs_label, load_inputs
from ..models.checkpoint import find_weight_files, verify_safetensors
from ..models.fingerprint import checkpoint_fingerprint
from ..models.loading import LoadedModel, load_model, resolve_model
from ..models.specs import spec_for_config
from ..models.stream import stream_choice, streamable
from ..models.trace import Trace, trace, trace_dense


@dataclass
class Study:
    """One model under study, its optional dense baseline, and where its results go."""

    lm: LoadedModel
    dense: LoadedModel | None
    results_dir: Path
    layers: list[int] | None
    params: dict[str, Any] = field(default_factory=dict)
    dense_note: str = ""  # why the dense baseline was left out, when it was
    allow_invalid: bool = False
    excluded: list[dict[str, Any]] = field(default_factory=list)
    stream_device: str | None = None  # set: forward passes read one decoder layer at a time, on this device

    @property
    def name(self) -> str:
        return self.lm.name

    @property
    def num_experts(self) -> int:
        return self.lm.facts.num_experts

    @property
    def top_k(self) -> int:
        return self.lm.facts.top_k

    @property
    def weights_source(self) -> LoadedModel | ScreenedSource:
        """Where weight-only analyses read from: the loaded model, or (``weights_only``) its
        checkpoint, streamed one layer at a time. With ``allow_invalid`` experts with non-finite
        weights are excluded (and listed in ``excluded``) instead of stopping the run."""
        return ScreenedSource(self.lm, self.excluded) if self.allow_invalid else self.lm

    @property
    def dense_weights_source(self) -> LoadedModel | ScreenedSource | None:
        """The dense baseline's weights, screened like :attr:`weights_source` (None without one)."""
        if self.dense is None or not self.allow_invalid:
            return self.dense
        return ScreenedSource(self.dense, self.excluded)

    def validity_note(self) -> str:
        """Markdown for the page: empty for a valid run, else which tensors were excluded."""
        if not self.excluded:
            return ""
        items = "; ".join(
            f"layer {r['layer']}, {'expert ' + str(r['expert']) if isinstance(r['expert'], int) else r['expert'] or 'dense MLP'}: "
            f"{r['tensor']} ({r['n_nan']} NaN, {r['n_inf']} inf)"
            for r in self.excluded
        )
        return (
            f"**INVALID: this model's weights hold NaN or infinite values**, so the numbers on this page leave "
            f"those experts out and do not describe the model as a whole (this run set allow_invalid = True). "
            f"Excluded: {items}."
        )

    def describe(self) -> pd.DataFrame:
        """A one-row-per-fact description of the model, for the top of each page."""
        facts = self.lm.facts
        rows = [
            ("model", self.lm.name),
            ("family (spec)", facts.family),
            ("MoE layers", f"{len(facts.moe_layers)} ({facts.moe_layers[0]}..{facts.moe_layers[-1]})"),
            ("layers analysed", "all" if self.layers is None else str(self.layers)),
            (
                "dense baseline (F)",
                self.dense.name
                if self.dense is not None
                else (f"left out: {self.dense_note}" if self.dense_note else "none"),
            ),
        ]
        rows += [
            ("experts per MoE layer", facts.num_experts),
            ("experts chosen per token (top-k)", facts.top_k),
            ("hidden size", facts.hidden_size),
            ("activation", facts.activation),
        ]
        rows.append(
            (
                "family spec",
                "derived from the model transformers builds (see the coverage page)"
                if facts.derived
                else "hand-written",
            )
        )
        rows += [(f"how to read ({i})", quirk) for i, quirk in enumerate(self.lm.spec.quirks, 1)]
        rows.append(("fingerprint", self.lm.fingerprint))
        if self.lm.source.get("revision"):
            rows.append(("hub revision", self.lm.source["revision"]))
        return pd.DataFrame(rows, columns=["", "value"]).set_index("")

    def inputs(self, spec: str, max_tokens: int | None = None) -> Inputs:
        """Tokenised inputs for a preset name, a text file or a dataset spec."""
        loaded = load_inputs(spec, self.lm.tokenizer, max_tokens=max_tokens)
        limit = self.lm.facts.max_positions
        if limit is not None:
            loaded = fit_context(loaded, limit, self.lm.tokenizer.bos_token_id)
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
        layers = [l for l in (self.layers or self.lm.moe_layers) if l < self.dense.facts.num_layers]
        return trace_dense(self.dense, inputs.sequences, layers=layers)

    def save(
        self,
        analysis: str,
        tables: Mapping[str, pd.DataFrame],
        summary: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write this analysis's results file atomically and return its path."""
        return write_result(
            self.results_dir,
            analysis,
            self.lm.name,
            self.lm.fingerprint,
            {**self.params, **(params or {})},
            dict(tables),
            dict(summary),
            source=self.lm.source,
            invalid=self.excluded,
        )


def checkpoint_only(model: str, revision: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Describe a checkpoint without building the model (``model`` attribute None), for analyses
    that stream weights one layer at a time. ``random:`` ids have no checkpoint, so they are built."""
    ref = resolve_model(model, revision)
    if ref.path is None:
        return load_model(model)
    cfg = read_config_json(ref.path)
    spec = spec_for_config(cfg)
    files = find_weight_files(ref.path, allow_pickle=allow_pickle)
    verify_safetensors(files)
    return LoadedModel(
        model=None,
        tokenizer=None,
        spec=spec,
        config=cfg,
        name=ref.name,
        path=ref.path,
        fingerprint=checkpoint_fingerprint(cfg, files),
        source=ref.source(),
    )


def _baseline_mismatch(lm: LoadedModel, dense: LoadedModel, weights_only: bool) -> str:
    """Why ``dense`` cannot serve as the F baseline of ``lm`` (empty when it can)."""
    h_model = lm.facts.hidden_size
    h_dense = dense.facts.hidden_size
    if h_model != h_dense:
        return f"its hidden size is {h_dense}, the model's is {h_model}, so its FFN cannot be compared with the experts"
    if not weights_only:
        if dense.tokenizer is None:
            return "it has no tokenizer files, so its outputs cannot be matched token by token"
        if not _same_tokenizer(lm, dense):
            return "its tokenizer splits text differently, so its outputs cannot be matched token by token"
    return ""


def _same_tokenizer(a: LoadedModel, b: LoadedModel) -> bool:
    probe = "As an open source alternative to\n    def forward(self, x):  # 1234"
    return a.tokenizer(probe)["input_ids"] == b.tokenizer(probe)["input_ids"]


def open_study(
    model: str,
    dense_baseline: str | None = None,
    layers: Sequence[int] | None = None,
    dtype: str = "float32",
    device_map: Any = None,
    trust_remote_code: bool = False,
    results_dir: str | Path | None = None,
    seed: int = 0,
    weights_only: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
    allow_invalid: bool = False,
    stream: bool | None = None,
    device: str = "cpu",
    **params: Any,
) -> Study:
    """Load the model under study (it must be an MoE) and, if given, its dense baseline.

    ``weights_only`` skips building the models: weight analyses then stream the safetensors one
    layer at a time, so even Mixtral 8x7B fits a machine with a few GB of memory. The baseline is
    dropped with a warning when its tokenizer splits text differently, because F outputs are
    compared token by token (the paper checks the same for Mistral and Mixtral), or when its
    hidden size differs; the page then says so in its description table. ``revision`` (a hub
    branch, tag or commit) applies to ``model``; ``allow_pickle`` lets ``.bin``/``.pt`` weights
    load with torch's ``weights_only``. ``layers`` and an ``inputs`` file are checked before any
    model is loaded.

    Non-finite weights or activations stop the run (:class:`~moe_utils.core.errors.NonFiniteError`).
    ``allow_invalid`` lets weight-only analyses (``study.weights_source``) exclude the offending
    experts instead; the results file then lists them under ``invalid`` and
    ``study.validity_note()`` says so on the page. Forward passes always stop.
    """
    chosen = check_layers(layers)
    if isinstance(params.get("inputs"), str):
        check_inputs_spec(params["inputs"])
    torch.manual_seed(seed)
    transformers.logging.disable_progress_bar()

    streamed = False if weights_only else stream_choice(model, stream, dtype, revision, allow_pickle)

    def load(name: str, rev: str | None = None) -> LoadedModel:
        if weights_only:
            return checkpoint_only(name, rev, allow_pickle=allow_pickle)
        if streamed and name == model:
            return streamable(name, rev, allow_pickle=allow_pickle)
        return load_model(
            name,
            dtype=dtype,
            device_map=device_map,
            revision=rev,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )

    lm = load(model, revision)
    if not weights_only and lm.tokenizer is None:
        raise CheckpointError(
            f"{lm.name} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
            "tokenizer.model or vocab.json) in its folder; copy the tokenizer of the model "
            "it was trained from into that folder"
        )
    if not lm.is_moe:
        raise NotMoEModelError(
            f"{model!r} is a dense model; the observation notebooks need a Mixture-of-Experts "
            f"model. Pass a dense model as dense_baseline instead."
        )
    dense = None
    dense_note = ""
    dense_name = None
    if dense_baseline:
        dense = load(dense_baseline)
        dense_name = dense.name
        if dense.is_moe:
            raise NotMoEModelError(
                f"dense_baseline {dense_baseline!r} is itself an MoE model; pass a dense model "
                f"(for Mixtral 8x7B that is Mistral 7B) or None."
            )
        why = _baseline_mismatch(lm, dense, weights_only)
        if why:
            dense_note = f"{dense.name}: {why}"
            warnings.warn(f"the dense baseline {dense.name} is left out of this page: {why}.", stacklevel=2)
            dense = None
    if results_dir is None:
        results_dir = Path("results") / model_slug(model)
    if chosen is not None:
        check_layers(chosen, lm.facts)
    if isinstance(params.get("inputs"), str):
        params = {**params, "inputs": inputs_label(params["inputs"])}
    run_params = {
        "model": lm.name,
        "dense_baseline": dense_name,
        "dense_used": dense is not None,
        "layers": chosen,
        "dtype": dtype,
        "seed": seed,
        "revision": lm.source.get("revision"),
        **params,
    }
    if allow_invalid:
        run_params["allow_invalid"] = True
    if streamed:
        run_params["stream"] = True
    return Study(
        lm,
        dense,
        Path(results_dir),
        chosen,
        run_params,
        dense_note=dense_note,
        allow_invalid=bool(allow_invalid),
        stream_device=str(device) if streamed else None,
    )
