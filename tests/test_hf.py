"""An export folder loads with transformers' Auto classes (trust_remote_code) and matches lrkv.export.load_export."""

import importlib.util
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lrkv.config import ModelConfig  # noqa: E402
from lrkv.export import ExportError, load_export, model_state_dict, remote_code, save_export  # noqa: E402
from lrkv.model import Transformer  # noqa: E402
from lrkv.tokenizer import EOS, train_tokenizer  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def export(tmp_path, tie: bool, tokenizer: bool = False):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, n_layer=2, d_model=64, n_head=4, rank_k=6, rank_v=12, ffn_dim=96,
                      lrkv_b_init="normal", max_seq_len=64, tie_embeddings=tie, rope_scaling=LLAMA3)
    tok_file = None
    if tokenizer:
        tok_file = tmp_path / "tok.json"
        train_tokenizer(["to be or not to be, that is the question"] * 20, cfg.vocab_size, 10_000).save(str(tok_file))
    return save_export(model_state_dict(Transformer(cfg)), cfg, tmp_path / f"export_tie{int(tie)}", tok_file)


@pytest.mark.parametrize("tie", [False, True])
def test_auto_model_gives_the_same_logits(tmp_path, tie):
    folder = export(tmp_path, tie)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_lrkv.LRKVForCausalLM"
    ref = load_export(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert hf.config.lrkv_model["rope_scaling"] == LLAMA3 and hf.config.tie_word_embeddings == tie
    x = torch.randint(0, 300, (2, 13))
    valid = torch.ones_like(x)
    valid[1, :5] = 0  # left padding
    with torch.no_grad():
        assert (hf(x).logits - ref(x)).abs().max().item() <= 1e-6
        assert (hf(x, attention_mask=valid).logits - ref(x, valid=valid.bool())).abs().max().item() <= 1e-6
        labels = x.clone()
        loss = ref(x[:, :-1], targets=x[:, 1:])
        assert abs(hf(x, labels=labels).loss.item() - loss.item()) <= 1e-6


def test_generate_matches_greedy_decoding(tmp_path):
    """HF generate, with lrkv's cache and without, against greedy decoding of the export."""
    folder = export(tmp_path, tie=False)
    ref = load_export(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    x = torch.randint(0, 300, (2, 7))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    cached = hf.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    uncached = hf.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    seq, valid = x, mask.bool()
    with torch.no_grad():
        for _ in range(5):
            nxt = ref(seq, valid=valid)[:, -1].argmax(-1, keepdim=True)
            seq, valid = torch.cat((seq, nxt), 1), torch.cat((valid, torch.ones_like(nxt, dtype=torch.bool)), 1)
    assert torch.equal(cached, seq) and torch.equal(uncached, seq)


def test_auto_tokenizer_loads_from_the_export(tmp_path):
    folder = export(tmp_path, tie=True, tokenizer=True)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert tok.eos_token == EOS and tok.eos_token_id == tok.convert_tokens_to_ids(EOS)
    ids = tok("to be or not").input_ids
    assert tok.decode(ids) == "to be or not"
    assert tok.model_max_length == 64


def test_lm_eval_hflm_scores_the_export(tmp_path):
    """lm-evaluation-harness's `--model hf` wrapper: loglikelihoods equal the export's own log-softmax sums."""
    pytest.importorskip("lm_eval.models.huggingface", reason="lm_eval is not installed")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder = export(tmp_path, tie=False, tokenizer=True)
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, device="cpu", batch_size=2)
    assert lm.max_length == 64
    requests = [("to be or", " not to be"), ("that is", " the question")]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    ref, tok = load_export(folder), AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    for (context, cont), (score, _) in zip(requests, scores):
        c, x = tok(context).input_ids, tok(cont).input_ids
        with torch.no_grad():
            logp = ref(torch.tensor([c + x])).log_softmax(-1)[0]
        assert abs(score - sum(logp[len(c) - 1 + i, t].item() for i, t in enumerate(x))) <= 1e-5


def fed_lengths(hf):
    """Record the number of tokens each forward embeds (the embedding runs once per forward, in any version)."""
    lengths = []
    hf.get_input_embeddings().register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    return lengths


def test_generate_feeds_one_token_per_step(tmp_path):
    """With the cache, every step after the prompt embeds exactly the one new token (not the whole sequence)."""
    hf = AutoModelForCausalLM.from_pretrained(export(tmp_path, tie=False), trust_remote_code=True).eval()
    lengths = fed_lengths(hf)
    x = torch.randint(0, 300, (2, 7))
    hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert lengths == [7, 1, 1, 1, 1]
    lengths.clear()
    hf.generate(x, max_new_tokens=3, do_sample=True, top_k=20, num_return_sequences=2, pad_token_id=0)
    assert lengths == [7, 1, 1]


@pytest.mark.parametrize("kwargs, uncached",
                         [({"num_beams": 3}, {"num_beams": 3}), ({"prompt_lookup_num_tokens": 2}, {})],
                         ids=["beam_search_reorders", "prompt_lookup_crops"])
def test_cache_serves_beam_search_and_candidate_decoding(tmp_path, kwargs, uncached):
    """Beam search (reorder_cache) with the cache gives the beams it gives without one; prompt-lookup decoding
    (which crops the cache after rejected candidates) gives plain greedy decoding's tokens."""
    hf = AutoModelForCausalLM.from_pretrained(export(tmp_path, tie=False), trust_remote_code=True).eval()
    torch.manual_seed(1)
    x = torch.randint(0, 20, (1, 12))  # a small alphabet: repeated n-grams give prompt lookup candidates
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(x, **gen, **kwargs), hf.generate(x, use_cache=False, **gen, **uncached))


