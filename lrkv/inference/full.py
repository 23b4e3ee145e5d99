"""`FullDecoder`: the model's own exact cache (ModelCache) behind the Decoder protocol (lrkv/inference/decoder.py)."""

from __future__ import annotations

import copy

import torch

from lrkv.inference.decoder import Counts, DecodeStats


class FullDecoder:
    """The model's own exact cache (ModelCache) behind the Decoder protocol."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.stats = DecodeStats()

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, valid: torch.Tensor | None = None, logits_to_keep: int = 0,
                keep_prompt: bool = False) -> torch.Tensor:
        self.cache = self.model.new_cache()
        self.stats = DecodeStats()
        return self.model(idx, cache=self.cache, valid=valid, logits_to_keep=logits_to_keep)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("FullDecoder.step called before prefill")
        self.stats.steps += 1
        self.stats.last_step = Counts(steps=1)
        return self.model(tokens, cache=self.cache)

    def fork(self, cfg=None) -> "FullDecoder":
        """A copy of this decoder (its cache tensors copied) that decodes independently."""
        if cfg is not None:
            raise ValueError("FullDecoder.fork takes no config: it is the exact cache")
        if self.cache is None:
            raise RuntimeError("FullDecoder.fork called before prefill")
        other = FullDecoder(self.model)
        other.cache, other.stats = copy.deepcopy(self.cache), copy.deepcopy(self.stats)
        return other
