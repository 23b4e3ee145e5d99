"""shadowkv: ShadowKV's token selection (Sun et al. 2024, arXiv 2410.21465), attending exact keys (ShadowKV itself
rebuilds keys from a rank-160 SVD; that approximation is not modelled): "ShadowKV selection, exact keys".

At prefill the prompt's post-RoPE keys are cut into chunks of `chunk` tokens; each chunk's landmark is its mean
key. The chunks whose keys agree least with their landmark (lowest minimum cosine similarity; over every head of a
stream for lrkv) are outliers and always kept, `outlier_share` of the top_k budget (ShadowKV's CPU path: 24 chunks
of 8 per 1024 budget tokens). A step scores the other chunks' landmarks with softmax(q . landmark / sqrt(D)) per
query head and takes the max over the stream's heads (ShadowKV: over a KV group); the top_k budget is filled with the outliers, every
token after the last whole prompt chunk (ShadowKV keeps the tail and all generated tokens), then the best chunks'
tokens (a chunk at the budget's edge may be cut). Landmarks are fixed after prefill, as in ShadowKV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lrkv.inference.sparse.plan import Geometry
from lrkv.inference.sparse.policy import Policy
from lrkv.inference.sparse.store import grown

KEPT = 2.0  # the score of a token always kept: above any softmax probability


class ShadowKV(Policy):
    @dataclass(frozen=True)
    class Knobs:
        chunk: int = 8  # tokens per landmark
        outlier_share: float = 24 * 8 / 1024  # share of top_k spent on outlier chunks

        def problems(self, head_dim: int) -> list[str]:
            rules = [(self.chunk >= 1, f"chunk must be >= 1, got {self.chunk}"),
                     (0 <= self.outlier_share < 1, f"outlier_share must be in [0, 1), got {self.outlier_share}")]
            return [message for ok, message in rules if not ok]

    def __init__(self, view, knobs, capacity):
        super().__init__(view, knobs, capacity)
        S, m, D = view.geo.pool, view.geo.key_heads, view.head_dim
        self.landmarks = torch.zeros(S, m, capacity // knobs.chunk, D, device=view.device)  # fp32
        self.kept = torch.zeros(S, capacity, dtype=torch.bool, device=view.device)  # outlier chunks' tokens
        self.chunks = 0  # whole prompt chunks; later tokens are always kept

    @staticmethod
    def state_bytes(knobs, g: Geometry, length: int, head_dim: int, elt: int) -> int:
        return g.pool * (g.key_heads * (length // knobs.chunk) * head_dim * 4 + length)  # landmarks, kept flags

    def grow(self, capacity):
        self.landmarks = grown(self.landmarks, capacity // self.knobs.chunk, 0.0, dim=2)
        self.kept = grown(self.kept, capacity, False)

    def prefill(self, q, k, kv, keep):
        T, c, geo = k.shape[2], self.knobs.chunk, self.view.geo
        n = self.chunks = T // c
        keys = k[:, :, : n * c].float().unflatten(2, (n, c))  # (B, Hk, n, c, D)
        real = torch.ones_like(keys[..., 0]) if keep is None else keep[:, None, : n * c].unflatten(2, (n, c))
        marks = (keys * real[..., None]).sum(3) / real.sum(3, keepdim=True).clamp(min=1)  # mean of the real keys
        cos = F.cosine_similarity(marks[:, :, :, None], keys, dim=-1).masked_fill(real == 0, 1.0)
        agree = geo.key_streams(cos.amin(3)).amin(1)  # (S, n): the worst key of each chunk, over the stream's heads
        outliers = min(round(self.knobs.outlier_share * self.view.top_k / c), n)
        worst = agree.topk(outliers, dim=-1, largest=False).indices
        outlier = torch.zeros_like(agree, dtype=torch.bool).scatter_(1, worst, True)
        self.kept[:, : n * c] = outlier.repeat_interleave(c, 1)
        self.landmarks[:, :, :n] = geo.key_streams(marks)
        return self._scores(q[:, :, -1], T)

    def step(self, q, k_t, kv, t):
        return self._scores(q[:, :, 0], t + 1)

    def _scores(self, q, length: int) -> torch.Tensor:
        n, c = self.chunks, self.knobs.chunk
        qs = self.view.geo.streams(q.float())[:, :, None]  # (S, m, 1, D)
        logits = (qs @ self.landmarks[:, :, :n].mT)[:, :, 0] / math.sqrt(q.shape[-1])  # (S, m, n)
        outlier = self.kept[:, : n * c : c]  # outlier chunks have no landmark in ShadowKV: not in the softmax
        probs = logits.masked_fill(outlier[:, None], float("-inf")).softmax(-1)
        chunk_scores = probs.amax(1).repeat_interleave(c, 1)  # (S, n c)
        scores = torch.full((len(chunk_scores), length), KEPT, device=q.device)
        scores[:, : n * c] = chunk_scores.masked_fill(self.kept[:, : n * c], KEPT)
        return scores[:, None]
