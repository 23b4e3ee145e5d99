"""A prompt + new tokens past the model's trained context (model.max_seq_len) warns once with the numbers, in
both cache modes; --strict-context (strict_context=True) refuses it."""

import warnings

import pytest
import torch

from lrkv.config import ModelConfig
from lrkv.export import save_export
from lrkv.generate import main
from lrkv.inference.generator import ContextLengthWarning, GenerateError, Generator
from lrkv.inference.sparse import SparseConfig
from lrkv.model import Transformer
from lrkv.tokenizer import train_tokenizer

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
LIMIT = 32


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctx")
    train_tokenizer([TEXT], vocab_size=300, max_chars=len(TEXT)).save(str(root / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=320, n_layer=1, d_model=64, n_head=2, head_dim=32, rank_k=4, rank_v=4, ffn_dim=96,
                      max_seq_len=LIMIT)
    torch.manual_seed(0)
    return save_export(Transformer(cfg).state_dict(), cfg, root / "export", root / "tokenizer.json")


@pytest.mark.parametrize("cache", ["full", "lrqk"])
def test_past_max_seq_len_warns_once_with_the_numbers(export, cache):
    gen = Generator.from_checkpoint(export, cache=cache, lrqk=SparseConfig(top_k=8, recent=8).tuned(rank=8))
    prompt = next(TEXT[:i] for i in range(len(TEXT)) if len(gen.tokenizer.encode(TEXT[:i]).ids) == LIMIT - 8)
    n = len(gen.tokenizer.encode(prompt).ids)
    assert n < LIMIT < n + 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen.generate([prompt], max_new_tokens=LIMIT - n)  # exactly fills the context: fine
        assert caught == []
        gen.generate([prompt, "To"], max_new_tokens=20)
        gen.generate([prompt], max_new_tokens=20)
    assert [str(w.message) for w in caught] == [f"prompt {n} + 20 new tokens > max_seq_len {LIMIT}: positions past "
                                                f"{LIMIT} were never trained"]
    assert caught[0].category is ContextLengthWarning
    strict = Generator.from_checkpoint(export, cache=cache, lrqk=SparseConfig(top_k=8, recent=8).tuned(rank=8),
                                       strict_context=True)
    with pytest.raises(GenerateError, match=rf"prompt {n} \+ 20 new tokens > max_seq_len {LIMIT}"):
        strict.generate([prompt], max_new_tokens=20)


def test_cli_warns_on_one_line_and_strict_context_refuses(export, capsys):
    prompt = TEXT[:200]
    assert main(["--checkpoint", str(export), "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(prompt)
    assert [line.split(" + ")[1] for line in captured.err.splitlines()] == ["4 new tokens > max_seq_len 32: positions "
                                                                           "past 32 were never trained"]
    assert captured.err.startswith("warning: prompt ")
    assert main(["--checkpoint", str(export), "--prompt", prompt, "--max-new-tokens", "4", "--strict-context"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: prompt ") and err[0].endswith("refused (strict context)")
