"""Model organisms: tiny dense / upcycled MoE / from-scratch MoE trained on CPython's own text.

They ship as package data (Hugging Face folders) so the book runs anywhere without a download.
"""

from __future__ import annotations

from moe_utils.core.paths import ZOO_MODELS, zoo_dir, zoo_path

DEFAULT_MOE_MODELS: tuple[str, ...] = ("tiny-moe-upcycled", "tiny-moe-scratch", "tiny-moe-fine")
DEFAULT_DENSE_BASELINE = "tiny-dense"
PAPER_COUNTERPART = {
    "tiny-dense": "Mistral 7B (dense)",
    "tiny-moe-upcycled": "Mixtral 8x7B (believed upcycled from Mistral 7B)",
    "tiny-moe-scratch": "Grok-1 (trained from scratch, experts as wide as the dense FFN)",
    "tiny-moe-fine": "DeepSeekMoE 16B (fine-grained experts, shared experts, dense first layer)",
}


__all__ = ["DEFAULT_DENSE_BASELINE", "DEFAULT_MOE_MODELS", "PAPER_COUNTERPART", "ZOO_MODELS", "zoo_dir", "zoo_path"]
