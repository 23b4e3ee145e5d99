"""exact: the oracle, true q . k_j over every stored key (an upper bound; it needs every key, so it saves nothing)."""

from __future__ import annotations

from lrkv.inference.sparse.plan import Geometry
from lrkv.inference.sparse.policy import Policy, qk


class Exact(Policy):
    @staticmethod
    def state_bytes(knobs, g: Geometry, length: int, head_dim: int, elt: int) -> int:
        return g.store * length * g.key_width * elt  # it scores every stored key: all keys resident

    def prefill(self, q, k, kv, keep):
        return self.view.geo.streams(qk(q[:, :, -1:], k)[:, :, 0])

    def step(self, q, k_t, kv, t):
        return self.view.exact_scores(q, t + 1)
