"""Input presets, user files, dataset specs and truncation, with a tiny in-memory tokenizer."""

import re
import sys
import types

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from moe_utils.core.errors import InputSpecError, OfflineError
from moe_utils.engine import inputs as I

WORD_RE = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits on


def naive_count(text):
    return len(WORD_RE.findall(text))


def word_tokenizer(extra_text=""):
    words = sorted(set(WORD_RE.findall(I.ROUTING_PROMPT + " " + extra_text)))
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


class WithBos:
    """Minimal stand-in for a Hugging Face tokenizer: encode/decode plus a BOS id."""

    bos_token_id = 1

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, add_special_tokens=True):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


PARAS = [f"paragraph {i} has words number {i}" for i in range(10)]
CODE = "def f(x):\n    return x\n\n    # still the same paragraph"


def test_short_preset_has_seven_tokens_with_bos():
    tok = WithBos(word_tokenizer())
    inp = I.load_inputs("short", tok)
    assert inp.texts == ["As an open source alternative to"]
    assert inp.n_tokens == 7 and inp.sequences[0][0] == 1
    assert inp.sequences[0][1:] == tok.encode("As an open source alternative to", add_special_tokens=False)
    assert not inp.truncated and inp.note == ""


def test_routing_preset_and_no_bos():
    raw = word_tokenizer()
    inp = I.load_inputs("routing", raw)  # a bare tokenizers.Tokenizer has no BOS id: nothing added
    assert inp.texts[0].startswith(I.SHORT_PROMPT) and inp.texts[0].endswith("(Generative Pre-trained Transformer")
    assert inp.n_tokens == naive_count(I.ROUTING_PROMPT)
    assert I.load_inputs("routing", WithBos(raw), add_bos=False).n_tokens == naive_count(I.ROUTING_PROMPT)


def test_long_preset_from_package_data_file(tmp_path, monkeypatch):
    data = tmp_path / "long_heldout.txt"
    data.write_text("\n---\n".join(PARAS[:9] + [CODE]) + "\n")
    monkeypatch.setattr(I, "LONG_HELDOUT_FILE", data)
    tok = WithBos(word_tokenizer(" ".join(PARAS) + CODE))
    inp = I.load_inputs("long", tok)
    assert inp.n_sequences == 10 and inp.texts[9] == CODE
    assert [len(s) for s in inp.sequences] == [1 + naive_count(t) for t in PARAS[:9] + [CODE]]
    assert inp.seq_index().tolist()[:8] == [0] * 7 + [1] and len(inp.seq_index()) == inp.n_tokens


def test_missing_long_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(I, "LONG_HELDOUT_FILE", tmp_path / "nope.txt")
    with pytest.raises(InputSpecError, match="package data"):
        I.load_inputs("long", word_tokenizer())


@pytest.mark.skipif(not I.LONG_HELDOUT_FILE.is_file(), reason="package data not generated yet")
def test_shipped_long_preset_has_ten_paragraphs():
    assert len(I.split_paragraphs(I.LONG_HELDOUT_FILE.read_text(encoding="utf-8"))) == 10


def test_user_file_blank_lines_and_separator_lines(tmp_path):
    blank = tmp_path / "a.txt"
    blank.write_text("first one here\r\n\r\nsecond\n  \n\nthird line\nstill third\n")
    assert I.split_paragraphs(blank.read_text()) == ["first one here", "second", "third line\nstill third"]
    sep = tmp_path / "b.txt"
    sep.write_text("one\n\nstill one\n---\ntwo\n --- \n\n")
    assert I.split_paragraphs(sep.read_text()) == ["one\n\nstill one", "two"]
    tok = WithBos(word_tokenizer("first one here second third line still two"))
    inp = I.load_inputs(str(blank), tok)
    assert (
        inp.n_sequences == 3
        and inp.name == str(blank)
        and inp.source == f"{blank.name} (sha256 {I.file_sha256(blank)})"
    )


