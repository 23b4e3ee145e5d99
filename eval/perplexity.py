"""Validation loss, perplexity and bits per byte of an export on a text source.

The source is read by lrkv.data (the embedded Shakespeare corpus by default, a local .txt/.json/.jsonl/.parquet
file or folder, or `hf:NAME[:CONFIG]`), tokenized with the export's tokenizer and packed exactly as training
packs it (documents joined by <|endoftext|>). `--split val` keeps the documents training held out (same hash
rule and val_fraction as lrkv.data); `--split all` uses every document. The first `--tokens` predicted tokens
are scored in non-overlapping windows of `--context` tokens, so every score sees the same text.

    loss = mean next-token NLL (nats);  ppl = exp(loss);
    bpb  = total NLL / ln 2 / UTF-8 bytes of the scored target text (the EOS separators decode to 0 bytes)

    python -m eval.perplexity --export DIR [--source shakespeare] [--split val] [--tokens 32768] [--context 128]
"""

from __future__ import annotations

import argparse
import json
import math

from lrkv.config import DataConfig


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    p = argparse.ArgumentParser(prog="python -m eval.perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="export folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--source", default="shakespeare", help="shakespeare | local file/folder | hf:NAME[:CONFIG]")
    p.add_argument("--split", default="val", choices=("val", "all"),
                   help="val: the documents training held out (default); all: every document")
    p.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction,
                   help="held-out share of documents, as in training's data.val_fraction (default %(default)s)")
    p.add_argument("--text-field", default="text", help="the text column of .json/.jsonl/.parquet/hf: sources")
    p.add_argument("--text-sample-by", default="document", choices=("document", "paragraph", "line"),
                   help=".txt sources: one document per file (default), paragraph or line")
    p.add_argument("--tokens", type=int, default=32768, help="predicted tokens scored (default %(default)s)")
    p.add_argument("--context", type=int, default=128, help="window length in tokens (default %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass (default %(default)s)")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from eval.common import cli  # noqa: E402
from lrkv.data import documents, pack, split_documents  # noqa: E402
from lrkv.export import open_export  # noqa: E402
from lrkv.model import Transformer  # noqa: E402


def source_tokens(tok: Tokenizer, source: str = "shakespeare", split: str = "val", val_fraction: float = 0.01,
                  text_field: str = "text", text_sample_by: str = "document") -> np.ndarray:
    """The packed token stream of the chosen split of a source, as lrkv.data builds it for training."""
    docs = documents(DataConfig(source=source, text_field=text_field, text_sample_by=text_sample_by))
    if split == "val":
        docs = split_documents(docs, val_fraction)[1]
    elif split != "all":
        raise ValueError(f"split must be val or all, got '{split}'")
    return pack(docs, tok)


def perplexity(model: Transformer, tok: Tokenizer, tokens: np.ndarray, n_tokens: int, context: int,
               batch: int = 8) -> dict:
    """Score the first n_tokens predictions (rounded down to whole windows) of the stream."""
    windows = min(n_tokens, len(tokens) - 1) // context
    if windows == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {context} + 1")
    if context > model.cfg.max_seq_len:
        raise ValueError(f"context {context} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    stream = torch.from_numpy(tokens[: windows * context + 1].astype(np.int64))
    x, y = stream[:-1].view(windows, context), stream[1:].view(windows, context)
    nll = 0.0
    with torch.no_grad():
        for i in range(0, windows, batch):
            logits = model(x[i:i + batch]).float()
            nll += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(), reduction="sum"))
    count = windows * context
    n_bytes = len(tok.decode(y.flatten().tolist()).encode("utf-8"))
    return {"tokens": count, "context": context, "loss": nll / count, "ppl": math.exp(nll / count),
            "bpb": nll / math.log(2) / n_bytes, "bytes": n_bytes}


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    ex = open_export(args.export)
    model, tok = ex.model(), ex.tokenizer
    tokens = source_tokens(tok, args.source, args.split, args.val_fraction, args.text_field, args.text_sample_by)
    result = {"source": args.source, "split": args.split,
              **perplexity(model, tok, tokens, args.tokens, args.context, args.batch)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli(main)
