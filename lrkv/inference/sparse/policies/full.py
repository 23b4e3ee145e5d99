"""full: every stored row selected, i.e. exact attention through the engine (the budget is the context: size
top_k to it, e.g. SparseConfig.full). No scores are computed: select_top_k keeps every candidate when they fit."""

from __future__ import annotations

import torch

from lrkv.inference.sparse.policy import Policy


class Full(Policy):
    def prefill(self, q, k, kv, keep):
        return self._nothing(q.shape[2])

    def step(self, q, k_t, kv, t):
        return self._nothing(t + 1)

    def _nothing(self, length: int) -> torch.Tensor:
        return torch.zeros((), device=self.view.device).expand(self.view.geo.pool, 1, length)
