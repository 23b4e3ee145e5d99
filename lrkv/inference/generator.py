"""Text generation over an export folder: batching, sampling, stop tokens, streaming; `full` or `lrqk` cache.

    gen = Generator.from_checkpoint("runs/debug/export", cache="lrqk", lrqk=SparseConfig(top_k=256))
    for c in gen.generate(["ROMEO:", "JULIET: O Romeo"], max_new_tokens=64):
        print(c.text, c.finish_reason)
    for deltas in gen.stream(["ROMEO:"], max_new_tokens=64):   # one list of Delta per decode step
        print("".join(d.text for d in deltas), end="", flush=True)

Prompts of different lengths are left-padded into one batch with a `valid` mask, so every row gets the tokens
it would get alone. Prefill is exact in both cache modes; in `lrqk` mode decode steps attend sparsely
(`SparseConfig.sparse_query_tail` moves the last prompt tokens onto the sparse path too). Sampling draws on
the CPU from a seeded torch.Generator, so a seed repeats its draws whatever the device. Loading imports
neither Lightning nor DeepSpeed.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from lrkv.export import open_export
from lrkv.inference.full import FullDecoder
from lrkv.inference.sparse import SparseConfig, SparseDecoder, MemoryPlan, memory_plan
from lrkv.model import Transformer

CACHE_MODES = ("full", "lrqk")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class GenerateError(ValueError):
    """A generation request that cannot run as given (empty prompt, bad sampling setting)."""


class ContextLengthWarning(UserWarning):
    """Prompt + new tokens run past model.max_seq_len: positions never seen in training (RoPE extrapolation)."""


@dataclass
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / T) restricted by top_k (0 = off) and top_p (1 = off)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerateError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerateError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerateError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Delta:
    """What one decode step added to one row. `text` is the newly settled text: it may be '' while a multi-byte
    character or a possible stop-string prefix is pending, and it never includes a stop token or stop string."""

    row: int
    token: int
    text: str
    finish_reason: str | None  # None while the row runs; "stop" or "length" on its last delta


@dataclass
class Completion:
    tokens: list[int]  # new tokens; ends with the stop token when a stop id ended the row
    text: str  # decoded new tokens, cut before the stop token / stop string
    finish_reason: str  # "stop" | "length"


@dataclass
class _Row:
    """One row's decoding state. Each new token is decoded once, in DecodeStream's window of a few tokens, and only
    the text not yet yielded is kept: the work per token does not grow with the continuation."""

    new_tokens: int = 0
    stream: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=True))
    held: list[int] = field(default_factory=list)  # tokens the stream holds back: an incomplete character so far
    unsent: str = ""  # decoded, not yet yielded: a suffix that could still grow into a stop string
    finish_reason: str | None = None


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. logits: (B, V)."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass (the top token stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids on the CPU: argmax when greedy, else one draw per row."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1).cpu()
    scaled = logits.float().cpu() / sampling.temperature
    probs = filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists -> idx (B, T) left-padded with id 0, and valid (B, T) bool, or None when nothing is padded."""
    T = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, T - len(p):] = True
    return idx.to(device), (None if bool(valid.all()) else valid.to(device))


