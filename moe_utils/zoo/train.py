"""Rebuild the model organisms: corpus -> tokenizer -> tiny-dense -> tiny-moe-upcycled, tiny-moe-scratch.

Console entry: ``moe-book zoo train [--models ...] [--out DIR] [--force] [--resume]
[--max-minutes M] [--install]`` (options in :mod:`moe_utils.zoo.commands`, :func:`run` here). Every step has a fixed seed; checkpoints
(model, optimizer, step, RNG states, log) are written under ``OUT/checkpoints/<name>/`` so an
interrupted run continues with ``--resume``. The shipped copies inside the package are only
replaced with ``--install --force``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from moe_utils.core.errors import ArgumentError, MoEUtilsError, ShapeError, UsageError
from moe_utils.core.paths import ZOO_MODELS_DIR
from moe_utils.zoo import configs
from moe_utils.zoo.cards import finalize_model
from moe_utils.zoo.commands import MODEL_ORDER, TRAIN_DESCRIPTION, add_train_arguments
from moe_utils.zoo.configs import TrainSpec
from moe_utils.zoo.corpus import Corpus, build_corpus, write_corpus_json
from moe_utils.zoo.evaluate import (
    encode_docs,
    make_windows,
    model_nll,
    save_windows,
    unigram_counts,
    window_documents,
)
from moe_utils.zoo.heldout import select_paragraphs, write_long_heldout
from moe_utils.zoo.tokenizer import load_zoo_tokenizer, save_tokenizer, train_tokenizer

if TYPE_CHECKING:
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

EVAL_WINDOWS_DURING_TRAINING = 24
CHECKPOINT_EVERY = 100
LOG_EVERY = 10


# ----------------------------------------------------------------------------- data


def token_stream(docs_ids: Sequence[Sequence[int]], eos_id: int = 2) -> np.ndarray:
    """Concatenate documents' ids, each followed by ``</s>``, as one uint16 stream."""
    parts = []
    for ids in docs_ids:
        parts.append(np.asarray(ids, dtype=np.uint16))
        parts.append(np.asarray([eos_id], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def sample_batch(
    stream: np.ndarray, batch_size: int, seq_len: int, gen: torch.Generator, bos_id: int = 1
) -> torch.Tensor:
    """``batch_size`` random windows ``[<s>] + stream[o : o + seq_len - 1]`` (offsets from ``gen``)."""
    n = seq_len - 1
    offsets = torch.randint(0, len(stream) - n, (batch_size,), generator=gen).tolist()
    rows = [np.concatenate([[bos_id], stream[o : o + n]]).astype(np.int64) for o in offsets]
    return torch.from_numpy(np.stack(rows))


# ----------------------------------------------------------------------------- models


def build_dense(seed: int, vocab_size: int = configs.VOCAB_SIZE, **overrides):
    """A freshly initialised ``tiny-dense`` (MistralForCausalLM) with a fixed seed."""
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(configs.dense_config(vocab_size, **overrides))


def build_moe(seed: int, vocab_size: int = configs.VOCAB_SIZE, **overrides):
    """A freshly initialised Mixtral of the organisms' shape with a fixed seed."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(configs.moe_config(vocab_size, **overrides))


def build_fine(seed: int, vocab_size: int = configs.VOCAB_SIZE, **overrides):
    """A freshly initialised ``tiny-moe-fine`` (Qwen2MoeForCausalLM) with a fixed seed."""
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(configs.fine_config(vocab_size, **overrides))


def build_placement(seed: int, dense_layer: int | None, vocab_size: int = configs.VOCAB_SIZE, **overrides):
    """A freshly initialised dense-layer placement organism (Qwen3MoeForCausalLM) with a fixed seed."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(configs.placement_config(dense_layer, vocab_size, **overrides))


@torch.no_grad()
def upcycle(dense, moe_config, seed: int):
    """Mixtral whose experts all start as copies of ``dense``'s FFN of the same layer.

    Attention, norms and embeddings are copied; the router keeps its fresh random
    initialisation (std = ``initializer_range``). transformers 5 layout:
    ``experts.gate_up_proj[e] = cat(gate_proj, up_proj)`` ([2I, H]) and
    ``experts.down_proj[e] = down_proj`` ([H, I]).
    """
    from transformers import MixtralForCausalLM

    dcfg = dense.config
    for attr in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        if getattr(dcfg, attr) != getattr(moe_config, attr):
            raise ShapeError(
                f"cannot upcycle: dense {attr}={getattr(dcfg, attr)} but MoE config has "
                f"{getattr(moe_config, attr)}; use the same shape for both"
            )
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(moe_config)
    dsd = dense.state_dict()
    msd = moe.state_dict()
    for name, tensor in dsd.items():
        if ".mlp." in name:
            continue
        if name not in msd:
            raise KeyError(f"dense weight {name} has no counterpart in the MoE model")
        msd[name].copy_(tensor)
    for i, layer in enumerate(dense.model.layers):
        gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], dim=0)
        experts = cast("MixtralDecoderLayer", moe.model.layers[i]).mlp.experts  # transformers 5: fused
        gate_up_proj, down_proj = experts.get_parameter("gate_up_proj"), experts.get_parameter("down_proj")
        gate_up_proj.copy_(gate_up.unsqueeze(0).expand_as(gate_up_proj))
        down_proj.copy_(layer.mlp.down_proj.weight.unsqueeze(0).expand_as(down_proj))
    if moe.config.tie_word_embeddings:
        moe.tie_weights()
    return moe


