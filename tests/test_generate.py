"""Generation over export folders (lrkv.inference.generator, python -m lrkv.generate): tiny random models saved
with save_export plus a byte-level BPE trained here, checked against independent full-forward loops."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrkv.config import ModelConfig, validate_model
from lrkv.export import save_export
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from lrkv.generate import sparse_config, main, parse_args
from lrkv.inference import generator
from lrkv.inference.generator import GenerateError, Generator, Sampling, _settled, filter_logits, next_tokens
from lrkv.inference.sparse import SparseConfig
from lrkv.model import Transformer
from lrkv.tokenizer import EOS, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are all "
        "resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius "
        "Marcius is chief enemy to the people. All: We know't, we know't. ") * 20
PROMPTS = ["First Citizen:", "All: Speak, speak. You", "We"]


def tiny(attn: str) -> ModelConfig:
    cfg = ModelConfig(attn=attn, vocab_size=320, n_layer=2, d_model=64, n_head=4, head_dim=16, rank_k=4, rank_v=6,
                      n_kv_head=2 if attn == "gqa" else None, ffn_dim=96, lrkv_b_init="normal",
                      init_std=0.2)  # large init: peaked logits, so argmax never hinges on float noise
    validate_model(cfg)
    return cfg


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([TEXT], vocab_size=300, max_chars=len(TEXT)).save(str(path))
    return path


def make_export(root: Path, tokenizer_file: Path, attn: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = tiny(attn)
    return save_export(Transformer(cfg).state_dict(), cfg, root / f"{attn}-{seed}", tokenizer_file)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_file) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {attn: make_export(root, tokenizer_file, attn) for attn in ("lrkv", "gqa")}


def reference_greedy(model: Transformer, ids: list[int], n: int, stop: set[int]) -> list[int]:
    """Independent greedy loop: one full forward over the whole sequence per token, no cache, no padding."""
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(t)
            out.append(t)
            if t in stop:
                break
    return out


@pytest.mark.parametrize("attn", ["lrkv", "gqa"])
def test_greedy_equals_full_forward_loop_and_batching_equals_alone(exports, attn):
    gen = Generator.from_checkpoint(exports[attn])
    batched = gen.generate(PROMPTS, max_new_tokens=12)
    for prompt, c in zip(PROMPTS, batched):
        expected = reference_greedy(gen.model, gen.encode(prompt), 12, set(gen.eos))
        assert c.tokens == expected
        assert gen.generate([prompt], max_new_tokens=12)[0] == c
        assert c.finish_reason == ("stop" if expected[-1] in gen.eos else "length")
    assert gen.timing["prefill_tokens"] == len(gen.encode(PROMPTS[-1]))
    assert gen.decoder.stats.steps == gen.timing["decode_tokens"] == 11


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(filter_logits(logits, top_k=3)).tolist() == [[True, True, True, False]]
    # nucleus = smallest prefix holding >= top_p of the mass
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).tolist() == [[True, False, False, False]]


def test_sampling_frequencies_match_an_independent_computation():
    torch.manual_seed(0)
    logits = torch.randn(50) * 2
    s = Sampling(temperature=0.7, top_k=20, top_p=0.9, seed=3)
    # independent: softmax(l / T), keep the top 20, renormalise, keep the smallest prefix holding >= 0.9
    p = (logits / 0.7).softmax(-1)
    order = p.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    top20 = p[order[:20]].sum().item()
    for i in order[:20]:
        if mass >= 0.9:
            break
        kept.append(i)
        mass += p[i].item() / top20
    expected = torch.zeros(50)
    expected[kept] = p[kept] / p[kept].sum()
    n = 40_000
    draws = next_tokens(logits.expand(n, 50), s, torch.Generator().manual_seed(s.seed))
    freq = torch.bincount(draws, minlength=50).float() / n
    assert set(draws.unique().tolist()) <= set(kept)  # filtered tokens are never drawn
    assert (freq - expected).abs().max() < 0.015
    again = next_tokens(logits.expand(n, 50), s, torch.Generator().manual_seed(s.seed))
    assert torch.equal(draws, again)


def test_sampling_end_to_end_seeded_and_tiny_top_p_is_greedy(exports):
    gen = Generator.from_checkpoint(exports["lrkv"])
    greedy = gen.generate(PROMPTS, max_new_tokens=10)
    nucleus = gen.generate(PROMPTS, max_new_tokens=10, sampling=Sampling(temperature=1.0, top_p=1e-6, seed=1))
    assert [c.tokens for c in nucleus] == [c.tokens for c in greedy]
    hot = Sampling(temperature=3.0, seed=7)
    a = gen.generate(PROMPTS, max_new_tokens=10, sampling=hot)
    assert a == gen.generate(PROMPTS, max_new_tokens=10, sampling=hot)
    assert a != gen.generate(PROMPTS, max_new_tokens=10, sampling=Sampling(temperature=3.0, seed=8))
    with pytest.raises(GenerateError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_stop_ids_and_stop_strings_end_rows(exports):
    gen = Generator.from_checkpoint(exports["lrkv"])
    assert gen.eos == [gen.tokenizer.token_to_id(EOS)]
    full = gen.generate(PROMPTS, max_new_tokens=16)
    stop_id = full[0].tokens[3]
    out = gen.generate(PROMPTS, max_new_tokens=16, stop_ids=[stop_id])
    for f, o in zip(full, out):
        cut = f.tokens.index(stop_id) + 1 if stop_id in f.tokens else len(f.tokens)
        assert o.tokens == f.tokens[:cut]  # finished rows stop growing, the others run on unchanged
        assert o.finish_reason == ("stop" if stop_id in f.tokens else f.finish_reason)
        assert o.text == gen.tokenizer.decode(o.tokens[:-1] if o.finish_reason == "stop" else o.tokens)
    text = full[1].text
    stop = text[4:6]
    s = gen.generate([PROMPTS[1]], max_new_tokens=16, stop=[stop])[0]
    assert s.finish_reason == "stop" and s.text == text[: text.find(stop)]
    assert s.tokens == full[1].tokens[: len(s.tokens)] and len(s.tokens) < 16


def test_generation_config_eos_ids_are_stop_tokens(exports, tmp_path, tokenizer_file):
    out = make_export(tmp_path, tokenizer_file, "lrkv")
    gen = Generator.from_checkpoint(out)
    first = gen.generate([PROMPTS[0]], max_new_tokens=8)[0].tokens
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [first[2], 5]}))
    gen = Generator.from_checkpoint(out)
    assert gen.eos == sorted({gen.tokenizer.token_to_id(EOS), first[2], 5})
    assert gen.generate([PROMPTS[0]], max_new_tokens=8)[0].tokens == first[: first.index(first[2]) + 1]


def test_tokenizer_saved_with_truncation_and_padding_encodes_prompts_whole(exports, tmp_path, tokenizer_file):
    """open_export (lrkv.generate, eval.perplexity, eval.ruler) drops the truncation/padding a saved tokenizer kept."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    saved = tmp_path / "tokenizer.json"
    tok.enable_truncation(max_length=64)
    tok.enable_padding(length=32, pad_id=tok.token_to_id(EOS), pad_token=EOS)
    tok.save(str(saved))
    assert json.loads(saved.read_text())["truncation"] is not None
    gen = Generator.from_checkpoint(make_export(tmp_path, saved, "lrkv"))
    clean = Tokenizer.from_file(str(tokenizer_file))
    assert gen.encode(TEXT) == clean.encode(TEXT).ids and len(clean.encode(TEXT).ids) > 64
    expected = Generator.from_checkpoint(exports["lrkv"]).generate([PROMPTS[0]], max_new_tokens=8)[0].tokens
    assert gen.generate([PROMPTS[0]], max_new_tokens=8)[0].tokens == expected


