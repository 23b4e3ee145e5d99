"""eval/: task generators parse back, prompt sizing, RULER scoring, head-diversity metrics, perplexity, KV memory."""

import json
import math
import random
import re
from collections import Counter

import pytest
import torch

from eval.compare import savings, smooth, steps_to_reach
from eval.head_diversity import centred_spectrum, diversity_metrics, head_maps, layer_diversity, operator_gram
from eval.kv_memory import formula_bytes_per_token, measured_bytes_per_token, named_configs
from eval.long_context import TASKS, Item, evaluate, make_item, prompt_tokens, ruler_score, string_match_all
from eval.lrqk_agreement import agreement
from eval.perplexity import perplexity, source_tokens
from eval.recall_study import MQARTask, mqar_accuracy, train_mqar
from lrkv.config import ModelConfig, validate_model
from lrkv.inference.sparse import SparseConfig, SparseDecoder
from lrkv.model import Transformer
from lrkv.rundir import RunDir, export_label
from lrkv.tokenizer import train_tokenizer

VARIANTS = ("mha", "gqa", "mqa", "mla", "lrkv")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode steps are tiny ops: on 2 shared cores, thread hand-offs cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    texts = [gen(random.Random(i), 40, 0.5).prompt for i in range(4) for gen in TASKS.values()]
    return train_tokenizer(texts, 400, 10**6)


