"""Load a model by id: ``zoo:NAME``, ``random:FAMILY``, a local folder, or a hub id.

Nothing from a checkpoint folder is executed unless ``trust_remote_code=True`` is passed, and
pickle weights are refused unless ``allow_pickle=True``. Families whose code is not part of
transformers (DeepSeekMoE, Grok-1) still work for weight analyses, which stream safetensors
without building the model (:mod:`moe_utils.models.weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from moe_utils.arch import FamilySpec, require_moe
from moe_utils.arch.config import read_config_json
from moe_utils.core.errors import ArgumentError, RemoteCodeRequiredError, UsageError
from moe_utils.core.memory import shedding_file_pages
from moe_utils.models.checkpoint import find_weight_files, verify_safetensors
from moe_utils.models.consistency import check_config_against_tensors
from moe_utils.models.fingerprint import checkpoint_fingerprint
from moe_utils.models.ids import ModelRef, resolve_folder, resolve_model
from moe_utils.models.loaded import LoadedModel
from moe_utils.models.random_models import byte_tokenizer, random_fingerprint, random_model
from moe_utils.models.specs import get_spec, spec_for_config, spec_for_tiny_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ArgumentError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


# ---- loading ---------------------------------------------------------------------------------
def _needs_remote_code(cfg: dict, spec: FamilySpec) -> bool:
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    return (not spec.native) or "auto_map" in cfg or model_type not in CONFIG_MAPPING


def _canonical_config(path: Path, cfg: dict, spec: FamilySpec, trust_remote_code: bool):
    """AutoConfig of a folder, with aliased keys (e.g. ``num_experts_per_token``) made canonical."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if spec.is_moe and spec.native:
        for keys, value_of in ((spec.keys.num_experts, spec.num_experts), (spec.keys.top_k, spec.top_k)):
            canonical = next((k for k in keys if "." not in k and hasattr(config, k)), None)
            value = value_of(cfg)
            if canonical is not None and getattr(config, canonical, None) != value:
                setattr(config, canonical, value)
    return config


def load_tokenizer(path: str | Path | None, trust_remote_code: bool = False):
    """Tokenizer stored with a model folder, or None when the folder has none."""
    if path is None:
        return byte_tokenizer()
    path = Path(path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _set_experts_impl(model: nn.Module, impl: str | None) -> None:
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if impl and callable(can_set) and can_set():  # only transformers models have the class method
        cast("PreTrainedModel", model).set_experts_implementation(impl)


def load_model(
    model: str | Path,
    dtype: str | torch.dtype = "float32",
    device_map: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    *,
    seed: int = 0,
    require_moe_model: bool = False,
    experts_implementation: str | None = "grouped_mm",
    offload_folder: str | Path | None = None,
    config_overrides: dict | None = None,
) -> LoadedModel:
    """Load ``model`` (see module docstring for accepted ids) in eval mode.

    Dense models load too (``is_moe=False``) so they can serve as the dense baseline; pass
    ``require_moe_model=True`` to refuse them. ``experts_implementation`` is applied where the
    family supports it (``grouped_mm`` is fast on CPU; never use ``batched_mm`` there).
    ``device_map``/``offload_folder`` are passed to accelerate (a ``"disk"`` entry offloads
    those modules; weight analyses then read the offloaded tensors from the checkpoint).
    ``seed`` and ``config_overrides`` (e.g. ``{"num_hidden_layers": 8}``) apply to
    ``random:`` ids only.
    """
    torch_dtype = as_dtype(dtype)
    ref = resolve_model(model, revision, include_code=trust_remote_code)
    if ref.kind == "random":
        if ref.family is None:
            raise UsageError(f"{ref.name}: a random: model id names no family")
        spec = get_spec(ref.family)
        module, config = random_model(spec, seed=seed, dtype=torch_dtype, **(config_overrides or {}))
        if spec.derived and config_overrides:  # derived specs hold their config's layer pattern
            spec = spec_for_tiny_config(config)
        fingerprint = random_fingerprint(ref.family, config, seed)
        tokenizer = byte_tokenizer()
        if device_map is not None:
            module = _dispatch(module, device_map, offload_folder)
        path = None
    else:
        if config_overrides:
            raise ArgumentError(f"config_overrides only applies to random: ids; edit config.json of {ref.name} instead")
        path = ref.path
        if path is None:
            raise UsageError(f"{ref.name}: no model folder was resolved for this id")
        cfg = read_config_json(path)
        spec = spec_for_config(cfg)
        if _needs_remote_code(cfg, spec) and not trust_remote_code:
            raise RemoteCodeRequiredError(
                f"{ref.name} ({spec.name}) needs its publisher's Python code to run (its config "
                f"{'has an auto_map' if 'auto_map' in cfg else 'names a model type transformers does not know'}). "
                "Code from a checkpoint folder only runs if you opt in: pass "
                "trust_remote_code=True if you trust its source. Weight-only analyses work without "
                "it: moe_utils.models.weights.layer_weights(<folder>, layer) streams the safetensors."
            )
        files = find_weight_files(path, allow_pickle=allow_pickle)
        verify_safetensors(files)
        check_config_against_tensors(cfg, spec, files)
        config = _canonical_config(path, cfg, spec, trust_remote_code)
        from transformers import AutoModelForCausalLM

        # converted tensors (fused experts) would otherwise sit in memory twice: as the new
        # tensor and as touched pages of the file map
        with shedding_file_pages(files.files):
            module = AutoModelForCausalLM.from_pretrained(
                path,
                config=config,
                dtype=torch_dtype,
                device_map=device_map,
                trust_remote_code=trust_remote_code,
                use_safetensors=files.kind == "safetensors",
                **({"offload_folder": str(offload_folder)} if offload_folder else {}),
            )
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        fingerprint = checkpoint_fingerprint(cfg, files)
    _set_experts_impl(module, experts_implementation)
    module.eval()
    if require_moe_model:
        require_moe(spec, f"loading {ref.name}")
    return LoadedModel(
        model=module,
        tokenizer=tokenizer,
        spec=spec,
        config=module.config,
        name=ref.name,
        path=path,
        fingerprint=fingerprint,
        source=ref.source(),
    )


def _dispatch(module: nn.Module, device_map: Any, offload_folder: str | Path | None) -> nn.Module:
    """Place an in-memory model with accelerate (``"cpu"``, ``"auto"`` or an explicit map)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = (
            {"": device_map} if device_map not in ("auto", "balanced", "sequential") else infer_auto_device_map(module)
        )
    return dispatch_model(
        module,
        device_map=device_map,
        main_device="cpu",  # pyright: ignore[reportArgumentType]  # annotated torch.device, documented (and defaulted inside) as str | int | device
        offload_dir=str(offload_folder) if offload_folder else None,
    )


__all__ = ["LoadedModel", "ModelRef", "as_dtype", "load_model", "load_tokenizer", "resolve_folder", "resolve_model"]