def test_streaming_yields_the_same_tokens_and_text(exports):
    gen = Generator.from_checkpoint(exports["lrkv"])
    kw = dict(max_new_tokens=14, sampling=Sampling(temperature=1.5, top_k=30, seed=5), stop=["ee", "k,"])
    whole = gen.generate(PROMPTS, **kw)
    tokens, texts, done = [[] for _ in PROMPTS], [""] * 3, set()
    for deltas in gen.stream(PROMPTS, **kw):
        assert not done & {d.row for d in deltas}  # a finished row yields nothing more
        for d in deltas:
            tokens[d.row].append(d.token)
            texts[d.row] += d.text
            if d.finish_reason:
                done.add(d.row)
    assert done == {0, 1, 2}
    assert tokens == [c.tokens for c in whole] and texts == [c.text for c in whole]


def test_stream_holds_back_partial_characters_and_possible_stop_prefixes():
    assert _settled("abc\ufffd\ufffd", []) == "abc"
    assert _settled("to be or no", ["not", "x"]) == "to be or "
    assert _settled("to be or n", ["not"]) == "to be or "
    assert _settled("to be", ["not"]) == "to be"


MULTIBYTE = "Café naïve – 🎉🙂 日本語, ok. "  # outside the tokenizer's ASCII corpus: one token per UTF-8 byte