def test_truncation_keeps_whole_sequences_first(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(PARAS[:3]))
    tok = WithBos(word_tokenizer(" ".join(PARAS)))
    full = I.load_inputs(str(f), tok)
    per = [len(s) for s in full.sequences]  # 7 tokens each incl. BOS
    with pytest.warns(UserWarning, match="truncated"):
        cut = I.load_inputs(str(f), tok, max_tokens=per[0] + per[1] + 3)
    assert cut.truncated and cut.n_tokens == per[0] + per[1] + 3
    assert cut.sequences[:2] == full.sequences[:2] and cut.sequences[2] == full.sequences[2][:3]
    assert "2 whole sequence(s)" in cut.note and cut.texts[2] == "paragraph 2"
    with pytest.warns(UserWarning):
        exact = I.load_inputs(str(f), tok, max_tokens=per[0] + 1)  # room for BOS only: dropped
    assert exact.n_sequences == 1 and exact.n_tokens == per[0]
    assert I.load_inputs(str(f), tok, max_tokens=sum(per)).truncated is False


def test_unknown_spec_lists_presets():
    with pytest.raises(InputSpecError) as err:
        I.load_inputs("medium", word_tokenizer())
    msg = str(err.value)
    assert all(p in msg for p in ("'short'", "'routing'", "'long'", "hf:"))
    with pytest.raises(InputSpecError, match="max_tokens"):
        I.load_inputs("short", word_tokenizer(), max_tokens=0)


def test_parse_hf_spec():
    assert I.parse_hf_spec("hf:gsm8k:main:test") == ("gsm8k", "main", "test", None)
    assert I.parse_hf_spec("hf:wikitext:wikitext-103-raw-v1:test[:100]:text") == (
        "wikitext",
        "wikitext-103-raw-v1",
        "test[:100]",
        "text",
    )
    assert I.parse_hf_spec("hf:org/data:train") == ("org/data", None, "train", None)
    assert I.parse_hf_spec("hf:org/data::train:content") == ("org/data", None, "train", "content")
    with pytest.raises(InputSpecError):
        I.parse_hf_spec("hf:only")


def test_hf_without_datasets_package_is_offline_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(OfflineError, match="pip install"):
        I.load_inputs("hf:wikitext:test", word_tokenizer())


class FakeData(list):
    column_names = ["content", "id"]


def fake_datasets(monkeypatch, behaviour):
    mod = types.ModuleType("datasets")
    mod.load_dataset = behaviour
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_hf_offline_error(monkeypatch):
    def refuse(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    fake_datasets(monkeypatch, refuse)
    with pytest.raises(OfflineError, match="offline"):
        I.load_inputs("hf:some/data:train", word_tokenizer())


def test_hf_rows_become_sequences(monkeypatch):
    seen = {}

    def load(name, config, split):
        seen.update(name=name, config=config, split=split)
        return FakeData(
            [
                {"content": "paragraph 1 has", "id": 1},
                {"content": "  ", "id": 2},
                {"content": "words number 2", "id": 3},
            ]
        )

    fake_datasets(monkeypatch, load)
    tok = WithBos(word_tokenizer(" ".join(PARAS)))
    inp = I.load_inputs("hf:some/data::train[:3]:content", tok)
    assert seen == {"name": "some/data", "config": None, "split": "train[:3]"}
    assert inp.texts == ["paragraph 1 has", "words number 2"] and inp.n_tokens == 8
    with pytest.raises(InputSpecError, match="no 'text' column"):
        I.load_inputs("hf:some/data:train", tok)


def test_hugging_face_tokenizer_gets_bos_prepended():
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), bos_token="<s>", unk_token="<unk>")
    inp = I.load_inputs("short", hf)
    assert inp.sequences[0][0] == hf.bos_token_id and inp.n_tokens == 7
    assert hf.convert_ids_to_tokens(inp.sequences[0][1:]) == I.SHORT_PROMPT.split()


def test_fit_context_splits_long_sequences_into_windows_with_bos():
    from moe_utils.engine.inputs import Inputs, fit_context

    seq = [1] + list(range(10, 30))  # BOS + 20 tokens
    inp = Inputs(name="x", sequences=[seq, [1, 5, 6]], texts=["long", "short"])
    out = fit_context(inp, max_len=8, bos_id=1)
    assert all(len(s) <= 8 for s in out.sequences)
    assert all(s[0] == 1 for s in out.sequences)
    body = [t for s in out.sequences[:-1] for t in s[1:]]
    assert body == list(range(10, 30))  # nothing lost, nothing repeated
    assert out.sequences[-1] == [1, 5, 6]
    assert "split" in out.note
    assert fit_context(inp, max_len=64, bos_id=1) is inp
