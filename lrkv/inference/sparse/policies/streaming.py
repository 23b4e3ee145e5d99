"""streaming: StreamingLLM (Xiao et al. 2023, arXiv 2309.17453), sinks + the most recent tokens: the top_k budget
extends the recent window; no scores. Tokens keep their original positions (no position shift)."""

from __future__ import annotations

import torch

from lrkv.inference.sparse.policy import Policy


class Streaming(Policy):
    def prefill(self, q, k, kv, keep):
        return self._newest(q.shape[2])

    def step(self, q, k_t, kv, t):
        return self._newest(t + 1)

    def _newest(self, length: int) -> torch.Tensor:
        return torch.arange(length, dtype=torch.float32, device=self.view.device).expand(self.view.geo.pool, 1, length)
