"""Unit tests of the zoo pipeline on tiny configurations (seconds on a CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_utils.core.errors import CheckpointError, EnvironmentMismatchError, UsageError
from moe_utils.core.paths import ZOO_MODELS_DIR
from moe_utils.engine.inputs import split_paragraphs
from moe_utils.zoo import ZOO_MODELS, study, train, zoo_path
from moe_utils.zoo.cards import parameter_counts
from moe_utils.zoo.configs import TrainSpec
from moe_utils.zoo.corpus import build_corpus, extract_docstrings, is_heldout
from moe_utils.zoo.evaluate import expert_load, make_windows, model_nll, targets_of, unigram_counts, unigram_nll
from moe_utils.zoo.tokenizer import BOS, train_tokenizer, wrap_tokenizer
from moe_utils.zoo.train import build_dense, build_moe, sample_batch, token_stream, train_model, upcycle

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


def _tiny_moe_config():
    from moe_utils.zoo.configs import moe_config

    return moe_config(**TINY)


def _pattern_stream(n: int = 4000, seed: int = 0) -> np.ndarray:
    """A learnable stream: a random walk over 3..63 where each token mostly predicts the next."""
    rng = np.random.default_rng(seed)
    x = [3]
    for _ in range(n - 1):
        x.append(3 + (x[-1] - 3 + (1 if rng.random() < 0.9 else rng.integers(2, 60))) % 61)
    return np.asarray(x, dtype=np.uint16)


def test_corpus_is_deterministic_and_splits_by_file():
    a = build_corpus(limit_files=25, include_topics=False)
    b = build_corpus(limit_files=25, include_topics=False)
    assert a.meta["sha256_all"] == b.meta["sha256_all"]
    assert [d.name for d in a.train] == [d.name for d in b.train]
    assert len(a.train) > 0
    # a file's docstrings and source land in the same split (the split hashes the file path)
    for doc in a.train + a.heldout:
        assert (doc in a.heldout) == is_heldout(doc.key)


def test_extract_docstrings_finds_module_class_and_function_docs():
    src = '"""Module doc."""\n\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n\ndef g():\n    return 1\n'
    assert extract_docstrings(src) == ["Module doc.", "Class doc.", "Method doc."]
    assert extract_docstrings("def broken(:\n") == []


def test_preset_reader_splits_on_separator_lines_only():
    """The reader of the long preset (engine.inputs) splits where zoo.heldout's writer put separators."""
    text = "# a comment line stays\nx = 1\n---\nsecond -- not a separator\n---\n\nthird\n"
    assert split_paragraphs(text) == [
        "# a comment line stays\nx = 1",
        "second -- not a separator",
        "\nthird".strip("\n"),
    ]


def test_tokenizer_round_trips_and_prepends_bos():
    texts = ["def add(a, b):\n    return a + b\n", "As an open source alternative to the shell."] * 20
    tok = wrap_tokenizer(train_tokenizer(texts, vocab_size=300))
    s = "As an open source alternative to\n    return a + b  # ünïcode"
    ids = tok(s)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(BOS) == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == s
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_sample_batch_starts_with_bos_and_copies_stream():
    stream = np.arange(100, dtype=np.uint16)
    x = sample_batch(stream, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == (4, 10) and (x[:, 0] == 1).all()
    for row in x:  # the rest is a contiguous slice of the stream
        assert (row[2:] - row[1:-1] == 1).all()


def test_token_stream_joins_documents_with_eos():
    assert token_stream([[5, 6], [7]]).tolist() == [5, 6, 2, 7, 2]


def test_training_a_few_steps_lowers_the_loss():
    model = build_moe(seed=0, **TINY)
    spec = TrainSpec(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5, seed=0)
    res = train_model(model, _pattern_stream(), spec, progress=False)
    log = res["log"]
    assert res["done"] and log[-1]["step"] == 40
    assert log[0]["ce"] > math.log(64) - 0.5  # starts near chance
    assert log[-1]["ce"] < log[0]["ce"] - 1.0  # and learns the pattern
    assert all(r["aux"] > 0 for r in log)  # load-balancing loss is on


def test_resume_continues_exactly(tmp_path):
    stream = _pattern_stream()
    spec = TrainSpec(steps=6, batch_size=2, seq_len=16, warmup_steps=2, seed=4)
    straight = build_dense(seed=1, **TINY)
    train_model(straight, stream, spec, progress=False)
    ck = tmp_path / "last.pt"
    half = build_dense(seed=1, **TINY)
    first = train_model(half, stream, spec, ckpt_path=ck, max_seconds=0.0, progress=False)
    assert not first["done"] and first["log"][-1]["step"] == 1
    resumed = build_dense(seed=99, **TINY)  # different init: everything must come from the checkpoint
    second = train_model(resumed, stream, spec, ckpt_path=ck, resume=True, progress=False)
    assert second["done"]
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)


