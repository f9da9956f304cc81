"""Tiny random models of any registered family, plus a byte-level tokenizer; nothing downloaded.

``random:FAMILY`` ids resolve here: the family spec's ``tiny_config`` is instantiated with its
transformers config class and the model is initialised from a fixed seed, so the same id always
gives the same weights. Used by tests and for trying notebooks without a real checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moe_utils.arch import FamilySpec
from moe_utils.core.errors import DerivationError, RemoteCodeRequiredError, UnknownFamilyError
from moe_utils.models.weights import tensor_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BYTE_SPECIALS = ("<s>", "</s>", "<pad>")


def byte_tokenizer():
    """A 259-token byte-level tokenizer (``<s>``=0 BOS, ``</s>``=1, ``<pad>``=2, then 256 bytes).

    Built in memory with the ``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast``;
    any text round-trips exactly, and encoding adds ``<s>`` at the start.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    vocab.update({ch: len(BYTE_SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def config_class_for(model_type: str):
    """The transformers config class registered for ``model_type``."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        raise UnknownFamilyError(
            f"model_type {model_type!r} is not part of the installed transformers, so no spec can be derived for it"
        ) from None


def decoder_classes(config) -> list[type[PreTrainedModel]]:
    """The model classes of ``config``'s own modeling module, causal LM first, for a config the auto
    classes do not map (the text part of a multimodal model, e.g. ``DeepseekOcr2TextConfig``)."""
    try:
        module = importlib.import_module(type(config).__module__.replace("configuration_", "modeling_"))
    except ImportError:
        return []
    base = type(config).__name__[: -len("Config")]
    return [getattr(module, base + suffix) for suffix in ("ForCausalLM", "Model") if hasattr(module, base + suffix)]


def build_model(config, seed: int = 0) -> nn.Module:
    """A randomly initialised model for ``config`` (causal LM, else the bare decoder), eval, fp32."""
    from transformers import AutoModel, AutoModelForCausalLM

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for auto in (AutoModelForCausalLM, AutoModel):
            try:
                return _fill_zero_moe_weights(auto.from_config(config).float().eval(), seed)
            except ValueError:
                continue
        for cls in decoder_classes(config):
            return _fill_zero_moe_weights(cls(config).float().eval(), seed)
    finally:
        torch.random.set_rng_state(state)
    raise DerivationError(f"transformers has no model class for {type(config).__name__}")


def _fill_zero_moe_weights(model: nn.Module, seed: int) -> nn.Module:
    """Some families initialise router or expert weights to zero (e.g. AFMoE's router); a random
    model with equal router logits everywhere cannot tell routing functions apart, so such
    weight matrices get small random values (seeded)."""
    g = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type == "meta" or param.dim() < 2:
                continue
            if any(part in name for part in ("experts", "router", ".gate.")) and not bool(param.any()):
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)
    return model


def random_config(spec: FamilySpec, **overrides: Any):
    """The transformers config of a tiny ``spec`` model (``overrides`` replace tiny_config keys)."""
    if spec.config_class is None or not spec.tiny_config:
        raise RemoteCodeRequiredError(
            f"{spec.name} models need their publisher's code, which is not part of transformers, "
            "so no random test model can be built; use a local checkpoint folder (weight analyses "
            "stream it without code) and pass trust_remote_code=True for forward passes."
        )
    import transformers

    cls = getattr(transformers, spec.config_class, None)
    if cls is None:
        cls = config_class_for(spec.model_types[0])
    return cls(**{**dict(spec.tiny_config), **overrides})


def random_model(spec: FamilySpec, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny randomly initialised model of the family of ``spec`` (eval mode) and its config.

    Correction-bias buffers (zeros at init) get small random values so the "bias picks, unbiased
    score weighs" path of DeepSeek-V3-style routers is exercised.
    """
    config = random_config(spec, **overrides)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(config, seed=seed)
        bias_rel = spec.memory.moe.correction_bias if spec.memory.moe else None
        if bias_rel:
            tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
            tensors.update(dict(model.named_buffers()))
            for layer in spec.moe_layers(config):
                name = tensor_name(spec.memory, layer, bias_rel)
                if name not in tensors:  # a config override removed this layer's bias (or its MoE block)
                    continue
                buf = tensors[name].data
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed + layer)) * 0.05)
    finally:
        torch.random.set_rng_state(generator_state)
    model = model.to(dtype).eval()
    return model, config


def random_fingerprint(family: str, config, seed: int) -> str:
    """Stable hash of a random model's family, config and seed."""
    payload = json.dumps({"family": family, "seed": seed, "config": config.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
