"""Byte-level BPE tokenizer of the model organisms (trained with the ``tokenizers`` library).

Vocabulary 4096: large enough that common English words and Python keywords are single tokens
(about 3.3 characters per token on the held-out split), small enough that the tied embedding matrix
(4096 x 128 = 0.5 M parameters) stays a minor share of each model. ``<s>`` is prepended by the
post-processor, as in Llama/Mistral tokenizers, so the paper's short prompt
``<s> As an open source alternative to`` is reproduced by encoding the plain sentence.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
DEFAULT_VOCAB_SIZE = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts`` (deterministic for fixed input)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def wrap_tokenizer(tok, model_max_length: int = 256):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with the special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok, folder: Path, model_max_length: int = 256) -> None:
    """Save so that ``AutoTokenizer.from_pretrained(folder)`` loads it (tokenizer.json + config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wrap_tokenizer(tok, model_max_length).save_pretrained(str(folder))


def load_zoo_tokenizer(folder: Path):
    """Load a saved zoo tokenizer with ``AutoTokenizer`` (no remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
