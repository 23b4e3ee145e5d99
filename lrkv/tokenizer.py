"""Byte-level BPE tokenizer (HF `tokenizers`), trained on the corpus or loaded from a tokenizer.json.

Byte-level means every string round-trips and no token is unknown; `<|endoftext|>` is the one special token,
used as the separator between packed documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + EOS


class TokenizerError(ValueError):
    """A tokenizer file that cannot serve this model; the message names the file."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (EOS included) on at most `max_chars` characters of `texts`."""
    if vocab_size < MIN_VOCAB:
        raise TokenizerError(f"model.vocab_size={vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_take_chars(texts, max_chars), trainer=trainer)
    return tok


def _take_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def load_tokenizer(path: str | Path, vocab_size: int, require_eos: bool = True) -> Tokenizer:
    """Load a tokenizer.json, as transformers uses it, and check it fits a model with `vocab_size` embeddings and
    (for training, where it separates packed documents) has the EOS token."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from e
    # save_pretrained keeps the truncation/padding of the last transformers call; transformers resets both on every
    # call, and kept here they would cut a prompt or document to max_length or pad a short one with EOS
    tok.no_truncation()
    tok.no_padding()
    n = tok.get_vocab_size()
    if n > vocab_size:
        raise TokenizerError(f"{path}: tokenizer has {n} tokens but model.vocab_size is {vocab_size}; "
                             f"set --model.vocab_size={n} or use a matching tokenizer")
    if require_eos and tok.token_to_id(EOS) is None:
        raise TokenizerError(f"{path}: tokenizer has no '{EOS}' token (needed as the document separator)")
    return tok


def eos_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOS)