def test_export_has_eos_pad_and_dtype_for_transformers(tmp_path):
    cfg_folder = export(tmp_path, tie=False, tokenizer=True)
    tok = AutoTokenizer.from_pretrained(cfg_folder, trust_remote_code=True)
    eos = tok.convert_tokens_to_ids(EOS)
    assert tok.eos_token == tok.pad_token == tok.bos_token == EOS
    batch = tok(["to be", "or not to be that"], padding=True, return_tensors="pt")  # needs a pad token
    assert batch.input_ids.shape[0] == 2 and batch.attention_mask[0].sum() < batch.attention_mask[1].sum()
    hf = AutoModelForCausalLM.from_pretrained(cfg_folder, trust_remote_code=True)
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == hf.generation_config.pad_token_id == eos
    from transformers import pipeline

    pipe = pipeline("text-generation", model=hf, tokenizer=tok, batch_size=2)
    out = pipe(["to be", "or not to be that"], max_new_tokens=3, do_sample=False)
    assert all(o[0]["generated_text"].startswith(p) for o, p in zip(out, ["to be", "or not to be that"]))

    bf16 = tmp_path / "bf16"
    weights = {k: v.to(torch.bfloat16) for k, v in load_export(cfg_folder).state_dict().items()}
    save_export(weights, load_export(cfg_folder).cfg, bf16)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(bf16, trust_remote_code=True, dtype="auto").dtype == torch.bfloat16


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_folder_loads_with_load_export(tmp_path, tie):
    """A folder written by transformers from the loaded model (what a Trainer or peft leaves) is an export again;
    a key that is neither the model's nor transformers' is still refused by name."""
    hf = AutoModelForCausalLM.from_pretrained(export(tmp_path, tie), trust_remote_code=True).eval()
    with torch.no_grad():
        hf.model.norm.weight.mul_(1.5)  # a change the round trip must carry
    hf.save_pretrained(tmp_path / "saved")
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(load_export(tmp_path / "saved")(x), hf(x).logits)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    (tmp_path / "saved" / "config.json").write_text(json.dumps({**config, "rank_q": 4}))
    with pytest.raises(ExportError, match="model.rank_q"):
        load_export(tmp_path / "saved")


