"""loki: Loki (Singhania et al. 2024, arXiv 2406.02542), keys projected on their top-r principal directions, score
(q P_r) . (k_j P_r). The basis is fitted on this prompt's keys at prefill (the paper fits it offline on calibration
text), uncentred: eigenvectors of K^T K."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrkv.inference.sparse.plan import Geometry
from lrkv.inference.sparse.policy import Policy, grown


class Loki(Policy):
    @dataclass(frozen=True)
    class Knobs:
        rank: int = 32  # principal directions kept

        def problems(self, head_dim: int) -> list[str]:
            return [] if 1 <= self.rank <= head_dim else [f"rank must be in [1, head_dim={head_dim}], got {self.rank}"]

    def __init__(self, view, knobs, capacity):
        super().__init__(view, knobs, capacity)
        S, m = view.geo.pool, view.geo.key_heads
        self.k_low = torch.zeros(S, m, capacity, knobs.rank, dtype=view.dtype, device=view.device)
        self.basis = None  # (S, m, D, r) fp32, fitted at prefill

    @staticmethod
    def state_bytes(knobs, g: Geometry, length: int, head_dim: int, elt: int) -> int:
        # rank-r projected keys (model dtype) and the D x r basis (fp32) per stream and head
        return g.pool * g.key_heads * (length * knobs.rank * elt + 4 * head_dim * knobs.rank)

    def grow(self, capacity):
        self.k_low = grown(self.k_low, capacity, 0.0, dim=2)

    def prefill(self, q, k, kv, keep):
        T = k.shape[2]  # one basis per key head, then shared by the query heads that read it
        ks = k.float() if keep is None else k.float() * keep[:, None, :, None]
        _, vecs = torch.linalg.eigh(ks.mT @ ks)  # ascending eigenvalues
        basis = vecs.flip(-1)[..., : self.knobs.rank]
        self.basis = self.view.geo.key_streams(basis)
        self.k_low[:, :, :T] = self.view.geo.key_streams((ks @ basis).to(self.k_low.dtype))
        return self._scores(q[:, :, -1], T)

    def step(self, q, k_t, kv, t):
        k_low = self.view.geo.streams(k_t[:, :, 0].float())[:, :, None] @ self.basis
        self.k_low[:, :, t] = k_low[:, :, 0].to(self.k_low.dtype)
        return self._scores(q[:, :, 0], t + 1)

    def _scores(self, q, length: int) -> torch.Tensor:
        q_low = self.view.geo.streams(q.float())[:, :, None] @ self.basis  # (S, m, 1, r)
        return (q_low @ self.k_low[:, :, :length].float().mT)[:, :, 0]