# ----------------------------------------------------------------------------- training


def lr_lambda(spec: TrainSpec):
    """Linear warm-up then cosine decay to ``min_lr_ratio`` of the peak."""

    def f(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        t = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def make_optimizer(model, spec: TrainSpec):
    """AdamW; weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=spec.betas,
    )


def _save_checkpoint(path: Path, model, opt, sched, step: int, gen: torch.Generator, log: list, elapsed: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "data_rng": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "log": json.dumps(log),
            "elapsed": elapsed,
        },
        tmp,
    )
    os.replace(tmp, path)


def train_model(
    model,
    stream: np.ndarray,
    spec: TrainSpec,
    *,
    eval_windows=None,
    ckpt_path: Path | None = None,
    resume: bool = False,
    max_seconds: float | None = None,
    desc: str = "train",
    progress: bool = True,
    snapshot_steps: Sequence[int] = (),
    on_snapshot: Callable[[int, Any], None] | None = None,
) -> dict:
    """Train ``model`` on random windows of ``stream``; returns ``{"log", "done", "elapsed"}``.

    The loss logged is the model's loss (cross-entropy + router aux loss for MoE) and, separately,
    the cross-entropy alone. Checkpoints every ``CHECKPOINT_EVERY`` steps when ``ckpt_path`` is set.
    ``on_snapshot(step, model)`` is called after each step in ``snapshot_steps`` (0: before the
    first step); it must not change the model.
    """
    from tqdm.auto import tqdm

    opt = make_optimizer(model, spec)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec))
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    step, log, elapsed0 = 0, [], 0.0
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["data_rng"])
        torch.set_rng_state(ck["torch_rng"])
        step, log, elapsed0 = int(ck["step"]), json.loads(ck["log"]), float(ck["elapsed"])
    coef = (
        getattr(model.config, "router_aux_loss_coef", 0.0)
        if getattr(model.config, "output_router_logits", False)
        else 0.0
    )
    t0 = time.time()
    bar = tqdm(total=spec.steps, initial=step, desc=desc, disable=not progress, mininterval=20)
    snapshots = set(snapshot_steps)
    if on_snapshot is not None and step == 0 and 0 in snapshots:
        on_snapshot(0, model)
    model.train()
    while step < spec.steps:
        x = sample_batch(stream, spec.batch_size, spec.seq_len, gen)
        out = model(input_ids=x, labels=x, use_cache=False)
        loss = out.loss
        aux = float(out.aux_loss.detach()) if getattr(out, "aux_loss", None) is not None else 0.0
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        bar.update(1)
        if step % LOG_EVERY == 0 or step == 1 or step == spec.steps:
            rec = {
                "step": step,
                "tokens": step * spec.tokens_per_step,
                "loss": float(loss.detach()),
                "ce": float(loss.detach()) - coef * aux,
                "aux": aux,
                "lr": sched.get_last_lr()[0],
                "grad_norm": gnorm,
                "elapsed_s": elapsed0 + time.time() - t0,
            }
            if eval_windows is not None and (step % CHECKPOINT_EVERY == 0 or step == spec.steps):
                rec["heldout_ce"] = model_nll(model, eval_windows)
                model.train()
            log.append(rec)
            bar.set_postfix(loss=f"{rec['ce']:.3f}")
        if on_snapshot is not None and step in snapshots:
            on_snapshot(step, model)
            model.train()
        timeout = max_seconds is not None and time.time() - t0 > max_seconds
        if ckpt_path is not None and (step % CHECKPOINT_EVERY == 0 or step == spec.steps or timeout):
            _save_checkpoint(ckpt_path, model, opt, sched, step, gen, log, elapsed0 + time.time() - t0)
        if timeout and step < spec.steps:
            bar.close()
            return {"log": log, "done": False, "elapsed": elapsed0 + time.time() - t0}
    bar.close()
    model.eval()
    return {"log": log, "done": True, "elapsed": elapsed0 + time.time() - t0}


# ----------------------------------------------------------------------------- pipeline


def heldout_windows(corpus: Corpus, tokenizer) -> tuple[list[list[int]], np.ndarray]:
    """The held-out windows of ``corpus`` (consecutive windows of each held-out document, in corpus
    order) and the index of the held-out document each window was cut from."""
    held_docs = encode_docs(tokenizer, corpus.texts("heldout"))
    return make_windows(held_docs, configs.SEQ_LEN), window_documents(held_docs, configs.SEQ_LEN)


def _has_documents(npz: Path) -> bool:
    if not npz.exists():
        return False
    with np.load(npz) as z:
        return "documents" in z.files


def prepare(out: Path, log=print) -> dict:
    """Corpus, tokenizer, token streams, unigram counts and long held-out preset under ``out``.

    Cached: if ``out/prepared.json`` matches the current corpus hash, the files are reused.
    """
    out.mkdir(parents=True, exist_ok=True)
    log("building corpus ...")
    corpus = build_corpus()
    marker = out / "prepared.json"
    if marker.exists() and json.loads(marker.read_text()).get("sha256_all") == corpus.meta["sha256_all"]:
        log("reusing prepared corpus/tokenizer in", out)
    else:
        write_corpus_json(corpus, out / "corpus.json")
        log("training tokenizer ...")
        tok = train_tokenizer(corpus.texts("train"), configs.VOCAB_SIZE)
        save_tokenizer(tok, out / "tokenizer", configs.SEQ_LEN)
        hf = load_zoo_tokenizer(out / "tokenizer")
        log("tokenizing ...")
        train_ids = token_stream(encode_docs(hf, corpus.texts("train")))
        np.save(out / "train_ids.npy", train_ids)
        windows, documents = heldout_windows(corpus, hf)
        (out / "heldout_windows.json").write_text(json.dumps(windows))
        save_windows(out / "heldout_windows.npz", windows, documents)
        counts = unigram_counts(train_ids, configs.VOCAB_SIZE)
        (out / "unigram_counts.json").write_text(
            json.dumps(
                {
                    "description": "token counts of the zoo training split (documents joined by </s>), "
                    "for the add-one smoothed unigram baseline",
                    "corpus_sha256_train": corpus.meta["sha256_train"],
                    "counts": counts.tolist(),
                }
            )
        )
        meta = dict(corpus.meta)
        meta["train_tokens"] = len(train_ids)
        meta["heldout_tokens"] = int(sum(len(w) - 1 for w in windows))
        meta["heldout_windows"] = len(windows)
        write_corpus_json(type(corpus)(corpus.train, corpus.heldout, meta), out / "corpus.json")
        marker.write_text(json.dumps({"sha256_all": corpus.meta["sha256_all"]}))
    if not _has_documents(out / "heldout_windows.npz"):
        windows, documents = heldout_windows(corpus, load_zoo_tokenizer(out / "tokenizer"))
        if windows != json.loads((out / "heldout_windows.json").read_text()):
            raise MoEUtilsError(
                f"the held-out windows rebuilt from the corpus differ from {out / 'heldout_windows.json'}; "
                "delete the prepared folder and prepare again"
            )
        save_windows(out / "heldout_windows.npz", windows, documents)
    paras, sources = select_paragraphs(corpus, load_zoo_tokenizer(out / "tokenizer"))
    write_long_heldout(out / "long_heldout.txt", paras, sources, corpus.meta)
    return json.loads((out / "corpus.json").read_text())


def _save_model(model, folder: Path, tokenizer_dir: Path) -> None:
    """Save in bf16 (like hub checkpoints), router logits off by default, plus the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    m = model.to(torch.bfloat16)
    if hasattr(m.config, "output_router_logits"):
        m.config.output_router_logits = False
    m.config.use_cache = True
    m.save_pretrained(str(folder))
    model.to(torch.float32)
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = True
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, folder / f.name)


