"""quest: Quest (Tang et al. 2024, arXiv 2406.10774), pages of `page` tokens keep the element-wise min and max of
their post-RoPE keys (the sinks left out, so that they do not widen page 0's bounds); the page score
sum_d max(q_d max_d, q_d min_d) bounds q . k within the page. The budget is whole pages, as Quest counts it: the
top_k // page best pages that hold older tokens than the recent window (ranked by the stream's heads as select_top_k
ranks tokens), all their candidate tokens. Every layer is sparse (the paper keeps the first two dense)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lrkv.inference.sparse.plan import Geometry
from lrkv.inference.sparse.policy import Policy, max_over_heads
from lrkv.inference.sparse.store import grown


class Quest(Policy):
    @dataclass(frozen=True)
    class Knobs:
        page: int = 16  # tokens per page (Quest's default)

        def problems(self, head_dim: int) -> list[str]:
            return [] if self.page >= 1 else [f"page must be >= 1, got {self.page}"]

    def __init__(self, view, knobs, capacity):
        super().__init__(view, knobs, capacity)
        S, m, D = view.geo.pool, view.geo.key_heads, view.head_dim
        pages = -(-capacity // knobs.page)
        self.k_min = torch.full((S, m, pages, D), float("inf"), device=view.device)
        self.k_max = torch.full((S, m, pages, D), float("-inf"), device=view.device)

    @staticmethod
    def state_bytes(knobs, g: Geometry, length: int, head_dim: int, elt: int) -> int:
        return g.pool * g.key_heads * -(-length // knobs.page) * 2 * head_dim * 4  # min and max key per page (fp32)

    def grow(self, capacity):
        pages = -(-capacity // self.knobs.page)
        self.k_min = grown(self.k_min, pages, float("inf"), dim=2)
        self.k_max = grown(self.k_max, pages, float("-inf"), dim=2)

    def prefill(self, q, k, kv, keep):
        T, P = k.shape[2], self.knobs.page  # page bounds per key head, then shared by the query heads that read it
        kf = k.float()
        real = torch.ones(1, T, dtype=torch.bool, device=k.device) if keep is None else keep > 0
        first = real.int().argmax(1, keepdim=True)  # left padding: the first real token
        real = (real & (torch.arange(T, device=k.device) >= first + self.view.sinks))[:, None, :, None]
        pad = -T % P
        lo = F.pad(kf.masked_fill(~real, float("inf")), (0, 0, 0, pad), value=float("inf"))
        hi = F.pad(kf.masked_fill(~real, float("-inf")), (0, 0, 0, pad), value=float("-inf"))
        n = (T + pad) // P
        self.k_min[:, :, :n] = self.view.geo.key_streams(lo.unflatten(2, (n, P)).amin(3))
        self.k_max[:, :, :n] = self.view.geo.key_streams(hi.unflatten(2, (n, P)).amax(3))
        return self._scores(q[:, :, -1], T)

    def step(self, q, k_t, kv, t):
        page = t // self.knobs.page
        kt = self.view.geo.streams(k_t[:, :, 0].float())  # (S, m, D)
        self.k_min[:, :, page] = torch.minimum(self.k_min[:, :, page], kt)
        self.k_max[:, :, page] = torch.maximum(self.k_max[:, :, page], kt)
        return self._scores(q[:, :, 0], t + 1)

    def _scores(self, q, length: int) -> torch.Tensor:
        pages = -(-length // self.knobs.page)
        qs = self.view.geo.streams(q.float())[:, :, None]  # (S, m, 1, D)
        lo, hi = self.k_min[:, :, :pages], self.k_max[:, :, :pages]
        bound = torch.maximum(qs * hi, qs * lo).sum(-1)  # (S, m, pages)
        bound = bound.masked_fill(hi[..., 0] == float("-inf"), float("-inf"))  # pages with no real token
        P, start = self.knobs.page, max(length - self.view.recent, 0)
        ranked = max_over_heads(bound)
        ranked = ranked.masked_fill(torch.arange(pages, device=q.device) * P >= start, float("-inf"))
        best = ranked.topk(min(max(self.view.top_k // P, 1), pages), dim=-1)
        chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter_(1, best.indices, best.values > float("-inf"))
        bound = bound.masked_fill(~chosen[:, None], float("-inf"))
        return bound.repeat_interleave(P, dim=2)[:, :, :length]
