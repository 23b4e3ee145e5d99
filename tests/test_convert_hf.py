"""HF -> lrkv conversion checked against transformers itself: tiny random Llama / Qwen2 models built from
configs here (offline), saved, converted, and decoded by both implementations."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lrkv.convert_hf import ConvertError, convert, hf_model_config
from lrkv.export import load_export
from lrkv.inference.sparse import SparseConfig, SparseDecoder

VOCAB, PROMPT, STEPS = 128, 12, 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # head_dim 32, theta 5e5: low, medium and high bands all occur
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-5, attn_implementation="eager")


def llama_config():
    # GQA 4/2, head_dim 32 != hidden/heads, llama3 rope scaling, untied
    return LlamaConfig(**COMMON, num_key_value_heads=2, head_dim=32, rope_theta=5e5, rope_scaling=LLAMA3_ROPE,
                       tie_word_embeddings=False)


def qwen2_config():
    # q/k/v biases, tied embeddings, 4 query heads on 1 KV head
    return Qwen2Config(**COMMON, num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=True)


def random_hf_model(config, seed: int = 0):
    """A transformers model with every parameter random (HF zero-inits biases and sets norms to one)."""
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if isinstance(config, LlamaConfig) else Qwen2ForCausalLM)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "llama_sharded", "qwen2"])
def pair(request, tmp_path_factory):
    """(HF model, our converted model) for one checkpoint flavour."""
    config = llama_config() if request.param.startswith("llama") else qwen2_config()
    hf = random_hf_model(config)
    src, out = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("lrkv") / "export"
    shard = {"max_shard_size": "40KB"} if request.param.endswith("sharded") else {}
    hf.save_pretrained(src, **shard)
    if shard:  # the parts of a fused tensor must really sit in different files
        files = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        assert len({files[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"}) > 1
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m }}{% endfor %}"}))
    convert(src, out)
    for kept in ("generation_config.json", "tokenizer_config.json"):  # eos ids for generate; the chat template
        assert json.loads((out / kept).read_text()) == json.loads((src / kept).read_text())
    return hf, load_export(out)


def test_logits_and_greedy_decode_match_transformers(pair):
    hf, ours = pair
    torch.manual_seed(1)
    seq = torch.randint(0, VOCAB, (1, PROMPT))
    cache = ours.new_cache()
    errors = []
    with torch.no_grad():
        ref = hf(seq).logits
        got = ours(seq, cache=cache)
        errors.append((got - ref).abs().max().item())
        for _ in range(STEPS):  # HF recomputes the whole sequence; ours decodes one token from its KV cache
            token = ref[:, -1:].argmax(-1)
            assert token.item() == got[:, -1:].argmax(-1).item()
            seq = torch.cat((seq, token), dim=1)
            ref = hf(seq).logits
            got = ours(token, cache=cache)
            errors.append((got[:, -1] - ref[:, -1]).abs().max().item())
    print(f"\n{type(hf).__name__}: max |logit error| over prompt + {STEPS} steps = {max(errors):.2e}")
    assert max(errors) < 1e-5


def test_dtype_kept_or_cast(tmp_path):
    hf = random_hf_model(qwen2_config()).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    for dtype, expected in ((None, torch.bfloat16), (torch.float32, torch.float32)):
        out = tmp_path / f"out_{expected}"
        convert(tmp_path / "hf", out, dtype)
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {expected}
            assert "lm_head.weight" not in f.keys()  # tied: stored once, as embed.weight


def test_transformers4_and_5_rope_spellings_agree():
    v5 = llama_config().to_dict() | {"architectures": ["LlamaForCausalLM"]}
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = 5e5
    v4["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"} | {"type": "llama3"}
    assert hf_model_config(v4) == hf_model_config(v5)
    assert hf_model_config(v5).rope_scaling["factor"] == 8.0 and hf_model_config(v5).rope_theta == 5e5


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf_llama")
    random_hf_model(llama_config()).save_pretrained(src)
    return src


@pytest.mark.parametrize("edit, field", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architectures"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 24}, "model.head_dim"),
])
def test_unsupported_configs_are_refused_naming_the_field(llama_folder, tmp_path, edit, field):
    src = tmp_path / "src"
    shutil.copytree(llama_folder, src)
    config = json.loads((src / "config.json").read_text()) | edit
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match=field.replace(".", r"\.")):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensors_and_shards_are_named(llama_folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(llama_folder, src)
    weights = load_file(str(src / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(ConvertError, match=r"fused tensor 'layers\.1\.attn\.qkv\.weight'"):
        convert(src, tmp_path / "out")
    index = {"weight_map": {"x": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="model-00002-of-00002.safetensors"):
        convert(src, tmp_path / "out")


def test_chat_template_saved_beside_as_jinja_lands_in_tokenizer_config(llama_folder, tmp_path):
    src = tmp_path / "src"  # transformers 5's save_pretrained keeps the template in chat_template.jinja
    shutil.copytree(llama_folder, src)
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    (src / "chat_template.jinja").write_text(template)
    convert(src, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {
        "eos_token": "<|im_end|>", "chat_template": template}


def test_refuses_to_overwrite_a_folder_that_is_not_an_export(llama_folder, tmp_path):
    with pytest.raises(ConvertError, match="not an lrkv export folder"):
        convert(llama_folder, llama_folder)
    assert (llama_folder / "model.safetensors").is_file()


def test_lrqk_with_every_token_resident_decodes_like_full_cache(llama_folder, tmp_path):
    convert(llama_folder, tmp_path / "out")
    model = load_export(tmp_path / "out")
    torch.manual_seed(2)
    prompt = torch.randint(0, VOCAB, (1, PROMPT))
    recent = 4  # top_k + recent == the final length: every token stays resident, just
    decoder = SparseDecoder(model, SparseConfig(top_k=PROMPT + STEPS - recent, recent=recent).tuned(rank=8))
    cache = model.new_cache()
    with torch.no_grad():
        full, sparse = model(prompt, cache=cache)[:, -1], decoder.prefill(prompt)[:, -1]
        full_tokens, sparse_tokens = [], []
        for _ in range(STEPS):
            full_tokens.append(full.argmax(-1, keepdim=True))
            sparse_tokens.append(sparse.argmax(-1, keepdim=True))
            full = model(full_tokens[-1], cache=cache)[:, -1]
            sparse = decoder.step(sparse_tokens[-1])[:, -1]
    assert torch.cat(sparse_tokens, 1).tolist() == torch.cat(full_tokens, 1).tolist()
    torch.testing.assert_close(sparse, full, rtol=0, atol=1e-4)
