"""Tiny model builders shared by the engine tests (random native models, synthetic checkpoints
with the paper models' real tensor names, and a remote-code-style DeepSeekMoE module).

Everything is built offline from config classes or hand-written tensors, small enough that the
whole engine suite runs in a few minutes on two CPU cores.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from moe_utils.arch import SPECS
from moe_utils.models.loading import LoadedModel, load_model

NATIVE_MOE = [name for name, s in SPECS.items() if s.is_moe and s.native and s.tiny_config]


@functools.cache
def tiny(family: str, dtype: str = "float32", seed: int = 0) -> LoadedModel:
    """``random:FAMILY`` loaded once per test session (treat as read-only)."""
    return load_model(f"random:{family}", dtype=dtype, seed=seed)


def sequences(seed: int = 0, lengths=(9, 5)) -> list[list[int]]:
    """Token-id sequences of different lengths inside the byte tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(3, 259, (n - 1,), generator=g).tolist() for n in lengths]


def save(lm: LoadedModel, folder: Path, **kwargs) -> Path:
    """save_pretrained (default: original per-expert naming) plus the tokenizer."""
    lm.model.save_pretrained(folder, **kwargs)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(folder)
    return folder


# ---- synthetic checkpoints -------------------------------------------------------------------
def write_checkpoint(folder: Path, shards: dict[str, dict[str, torch.Tensor]], config: dict) -> Path:
    """Write ``config.json`` plus safetensors shards; an index is written when there are several."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for fname, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / fname))
    if len(shards) > 1:
        weight_map = {name: fname for fname, tensors in shards.items() for name in tensors}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
        )
    return folder


def _rand(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * 0.1).to(dtype)


def synthetic_mixtral(
    folder: Path, E: int = 4, H: int = 16, I: int = 24, layers: int = 2, dtype=torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Mixtral in original hub naming over two shards: w1/w2 in shard 1, every w3 in shard 2, old
    ``num_experts``/``num_experts_per_token`` config keys (as in the paper's code)."""
    g = torch.Generator().manual_seed(1)
    one, two = {}, {}
    for n in range(layers):
        p = f"model.layers.{n}.block_sparse_moe."
        one[p + "gate.weight"] = _rand(g, E, H, dtype=dtype)
        for e in range(E):
            one[p + f"experts.{e}.w1.weight"] = _rand(g, I, H, dtype=dtype)
            one[p + f"experts.{e}.w2.weight"] = _rand(g, H, I, dtype=dtype)
            two[p + f"experts.{e}.w3.weight"] = _rand(g, I, H, dtype=dtype)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": layers,
        "num_experts": E,
        "num_experts_per_token": 2,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 64,
        "vocab_size": 32,
    }
    write_checkpoint(folder, {"model-00001-of-00002.safetensors": one, "model-00002-of-00002.safetensors": two}, config)
    return {**one, **two}


def synthetic_deepseekmoe(
    folder: Path, E: int = 6, H: int = 16, I: int = 8, dense_I: int = 40, layers: int = 3, n_shared: int = 2
) -> dict[str, torch.Tensor]:
    """DeepSeekMoE 16B naming: dense layer 0, routed experts + a shared MLP of width n_shared*I."""
    g = torch.Generator().manual_seed(2)
    t = {}
    t["model.layers.0.mlp.gate_proj.weight"] = _rand(g, dense_I, H)
    t["model.layers.0.mlp.up_proj.weight"] = _rand(g, dense_I, H)
    t["model.layers.0.mlp.down_proj.weight"] = _rand(g, H, dense_I)
    for n in range(1, layers):
        p = f"model.layers.{n}.mlp."
        t[p + "gate.weight"] = _rand(g, E, H)
        for e in range(E):
            t[p + f"experts.{e}.gate_proj.weight"] = _rand(g, I, H)
            t[p + f"experts.{e}.up_proj.weight"] = _rand(g, I, H)
            t[p + f"experts.{e}.down_proj.weight"] = _rand(g, H, I)
        t[p + "shared_experts.gate_proj.weight"] = _rand(g, n_shared * I, H)
        t[p + "shared_experts.up_proj.weight"] = _rand(g, n_shared * I, H)
        t[p + "shared_experts.down_proj.weight"] = _rand(g, H, n_shared * I)
    config = deepseekmoe_config(E=E, H=H, I=I, dense_I=dense_I, layers=layers, n_shared=n_shared)
    write_checkpoint(folder, {"model.safetensors": t}, config)
    return t


def deepseekmoe_config(
    E: int = 6, H: int = 16, I: int = 8, dense_I: int = 40, layers: int = 3, n_shared: int = 2, top_k: int = 3
) -> dict:
    """config.json keys of DeepSeekMoE 16B (remote code) at a small size."""
    return {
        "architectures": ["DeepseekForCausalLM"],
        "model_type": "deepseek",
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekConfig",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
        },
        "hidden_size": H,
        "intermediate_size": dense_I,
        "moe_intermediate_size": I,
        "num_hidden_layers": layers,
        "n_routed_experts": E,
        "n_shared_experts": n_shared,
        "num_experts_per_tok": top_k,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "vocab_size": 64,
    }


