"""An export folder loads with transformers' Auto classes (trust_remote_code) and matches lrkv.export.load_export."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lrkv.config import ModelConfig  # noqa: E402
from lrkv.export import load_export, model_state_dict, save_export  # noqa: E402
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