def test_upcycled_experts_are_exact_copies_and_model_matches_dense():
    dense = build_dense(seed=5, **TINY)
    moe = upcycle(dense, _tiny_moe_config(), seed=6)
    I = TINY["intermediate_size"]
    for i, layer in enumerate(dense.model.layers):
        ex = moe.model.layers[i].mlp.experts
        for e in range(ex.gate_up_proj.shape[0]):
            assert torch.equal(ex.gate_up_proj[e, :I], layer.mlp.gate_proj.weight)
            assert torch.equal(ex.gate_up_proj[e, I:], layer.mlp.up_proj.weight)
            assert torch.equal(ex.down_proj[e], layer.mlp.down_proj.weight)
        assert torch.equal(moe.model.layers[i].self_attn.q_proj.weight, layer.self_attn.q_proj.weight)
        assert moe.model.layers[i].mlp.gate.weight.abs().max() > 0  # router is fresh, not zero
    assert torch.equal(moe.lm_head.weight, dense.lm_head.weight)
    # identical experts + top-k weights that sum to 1 => the MoE computes the dense function
    x = torch.randint(3, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=x).logits, dense(input_ids=x).logits, atol=1e-5, rtol=1e-4)


def test_upcycle_refuses_mismatched_shapes():
    dense = build_dense(seed=5, **TINY)
    from moe_utils.zoo.configs import moe_config

    with pytest.raises(ValueError, match="intermediate_size"):
        upcycle(dense, moe_config(**dict(TINY, intermediate_size=40)), seed=0)


def test_unigram_nll_closed_forms():
    V = 8
    assert unigram_nll(np.zeros(V), np.arange(V)) == pytest.approx(math.log(V))
    counts = unigram_counts(np.array([0, 0, 0, 1]), 3)
    assert counts.tolist() == [3, 1, 0]
    # add-one: p(0) = 4/7, p(2) = 1/7
    assert unigram_nll(counts, np.array([0, 2])) == pytest.approx(-(math.log(4 / 7) + math.log(1 / 7)) / 2)


def test_make_windows_and_targets():
    w = make_windows([list(range(10, 20)), [7]], seq_len=5)
    assert w == [[1, 10, 11, 12, 13], [1, 14, 15, 16, 17], [1, 18, 19]]
    assert targets_of(w).tolist() == list(range(10, 20))


def test_model_nll_matches_transformers_loss():
    model = build_dense(seed=2, **TINY).eval()
    w = [[1, 5, 9, 11, 4], [1, 8, 3]]
    with torch.no_grad():
        ref = [model(input_ids=torch.tensor([x]), labels=torch.tensor([x])).loss.item() for x in w]
    assert model_nll(model, w) == pytest.approx((ref[0] * 4 + ref[1] * 2) / 6, rel=1e-5)