def synthetic_grok(folder: Path, E: int = 4, H: int = 16, I: int = 24, layers: int = 2) -> dict[str, torch.Tensor]:
    """Grok-1 (hpcai-tech port) naming; its config has no model_type."""
    g = torch.Generator().manual_seed(3)
    t = {}
    for n in range(layers):
        p = f"model.layers.{n}.moe_block."
        t[p + "gate.weight"] = _rand(g, E, H, dtype=torch.bfloat16)
        for e in range(E):
            t[p + f"experts.{e}.linear.weight"] = _rand(g, I, H, dtype=torch.bfloat16)
            t[p + f"experts.{e}.linear_v.weight"] = _rand(g, I, H, dtype=torch.bfloat16)
            t[p + f"experts.{e}.linear_1.weight"] = _rand(g, H, I, dtype=torch.bfloat16)
    config = {
        "architectures": ["Grok1ModelForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_grok1.Grok1Config"},
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": layers,
        "num_experts": E,
        "num_experts_per_tok": 2,
        "attn_output_multiplier": 0.088,
        "embedding_multiplier_scale": 78.4,
        "max_position_embeddings": 64,
    }
    write_checkpoint(folder, {"model.safetensors": t}, config)
    return t


def synthetic_mistral(folder: Path, H: int = 16, I: int = 40, layers: int = 2) -> dict[str, torch.Tensor]:
    """Dense Mistral MLP tensors (the paper's dense baseline F)."""
    g = torch.Generator().manual_seed(4)
    t = {}
    for n in range(layers):
        p = f"model.layers.{n}.mlp."
        t[p + "gate_proj.weight"] = _rand(g, I, H)
        t[p + "up_proj.weight"] = _rand(g, I, H)
        t[p + "down_proj.weight"] = _rand(g, H, I)
    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": layers,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "vocab_size": 32,
    }
    write_checkpoint(folder, {"model.safetensors": t}, config)
    return t


# ---- a remote-code-style DeepSeekMoE model (per-expert ModuleList) ---------------------------
class _MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Gate(nn.Module):
    """Returns ``(top_k_index, top_k_weight, aux_loss)`` like the publisher's MoEGate."""

    def __init__(self, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(experts, hidden) * 0.3)

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores = F.linear(flat, self.weight).softmax(dim=-1)
        weight, index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return index, weight, None


class _MoE(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        H, I = cfg["hidden_size"], cfg["moe_intermediate_size"]
        self.gate = _Gate(H, cfg["n_routed_experts"], cfg["num_experts_per_tok"])
        self.experts = nn.ModuleList(_MLP(H, I) for _ in range(cfg["n_routed_experts"]))
        self.shared_experts = _MLP(H, I * cfg["n_shared_experts"])

    def forward(self, hidden_states):
        index, weight, _ = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = torch.zeros_like(flat)
        for slot in range(index.shape[1]):
            for e, expert in enumerate(self.experts):
                rows = (index[:, slot] == e).nonzero().flatten()
                if rows.numel():
                    out[rows] += weight[rows, slot, None] * expert(flat[rows])
        return out.view_as(hidden_states) + self.shared_experts(hidden_states)


class _Layer(nn.Module):
    def __init__(self, cfg: dict, moe: bool):
        super().__init__()
        self.norm = nn.LayerNorm(cfg["hidden_size"])
        self.mix = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])
        self.mlp = _MoE(cfg) if moe else _MLP(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, h):
        # causal running mean as a stand-in for attention, so positions interact
        counts = torch.arange(1, h.shape[1] + 1, device=h.device).view(1, -1, 1)
        h = h + self.mix(h.cumsum(dim=1) / counts)
        return h + self.mlp(self.norm(h))


class _Body(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(
            _Layer(cfg, i >= cfg["first_k_dense_replace"]) for i in range(cfg["num_hidden_layers"])
        )


class RemoteStyleDeepseekMoE(nn.Module):
    """Per-expert ModuleList MoE with DeepSeekMoE's module names (``model.layers.N.mlp``...)."""

    def __init__(self, cfg: dict, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = dict(cfg)
        self.model = _Body(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, **kwargs):
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(h)


def remote_style_loaded(seed: int = 0) -> LoadedModel:
    """The remote-style DeepSeekMoE model wrapped as a LoadedModel (no tokenizer)."""
    from moe_utils.arch import get_spec

    cfg = deepseekmoe_config(E=6, H=16, I=8, dense_I=24, layers=3, n_shared=2, top_k=3)
    model = RemoteStyleDeepseekMoE(cfg, seed=seed).eval()
    spec = get_spec("deepseek")
    return LoadedModel(
        model=model,
        tokenizer=None,
        spec=spec,
        config=cfg,
        name="remote-style-deepseek",
        path=None,
        fingerprint="remote-style",
    )