class Generator:
    """A model and tokenizer plus the cache mode; each generate/stream call builds a fresh decoder.

    After a call, `timing` holds prefill/decode token counts and seconds and `decoder.stats` the cache counters.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, cache: str = "full", lrqk: SparseConfig | None = None,
                 eos: Sequence[int] = (), strict_context: bool = False):
        if cache not in CACHE_MODES:
            raise GenerateError(f"cache must be one of {CACHE_MODES}, got '{cache}'")
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.lrqk = lrqk or SparseConfig()
        self.eos = list(eos)
        self.strict_context = strict_context  # refuse, instead of warning once, to run past model.max_seq_len
        self._warned_context = False
        self.device = next(model.parameters()).device
        self.decoder: FullDecoder | SparseDecoder | None = None
        self.timing: dict[str, float] = {}
        if cache == "lrqk":
            try:  # bad settings or an attention type LRQK cannot serve fail now (a decoder allocates at prefill)
                self.new_decoder(max_context=1)
            except ValueError as e:
                raise GenerateError(str(e)) from e

    @classmethod
    def from_checkpoint(cls, export_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, cache: str = "full",
                        lrqk: SparseConfig | None = None, strict_context: bool = False) -> Generator:
        """Load config.json, tokenizer.json and model.safetensors; errors (ExportError, TokenizerError) name a file."""
        export = open_export(export_dir)
        return cls(export.model(device, dtype), export.tokenizer, cache=cache, lrqk=lrqk, eos=export.eos_ids,
                   strict_context=strict_context)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerateError(f"prompt {prompt!r} encodes to no tokens")
        return ids

    def memory_plan(self, batch: int, max_context: int) -> MemoryPlan:
        """What an LRQK decoder for this batch and context would allocate (nothing is allocated here)."""
        return memory_plan(self.model.cfg, self.lrqk, batch, max_context, dtype=next(self.model.parameters()).dtype)

    def new_decoder(self, max_context: int) -> FullDecoder | SparseDecoder:
        if self.cache == "full":
            return FullDecoder(self.model)
        return SparseDecoder(self.model, self.lrqk, gpu_device=self.device, cpu_device="cpu",
                             pin_memory=self.device.type == "cuda", max_context=max_context)

    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
                 sampling: Sampling | None = None, stop: Sequence[str] = (),
                 stop_ids: Sequence[int] = ()) -> list[Completion]:
        tokens: list[list[int]] = [[] for _ in prompts]
        pieces: list[list[str]] = [[] for _ in prompts]
        reasons = [""] * len(prompts)
        for deltas in self.stream(prompts, max_new_tokens, sampling, stop, stop_ids):
            for d in deltas:
                tokens[d.row].append(d.token)
                pieces[d.row].append(d.text)
                reasons[d.row] = d.finish_reason or ""
        return [Completion(t, "".join(p), r) for t, p, r in zip(tokens, pieces, reasons)]

    def stream(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
               sampling: Sampling | None = None, stop: Sequence[str] = (),
               stop_ids: Sequence[int] = ()) -> Iterator[list[Delta]]:
        """Yield, per step, one Delta for each row still running; finished rows stop growing."""
        if max_new_tokens < 1:
            raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            raise GenerateError("no prompts given")
        sampling = sampling or Sampling()
        ids = [self.encode(p) for p in prompts]
        self._check_context(max(map(len, ids)), max_new_tokens)
        stop_set = set(self.eos) | set(stop_ids)
        stop = [s for s in stop if s]
        rows = [_Row() for _ in ids]
        gen = torch.Generator().manual_seed(sampling.seed)
        idx, valid = left_pad(ids, self.device)
        self.decoder = self.new_decoder(idx.shape[1] + max_new_tokens)

        start = time.perf_counter()
        new = next_tokens(self.decoder.prefill(idx, valid, logits_to_keep=1)[:, -1], sampling, gen)
        self.timing = {"prefill_tokens": sum(map(len, ids)), "prefill_s": time.perf_counter() - start,
                       "decode_tokens": 0, "decode_s": 0.0}
        while True:
            deltas = [self._advance(i, row, int(t), max_new_tokens, stop_set, stop)
                      for i, (row, t) in enumerate(zip(rows, new.tolist())) if row.finish_reason is None]
            yield deltas
            if all(row.finish_reason is not None for row in rows):
                return
            start = time.perf_counter()
            # finished rows keep stepping (the batch stays rectangular) but their tokens are dropped
            new = next_tokens(self.decoder.step(new.view(-1, 1).to(self.device))[:, -1], sampling, gen)
            self.timing["decode_s"] += time.perf_counter() - start
            self.timing["decode_tokens"] += sum(row.finish_reason is None for row in rows)

    def _check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.model.cfg.max_seq_len
        if prompt_len + max_new_tokens <= limit:
            return
        msg = (f"prompt {prompt_len:,} + {max_new_tokens:,} new tokens > max_seq_len {limit:,}: positions past "
               f"{limit:,} were never trained")
        if self.strict_context:
            raise GenerateError(f"{msg}; refused (strict context)")
        if not self._warned_context:
            warnings.warn(msg, ContextLengthWarning, stacklevel=4)
            self._warned_context = True

    def _advance(self, i: int, row: _Row, token: int, max_new_tokens: int, stop_set: set[int],
                 stop: list[str]) -> Delta:
        row.new_tokens += 1
        if token in stop_set:
            row.finish_reason = "stop"
            text = row.unsent + self.tokenizer.decode(row.held)  # an incomplete character decodes as U+FFFD
        else:
            piece = row.stream.step(self.tokenizer, token)
            if piece is None:
                row.held.append(token)
            else:
                row.unsent, row.held = row.unsent + piece, []
            # a stop string completed now starts in the unsent text: what was yielded held no prefix of one
            cut = min((j for j in (row.unsent.find(s) for s in stop) if j >= 0), default=-1)
            if cut >= 0:
                row.finish_reason, text = "stop", row.unsent[:cut]
            elif row.new_tokens >= max_new_tokens:
                row.finish_reason, text = "length", row.unsent + self.tokenizer.decode(row.held)
            else:
                text = _settled(row.unsent, stop)
        row.unsent = row.unsent[len(text):]
        return Delta(i, token, text, row.finish_reason)


def _settled(text: str, stop: list[str]) -> str:
    """Text safe to show mid-stream: without a trailing partial UTF-8 character (decoded as U+FFFD) and without
    a suffix that could still grow into a stop string."""
    text = text.rstrip("\ufffd")
    hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold]