@pytest.mark.parametrize("tie", [False, True])
def test_sharded_save_pretrained_folder_loads_with_load_export(tmp_path, tie, capsys):
    """save_pretrained(max_shard_size=...) writes model-0000i-of-0000n.safetensors and model.safetensors.index.json
    (each tensor's shard): load_export reads them, same logits; a missing shard is one error line naming it."""
    hf = AutoModelForCausalLM.from_pretrained(export(tmp_path, tie, tokenizer=True), trust_remote_code=True).eval()
    saved = tmp_path / "sharded"
    hf.save_pretrained(saved, max_shard_size="100KB")
    shards = sorted(saved.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (saved / "model.safetensors.index.json").is_file()
    assert not (saved / "model.safetensors").exists()
    (saved / "tokenizer.json").write_bytes((tmp_path / "tok.json").read_bytes())
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(load_export(saved)(x), hf(x).logits)
    shards[1].unlink()
    missing = f"shard {shards[1].name} listed in model.safetensors.index.json is missing (1 of {len(shards)}"
    with pytest.raises(ExportError, match=re.escape(missing)):
        load_export(saved)
    from lrkv.generate import main

    capsys.readouterr()  # transformers' loading progress, above
    assert main(["--checkpoint", str(saved), "--prompt", "to be"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {saved}: {missing} shards missing)"]


def test_hf_keys_cover_what_transformers_writes():
    """Every key PretrainedConfig writes for any model is one load_model_config knows to ignore."""
    from transformers import PretrainedConfig

    from lrkv.export import _HF_KEYS

    assert set(PretrainedConfig().to_dict()) <= _HF_KEYS


def load_remote_code(folder):
    """The export's modeling_lrkv.py as a module of its own (not lrkv's classes)."""
    spec = importlib.util.spec_from_file_location(f"modeling_lrkv_{folder.name}", folder / "modeling_lrkv.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("attn", ["lrkv", "mha", "gqa", "mqa", "mla"])
def test_standalone_remote_code_computes_what_lrkv_model_does(tmp_path, attn):
    """The export's modeling_lrkv.py is generated from the package (so it cannot drift) and, loaded on its own,
    gives lrkv.model.Transformer's logits: full, left-padded, and decoded step by step through its cache."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, n_layer=2, d_model=64, n_head=4, attn=attn,
                      n_kv_head=2 if attn == "gqa" else None,
                      rank_k=6, rank_v=12, mla_kv_rank=32, mla_rope_dim=8, ffn_dim=96, lrkv_b_init="normal",
                      max_seq_len=64, rope_scaling=LLAMA3)
    ref = Transformer(cfg).eval()
    folder = save_export(model_state_dict(ref), cfg, tmp_path / attn)
    assert (folder / "modeling_lrkv.py").read_text() == remote_code()
    remote = load_remote_code(folder)
    hf = remote.LRKVForCausalLM.from_pretrained(folder).eval()
    assert not isinstance(hf.model, Transformer)  # the file's own copy of the model
    x = torch.randint(0, 300, (2, 11))
    valid = torch.ones_like(x)
    valid[0, :4] = 0
    with torch.no_grad():
        full = ref(x, valid=valid.bool())
        assert (hf(x).logits - ref(x)).abs().max().item() <= 1e-5
        assert (hf(x, attention_mask=valid).logits - full).abs().max().item() <= 1e-5
        out = hf(x[:, :8], attention_mask=valid[:, :8], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        for t in range(8, 11):
            step = hf(x[:, t:t + 1], attention_mask=valid[:, :t + 1], cache=cache, use_cache=True).logits
            assert (step[:, 0] - full[:, t]).abs().max().item() <= 1e-5


def test_export_loads_and_generates_without_the_lrkv_package(tmp_path):
    """A hub user without lrkv: `import lrkv` fails in the subprocess, the Auto classes still load the export and
    generate what lrkv's own model decodes greedily."""
    folder = export(tmp_path, tie=True)
    x = torch.randint(0, 300, (1, 6))
    script = (f"import sys; sys.modules['lrkv'] = None\n"  # any import of lrkv now raises ImportError
              f"import torch\nfrom transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
              f"print(m.generate(torch.tensor({x.tolist()}), max_new_tokens=4, do_sample=False, pad_token_id=0)"
              f"[0].tolist())\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ref, seq = load_export(folder), x
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat((seq, ref(seq)[:, -1:].argmax(-1)), 1)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == seq[0].tolist()


def test_training_features_of_a_transformers_causal_lm(tmp_path):
    """inputs_embeds, output_hidden_states, AutoModel, gradient checkpointing and resize_token_embeddings behave as
    on a LLaMA-class model, checked against lrkv's own Transformer; output_attentions is refused by name."""
    from transformers import AutoModel

    folder = export(tmp_path, tie=False)
    ref = load_export(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="sdpa").eval()
    x = torch.randint(0, 300, (2, 9))
    seen = []  # each block's input, then the final norm's output, from the reference
    for layer in ref.layers:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    ref.norm.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        logits = ref(x)
        out = hf(inputs_embeds=hf.get_input_embeddings()(x), output_hidden_states=True)
        assert (out.logits - logits).abs().max().item() <= 1e-6
        assert len(out.hidden_states) == len(seen) == 3
        assert all((h - s).abs().max().item() <= 1e-6 for h, s in zip(out.hidden_states, seen))
        body = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert (body(x).last_hidden_state - seen[-1]).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="output_attentions"):
        hf(x, output_attentions=True)

    hf.train()
    def grads(model):
        model.zero_grad()
        model(x, labels=x).loss.backward()
        return [p.grad.clone() for p in model.parameters()]
    plain = grads(hf)
    calls, block = [], hf.model.layers[0]
    forward = block.forward  # counted by wrapping: torch's recomputation runs forward but not module hooks
    block.forward = lambda *args: (calls.append(1), forward(*args))[1]
    hf.gradient_checkpointing_enable()
    checkpointed = grads(hf)
    assert len(calls) == 2  # the forward is re-run in the backward: activations were not kept
    assert all((a - b).abs().max().item() <= 1e-6 for a, b in zip(plain, checkpointed))

    hf.eval().resize_token_embeddings(320)
    hf.save_pretrained(tmp_path / "resized")
    with torch.no_grad():
        assert hf(x).logits.shape[-1] == 320
        assert torch.equal(load_export(tmp_path / "resized")(x), hf(x).logits)


TASKS = {  # lm-evaluation-harness task configs over local files: the three request types it has
    "lrkv_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
    "lrkv_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": "word_perplexity"}]},
    "lrkv_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{text}}",
                 "generation_kwargs": {"until": ["\n"], "max_gen_toks": 5, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}
DOCS = [{"question": "to be or not", "choices": [" to be", " the question"], "label": 0,
         "text": "that is the question"},
        {"question": "that is", "choices": [" the question", " not"], "label": 0, "text": "to be, or not to be"},
        {"question": "not to", "choices": [" be", " that"], "label": 1, "text": "be or not, that is"}]


def run_lm_eval(model_dir, tmp_path) -> dict:
    """simple_evaluate, what the lm_eval command line runs, on TASKS written as YAML files over DOCS."""
    pytest.importorskip("lm_eval", reason="lm_eval is not installed")
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data, tasks = tmp_path / "docs.jsonl", tmp_path / "tasks"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks.mkdir(exist_ok=True)
    for name, task in TASKS.items():
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(
            {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
             "test_split": "test", **task}))
    return simple_evaluate(model="hf", model_args=f"pretrained={model_dir},trust_remote_code=True",
                           tasks=list(TASKS), task_manager=TaskManager(include_path=str(tasks)), device="cpu",
                           batch_size=2, log_samples=True, bootstrap_iters=0)


