"""h2o: H2O (Zhang et al. 2023, arXiv 2306.14048), heavy hitters by attention accumulated over the steps a token
was attended (prompt: column sums of the causal attention, unnormalised as the original), evicting: a token not kept
is gone. The top_k budget is the heavy set, the recent window the recent set."""

from __future__ import annotations

import math

import torch

from lrkv.inference.sparse.plan import Geometry
from lrkv.inference.sparse.policy import Policy
from lrkv.inference.sparse.store import grown


class H2O(Policy):
    wants_weights = True
    CHUNK_ELEMENTS = 2**22  # scores held at once by the prefill: 16 MiB fp32 (2**24 fell out of cache: 2x slower)

    def __init__(self, view, knobs, capacity):
        super().__init__(view, knobs, capacity)
        S = view.geo.pool
        self.acc = torch.zeros(S, capacity, device=view.device)
        self.evicted = torch.zeros(S, capacity, dtype=torch.bool, device=view.device)

    @staticmethod
    def state_bytes(knobs, g: Geometry, length: int, head_dim: int, elt: int) -> int:
        return g.pool * length * 5  # accumulated attention (fp32) and the evicted flag per token

    def grow(self, capacity):
        self.acc = grown(self.acc, capacity, 0.0)
        self.evicted = grown(self.evicted, capacity, False)

    def prefill(self, q, k, kv, keep):
        # column sums of the causal softmax of every real prompt query, in query chunks of about CHUNK_ELEMENTS
        # scores: chunk c only scores keys [0, end of c) (the causal half) and the group's heads share one key read
        B, H, T, D = q.shape
        Hk = k.shape[1]
        group = H // Hk
        acc = q.new_zeros(B, Hk, group, T, dtype=torch.float32)
        rows = max(1, self.CHUNK_ELEMENTS // (H * T))
        # the product in the model's dtype (bf16 runs on AMX/avx512_bf16 CPUs' matrix units), the softmax in fp32;
        # a group's query rows in one matmul per KV head, as policy.qk does (broadcasting k would copy it per head)
        q_scaled, k_t = q / math.sqrt(D), k.mT
        for start in range(0, T, rows):
            end = min(start + rows, T)
            s = (q_scaled[:, :, start:end].reshape(B, Hk, -1, D) @ k_t[..., :end]).view(B, Hk, group, end - start, end)
            s[..., start:].masked_fill_(~torch.ones(end - start, end - start, dtype=torch.bool,
                                                    device=q.device).tril(), float("-inf"))
            if keep is not None:
                s.masked_fill_(~(keep > 0)[:, None, None, None, :end], float("-inf"))
            p = s.softmax(-1, dtype=torch.float32)
            if keep is not None:  # padding queries (all keys masked: NaN rows) add nothing
                p = p.nan_to_num(0.0) * keep[:, None, None, start:end, None]
            acc[..., :end] += p.sum(-2)
        self.acc[:, :T] = self.view.geo.streams(acc.flatten(1, 2)).sum(1)
        return self.acc[:, None, :T]

    def step(self, q, k_t, kv, t):
        return self.acc[:, None, : t + 1]

    def restrict(self, candidate):
        return candidate & ~self.evicted[:, : candidate.shape[1]]

    def chosen(self, top, top_ok, candidate):
        kept = torch.zeros_like(candidate)
        kept.scatter_(1, top.clamp(min=0), top_ok)
        self.evicted[:, : candidate.shape[1]] |= candidate & ~kept

    def observe(self, weights):
        pool = self.view.pool
        self.acc.scatter_add_(1, pool.token.clamp(min=0), weights * (pool.token >= 0))
