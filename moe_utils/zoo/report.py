"""Tables and charts of the model organisms page (``notebooks/organisms.ipynb``).

Each function returns a DataFrame or an Altair chart computed from the shipped folders, so the
notebook only calls them; numbers shown on the page are measured when it runs, not copied.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from moe_utils.arch import spec_for_config
from moe_utils.arch.facts import facts_for
from moe_utils.core.paths import ZOO_MODELS_DIR
from moe_utils.zoo import PAPER_COUNTERPART, ZOO_MODELS, zoo_path
from moe_utils.zoo.cards import STARTS_AFTER, parameter_counts
from moe_utils.zoo.evaluate import expert_load, load_unigram_counts, load_windows, model_nll, targets_of, unigram_nll


def _training_info(name: str) -> dict:
    return json.loads((zoo_path(name) / "training_log.json").read_text())


def _experts_label(cfg: dict) -> str:
    if "num_local_experts" in cfg:
        return f"{cfg['num_local_experts']} (top-{cfg['num_experts_per_tok']})"
    if "num_experts" in cfg:
        shared = cfg.get("shared_expert_intermediate_size") or 0
        dense = cfg.get("mlp_only_layers") or []
        return (
            f"{cfg['num_experts']} x {cfg['moe_intermediate_size']} (top-{cfg['num_experts_per_tok']})"
            + (f" + shared {shared}" if shared else "")
            + (f"; dense layer {dense}" if dense else "")
        )
    return "dense FFN"


def organisms_table(names: Sequence[str] = ZOO_MODELS) -> pd.DataFrame:
    """One row per organism: architecture, size, training budget and time, paper counterpart."""
    rows = []
    for name in names:
        cfg = json.loads((zoo_path(name) / "config.json").read_text())
        info = _training_info(name)
        pc = parameter_counts(cfg)
        own = info["train_spec"]["tokens"]
        before = _training_info(STARTS_AFTER[name])["train_spec"]["tokens"] if name in STARTS_AFTER else 0
        rows.append(
            {
                "model": name,
                "architecture": cfg["architectures"][0],
                "layers": cfg["num_hidden_layers"],
                "experts (top-k)": _experts_label(cfg),
                "params total": pc["total"],
                "params active": pc["active"],
                "training tokens": own + before,
                "of which as this model": own,
                "training minutes": round(info["training_seconds"] / 60, 1),
                "stands in for": PAPER_COUNTERPART[name],
            }
        )
    return pd.DataFrame(rows)


def _corpus_train_tokens() -> int:
    return int(json.loads((ZOO_MODELS_DIR / "corpus.json").read_text())["train_tokens"])


def regime_table(names: Sequence[str] = ZOO_MODELS) -> pd.DataFrame:
    """The regime each organism's verdicts come from: layers, training tokens, passes over the
    training corpus, and whether the held-out loss had stopped falling (its fall over the last
    quarter of training, from the training log's held-out evaluations)."""
    corpus = _corpus_train_tokens()
    rows = []
    for name in names:
        cfg = json.loads((zoo_path(name) / "config.json").read_text())
        info = _training_info(name)
        before = _training_info(STARTS_AFTER[name])["train_spec"]["tokens"] if name in STARTS_AFTER else 0
        tokens = info["train_spec"]["tokens"] + before
        evals = [(r["step"], r["heldout_ce"]) for r in info["log"] if r.get("heldout_ce") is not None]
        last_step = evals[-1][0] if evals else 0
        quarter = [ce for step, ce in evals if step >= 0.75 * last_step]
        fall = float(quarter[0] - quarter[-1]) if len(quarter) > 1 else float("nan")
        rows.append(
            {
                "model": name,
                "layers": cfg["num_hidden_layers"],
                "training tokens": tokens,
                "passes over the corpus": round(tokens / corpus, 2),
                "held-out loss fall, last quarter (nats)": round(fall, 3),
                "loss still falling": bool(fall > 0.02) if fall == fall else None,
            }
        )
    return pd.DataFrame(rows).set_index("model")


def loss_curves(names: Sequence[str] = ZOO_MODELS) -> pd.DataFrame:
    """Training and held-out cross-entropy against tokens, the upcycled curve offset by the dense tokens."""
    rows = []
    for name in names:
        info = _training_info(name)
        offset = _training_info(STARTS_AFTER[name])["train_spec"]["tokens"] if name in STARTS_AFTER else 0
        for r in info["log"]:
            rows.append(
                {
                    "model": name,
                    "tokens": r["tokens"] + offset,
                    "step": r["step"],
                    "split": "training batch",
                    "cross_entropy": r["ce"],
                }
            )
            if "heldout_ce" in r:
                rows.append(
                    {
                        "model": name,
                        "tokens": r["tokens"] + offset,
                        "step": r["step"],
                        "split": "held-out sample",
                        "cross_entropy": r["heldout_ce"],
                    }
                )
    return pd.DataFrame(rows)


def loss_curve_chart(df: pd.DataFrame):
    """Altair line chart of ``loss_curves`` (one colour per model, dashed held-out points)."""
    import altair as alt

    base = alt.Chart(df).encode(
        x=alt.X("tokens:Q", title="training tokens (upcycled: counted from the dense start)"),
        y=alt.Y("cross_entropy:Q", title="cross-entropy (nats/token)", scale=alt.Scale(zero=False)),
        color=alt.Color("model:N", sort=list(ZOO_MODELS)),
        tooltip=["model", "split", "step", "tokens", alt.Tooltip("cross_entropy:Q", format=".3f")],
    )
    train = base.transform_filter(alt.datum.split == "training batch").mark_line(opacity=0.8)
    held = base.transform_filter(alt.datum.split == "held-out sample").mark_point(filled=True, size=40)
    return (train + held).properties(
        width=560, height=280, title="Training loss (lines) and held-out loss on 24 windows (points)"
    )


def heldout_losses(names: Sequence[str] = ZOO_MODELS, max_windows: int | None = None) -> pd.DataFrame:
    """Held-out nats/token of each organism and of the add-one unigram baseline, same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    windows = load_windows(max_windows=max_windows)
    n_tokens = int(sum(len(w) - 1 for w in windows))
    rows = [
        {
            "model": "unigram (add-one, training split)",
            "nats_per_token": unigram_nll(load_unigram_counts(), targets_of(windows)),
        }
    ]
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(str(zoo_path(name)), dtype=torch.float32)
        rows.append({"model": name, "nats_per_token": model_nll(model, windows)})
    df = pd.DataFrame(rows)
    df["perplexity"] = np.exp(df["nats_per_token"])
    df["tokens"] = n_tokens
    return df


def heldout_sentence(losses: pd.DataFrame) -> str:
    """Markdown: whether every organism beats the unigram baseline (the first row of
    :func:`heldout_losses`) and the best organism's loss and perplexity."""
    uni = losses.iloc[0]["nats_per_token"]
    organisms = losses.iloc[1:]
    if not (organisms["nats_per_token"] < uni).all():
        return "**At least one organism does not beat the unigram baseline on this sample.**"
    best = organisms.sort_values("nats_per_token").iloc[0]
    return (
        f"On these {int(losses['tokens'].iloc[0]):,} held-out tokens every organism beats the unigram baseline "
        f"({uni:.2f} nats/token); the best, `{best['model']}`, reaches {best['nats_per_token']:.2f} nats/token "
        f"(perplexity {best['perplexity']:.0f})."
    )


def corpus_sentence(name: str) -> str:
    """Markdown: the training corpus of organism ``name`` (from its ``corpus.json``)."""
    corpus = json.loads((zoo_path(name).parent / "corpus.json").read_text())
    return (
        f"Python {corpus['python_version']} standard library; training split: "
        f"{corpus['train']['total']['documents']:,} documents, {corpus['train']['total']['characters']:,} characters, "
        f"{corpus['train_tokens']:,} tokens; held-out split: {corpus['heldout']['total']['documents']} documents, "
        f"{corpus['heldout_tokens']:,} tokens. Corpus sha256 `{corpus['sha256_all'][:16]}…` "
        "(full hashes in `corpus.json` and the model cards)."
    )


def expert_loads(names: Sequence[str], max_windows: int | None = None) -> pd.DataFrame:
    """Share of top-k selections per (model, layer, expert) on the held-out windows."""
    import torch
    from transformers import AutoModelForCausalLM

    windows = load_windows(max_windows=max_windows)
    rows = []
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(str(zoo_path(name)), dtype=torch.float32)
        load = expert_load(model, windows)
        share = load / load.sum(axis=1, keepdims=True)
        moe_layers = facts_for(spec_for_config(model.config), model.config).moe_layers
        for row, layer in enumerate(moe_layers):
            for e in range(load.shape[1]):
                rows.append(
                    {
                        "model": name,
                        "layer": layer,
                        "expert": e,
                        "selections": int(load[row, e]),
                        "share": float(share[row, e]),
                        "uniform": 1 / load.shape[1],
                    }
                )
    return pd.DataFrame(rows)


def load_summary(loads: pd.DataFrame) -> pd.DataFrame:
    """Per model: how many (layer, expert) pairs were never selected, and the smallest and largest share."""
    return loads.groupby("model").agg(
        dead_experts=("selections", lambda s: int((s == 0).sum())),
        min_share=("share", "min"),
        max_share=("share", "max"),
    )


def load_interpretation(loads: pd.DataFrame) -> str:
    """Markdown: per organism its dead experts and its busiest expert, and what they mean for the
    observations (computed from ``expert_loads``)."""
    lines = []
    for model, g in loads.groupby("model", sort=False):
        k_uniform = float(g.uniform.iloc[0])
        dead = g[g.selections == 0]
        busiest = g.loc[g.share.idxmax()]
        dead_text = (
            "no dead expert"
            if dead.empty
            else f"{len(dead)} dead expert(s) ("
            + ", ".join(f"layer {int(r.layer)} expert {int(r.expert)}" for r in dead.itertuples())
            + ")"
        )
        lines.append(
            f"- **{model}** has {dead_text}; its busiest expert (layer {int(busiest.layer)}, expert "
            f"{int(busiest.expert)}) takes {busiest.share:.0%} of that layer's selections, "
            f"{busiest.share / k_uniform:.1f} times an even share."
        )
    lines += [
        "",
        "What this means for the observations: a dead expert still has weights, so it enters the weight analyses "
        "of observation 1 and the all-expert evaluations of observations 2 and 3 like any other, although the router "
        "never sends it a token; an expert that takes a large share of the selections makes the top-scored expert "
        "predictable without any link to output norms. That is why observation 2 is judged against the independence "
        "null built from each layer's own selection frequencies rather than against 1/E, and why the repeat rate of "
        "observation 3 is compared with a frequency baseline.",
    ]
    return "\n".join(lines)


def greedy_continuations(
    names: Sequence[str], prompt: str = "As an open source alternative to", new_tokens: int = 24
) -> pd.DataFrame:
    """Greedy continuation of ``prompt`` by each organism (deterministic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = []
    for name in names:
        tok = AutoTokenizer.from_pretrained(str(zoo_path(name)))
        model = AutoModelForCausalLM.from_pretrained(str(zoo_path(name)), dtype=torch.float32).eval()
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(new_tokens):
                nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        rows.append({"model": name, "continuation": tok.decode(ids[0], skip_special_tokens=True)[len(prompt) :]})
    return pd.DataFrame(rows)
