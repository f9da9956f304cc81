"""Model cards, loss-curve pictures and evaluation summaries of the trained organisms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_utils.arch import spec_for_config
from moe_utils.arch.config import config_dict
from moe_utils.arch.facts import ModelFacts, facts_for
from moe_utils.zoo import PAPER_COUNTERPART
from moe_utils.zoo.evaluate import expert_load, model_nll, perplexity, targets_of, unigram_nll

STARTS_AFTER = {"tiny-moe-upcycled": "tiny-dense"}  # whose training tokens precede this model's
# How the shipped models were produced (two processes at once, one torch thread each).
SHIPPED_COMMANDS = {
    "tiny-dense": "python -m moe_utils.zoo.train --models tiny-dense tiny-moe-upcycled --out zoo-build --resume --threads 1",
    "tiny-moe-upcycled": "python -m moe_utils.zoo.train --models tiny-dense tiny-moe-upcycled --out zoo-build --resume --threads 1",
    "tiny-moe-scratch": "python -m moe_utils.zoo.train --models tiny-moe-scratch --out zoo-build --resume --threads 1",
}


def ffn_layout(facts: ModelFacts) -> list[dict]:
    """Per layer: routed experts (count, width), experts per token, shared width and dense width,
    from the model's facts (so every MoE spelling the family specs know is read the same way)."""
    moe = set(facts.moe_layers)
    dense_width = facts.dense_intermediate_size or 0
    out = []
    for layer in range(facts.num_layers):
        if layer in moe:
            out.append(
                {
                    "experts": facts.num_experts,
                    "width": facts.expert_intermediate_size or 0,
                    "top_k": facts.top_k,
                    "shared": facts.shared_expert_intermediate_size or 0,
                    "dense": 0,
                }
            )
        else:
            out.append({"experts": 0, "width": 0, "top_k": 0, "shared": 0, "dense": dense_width})
    return out


def parameter_counts(config: dict) -> dict:
    """Total and per-token active parameters from a config dict (tied embeddings counted once):
    the FFN layout from the model's facts, the attention from the config's own keys (the
    organisms' Mixtral, Qwen2-MoE and Qwen3-MoE spellings)."""
    facts = facts_for(spec_for_config(config), config)
    H, V = facts.hidden_size, config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or H // heads
    attn = H * heads * hd * 2 + H * kv * hd * 2
    if config.get("qkv_bias") or config.get("attention_bias"):
        attn += heads * hd + 2 * kv * hd
    if config.get("model_type") == "qwen3_moe":
        attn += 2 * hd  # q_norm and k_norm
    norms = 2 * H
    total = active = experts_total = 0
    for lay in ffn_layout(facts):
        fixed = attn + norms + 3 * H * (lay["dense"] + lay["shared"])
        if lay["experts"]:
            fixed += H * lay["experts"] + (H if lay["shared"] else 0)  # router, shared-expert gate
        routed = 3 * H * lay["width"]
        total += fixed + routed * lay["experts"]
        active += fixed + routed * lay["top_k"]
        experts_total += routed * lay["experts"]
    emb = V * H * (1 if config.get("tie_word_embeddings", False) else 2)
    total += H + emb
    active += H + emb
    return {
        "total": total,
        "active": active,
        "experts_total": experts_total,
        "embedding": emb,
        "non_embedding_total": total - emb,
        "non_embedding_active": active - emb,
    }


def loss_chart(log: list[dict], title: str, offset_tokens: int = 0):
    """Altair chart of training cross-entropy (and held-out points) against tokens seen."""
    import altair as alt
    import pandas as pd

    rows = []
    for r in log:
        rows.append({"tokens": r["tokens"] + offset_tokens, "loss": r["ce"], "curve": "training (batch)"})
        if "heldout_ce" in r:
            rows.append(
                {"tokens": r["tokens"] + offset_tokens, "loss": r["heldout_ce"], "curve": "held-out (24 windows)"}
            )
    df = pd.DataFrame(rows)
    return (
        alt.Chart(df, title=title)
        .mark_line(point=alt.OverlayMarkDef(size=12))
        .encode(
            x=alt.X("tokens:Q", title="training tokens"),
            y=alt.Y("loss:Q", title="cross-entropy (nats/token)", scale=alt.Scale(zero=False)),
            color=alt.Color("curve:N", title=None),
        )
        .properties(width=420, height=220)
    )


def save_png(chart, path: Path) -> None:
    """Render an Altair chart to a small PNG with vl-convert (no browser needed)."""
    import vl_convert as vlc

    Path(path).write_bytes(vlc.vegalite_to_png(chart.to_json(), scale=1.5))


