"""Checks of the models shipped inside the package (loaded from package data, float32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_utils.core.paths import LONG_HELDOUT_FILE
from moe_utils.engine.inputs import split_paragraphs
from moe_utils.zoo import DEFAULT_DENSE_BASELINE, DEFAULT_MOE_MODELS, ZOO_MODELS, zoo_path
from moe_utils.zoo.evaluate import (
    encode_docs,
    expert_load,
    load_unigram_counts,
    make_windows,
    model_nll,
    targets_of,
    unigram_nll,
)

# Experts that never enter a top-2 on the ten shipped held-out paragraphs (~1,100 tokens), per
# model, as measured on the shipped weights: upcycled (layer, expert) (1, 3), (2, 1), (3, 1);
# scratch (3, 5), (6, 3). On the whole held-out split (147k tokens) the counts are 2 and 0: the
# load-balancing loss (coefficient 0.01) over this short training left the load uneven, and a few
# experts are chosen very rarely. A change here means the shipped weights or the routing changed.
# Measured on the held-out paragraphs below: the organisms ship with a few experts that these
# windows never select (tiny-moe-fine: 6 of its 7 x 30 routed experts); the pages report them.
EXPECTED_DEAD_EXPERTS = {"tiny-moe-upcycled": 3, "tiny-moe-scratch": 2, "tiny-moe-fine": 6}
MIXTRAL_ORGANISMS = [n for n in DEFAULT_MOE_MODELS if n != "tiny-moe-fine"]
MIN_MARGIN_NATS = 1.0  # every model must beat the unigram baseline by at least this much


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(zoo_path(DEFAULT_DENSE_BASELINE)))


@pytest.fixture(scope="module")
def windows(tokenizer):
    return make_windows(
        encode_docs(tokenizer, split_paragraphs(LONG_HELDOUT_FILE.read_text(encoding="utf-8"))), seq_len=256
    )


def _load(name):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(zoo_path(name)), dtype=torch.float32).eval()


def test_zoo_lists_the_defaults():
    assert set(DEFAULT_MOE_MODELS) | {DEFAULT_DENSE_BASELINE} <= set(ZOO_MODELS)
    for name in ZOO_MODELS:
        folder = zoo_path(name)
        for f in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "README.md",
            "training_log.json",
            "loss.png",
        ):
            assert (folder / f).exists(), f"{name} lacks {f}"
        assert zoo_path("zoo:" + name) == folder


def test_shipped_tokenizers_are_identical_and_prepend_bos(tokenizer):
    ref = (zoo_path(ZOO_MODELS[0]) / "tokenizer.json").read_bytes()
    for name in ZOO_MODELS[1:]:
        assert (zoo_path(name) / "tokenizer.json").read_bytes() == ref
    ids = tokenizer("As an open source alternative to")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[:1]) == ["<s>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "As an open source alternative to"


def test_long_heldout_preset_is_ten_paragraphs_of_about_1100_tokens(tokenizer):
    paras = split_paragraphs(LONG_HELDOUT_FILE.read_text(encoding="utf-8"))
    assert len(paras) == 10
    n = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in paras)
    assert 1000 <= n <= 1200
    assert all(len(tokenizer(p)["input_ids"]) <= 256 for p in paras)  # each fits the context


def test_unigram_counts_cover_the_vocabulary(tokenizer):
    counts = load_unigram_counts()
    assert len(counts) == len(tokenizer) and counts.sum() > 1_000_000


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_shipped_model_beats_unigram_on_heldout_text(name, windows):
    model = _load(name)
    nll = model_nll(model, windows)
    uni = unigram_nll(load_unigram_counts(), targets_of(windows))
    assert nll < uni - MIN_MARGIN_NATS, (name, nll, uni)


@pytest.mark.parametrize("name", DEFAULT_MOE_MODELS)
def test_every_expert_receives_tokens_on_heldout_text(name, windows):
    model = _load(name)
    load = expert_load(model, windows)
    cfg = model.config.to_dict()
    n_moe = cfg["num_hidden_layers"] - len(cfg.get("mlp_only_layers") or [])
    assert load.shape == (n_moe, cfg.get("num_local_experts") or cfg["num_experts"])
    assert int((load == 0).sum()) == EXPECTED_DEAD_EXPERTS[name], load


def test_fine_organism_shape() -> None:
    fine = json.loads((zoo_path("tiny-moe-fine") / "config.json").read_text())
    scratch = json.loads((zoo_path("tiny-moe-scratch") / "config.json").read_text())
    assert fine["model_type"] == "qwen2_moe" and fine["mlp_only_layers"] == [0]
    assert fine["num_experts"] >= 16 and fine["num_experts_per_tok"] >= 4
    neurons = fine["shared_expert_intermediate_size"] + fine["num_experts"] * fine["moe_intermediate_size"]
    assert neurons == scratch["num_local_experts"] * scratch["intermediate_size"]
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads"):
        assert fine[key] == scratch[key]


@pytest.mark.parametrize("name", MIXTRAL_ORGANISMS)
def test_shipped_moe_shape_matches_the_dense_baseline(name):
    moe = json.loads((zoo_path(name) / "config.json").read_text())
    dense = json.loads((zoo_path(DEFAULT_DENSE_BASELINE) / "config.json").read_text())
    assert moe["model_type"] == "mixtral" and dense["model_type"] == "mistral"
    assert moe["num_local_experts"] == 8 and moe["num_experts_per_tok"] == 2
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        assert moe[key] == dense[key]
    assert moe["num_hidden_layers"] >= 8


def test_upcycled_experts_remain_closer_to_each_other_than_scratch_experts():
    """The property the organisms exist for: upcycled experts stay similar, scratch ones diverge."""

    def mean_offdiag_cos(name):
        m = _load(name)
        vals = []
        for layer in m.model.layers:
            W = layer.mlp.experts.down_proj.detach().reshape(layer.mlp.experts.down_proj.shape[0], -1)
            W = torch.nn.functional.normalize(W, dim=1)
            S = W @ W.T
            E = S.shape[0]
            vals.append(((S.sum() - S.diag().sum()) / (E * (E - 1))).item())
        return float(np.mean(vals))

    assert mean_offdiag_cos("tiny-moe-upcycled") > mean_offdiag_cos("tiny-moe-scratch") + 0.2


def test_organisms_table_matches_the_models_and_equal_budgets():
    from moe_utils.zoo.report import organisms_table

    table = organisms_table().set_index("model")
    for name in ZOO_MODELS:
        assert table.loc[name, "params total"] == sum(p.numel() for p in _load(name).parameters())
    # the upcycled model's budget counts its dense pre-training: equal to the scratch model's
    assert table.loc["tiny-moe-upcycled", "training tokens"] == table.loc["tiny-moe-scratch", "training tokens"]
    assert table.loc["tiny-dense", "training tokens"] == table.loc["tiny-moe-upcycled", "of which as this model"]


def test_corpus_and_long_preset_rebuild_identically_on_the_same_python(tokenizer, tmp_path):
    """The shipped corpus hash and long preset are reproducible from this interpreter's stdlib."""
    import sys

    from moe_utils.zoo.corpus import build_corpus
    from moe_utils.zoo.heldout import select_paragraphs, write_long_heldout

    shipped = json.loads((zoo_path(DEFAULT_DENSE_BASELINE).parent / "corpus.json").read_text())
    if sys.version.split()[0] != shipped["python_version"]:
        pytest.skip(f"corpus was built with Python {shipped['python_version']}; the stdlib differs here")
    corpus = build_corpus()
    if corpus.meta["sha256_all"] != shipped["sha256_all"]:
        pytest.skip("same Python version but a different standard library build (patched distribution)")
    paras, sources = select_paragraphs(corpus, tokenizer)
    write_long_heldout(tmp_path / "long.txt", paras, sources, corpus.meta)
    assert (tmp_path / "long.txt").read_text() == LONG_HELDOUT_FILE.read_text()