def test_lm_eval_runs_local_tasks_of_every_request_type(tmp_path):
    """`lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True --tasks ...` on local-file tasks:
    every loglikelihood, rolling loglikelihood and greedy continuation equals the export's own computation."""
    folder = export(tmp_path, tie=False, tokenizer=True)
    out = run_lm_eval(folder, tmp_path)
    assert all(len(out["samples"][name]) == len(DOCS) for name in TASKS)
    ref, tok = load_export(folder), AutoTokenizer.from_pretrained(folder, trust_remote_code=True)

    def logp(ids):
        with torch.no_grad():
            return ref(torch.tensor([ids])).log_softmax(-1)[0]

    for sample in out["samples"]["lrkv_mc"]:  # lm_eval's split: the pair tokenised whole, the context alone
        for (context, cont), ((score, _),) in zip(sample["arguments"], sample["resps"]):
            whole, n = tok(context + cont).input_ids, len(tok(context).input_ids)
            lp = logp(whole)
            assert abs(score - sum(lp[i - 1, whole[i]].item() for i in range(n, len(whole)))) <= 1e-4
    for sample in out["samples"]["lrkv_rolling"]:  # every token, the first one predicted from the EOS token
        ids = [tok.eos_token_id] + tok(sample["doc"]["text"]).input_ids
        lp = logp(ids)
        assert abs(sample["resps"][0][0] - sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)))) <= 1e-4
    for sample in out["samples"]["lrkv_gen"]:  # greedy, up to 5 tokens, cut at the first newline
        ids = tok(sample["doc"]["question"]).input_ids
        for _ in range(5):
            ids.append(logp(ids)[-1].argmax().item())
        text = tok.decode(ids[len(tok(sample["doc"]["question"]).input_ids):]).split("\n")[0]
        assert sample["filtered_resps"][0] == text