class Scripted:
    """Stands in for the model's decoder: greedy decoding then yields `ids`, one per step, for one row."""

    def __init__(self, ids: list[int], vocab: int):
        self.ids, self.vocab, self.stats = list(ids), vocab, {}

    def prefill(self, idx, valid=None, logits_to_keep=1):
        return self.step(idx)

    def step(self, tokens):
        logits = torch.full((1, 1, self.vocab), float("-inf"))
        logits[0, 0, self.ids.pop(0)] = 0.0
        return logits


def scripted(gen: Generator, ids: list[int]) -> Generator:
    gen.new_decoder = lambda max_context: Scripted(ids, gen.model.cfg.vocab_size)
    return gen


def test_streamed_pieces_are_the_full_decode_with_characters_split_across_tokens(exports):
    gen = Generator.from_checkpoint(exports["lrkv"])
    ids = gen.tokenizer.encode(MULTIBYTE).ids
    assert sum(gen.tokenizer.decode([t]) == "\ufffd" for t in ids) >= 10  # many tokens are parts of a character
    pieces = [d.text for deltas in scripted(gen, ids).stream(["We"], len(ids)) for d in deltas]
    assert len(pieces) == len(ids) and "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)  # a character shows once whole, never as its bytes
    stop = "🙂 日"  # multi-byte characters over several tokens
    deltas = [d for ds in scripted(gen, ids).stream(["We"], len(ids), stop=[stop]) for d in ds]
    assert "".join(d.text for d in deltas) == MULTIBYTE[: MULTIBYTE.index(stop)]
    assert deltas[-1].finish_reason == "stop" and len(deltas) < len(ids)