def run_one(
    name: str,
    out: Path,
    *,
    resume: bool,
    force: bool,
    max_seconds: float | None,
    progress: bool,
    log=print,
    command: str | None = None,
) -> bool:
    """Train one organism into ``out/models/name``; returns True when finished."""
    from transformers import AutoModelForCausalLM

    final = out / "models" / name
    if (final / "model.safetensors").exists() and not force:
        log(f"{name}: already trained in {final} (use --force to retrain)")
        return True
    spec = configs.TRAIN_SPECS[name]
    stream = np.load(out / "train_ids.npy")
    windows = json.loads((out / "heldout_windows.json").read_text())
    eval_w = windows[:: max(1, len(windows) // EVAL_WINDOWS_DURING_TRAINING)][:EVAL_WINDOWS_DURING_TRAINING]
    ckpt = out / "checkpoints" / name / "last.pt"
    if name == "tiny-dense":
        model = build_dense(spec.seed)
    elif name == "tiny-moe-scratch":
        model = build_moe(spec.seed)
    elif name == "tiny-moe-upcycled":
        dense_dir = out / "models" / "tiny-dense"
        if not (dense_dir / "model.safetensors").exists():
            raise FileNotFoundError(
                f"tiny-moe-upcycled starts from tiny-dense, which is not in {dense_dir}; "
                "train it first (--models tiny-dense tiny-moe-upcycled)"
            )
        dense_ck = out / "checkpoints" / "tiny-dense" / "last.pt"
        dense = build_dense(configs.TRAIN_SPECS["tiny-dense"].seed)
        if dense_ck.exists():  # full-precision weights of the end of dense training
            dense.load_state_dict(torch.load(dense_ck, map_location="cpu", weights_only=True)["model"])
        else:
            dense = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32)
        model = upcycle(dense, configs.moe_config(), spec.seed)
    else:
        raise ArgumentError(f"unknown zoo model {name!r}; choose from {MODEL_ORDER}")
    res = train_model(
        model,
        stream,
        spec,
        eval_windows=eval_w,
        ckpt_path=ckpt,
        resume=resume,
        max_seconds=max_seconds,
        desc=name,
        progress=progress,
    )
    if not res["done"]:
        log(f"{name}: stopped at the time limit; continue with --resume")
        return False
    _save_model(model, final, out / "tokenizer")
    info = {
        "name": name,
        "train_spec": spec.as_dict(),
        "training_seconds": res["elapsed"],
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "command": command,
        "log": res["log"],
    }
    (final / "training_log.json").write_text(json.dumps(info, indent=1))
    log(f"{name}: done in {res['elapsed']:.0f} s")
    return True


def install(out: Path, names: Sequence[str], force: bool, log=print) -> None:
    """Copy trained models, corpus.json, unigram counts and the long preset into the package."""
    dest = ZOO_MODELS_DIR
    for name in names:
        target = dest / name
        if (target / "model.safetensors").exists() and not force:
            raise FileExistsError(f"{target} holds a shipped model; pass --force to replace it")
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (dest / name).exists():
            shutil.rmtree(dest / name)
        shutil.copytree(out / "models" / name, dest / name)
    for f in ("corpus.json", "unigram_counts.json", "heldout_windows.npz"):
        shutil.copy2(out / f, dest / f)
    for f in ("long_heldout.txt", "long_heldout.json"):
        shutil.copy2(out / f, dest.parent.parent / "inputs_data" / f)
    log(f"installed {list(names)} into {dest}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options of ``moe-book zoo train`` (defined in :mod:`moe_utils.zoo.commands`)."""
    p = argparse.ArgumentParser(prog="moe-book zoo train", description=TRAIN_DESCRIPTION)
    return add_train_arguments(p).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m moe_utils.zoo.train``: :func:`run` on ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(parse_args(argv), "moe-book zoo train " + " ".join(argv))


def run(args: argparse.Namespace, command: str) -> int:
    """``moe-book zoo train`` with its parsed options; ``command`` is recorded with each model."""
    out = args.out.resolve()
    if (out == ZOO_MODELS_DIR or ZOO_MODELS_DIR in out.parents) and not args.force:
        raise UsageError(
            f"--out {out} is inside the package's shipped models; "
            "use a working folder (default ./zoo-build) or pass --force"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    prepare(out)
    if args.prepare_only:
        return 0
    names = [n for n in MODEL_ORDER if n in args.models]
    if not args.finalize_only:
        for name in names:
            left = None if deadline is None else max(1.0, deadline - time.time())
            if not run_one(
                name,
                out,
                resume=args.resume,
                force=args.force,
                max_seconds=left,
                progress=not args.no_progress,
                command=command,
            ):
                return 3
    for name in names:
        if (out / "models" / name / "model.safetensors").exists():
            finalize_model(out, name)
    if args.install:
        try:
            install(out, names, args.force)
        except FileExistsError as err:
            raise UsageError(f"not installed: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