def evaluate_folder(folder: Path, windows: list[list[int]], counts: np.ndarray) -> dict:
    """Held-out loss / perplexity (bf16 weights loaded in fp32), unigram baseline and expert load."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    nll = model_nll(model, windows)
    uni = unigram_nll(counts, targets_of(windows))
    res = {
        "heldout_tokens": int(sum(len(w) - 1 for w in windows)),
        "heldout_windows": len(windows),
        "heldout_loss": nll,
        "heldout_perplexity": perplexity(nll),
        "unigram_loss": uni,
        "unigram_perplexity": perplexity(uni),
    }
    if facts_for(spec_for_config(config_dict(model.config)), model.config).is_moe:
        load = expert_load(model, windows)
        res["expert_load"] = load.tolist()
        res["dead_experts"] = int((load == 0).sum())
    return res


def write_card(folder: Path, name: str, info: dict, ev: dict, corpus: dict, prev_info: dict | None) -> None:
    """Write README.md (the model card) for one organism."""
    cfg = json.loads((folder / "config.json").read_text())
    pc = parameter_counts(cfg)
    facts = facts_for(spec_for_config(cfg), cfg)
    spec = info["train_spec"]
    arch = cfg["architectures"][0]
    lines = [
        f"# {name}",
        "",
        f"A model organism of `moe_utils`: a tiny `{arch}` trained on CPU on text that ships with CPython. "
        f"In the book it stands in for **{PAPER_COUNTERPART[name]}**.",
        "",
        "## Architecture",
        "",
        f"- {facts.num_layers} layers, hidden size {facts.hidden_size}, "
        f"{cfg['num_attention_heads']} attention heads / {cfg['num_key_value_heads']} key-value heads, "
        f"RoPE, RMSNorm, SwiGLU FFN of width {cfg['intermediate_size']}, tied embeddings, "
        f"vocabulary {cfg['vocab_size']}, context {facts.max_positions} tokens.",
    ]
    renorm = facts.routing is not None and facts.routing.renormalize
    width = facts.expert_intermediate_size or 0
    if facts.is_moe and not facts.dense_layers and not facts.shared_expert_intermediate_size:
        lines.append(
            f"- Every layer is a Mixtral MoE block: {facts.num_experts} experts, top-"
            f"{facts.top_k} softmax routing (weights renormalised over the top-k), "
            f"expert width = dense FFN width {width} (as Mixtral 8x7B vs Mistral 7B)."
        )
    elif facts.is_moe:
        shared = facts.shared_expert_intermediate_size or 0
        lines.append(
            f"- Fine-grained MoE layers (Qwen2-MoE block): one shared expert of width "
            f"{shared} behind a sigmoid gate plus {facts.num_experts} routed "
            f"experts of width {width}, softmax top-{facts.top_k} "
            f"({'renormalised' if renorm else 'not renormalised'}); "
            f"{shared + facts.num_experts * width} FFN "
            f"neurons per MoE layer, as in tiny-moe-scratch. Dense layer(s) {list(facts.dense_layers)}: a SwiGLU FFN of width "
            f"{facts.dense_intermediate_size}, as wide as the active part of an MoE layer (as in DeepSeekMoE 16B)."
        )
    lines += [
        f"- Parameters: {pc['total']:,} total, {pc['active']:,} active per token "
        f"({pc['non_embedding_total']:,} / {pc['non_embedding_active']:,} without the {pc['embedding']:,} embedding parameters).",
        "- Weights are stored in bfloat16 (`model.safetensors`) to keep the package small; training ran in float32. "
        "Load with `dtype=torch.float32` for analysis.",
        "",
        "## Training",
        "",
    ]
    if name == "tiny-moe-upcycled":
        lines.append(
            "- Upcycled from `tiny-dense` at the end of its training: every expert of layer *l* starts as an "
            "exact copy of `tiny-dense`'s FFN of layer *l* (gate_proj -> w1, up_proj -> w3, down_proj -> w2); "
            "attention, norms and embeddings are copied; the router is freshly initialised "
            "(normal, std 0.02). Then trained on with the router load-balancing loss."
        )
    elif name == "tiny-moe-scratch":
        lines.append("- Trained from random initialisation (seeded), same shape as `tiny-moe-upcycled`.")
    elif name == "tiny-moe-fine":
        lines.append(
            "- Trained from random initialisation (seeded) with the recipe and token budget of "
            "`tiny-moe-scratch`; seed 0 of the fine-grained kind of the organism study."
        )
    else:
        lines.append("- Trained from random initialisation (seeded). Its final weights seed `tiny-moe-upcycled`.")
    own = spec["tokens"]
    if prev_info is not None:
        prev = prev_info["train_spec"]["tokens"]
        lines.append(
            f"- Token budget: {prev:,} tokens as `tiny-dense` + {own:,} tokens as an MoE = {prev + own:,} "
            f"tokens in all (the same total as `tiny-moe-scratch`)."
        )
    else:
        lines.append(
            f"- Token budget: {own:,} tokens ({spec['steps']} steps x {spec['batch_size']} sequences x "
            f"{spec['seq_len']} tokens)."
        )
    lines += [
        f"- AdamW (betas {tuple(spec['betas'])}, weight decay {spec['weight_decay']} on matrices), peak learning rate "
        f"{spec['lr']}, {spec['warmup_steps']} warm-up steps, cosine decay to {spec['min_lr_ratio']} x peak, "
        f"gradient clipping {spec['grad_clip']}, seed {spec['seed']}, float32"
        + (f", router aux loss coefficient {cfg['router_aux_loss_coef']}" if facts.is_moe else "")
        + ".",
        f"- Samples: `<s>` followed by {spec['seq_len'] - 1} tokens from a random offset of the training token stream "
        "(documents joined by `</s>`).",
        f"- Training time: {info['training_seconds'] / 60:.1f} min wall clock on a shared 2-core CPU "
        f"({info['torch_threads']} torch thread(s), torch {info['torch_version']}).",
        (
            f"- Command: `{info['command']}` (the organism study; resumable: the same command continues an "
            "interrupted run)."
            if "zoo study" in (info.get("command") or "")
            else f"- Command: `{info.get('command') or SHIPPED_COMMANDS.get(name, 'moe-book zoo train --models ' + name)}` "
            "(`python -m moe_utils.zoo.train` is what `moe-book zoo train` runs; `tiny-moe-scratch` trained in a second "
            "process at the same time as the other two; checkpoints are resumable with `--resume`)."
        ),
        "",
        "## Data",
        "",
        f"- CPython {corpus['python_version']} documentation topics (`pydoc_data.topics`), standard-library docstrings "
        f"(extracted with `ast`) and {corpus['source_per_mille'] / 10:.0f} % of standard-library source files "
        "(sampled by hash); tests, IDLE and site-packages skipped.",
        f"- Training split: {corpus['train']['total']['documents']:,} documents, "
        f"{corpus['train']['total']['characters']:,} characters, {corpus['train_tokens']:,} tokens; held-out split "
        f"(~{corpus['heldout_per_mille'] / 10:.0f} % of files by hash): {corpus['heldout']['total']['documents']} "
        f"documents, {corpus['heldout_tokens']:,} tokens.",
        f"- Corpus sha256: `{corpus['sha256_all']}` (train `{corpus['sha256_train'][:16]}...`, held-out "
        f"`{corpus['sha256_heldout'][:16]}...`); see `corpus.json` next to the models.",
        "",
        "## Evaluation (held-out split)",
        "",
        "| model | nats/token | perplexity |",
        "|---|---|---|",
        f"| {name} | {ev['heldout_loss']:.3f} | {ev['heldout_perplexity']:.1f} |",
        f"| add-one unigram (fit on the training split) | {ev['unigram_loss']:.3f} | {ev['unigram_perplexity']:.1f} |",
        "",
        f"Measured on all {ev['heldout_windows']} held-out windows ({ev['heldout_tokens']:,} predicted tokens), "
        "with the stored bfloat16 weights loaded in float32.",
    ]
    if facts.is_moe:
        load = np.asarray(ev["expert_load"])
        share = load / load.sum(axis=1, keepdims=True)
        lines += [
            "",
            f"Expert load on the held-out split: dead experts (never in a top-{cfg['num_experts_per_tok']}): "
            f"{ev['dead_experts']}; per-layer share of selections ranges from {share.min():.3f} to "
            f"{share.max():.3f} (uniform: {1 / load.shape[1]:.3f}).",
        ]
    lines += [
        "",
        "## Loss curve",
        "",
        "![loss curve](loss.png)",
        "",
        "The curve as data: `training_log.json` (one record every 10 steps: batch loss, cross-entropy, aux loss, "
        "learning rate, gradient norm, elapsed seconds; held-out cross-entropy on 24 windows every 100 steps).",
        "",
        "## Limits",
        "",
        "A model this small, trained for minutes on a few megabytes, writes plausible-looking Python and docstring "
        "fragments, not correct programs or facts. It is an object of study for the book's measurements (router, "
        "expert weights, expert outputs), not a language model to use.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


def finalize_model(out: Path, name: str, windows=None) -> dict:
    """Evaluate a trained organism in ``out/models/name`` and write eval.json, loss.png and README.md."""
    out = Path(out)
    folder = out / "models" / name
    info = json.loads((folder / "training_log.json").read_text())
    corpus = json.loads((out / "corpus.json").read_text())
    if windows is None:
        windows = json.loads((out / "heldout_windows.json").read_text())
    counts = np.asarray(json.loads((out / "unigram_counts.json").read_text())["counts"])
    ev = evaluate_folder(folder, windows, counts)
    (folder / "eval.json").write_text(json.dumps(ev, indent=1))
    prev_info = None
    offset = 0
    if name in STARTS_AFTER:
        prev_path = out / "models" / STARTS_AFTER[name] / "training_log.json"
        if prev_path.exists():
            prev_info = json.loads(prev_path.read_text())
            offset = prev_info["train_spec"]["tokens"]
    title = f"{name}" + (f" (continues after {offset:,} dense tokens)" if offset else "")
    save_png(loss_chart(info["log"], title, offset), folder / "loss.png")
    write_card(folder, name, info, ev, corpus, prev_info)
    return ev