def test_streaming_decodes_each_token_once_however_long_the_text(exports, monkeypatch):
    """The old stream decoded the whole continuation per token (quadratic); now each token goes to DecodeStream once,
    alone, and nothing else is decoded."""
    gen = Generator.from_checkpoint(exports["lrkv"])
    real, stepped, decoded = gen.tokenizer, [], []

    class CountingTokenizer:
        def decode(self, ids, **kwargs):
            decoded.extend(ids)
            return real.decode(ids, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    class CountingStream:
        def __init__(self, **kwargs):
            self.inner = DecodeStream(**kwargs)

        def step(self, tokenizer, token):
            stepped.append(token)
            return self.inner.step(real, token)

    monkeypatch.setattr(generator, "DecodeStream", CountingStream)
    gen.tokenizer = CountingTokenizer()
    ids = real.encode(MULTIBYTE * 6).ids  # 240 tokens, within max_seq_len
    out = scripted(gen, ids).generate(["We"], len(ids))[0]
    assert out.text == MULTIBYTE * 6 and out.tokens == ids
    assert stepped == ids and decoded == []


@pytest.mark.parametrize("attn, tail", [("lrkv", 1), ("gqa", 0)])
def test_lrqk_with_everything_resident_gives_the_full_tokens(exports, attn, tail):
    full = Generator.from_checkpoint(exports[attn])
    cfg = SparseConfig(top_k=32, recent=16, sparse_query_tail=tail).tuned(rank=8)  # top_k + recent >= every context here
    lrqk = Generator.from_checkpoint(exports[attn], cache="lrqk", lrqk=cfg)
    assert [c.tokens for c in lrqk.generate(PROMPTS, max_new_tokens=16)] == \
        [c.tokens for c in full.generate(PROMPTS, max_new_tokens=16)]
    stats = lrqk.decoder.stats
    assert stats.steps == 15 + tail and stats.hits + stats.misses == stats.selections


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lrkv.generate", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_cli_prints_text_memory_plan_and_stats(exports):
    expected = Generator.from_checkpoint(exports["lrkv"]).generate(PROMPTS[:2], max_new_tokens=8)
    r = run_cli("--checkpoint", str(exports["lrkv"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                "--max-new-tokens", "8", "--cache", "lrqk", "--top-k", "32", "--recent", "16", "--rank", "8",
                "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"[{i}] {p}{c.text}\n" for i, (p, c) in enumerate(zip(PROMPTS, expected)))
    assert "[memory plan]" in r.stderr and "hit rate" in r.stderr and "bytes moved CPU->GPU" in r.stderr
    assert "tok/s" in r.stderr and "Traceback" not in r.stderr


def test_loading_and_generating_imports_neither_lightning_nor_deepspeed(exports):
    code = ("import sys; from lrkv.generate import main; "
            f"assert main(['--checkpoint', {str(exports['lrkv'])!r}, '--prompt', 'We', '--max-new-tokens', '3', "
            "'--stream']) == 0; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'deepspeed')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("We")


def test_bad_checkpoint_is_one_error_line_exit_2(tmp_path):
    r = run_cli("--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no config.json; not an lrkv export folder"]


def _error(capsys, *argv: str) -> list[str]:
    """Run the CLI in-process; it must exit 2 with stderr ending in one `error:` line. Returns stderr's lines."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and sum(line.startswith("error: ") for line in err) == 1
    return err


def test_corrupt_or_mismatched_checkpoints_are_refused(tmp_path, tokenizer_file, capsys):
    out = make_export(tmp_path, tokenizer_file, "lrkv")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "d_model": 128}))
    assert "has shape" in _error(capsys, "--checkpoint", str(out), "--prompt", "x")[-1]
    (out / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    assert "n_layers" in _error(capsys, "--checkpoint", str(out), "--prompt", "x")[-1]
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:100])
    assert "cannot read safetensors" in _error(capsys, "--checkpoint", str(out), "--prompt", "x")[-1]
    out = make_export(tmp_path, tokenizer_file, "gqa")
    (out / "tokenizer.json").unlink()
    assert "no tokenizer.json" in _error(capsys, "--checkpoint", str(out), "--prompt", "x")[-1]
    (out / "tokenizer.json").write_text("{not json")
    assert "not a valid tokenizer.json" in _error(capsys, "--checkpoint", str(out), "--prompt", "x")[-1]


def test_memory_plan_that_does_not_fit_is_refused(exports, capsys):
    plan, err = _error(capsys, "--checkpoint", str(exports["lrkv"]), "--prompt", "We", "--cache", "lrqk",
                       "--rank", "8", "--max-new-tokens", str(10**12))
    assert plan.startswith("[memory plan] sparse memory plan: CPU") and "GPU" in plan
    assert "sparse decoder plan needs" in err and "are free" in err


def test_cli_sparse_flags_preset_overrides_and_full_cache_refusal(exports, capsys):
    args = parse_args(["--checkpoint", "x", "--prompt", "p", "--cache", "lrqk", "--lrqk-preset", "memory",
                       "--top-k", "100", "--sparse-query-tail", "3"])
    assert sparse_config(args) == SparseConfig(top_k=100, recent=32, sparse_query_tail=3).tuned(rank=16)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(exports["lrkv"]), "--prompt", "We", "--top-k", "8"])
    assert e.value.code == 2 and "only apply to --cache lrqk" in capsys.readouterr().err


def test_chat_wraps_each_prompt_in_the_exports_template(tmp_path, tokenizer_file, capsys):
    """--chat renders the export's chat template (transformers' jinja2 machinery) around each prompt and prints only
    the reply, which is what greedy decoding of the rendered prompt gives; an export without a template is one
    clear error."""
    from lrkv.export import open_export

    out = make_export(tmp_path, tokenizer_file, "gqa")
    assert "no chat_template" in _error(capsys, "--checkpoint", str(out), "--prompt", "x", "--chat")[-1]
    cfg_file = out / "tokenizer_config.json"
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "chat_template": template}))
    assert open_export(out).chat_prompt("ROMEO?") == "[user] ROMEO?\n[assistant] "
    expected = Generator.from_checkpoint(out).generate(["[user] ROMEO?\n[assistant] "], max_new_tokens=6)[0].text
    assert main(["--checkpoint", str(out), "--prompt", "ROMEO?", "--chat", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"
