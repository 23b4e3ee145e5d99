"""lrqk: LRQK (Li et al. 2025, arXiv 2510.23649; docs/lrqk.md §1-2, §7 for LRKV's shared proxy), a rank-r proxy
q̂ . A_K[j]: factors fitted by ALS at prefill and updated per token (lowrank.py). A_K (proxies, L, r) is kept in the
model dtype, B_Q, B_K in fp32."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrkv.inference.sparse.plan import Geometry
from lrkv.inference.sparse.policies.lowrank import als_factorize, decode_solve, kaczmarz
from lrkv.inference.sparse.policy import Policy, qk
from lrkv.inference.sparse.store import grown, phase


class LRQK(Policy):
    @dataclass(frozen=True)
    class Knobs:
        rank: int = 32  # proxy rank r
        prefill_iters: int = 2  # ALS sweeps at prefill
        decode_iters: int = 2  # q̂/k̂ alternations per decode step
        tol: float = 1e-2  # early stop of both when the iterates move less

        def problems(self, head_dim: int) -> list[str]:
            rules = [(1 <= self.rank <= head_dim, f"rank must be in [1, head_dim={head_dim}], got {self.rank}"),
                     (self.prefill_iters >= 0 and self.decode_iters >= 1,
                      f"needs prefill_iters >= 0 and decode_iters >= 1, got {self.prefill_iters}, {self.decode_iters}")]
            return [message for ok, message in rules if not ok]

    def __init__(self, view, knobs, capacity):
        super().__init__(view, knobs, capacity)
        self.a_k = torch.zeros(view.geo.proxies, capacity, knobs.rank, dtype=view.dtype, device=view.device)
        self.b_q = self.b_k = None

    @staticmethod
    def state_bytes(knobs, g: Geometry, length: int, head_dim: int, elt: int) -> int:
        r = knobs.rank  # A_K (model dtype) per proxy; B_K, B_Q fp32
        return g.proxies * (length * r * elt + 4 * (r * head_dim + g.heads * r * head_dim))

    def grow(self, capacity):
        self.a_k = grown(self.a_k, capacity, 0.0)

    def spans_keys(self) -> bool:
        """One A_K for several heads that have their own keys (lrkv's shared proxy, docs/lrqk.md §7 P1): it
        reconstructs the key they share (the module's shared_key), not one head's."""
        return self.view.geo.heads > 1 and self.view.geo.key_heads > 1

    def prefill(self, q, k, kv, keep):
        v, kn, g = self.view, self.knobs, self.view.geo
        B, H, T, D = q.shape
        w = None if keep is None else keep[:, None, :, None]  # padding rows zeroed so they do not shape the fit
        kf = k.float() if w is None else k.float() * w  # fp32 math (a copy for bf16 models)
        if self.spans_keys():  # lrkv shared proxy: all heads' true scores vs one A_K; B_K: rope(k_s)
            k_rec = v.module.shared_key(kv, torch.arange(T, device=q.device)).float()  # (B, T, D)
            if keep is not None:
                k_rec = k_rec * keep[..., None]
            qf = q.float() if w is None else q.float() * w
            f = als_factorize(qf, kf, k_rec, kn.rank, kn.prefill_iters, kn.tol, v.generator)
            self.a_k[:, :T], self.b_q, self.b_k = f.a_k, f.b_q, f.b_k
            return (f.a_k[:, None] @ f.a_q[:, :, -1, :, None])[..., 0].reshape(g.pool, -1, T)
        # one key per proxy: its own head's (lrkv per_head) or its KV head's (GQA). The proxies are independent
        # problems, fitted a slice at a time so that no fp32 copy of every head exists at once: per KV head (with
        # its g query heads when they share A_K), or for GQA per query head, position j of every group, whose
        # keys are the KV heads themselves (never repeated per query head)
        Hk = k.shape[1]
        per_query_head = g.proxies > B * Hk
        X, n = (B * Hk, H // Hk) if per_query_head else (B, Hk)
        qs, a_k = q.reshape(X, n, g.heads, T, D), self.a_k.view(X, n, -1, kn.rank)
        wq = None if w is None else w.repeat_interleave(X // B, 0)  # padding weights per fitted row
        scores, b_q, b_k = [], [], []
        for i in range(n):
            qi = qs[:, i].float() if wq is None else qs[:, i].float() * wq
            ki = kf.reshape(X, 1, T, D) if per_query_head else kf[:, i, None]
            f = als_factorize(qi, ki, ki[:, 0], kn.rank, kn.prefill_iters, kn.tol, v.generator)
            a_k[:, i, :T] = f.a_k
            b_q.append(f.b_q), b_k.append(f.b_k)
            scores.append((f.a_k[:, None] @ f.a_q[:, :, -1, :, None])[..., 0])  # (X, heads, T)
        self.b_q, self.b_k = torch.stack(b_q, 1).flatten(0, 1), torch.stack(b_k, 1).flatten(0, 1)
        return torch.stack(scores, 1).reshape(g.pool, -1, T)

    def step(self, q, k_t, kv, t):
        # docs/lrqk.md §2: self score q_h . k_h,t, exact scores on the resident set Omega, q̂/k̂ solve, Kaczmarz
        # updates of B_Q, B_K, and k̂ as the new A_K row
        v, kn, g = self.view, self.knobs, self.view.geo
        D = q.shape[-1]
        qf = q[:, :, 0].float()
        s_self = qk(q, k_t)[:, :, 0, 0]  # (B, H)
        tokens, resident, k_pool = v.resident_keys()
        s_pool = g.streams(qk(q, k_pool)[:, :, 0]) * resident[:, None]  # (pool streams, heads, slots)
        per = self.a_k.shape[0] // tokens.shape[0]  # proxies per pool stream (lrkv per_head: H)
        a_omega = self.a_k.gather(1, tokens.repeat_interleave(per, 0)[..., None].expand(-1, -1, kn.rank)).float()
        a_omega = a_omega * resident.repeat_interleave(per, 0)[..., None]
        if self.spans_keys():
            k_rec = v.module.shared_key(kv, torch.full((1,), t, device=q.device))[:, 0].float()
        else:
            k_rec = k_t[:, :, 0].float().reshape(g.proxies, D)
        q_p = g.proxy_view(qf)
        with phase("lrqk.solve"):
            q_hat, k_hat = decode_solve(q_p, g.proxy_view(s_self), k_rec, g.proxy_view(s_pool), a_omega,
                                        self.b_q, self.b_k, kn.decode_iters, kn.tol)
            self.b_q, self.b_k = kaczmarz(self.b_q, q_hat, q_p), kaczmarz(self.b_k, k_hat, k_rec)
        self.a_k[:, t] = k_hat.to(self.a_k.dtype)
        L = t + 1
        # scored in the storage dtype (fp32 accumulation on GPUs): no fp32 copy of all of A_K every step
        scores = (self.a_k[:, None, :L] @ q_hat.to(self.a_k.dtype)[..., None])[..., 0].float()
        return scores.reshape(g.pool, -1, L)
