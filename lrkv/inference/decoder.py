"""What every decoder offers (FullDecoder: the model's own exact cache; SparseDecoder: the sparse engine), so that
generation, evaluations and benchmarks swap one for the other: prefill once, then one step per token, `fork` to
decode another way from the same prefill, and the counters as a dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol

import torch


@dataclass
class Counts:
    """Decode counters. hits/misses: selected rows already resident / fetched into the GPU pool; selections: rows
    the policy selected beyond the always-kept sinks and recent window; bytes_moved: host -> GPU bytes."""

    hits: int = 0
    misses: int = 0
    selections: int = 0
    bytes_moved: int = 0
    steps: int = 0

    def add(self, other: "Counts") -> None:
        for f in fields(Counts):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class DecodeStats(Counts):
    last_step: Counts = field(default_factory=Counts)
    recall: list[float] | None = None  # per layer, mean recall@k of the selection (SparseConfig.measure_recall)


class Decoder(Protocol):
    stats: DecodeStats

    @property
    def length(self) -> int:
        """Tokens decoded so far (the next token's position)."""
        ...

    def prefill(self, idx: torch.Tensor, valid: torch.Tensor | None = None, logits_to_keep: int = 0,
                keep_prompt: bool = False) -> torch.Tensor:
        """Exact attention over the prompt idx (B, T) -> logits (B, T or logits_to_keep, V); keep_prompt: keep what
        `fork` needs."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: tokens (B, 1) -> logits (B, 1, V)."""
        ...

    def fork(self, cfg=None) -> "Decoder":
        """A decoder positioned after the same prompt, decoding independently (a sparse decoder may take another
        SparseConfig), without running the model over the prompt again."""
        ...