def test_expert_load_matches_router_hook():
    model = build_moe(seed=3, **TINY).eval()
    windows = [[1] + list(range(3, 20)), [1, 40, 41, 42]]
    captured = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
        for layer in model.model.layers
    ]
    load = expert_load(model, windows)
    for h in hooks:
        h.remove()
    L, E = load.shape
    naive = np.zeros((L, E), dtype=int)
    for j, x in enumerate(captured):  # layer order repeats per window
        layer = j % L
        logits = x.reshape(-1, x.shape[-1]) @ model.model.layers[layer].mlp.gate.weight.T
        for row in logits:
            for e in torch.topk(row, 2).indices.tolist():
                naive[layer, e] += 1
    assert (load == naive).all()
    assert (load.sum(axis=1) == 2 * sum(len(w) for w in windows)).all()


def test_parameter_counts_match_the_built_models():
    dense = build_dense(seed=0, **TINY)
    moe = build_moe(seed=0, **TINY)
    assert parameter_counts(dense.config.to_dict())["total"] == sum(p.numel() for p in dense.parameters())
    pc = parameter_counts(moe.config.to_dict())
    assert pc["total"] == sum(p.numel() for p in moe.parameters())
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    assert pc["active"] == pc["total"] - experts + experts * 2 // 8


def test_zoo_path_rejects_unknown_names_with_the_list():
    with pytest.raises(CheckpointError) as err:
        zoo_path("tiny-moe-nonexistent")
    for name in ZOO_MODELS:
        assert name in str(err.value)


def test_finalize_writes_card_picture_and_eval(tmp_path):
    import json

    from moe_utils.zoo.cards import finalize_model
    from moe_utils.zoo.train import _save_model

    texts = ["def f(x):\n    return x + 1\n", "Return the sum of a and b."] * 10
    tok_dir = tmp_path / "tokenizer"
    from moe_utils.zoo.tokenizer import save_tokenizer

    save_tokenizer(train_tokenizer(texts, vocab_size=300), tok_dir)
    corpus = {
        "python_version": "3",
        "source_per_mille": 500,
        "heldout_per_mille": 20,
        "train_tokens": 100,
        "heldout_tokens": 10,
        "sha256_all": "a" * 64,
        "sha256_train": "b" * 64,
        "sha256_heldout": "c" * 64,
        "train": {"total": {"documents": 2, "characters": 50}},
        "heldout": {"total": {"documents": 1}},
    }
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    (tmp_path / "unigram_counts.json").write_text(json.dumps({"counts": [1] * 64}))
    windows = [[1, 5, 6, 7], [1, 9, 10]]
    spec = TrainSpec(steps=2, batch_size=2, seq_len=16, warmup_steps=1)
    for name, model in (("tiny-dense", build_dense(0, **TINY)), ("tiny-moe-upcycled", build_moe(0, **TINY))):
        res = train_model(model, _pattern_stream(), spec, progress=False)
        folder = tmp_path / "models" / name
        _save_model(model, folder, tok_dir)
        (folder / "training_log.json").write_text(
            json.dumps(
                {
                    "train_spec": spec.as_dict(),
                    "training_seconds": 1.0,
                    "torch_threads": 1,
                    "torch_version": "x",
                    "log": res["log"],
                }
            )
        )
        ev = finalize_model(tmp_path, name, windows=windows)
        card = (folder / "README.md").read_text()
        assert f"{ev['heldout_loss']:.3f}" in card and (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert (
        "expert_load" in ev and np.asarray(ev["expert_load"]).sum() == 2 * 2 * 7
    )  # 2 layers x top-2 x 7 positions (<s> included)
    assert "64 tokens as `tiny-dense` + 64 tokens" in card


def test_train_refuses_an_output_folder_inside_the_shipped_models():
    """A command-line mistake is a UsageError (moe-book exits 2), raised before anything is built."""
    args = train.parse_args(["--out", str(ZOO_MODELS_DIR / "scratch")])
    with pytest.raises(UsageError, match="inside the package's shipped models"):
        train.run(args, "moe-book zoo train")


def test_study_refuses_a_corpus_whose_tokenizer_differs_from_the_shipped_one(tmp_path):
    folder = tmp_path / "prepared" / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text('{"model": "another"}')
    with pytest.raises(EnvironmentMismatchError, match="not be comparable"):
        study.check_prepared(tmp_path)