def test_hf_trainer_with_gradient_checkpointing_trains_like_without(tmp_path):
    """transformers' Trainer, gradient_checkpointing=True: the same weights after three steps as without it."""
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    folder = export(tmp_path, tie=False)
    torch.manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 300, (12, 16))]
    weights = []
    for checkpointing in (False, True):
        hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        args = TrainingArguments(output_dir=str(tmp_path / f"out{checkpointing}"), max_steps=3,
                                 per_device_train_batch_size=4, learning_rate=1e-3, gradient_checkpointing=checkpointing, report_to=[], use_cpu=True,
                                 save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0)
        Trainer(model=hf, args=args, train_dataset=rows).train()
        weights.append(hf.model.state_dict())
    start = load_export(folder).state_dict()
    assert any(not torch.equal(weights[0][k], start[k]) for k in start)  # it trained
    assert all((weights[0][k] - weights[1][k]).abs().max().item() <= 1e-5 for k in start)


@pytest.mark.slow
def test_lm_eval_scores_a_converted_llama_as_transformers_scores_the_original(tmp_path):
    """The same local tasks on a random Llama through transformers' own LlamaForCausalLM and on its lrkv conversion:
    every loglikelihood and every generated text agree."""
    pytest.importorskip("lm_eval", reason="lm_eval is not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lrkv.convert_hf import convert

    tok = AutoTokenizer.from_pretrained(export(tmp_path, tie=False, tokenizer=True), trust_remote_code=True)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.08)
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    convert(tmp_path / "llama", tmp_path / "converted")
    ours, theirs = run_lm_eval(tmp_path / "converted", tmp_path), run_lm_eval(tmp_path / "llama", tmp_path)
    for name in TASKS:
        a, b = ours["samples"][name], theirs["samples"][name]
        assert len(a) == len(b) == len(DOCS)
        for x, y in zip(a, b):
            if name == "lrkv_gen":
                assert x["filtered_resps"] == y["filtered_resps"]
            else:
                assert [float(r[0][0] if name == "lrkv_mc" else r[0]) for r in x["resps"]] == \
                    pytest.approx([float(r[0][0] if name == "lrkv_mc" else r[0]) for r in y["resps"]], abs=1e-4)