def tiny(attn: str, **kw) -> ModelConfig:
    base = dict(attn=attn, vocab_size=400, n_layer=2, d_model=64, n_head=4, head_dim=16, rank_k=4, rank_v=6,
                n_kv_head=2 if attn == "gqa" else None, mla_kv_rank=24, mla_rope_dim=8, ffn_dim=96, lrkv_b_init="normal")
    base.update(kw)
    cfg = ModelConfig(**base)
    validate_model(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------- long context
# Each parser recovers the answer from the prompt text alone, without the generator's internals.


def parse_passkey(it: Item) -> list[str]:
    keys = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", it.context)
    assert len(keys) == 1 and keys[0][0] == keys[0][1]
    return [keys[0][0]]


def parse_niah(it: Item) -> list[str]:
    key = re.search(r"magic (?:number|uuid) for (\S+) mentioned in the provided text\?", it.question).group(1)
    needles = dict(re.findall(r"One of the special magic (?:numbers|uuids) for (\S+) is: (\S+)\.", it.context))
    assert len(needles) == (1 if it.task == "niah_single" else 4)
    return [needles[key]]


def parse_vt(it: Item) -> list[str]:
    value = re.search(r"assigned the value (\d+) in the text above", it.question).group(1)
    found = {name for name, v in re.findall(r"VAR (\w+) = (\d+)\.", it.context) if v == value}
    links = re.findall(r"VAR (\w+) = VAR (\w+)\.", it.context)
    grew = True
    while grew:
        new = {dst for dst, src in links if src in found} - found
        found |= new
        grew = bool(new)
    return sorted(found)


def parse_top_words(words: list[str], k: int) -> list[str]:
    counts = Counter(words).most_common()
    assert counts[k - 1][1] > counts[k][1], "the top-k is ambiguous"
    return sorted(w for w, _ in counts[:k])


def parse_cwe(it: Item) -> list[str]:
    k = int(re.search(r"What are the (\d+) most common words", it.question).group(1))
    return parse_top_words(re.findall(r"\d+\. (\w+)", it.context), k)


def parse_fwe(it: Item) -> list[str]:
    return parse_top_words(it.context.split("\n", 1)[1].split(), 3)


def parse_mqar(it: Item) -> list[str]:
    pairs = dict(re.findall(r"(\w+)=(\d+)", it.context.split("\n", 1)[1]))
    for k, v in re.findall(r"(\w+)=(\d+)", it.question):
        assert pairs[k] == v
    return [pairs[re.search(r"(\w+)=$", it.question).group(1)]]


def parse_niah_all(it: Item) -> list[str]:
    """multivalue / multiquery: every value of every key the question names."""
    asked = re.search(r"magic numbers for (.+) mentioned in the provided text\?", it.question).group(1)
    keys = re.findall(r"[a-z]+-[a-z]+", asked)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", it.context)
    assert len(needles) == 4 and {k for k, _ in needles} == set(keys)
    return [v for k, v in needles]


def parse_qa(it: Item) -> list[str]:
    line = re.search(r'Which character says "(.+)"\?', it.question).group(1)
    docs = re.split(r"\n*Document \d+:\n", it.context)[1:]
    holding = [d for d in docs if line in d]
    assert len(holding) == 1  # the quoted line pins one document
    speakers = [m.group(1) for m in re.finditer(r"^([A-Z][A-Z ]*)\. (.*)$", holding[0], re.M) if line in m.group(2)]
    assert len(set(speakers)) == 1
    return [speakers[0].title()]


PARSERS = {"passkey": parse_passkey, "niah_single": parse_niah, "niah_multikey": parse_niah,
           "niah_multikey_uuid": parse_niah, "niah_multivalue": parse_niah_all, "niah_multiquery": parse_niah_all,
           "vt": parse_vt, "cwe": parse_cwe, "fwe": parse_fwe, "mqar": parse_mqar, "qa": parse_qa}


def test_every_task_has_a_parser():
    assert set(PARSERS) == set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("target", [600, 1500])
def test_answer_recoverable_and_length_on_target(tok, task, target):
    for seed, depth in ((0, 0.0), (1, 0.5), (2, 1.0)):
        it = make_item(task, tok, target, seed, depth)
        assert sorted(PARSERS[task](it)) == sorted(it.answers)
        n = prompt_tokens(tok, it)
        unit = 80 if task == "qa" else 40  # qa grows by whole speeches (<= 100 characters, ~70 tokens at this vocab)
        assert target - max(unit, 0.03 * target) <= n <= target, (task, target, n)


def test_uuid_keys_and_needle_depth(tok):
    it = make_item("niah_multikey_uuid", tok, 800, 3)
    assert parse_niah(it) == it.answers and re.fullmatch(r"[0-9a-f-]{36}", it.answers[0])
    positions = []
    for depth in (0.0, 0.5, 1.0):
        it = make_item("niah_single", tok, 800, 4, depth)
        positions.append(it.context.index("One of the special magic") / len(it.context))
    assert positions[0] < 0.15 and 0.4 < positions[1] < 0.6 and positions[2] > 0.9


def test_ruler_scoring_hand_cases():
    assert string_match_all("The values are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all(" KAZI, lame", ["kazi", "Lame"]) == 1.0
    assert string_match_all("", ["1"]) == 0.0
    items = [Item("t", "", "", ["1"]), Item("t", "", "", ["2", "3"])]
    assert ruler_score(["1", "3"], items) == pytest.approx(100 * (1 + 0.5) / 2)


# ---------------------------------------------------------------------------------------------------- head diversity


def test_identical_heads_have_zero_diversity():
    L, R = torch.randn(1, 8, 2, dtype=torch.float64).expand(5, 8, 2), torch.randn(1, 8, 2, dtype=torch.float64).expand(5, 8, 2)
    for normalize in (True, False):
        m = diversity_metrics(*centred_spectrum(operator_gram(L, R), normalize))
        assert all(v == 0.0 for v in m.values()), m


def test_orthogonal_equal_norm_heads_span_h_minus_1_dimensions():
    H, m = 4, 2
    E = torch.eye(H * m, dtype=torch.float64).view(H * m, H, m).permute(1, 0, 2)  # head h: columns h*m..h*m+m-1
    gram = operator_gram(E, 3 * E)  # M_h = 3 E_h E_h^T: orthogonal, ||M_h||^2 = 9 m
    torch.testing.assert_close(gram, 9 * m * torch.eye(H, dtype=torch.float64))
    eig, total = centred_spectrum(gram, normalize=False)
    torch.testing.assert_close(eig, torch.tensor([18.0, 18.0, 18.0, 0.0], dtype=torch.float64))
    met = diversity_metrics(eig, total)
    assert met["erank"] == pytest.approx(H - 1) and met["erank_pct"] == pytest.approx(100.0)
    assert met["pr"] == pytest.approx(H - 1) and met["top1"] == pytest.approx(1 / 3) and met["top4"] == pytest.approx(1.0)
    assert met["spread"] == pytest.approx((H - 1) / H)


def test_two_orthogonal_heads_of_unequal_norm():
    # G = diag(a, b); J G J = (a+b)/4 [[1,-1],[-1,1]] has eigenvalues (a+b)/2 and 0.
    eig, total = centred_spectrum(torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)), normalize=False)
    torch.testing.assert_close(eig, torch.tensor([2.5, 0.0], dtype=torch.float64))
    assert total == 5.0
    eig, total = centred_spectrum(torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)), normalize=True)
    torch.testing.assert_close(eig, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_metrics_match_a_direct_computation_on_a_random_spectrum():
    eig = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    p = eig[:4] / eig.sum()
    m = diversity_metrics(eig, total=20.0)
    assert m["erank"] == pytest.approx(math.exp(-sum(float(x) * math.log(float(x)) for x in p)))
    assert m["pr"] == pytest.approx(9.5**2 / (25 + 9 + 1 + 0.25))
    assert m["top2"] == pytest.approx(8 / 9.5) and m["spread"] == pytest.approx(9.5 / 20)


def test_gram_from_small_products_equals_frobenius_of_full_operators():
    L, R = torch.randn(5, 12, 3, dtype=torch.float64), torch.randn(5, 12, 3, dtype=torch.float64)
    M = L @ R.transpose(1, 2)  # (H, d, d)
    torch.testing.assert_close(operator_gram(L, R), torch.einsum("aij,bij->ab", M, M))


@pytest.mark.parametrize("attn", VARIANTS)
def test_head_maps_reproduce_the_modules_projections(attn):
    torch.manual_seed(0)
    model = Transformer(tiny(attn, mla_q_rank=12 if attn == "mla" else 0)).double()
    a = model.layers[0].attn
    maps = head_maps(a)
    x = torch.randn(1, 3, 64, dtype=torch.float64)
    H, D = 4, 16
    if attn == "lrkv":
        q, k_s, v_s, z_k, z_v = a.project(x)
        k = k_s[:, :, None] + torch.einsum("bthr,hrd->bthd", z_k, a.b_k)
        v = v_s[:, :, None] + torch.einsum("bthr,hrd->bthd", z_v, a.b_v)
        q = q.transpose(1, 2)
    elif attn == "mla":
        q = a.wq_b(a.q_norm(a.wq_a(x))).view(1, 3, H, -1)[..., :D]
        c = a.wkv_a(x)[..., : a.kv_rank]
        rms = c.pow(2).mean(-1, keepdim=True).add(a.kv_norm.eps).sqrt()  # per-token scalar the linear map leaves out
        kv = a.wkv_b(a.kv_norm(c)).view(1, 3, H, 2 * D) * rms[..., None]
        k, v = kv[..., :D], kv[..., D:]
        q_rms = a.wq_a(x).pow(2).mean(-1, keepdim=True).add(a.q_norm.eps).sqrt()
        q = q * q_rms[..., None]
    else:
        G = a.n_kv_head
        q, k, v = a.qkv(x).split([H * D, G * D, G * D], dim=-1)
        q = q.view(1, 3, H, D)
        k, v = (t.view(1, 3, G, D).repeat_interleave(H // G, dim=2) for t in (k, v))
    torch.testing.assert_close(torch.einsum("btd,hdm->bthm", x, maps.wq), q)
    torch.testing.assert_close(torch.einsum("btd,hdm->bthm", x, maps.wk), k)
    torch.testing.assert_close(torch.einsum("btd,hdm->bthm", x, maps.wv), v)
    # W_O^h: the output projection of head h's value equals x M_h^OV, summed over heads
    torch.testing.assert_close(a.proj(v.reshape(1, 3, H * D)), torch.einsum("bthm,hem->bte", v, maps.wo))


def test_mqa_and_zero_b_lrkv_have_exactly_zero_key_only_diversity():
    torch.manual_seed(0)
    for cfg in (tiny("mqa"), tiny("lrkv", lrkv_b_init="zero")):
        d = layer_diversity(Transformer(cfg).layers[0].attn)
        assert all(v == 0.0 for v in d["qk_key_only"].values()), (cfg.attn, d["qk_key_only"])
        assert d["qk"]["erank"] > 1.0 and d["qk_query_only"]["erank"] > 1.0
    d = layer_diversity(Transformer(tiny("lrkv")).layers[0].attn)  # normal-init B: keys differ per head
    assert d["qk_key_only"]["erank"] > 1.0
    d = layer_diversity(Transformer(tiny("gqa")).layers[0].attn)  # 2 key groups: one centred dimension
    assert d["qk_key_only"]["erank"] == pytest.approx(1.0) and d["qk_key_only"]["pr"] == pytest.approx(1.0)


def test_exports_are_labelled_by_their_run_unless_they_stand_alone(tmp_path, monkeypatch):
    assert export_label(RunDir(tmp_path / "lrkv-run").export) == "lrkv-run"
    assert export_label(tmp_path / "my-export") == "my-export"
    (tmp_path / "lrkv-run").mkdir()
    monkeypatch.chdir(tmp_path / "lrkv-run")
    assert export_label("export") == "lrkv-run"  # relative: named from the resolved path


# ---------------------------------------------------------------------------------------------------- perplexity


def test_perplexity_and_bpb_match_a_hand_computation(tok, tmp_path):
    docs = [TASKS["passkey"](random.Random(i), 12, 0.5).prompt + " héllo wörld" for i in range(6)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokens = source_tokens(tok, str(path), split="all")
    torch.manual_seed(0)
    model = Transformer(tiny("lrkv")).eval()
    context, n = 32, 100
    res = perplexity(model, tok, tokens, n, context, batch=2)
    windows = n // context
    nll, n_bytes = 0.0, 0
    for w in range(windows):
        ids = torch.tensor(tokens[w * context: w * context + context + 1].astype("int64"))
        with torch.no_grad():
            logits = model(ids[None, :-1])[0].double()
        for t in range(context):
            row = logits[t]
            nll += float(torch.logsumexp(row, 0) - row[ids[t + 1]])
            symbols = tok.id_to_token(int(ids[t + 1]))
            n_bytes += 0 if symbols == "<|endoftext|>" else len(symbols)  # byte-level BPE: one symbol per byte
    count = windows * context
    assert res["tokens"] == count and res["bytes"] == n_bytes
    assert res["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert res["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- KV memory


def spec_numbers_per_token_per_layer(m: ModelConfig) -> int:
    """lrkv.md §3.1, written out independently of the model code."""
    return {"mha": 2 * m.n_head * m.dh, "gqa": 2 * (m.n_kv_head or 0) * m.dh, "mqa": 2 * m.dh,
            "mla": m.mla_kv_rank + m.mla_rope_dim, "lrkv": 2 * m.dh + m.n_head * (m.rank_k + m.rank_v)}[m.attn]


@pytest.mark.parametrize("attn", VARIANTS)
def test_kv_bytes_measured_from_cache_tensors_equal_the_formulas(attn):
    m = tiny(attn, n_layer=3)
    expected = 2 * m.n_layer * spec_numbers_per_token_per_layer(m)
    assert measured_bytes_per_token(m) == formula_bytes_per_token(m) == expected


def test_kv_bytes_of_every_shipped_config_and_debug_variant():
    for name, m in named_configs():
        assert measured_bytes_per_token(m) == formula_bytes_per_token(m) == 2 * m.n_layer * spec_numbers_per_token_per_layer(m), name


# ---------------------------------------------------------------------------------------------------- LRQK harness


@pytest.mark.parametrize("attn", ["mha", "lrkv"])
def test_lrqk_agreement_is_exact_when_everything_is_resident_and_lossy_otherwise(attn):
    torch.manual_seed(0)
    model = Transformer(tiny(attn, max_seq_len=64)).eval()
    windows = [torch.randint(1, 400, (40,)) for _ in range(2)]
    full = agreement(model, windows, 32, SparseConfig(top_k=64, recent=4, sinks=0).tuned(rank=4))
    assert full["recall"] == 1.0 and full["mass"] == pytest.approx(1.0) and full["agree"] == 1.0
    assert full["rel_err"] < 1e-5 and abs(full["kl"]) < 1e-6
    sparse = agreement(model, windows, 32, SparseConfig(top_k=2, recent=2, sinks=0, policy="exact").tuned(rank=4))
    assert sparse["recall"] == 1.0  # oracle selection: the exact top-k by construction
    assert 0.0 < sparse["mass"] < 1.0 and sparse["rel_err"] > 1e-3


def test_long_context_harness_lrqk_matches_full_when_nothing_is_dropped(tok):
    torch.manual_seed(0)
    model = Transformer(tiny("lrkv", max_seq_len=256)).eval()
    rows = evaluate(model, tok, ["passkey"], [200], 2, ["full", "lrqk"],
                    SparseConfig(top_k=256, recent=4, sinks=0).tuned(rank=4), [0.5])
    assert [r["cache"] for r in rows] == ["full", "lrqk"]
    assert rows[1]["same as full %"] == 100.0 and 0.0 <= rows[0]["score"] <= 100.0


# ---------------------------------------------------------------------------------------------------- ruler


def test_ruler_method_specs_share_one_budget():
    from eval.ruler import parse_method

    base = SparseConfig(recent=32, sinks=4).tuned(rank=32)
    assert parse_method("full", 256, base) == ("full", None)
    label, cfg = parse_method("lrqk:rank=8:budget=64", 256, base)
    assert (cfg.policy, cfg.knobs.rank, cfg.top_k, cfg.recent + cfg.sinks + cfg.top_k) == ("lrqk", 8, 28, 64)
    assert parse_method("exact:sinks=0", 256, base)[1].top_k == 224
    assert parse_method("quest:page=8", 256, base)[1].knobs.page == 8  # a knob of that policy only
    assert parse_method("loki", 256, base)[1].knobs.rank == 32  # the shared rank flag reaches Loki too
    for bad, message in (("bogus", "unknown method"), ("quest:rank=3", "not key=value"), ("lrqk:page=8", "a knob of lrqk \\(rank, "),
                         ("loki:budget=30", "leaves no top-k"), ("full:rank=2", "takes no settings")):
        with pytest.raises(ValueError, match=message):
            parse_method(bad, 256, base)


def test_ruler_every_method_equals_full_when_the_budget_covers_the_prompt(tok):
    from eval.ruler import evaluate as ruler_evaluate
    from eval.ruler import parse_method

    torch.manual_seed(0)
    model = Transformer(tiny("gqa", max_seq_len=512)).eval()
    base = SparseConfig(recent=8, sinks=2).tuned(rank=4)
    specs = ["full", "lrqk", "exact", "quest", "loki", "h2o", "streaming"]
    wide = [parse_method(m, 1024, base) for m in specs]
    quiet = {"eos": set(), "log": lambda *a, **k: None}
    records = ruler_evaluate(model, tok, model.cfg, ["niah_single"], [300], 1, wide, **quiet)
    outputs = {r["method"]: r["output"] for r in records}
    assert len(set(outputs.values())) == 1, outputs  # one prefill, seven decoders, identical greedy text
    assert all(r["h2d_per_step"] == 0 for r in records)  # everything resident from the prefill on
    sparse_q = ruler_evaluate(model, tok, model.cfg, ["niah_single"], [300], 1, wide[:1], protocol="sparse-question",
                              **quiet)
    # full attention is exact whether the question is prefilled or decoded token by token
    assert sparse_q[0]["output"] == outputs["full"] and (sparse_q[0]["protocol"], records[0]["protocol"]) == (
        "sparse-question", "dense-question")
    assert sparse_q[0]["steps"] > records[0]["steps"]  # the question's tokens were decode steps
    narrow = [parse_method(m, 24, base) for m in ("full", "lrqk", "streaming")]
    records = ruler_evaluate(model, tok, model.cfg, ["niah_single"], [300], 1, narrow, **quiet)
    by = {r["method"]: r for r in records}
    assert by["streaming"]["h2d_per_step"] == 0 < by["lrqk"]["h2d_per_step"] <= by["lrqk"]["h2d_no_cache_per_step"]
    assert by["full"]["gpu_bytes"] > by["lrqk"]["gpu_bytes"]



def test_ruler_methods_that_stop_leave_the_batch_without_changing_the_others(tok):
    from eval.ruler import parse_method, run_item
    from lrkv.inference.sparse import SparseConfig, SparseDecoder

    torch.manual_seed(0)
    model = Transformer(tiny("gqa", max_seq_len=512)).eval()
    methods = [parse_method(m, 24, SparseConfig(recent=8, sinks=2).tuned(rank=4)) for m in ("full", "lrqk", "streaming", "h2o")]
    ctx, question = list(range(5, 205)), [7, 8, 9]

    def run(ms, eos):
        base = SparseDecoder(model, SparseConfig(top_k=1, recent=1, policy="streaming").tuned(rank=1), max_context=260)
        return {label: out for label, (out, *_) in run_item(base, ctx, question, 40, ms, eos).items()}

    free = run(methods, set())
    counts = {}
    for out in free.values():
        for t in set(out[1:]):
            counts[t] = counts.get(t, 0) + 1
    eos = {max(counts, key=counts.get)}  # a token several methods emit, at different steps
    together = run(methods, eos)
    assert len({len(o) for o in together.values()}) > 1  # they stopped at different steps
    for m in methods:
        assert together[m[0]] == run([m], eos)[m[0]]  # the same text as decoding that method alone



def test_ruler_jobs_split_the_items_and_merge_the_same_records_as_one_process(tok, tmp_path):
    from eval.ruler import main as ruler_main
    from eval.ruler import parser as ruler_parser
    from lrkv.export import save_export

    torch.manual_seed(0)
    model = Transformer(tiny("gqa", max_seq_len=512))
    tok.save(str(tmp_path / "tokenizer.json"))
    export = save_export(model.state_dict(), model.cfg, tmp_path / "export", tmp_path / "tokenizer.json")
    run = ["--export", str(export), "--lengths", "400", "--tasks", "niah_single,niah_multikey", "--n", "2",
           "--budget", "24", "--methods", "full,lrqk,h2o", "--rank", "4", "--recent", "8", "--sinks", "2",
           "--dtype", "bf16"]
    one = ruler_main(run + ["--out", str(tmp_path / "one")])
    two = ruler_main(run + ["--jobs", "2", "--out", str(tmp_path / "two")])
    assert {r["item"] for r in _read_jsonl(tmp_path / "two" / "shard1" / "records.jsonl")} == {1}  # items 1 and 3
    untimed = [[{k: v for k, v in r.items() if k != "decode_s"} for r in rs] for rs in (one, two)]
    assert len(untimed[0]) == 12 and untimed[0] == untimed[1]
    assert _read_jsonl(tmp_path / "two" / "records.jsonl") == two
    assert "2 job(s)" in (tmp_path / "two" / "ruler.md").read_text()
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(SystemExit):
            ruler_parser().parse_args(["--shard", bad])


def _read_jsonl(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ruler_report_only_merges_record_files_without_an_export(tmp_path):
    import json

    from eval.ruler import main as ruler_main

    def rec(length, task, item, method, score):
        return {"length": length, "task": task, "item": item, "method": method, "score": score, "gpu_bytes": 2**20,
                "h2d_per_step": 1024.0, "h2d_no_cache_per_step": 2048.0, "decode_s": 1.0, "batch_steps": 10}

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(rec(4096, "vt", i, m, s)) + "\n"
                             for i, (m, s) in enumerate([("full", 100.0), ("lrqk", 0.0)])))
    second.write_text(json.dumps(rec(4096, "vt", 2, "lrqk", 50.0)) + "\n")
    records = ruler_main(["--report-only", str(first), str(second), "--out", str(tmp_path / "out")])
    assert len(records) == 3
    table = (tmp_path / "out" / "ruler.md").read_text()
    assert "| vt | 1 | 100 | 25 |" in table  # lrqk: mean of its two items across the two files
    assert (tmp_path / "out" / "ruler_accuracy.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------- compare
# (val_curve and step_cost read train.py's metrics.json: tests/test_train.py checks them on a real run)


def test_steps_to_reach_and_savings_hand_cases():
    base = [(10, 3.0), (20, 2.0), (30, 1.5)]
    faster = [(10, 2.5), (20, 1.7), (30, 1.2)]  # reaches 1.5 between steps 20 and 30: 20 + 10 * 0.2/0.5 = 24
    assert steps_to_reach(faster, 1.5) == pytest.approx(24.0)
    assert steps_to_reach(base, 1.5) == 30.0 and steps_to_reach(faster, 0.5) is None
    s = savings(base, 100.0, faster, 50.0)
    assert s["step saving %"] == pytest.approx(100 * (1 - 24 / 30))
    assert s["FLOP saving %"] == pytest.approx(100 * (1 - 24 * 50 / (30 * 100)))
    assert savings(base, 1.0, [(30, 9.0)], 1.0)["s*"] == "not reached"
    assert smooth([4.0, 2.0, 6.0], 2) == [4.0, 3.0, 4.0]


# ---------------------------------------------------------------------------------------------------- recall_study


def decode_mqar(task: MQARTask, x: torch.Tensor) -> tuple[list[dict[int, int]], list[list[int]]]:
    """Per sequence: {key: value} read back from the pair ids, and the queried keys (an independent decoding)."""
    query_base = 1 + task.keys * task.values
    tables = [{(t - 1) // task.values: (t - 1) % task.values for t in row[:task.pairs].tolist()} for row in x]
    asked = [[t - query_base for t in row[task.pairs:].tolist()] for row in x]
    return tables, asked


def test_mqar_answers_recoverable_from_the_pairs():
    task = MQARTask(keys=10, values=5, pairs=6, queries=4)
    x, targets = task.batch(torch.Generator().manual_seed(0), 50)
    assert x.shape == targets.shape == (50, 10) and int(x.max()) < task.vocab_needed
    tables, asked = decode_mqar(task, x)
    answer_base = 1 + task.keys * task.values + task.keys
    for table, keys, row in zip(tables, asked, targets):
        assert len(table) == task.pairs and len(set(keys)) == task.queries  # distinct keys, distinct queries
        assert (row[:task.pairs] == -100).all()
        assert [t - answer_base for t in row[task.pairs:].tolist()] == [table[k] for k in keys]
    with pytest.raises(ValueError, match="needs 1107 token ids; the model has 1000"):
        MQARTask(keys=40, values=26).check(1000)  # 1 + 40*26 pairs + 40 queries + 26 answers
    with pytest.raises(ValueError, match="queries <= pairs <= keys"):
        MQARTask(keys=8, pairs=16).check(2048)


def test_mqar_accuracy_on_hand_made_models():
    task = MQARTask(keys=10, values=5, pairs=6, queries=4)
    vocab = task.vocab_needed
    answer_base = vocab - task.values

    def oracle(x):  # looks the value up the way the task defines it
        tables, asked = decode_mqar(task, x)
        logits = torch.zeros(*x.shape, vocab)
        for b, (table, keys) in enumerate(zip(tables, asked)):
            for i, k in enumerate(keys):
                logits[b, task.pairs + i, answer_base + table[k]] = 1.0
        return logits

    def always_value_0(x):
        logits = torch.zeros(*x.shape, vocab)
        logits[..., answer_base] = 1.0
        return logits

    assert mqar_accuracy(oracle, task, 64, seed=3) == 1.0
    _, targets = task.batch(torch.Generator().manual_seed(3), 64)
    share_of_0 = (targets[:, task.pairs:] == answer_base).float().mean().item()
    assert mqar_accuracy(always_value_0, task, 64, seed=3) == pytest.approx(share_of_0)


def test_train_mqar_learns_recall_and_lrqk_keeping_every_key_answers_the_same():
    """A small task the debug model solves in 150 steps: fails if targets or training were misaligned."""
    task = MQARTask(keys=8, values=8, pairs=4, queries=2)
    model, curve = train_mqar("lrkv", task, steps=150, seed=0, eval_every=50, n_eval=128)
    assert [s for s, _ in curve] == [50, 100, 150]
    assert curve[-1][1] > 0.9  # chance is 1/8 for a value, 1/4 for guessing among the pairs present
    assert mqar_accuracy(model, task, 128, seed=10_000) == curve[-1][1]
    keep_all = SparseConfig(top_k=8, recent=1, sparse_query_tail=task.queries).tuned(rank=4)  # 8 >= the 5 earlier tokens
    assert mqar_accuracy(SparseDecoder(model, keep_all).prefill, task, 128, seed=10_000) == curve[-1][1]


@pytest.mark.parametrize("command", [["eval.ruler", "--export"], ["eval", "perplexity", "--export"]])
def test_a_bad_export_is_one_error_line(tmp_path, command):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", *command, str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    missing = tmp_path / "missing"
    assert out.stderr.strip().splitlines() == [f"error: {missing}: no config.json; not an lrkv export folder"]


def test_ruler_wraps_items_in_the_chat_template_and_fits_lokis_offline_basis_once(tok, tmp_path):
    """A chat template's head joins the prefilled context and its tail (the assistant's turn) the question: the
    prompt is the wrapped item, token for token. `loki:basis=offline` fits the export's basis on first use only."""
    from eval.long_context import encode, make_item
    from eval.ruler import LOKI_BASIS, evaluate as ruler_evaluate
    from eval.ruler import loki_basis, parse_method, split_answer_prefix
    from lrkv.export import open_export, save_export

    torch.manual_seed(0)
    model = Transformer(tiny("gqa", max_seq_len=512)).eval()
    chat = lambda user: f"<user>{user}</user><assistant>"  # noqa: E731
    methods = [parse_method("full", 64, SparseConfig(recent=8, sinks=2))]
    quiet = {"eos": set(), "log": lambda *a, **k: None}
    rec = ruler_evaluate(model, tok, model.cfg, ["niah_single"], [300], 1, methods, chat=chat, **quiet)[0]
    item = make_item("niah_single", tok, 300 - 128, 0, depth=0.1)
    query, prefix = item.question.split("? ")  # RULER: the answer prefix follows the assistant's turn
    assert prefix.startswith("The special magic") and split_answer_prefix(item.question) == (query + "?", prefix)
    assert rec["chat"] and rec["prompt"] == len(encode(tok, "<user>" + item.context)) + len(
        encode(tok, query + "?</user><assistant>" + prefix))
    vt = make_item("vt", tok, 600, 0).question
    assert split_answer_prefix(vt)[1].startswith("Answer: According to the chain")
    tok.save(str(tmp_path / "tokenizer.json"))
    export = open_export(save_export(model.state_dict(), model.cfg, tmp_path / "export", tmp_path / "tokenizer.json"))
    path = loki_basis(export, torch.float32, windows=2, length=64)
    assert path == export.path / LOKI_BASIS and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert loki_basis(export, torch.float32, windows=2, length=64) == path and path.stat().st_mtime_ns == stamp
