"""`FullDecoder`: the model's own exact cache (ModelCache) behind the same prefill/step/stats API as the LRQK
decoder, so generation, evaluations and benchmarks swap one for the other."""

from __future__ import annotations

import torch

from lrkv.inference.cache import STAT_KEYS, new_stats


class FullDecoder:
    """The model's own exact cache (ModelCache) behind the LRQK decoder's prefill/step/stats API."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.stats = new_stats()

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, valid: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        self.cache = self.model.new_cache()
        self.stats = new_stats()
        return self.model(idx, cache=self.cache, valid=valid, logits_to_keep=logits_to_keep)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("FullDecoder.step called before prefill")
        self.stats["steps"] += 1
        self.stats["last_step"] = {**{k: 0 for k in STAT_KEYS}, "steps": 1}
        return self.model(tokens, cache=self.cache)
