"""Token selection policies: which `top_k` older tokens each pool stream attends at a step, beside its sinks and
recent window (the decoder keeps those). Every policy runs through the same decoder: the same CPU row store, GPU
slot pool, hit/miss accounting, exact attention over the selected rows, and memory plan (plan.py).

A policy scores candidate tokens per pool stream and head: scores (S, m, L), where a pool stream is one query head
of a GQA/MHA model (m = 1, as in LRQK's reference) or one batch row of an LRKV model (m = H heads sharing one token
set); `select_top_k` takes max_h (s_h - max s_h) over the candidates, the same aggregation for every policy.
Definitions and the budget convention: docs/peers.md §1-2.

    lrqk       Li et al. 2025 (arXiv 2510.23649): rank-r proxy q̂ . A_K[j], factors fitted by ALS at prefill and
               updated per token (lowrank.py).
    exact      oracle: true q . k_j over every stored key (upper bound; it needs every key, so it saves nothing).
    streaming  StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): sinks + the most recent tokens, i.e. the top_k
               budget extends the recent window; no scores.
    h2o        H2O (Zhang et al. 2023, arXiv 2306.14048): heavy hitters by attention accumulated over the steps a
               token was attended (prompt: column sums of the causal attention), evicting: a token not kept is gone.
    quest      Quest (Tang et al. 2024, arXiv 2406.10774): pages of 16 tokens keep the element-wise min and max of
               their post-RoPE keys; page score sum_d max(q_d max_d, q_d min_d) bounds q . k within the page; the top
               top_k/16 pages (as tokens: the top_k tokens of the best pages). Every layer is sparse (the paper keeps
               the first two dense).
    loki       Loki (Singhania et al. 2024, arXiv 2406.02542): keys projected on their top-r principal directions,
               score (q P_r) . (k_j P_r). The basis is fitted on this prompt's keys at prefill (the paper fits offline
               on calibration text), uncentred: eigenvectors of K^T K, since q . k is not shift-invariant.
"""

from __future__ import annotations

import math

import torch

from lrkv.inference.cache import phase
from lrkv.inference.lrqk.lowrank import als_factorize, decode_solve, kaczmarz
from lrkv.inference.lrqk.plan import QUEST_PAGE


def select_top_k(scores: torch.Tensor, candidate: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (S, m, L) per head, candidate (S, L) bool -> ids (S, k'), ok (S, k') of the top-k tokens by
    max_h (s_h(j) - max_j' s_h(j')) over candidates (docs/lrqk.md §7; with m = 1 plain per-head top-k)."""
    if k >= scores.shape[-1]:  # every candidate fits (e.g. full attention as a policy): no ranking needed
        ids = torch.arange(scores.shape[-1], device=scores.device).expand_as(candidate)
        return torch.where(candidate, ids, -1), candidate
    if scores.shape[1] == 1:  # one head: subtracting its max changes no ranking
        s = scores[:, 0].masked_fill(~candidate, float("-inf"))
    else:
        neg = torch.finfo(scores.dtype).min
        s = scores.masked_fill(~candidate[:, None], neg)
        s = (s - s.amax(-1, keepdim=True)).amax(1).masked_fill(~candidate, float("-inf"))
    vals, ids = s.topk(min(k, s.shape[-1]), dim=-1)
    ok = vals > float("-inf")
    return torch.where(ok, ids, -1), ok


class Policy:
    """One layer's selection state. q (B, H, n, D) and k (B, Hk, n, D) arrive post-RoPE, query head h reading key
    head h // (H / Hk) (GQA's KV heads are not repeated); `layer.streams(q)` views queries as (S, m, n, D),
    `layer.key_streams(x)` maps a per-key-head tensor to the pool's streams."""

    wants_weights = False  # True: the decoder passes this step's attention weights to observe()

    def __init__(self, layer, capacity: int):
        self.layer, self.cfg = layer, layer.owner.cfg

    def grow(self, capacity: int) -> None:
        pass

    def prefill(self, q, k, kv, keep) -> torch.Tensor:
        """Fit the policy's state on the prompt (keep (B, T) float marks real tokens); scores of the last query."""
        raise NotImplementedError

    def step(self, q, k_t, kv, t: int) -> torch.Tensor:
        """Take token t in (q, k_t (B, Hk, 1, D) in the pool's key-head layout, its raw kv); scores over tokens 0..t
        for the step's query."""
        raise NotImplementedError

    def restrict(self, candidate: torch.Tensor) -> torch.Tensor:
        return candidate

    def chosen(self, top: torch.Tensor, top_ok: torch.Tensor, candidate: torch.Tensor) -> None:
        pass

    def observe(self, weights: torch.Tensor) -> None:
        """weights (S, C): this step's attention on each pool slot, summed over the stream's heads."""

    def tensors(self) -> list[torch.Tensor]:
        """The state this policy holds on the GPU (for allocated_bytes)."""
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]


class Exact(Policy):
    def prefill(self, q, k, kv, keep):
        return self.layer.streams(self.layer.qk(q[:, :, -1:], k)[:, :, 0])

    def step(self, q, k_t, kv, t):
        return self.layer.exact_scores(q, t + 1)


class Streaming(Policy):
    def prefill(self, q, k, kv, keep):
        return self._newest(q.shape[2])

    def step(self, q, k_t, kv, t):
        return self._newest(t + 1)

    def _newest(self, length: int) -> torch.Tensor:
        lay = self.layer
        return torch.arange(length, dtype=torch.float32, device=lay.device).expand(lay.geo["pool"], 1, length)


class H2O(Policy):
    wants_weights = True
    CHUNK_ELEMENTS = 2**22  # scores held at once by the prefill: 16 MiB fp32 (2**24 fell out of cache: 2x slower)

    def __init__(self, layer, capacity):
        super().__init__(layer, capacity)
        S = layer.geo["pool"]
        self.acc = torch.zeros(S, capacity, device=layer.device)
        self.evicted = torch.zeros(S, capacity, dtype=torch.bool, device=layer.device)

    def grow(self, capacity):
        self.acc = _grown(self.acc, capacity, 0.0)
        self.evicted = _grown(self.evicted, capacity, False)

    def prefill(self, q, k, kv, keep):
        # column sums of the causal softmax of every real prompt query, in query chunks of about CHUNK_ELEMENTS
        # scores: chunk c only scores keys [0, end of c) (the causal half) and the group's heads share one key read
        B, H, T, D = q.shape
        Hk = k.shape[1]
        group, real = H // Hk, keep > 0
        acc = q.new_zeros(B, Hk, group, T, dtype=torch.float32)
        rows = max(1, self.CHUNK_ELEMENTS // (H * T))
        # the product in the model's dtype (bf16 runs on AMX/avx512_bf16 CPUs' matrix units), the softmax in fp32;
        # a group's query rows in one matmul per KV head, as LRQKLayer.qk does (broadcasting k would copy it per head)
        q_scaled, k_t = q / math.sqrt(D), k.mT
        for start in range(0, T, rows):
            end = min(start + rows, T)
            s = (q_scaled[:, :, start:end].reshape(B, Hk, -1, D) @ k_t[..., :end]).view(B, Hk, group, end - start, end)
            s[..., start:].masked_fill_(~torch.ones(end - start, end - start, dtype=torch.bool,
                                                    device=q.device).tril(), float("-inf"))
            if self.layer.owner.padded:
                s.masked_fill_(~real[:, None, None, None, :end], float("-inf"))
            p = s.softmax(-1, dtype=torch.float32)
            if self.layer.owner.padded:  # padding queries (all keys masked: NaN rows) add nothing
                p = p.nan_to_num(0.0) * keep[:, None, None, start:end, None]
            acc[..., :end] += p.sum(-2)
        self.acc[:, :T] = self.layer.streams(acc.flatten(1, 2)).sum(1)
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
        pool = self.layer.pool
        self.acc.scatter_add_(1, pool.token.clamp(min=0), weights * (pool.token >= 0))


class Quest(Policy):
    def __init__(self, layer, capacity):
        super().__init__(layer, capacity)
        S, m, D = layer.geo["pool"], layer.geo["key_heads"], layer.module.head_dim
        pages = -(-capacity // QUEST_PAGE)
        self.k_min = torch.full((S, m, pages, D), float("inf"), device=layer.device)
        self.k_max = torch.full((S, m, pages, D), float("-inf"), device=layer.device)

    def grow(self, capacity):
        pages = -(-capacity // QUEST_PAGE)
        self.k_min = _grown(self.k_min, pages, float("inf"), dim=2)
        self.k_max = _grown(self.k_max, pages, float("-inf"), dim=2)

    def prefill(self, q, k, kv, keep):
        T = k.shape[2]  # page bounds per key head, then shared by the query heads that read it
        kf, real = k.float(), (keep > 0)[:, None, :, None]
        pad = -T % QUEST_PAGE
        lo = torch.nn.functional.pad(kf.masked_fill(~real, float("inf")), (0, 0, 0, pad), value=float("inf"))
        hi = torch.nn.functional.pad(kf.masked_fill(~real, float("-inf")), (0, 0, 0, pad), value=float("-inf"))
        n = (T + pad) // QUEST_PAGE
        self.k_min[:, :, :n] = self.layer.key_streams(lo.unflatten(2, (n, QUEST_PAGE)).amin(3))
        self.k_max[:, :, :n] = self.layer.key_streams(hi.unflatten(2, (n, QUEST_PAGE)).amax(3))
        return self._scores(q[:, :, -1], T)

    def step(self, q, k_t, kv, t):
        page = t // QUEST_PAGE
        kt = self.layer.streams(k_t[:, :, 0].float())  # (S, m, D)
        self.k_min[:, :, page] = torch.minimum(self.k_min[:, :, page], kt)
        self.k_max[:, :, page] = torch.maximum(self.k_max[:, :, page], kt)
        return self._scores(q[:, :, 0], t + 1)

    def _scores(self, q, length: int) -> torch.Tensor:
        pages = -(-length // QUEST_PAGE)
        qs = self.layer.streams(q.float())[:, :, None]  # (S, m, 1, D)
        lo, hi = self.k_min[:, :, :pages], self.k_max[:, :, :pages]
        bound = torch.maximum(qs * hi, qs * lo).sum(-1)  # (S, m, pages)
        bound = bound.masked_fill(hi[..., 0] == float("-inf"), float("-inf"))  # pages with no real token
        return bound.repeat_interleave(QUEST_PAGE, dim=2)[:, :, :length]


class Loki(Policy):
    def __init__(self, layer, capacity):
        super().__init__(layer, capacity)
        S, m = layer.geo["pool"], layer.geo["key_heads"]
        self.k_low = torch.zeros(S, m, capacity, self.cfg.rank, dtype=layer.owner.dtype, device=layer.device)
        self.basis = None  # (S, m, D, r) fp32, fitted at prefill

    def grow(self, capacity):
        self.k_low = _grown(self.k_low, capacity, 0.0, dim=2)

    def prefill(self, q, k, kv, keep):
        T = k.shape[2]  # one basis per key head, then shared by the query heads that read it
        ks = k.float() * keep[:, None, :, None]
        _, vecs = torch.linalg.eigh(ks.mT @ ks)  # ascending eigenvalues
        basis = vecs.flip(-1)[..., : self.cfg.rank]
        self.basis = self.layer.key_streams(basis)
        self.k_low[:, :, :T] = self.layer.key_streams((ks @ basis).to(self.k_low.dtype))
        return self._scores(q[:, :, -1], T)

    def step(self, q, k_t, kv, t):
        self.k_low[:, :, t] = (self.layer.streams(k_t[:, :, 0].float())[:, :, None] @ self.basis)[:, :, 0].to(
            self.k_low.dtype)
        return self._scores(q[:, :, 0], t + 1)

    def _scores(self, q, length: int) -> torch.Tensor:
        q_low = self.layer.streams(q.float())[:, :, None] @ self.basis  # (S, m, 1, r)
        return (q_low @ self.k_low[:, :, :length].float().mT)[:, :, 0]


class LRQK(Policy):
    """docs/lrqk.md §1-2 (§7 for LRKV's shared proxy): A_K (proxies, L, r) in the model dtype, B_Q, B_K fp32."""

    def __init__(self, layer, capacity):
        super().__init__(layer, capacity)
        g = layer.geo
        self.a_k = torch.zeros(g["proxies"], capacity, self.cfg.rank, dtype=layer.owner.dtype, device=layer.device)
        self.b_q = self.b_k = None

    def grow(self, capacity):
        self.a_k = _grown(self.a_k, capacity, 0.0)

    def prefill(self, q, k, kv, keep):
        lay, cfg = self.layer, self.cfg
        B, H, T, D = q.shape
        w = keep[:, None, :, None] if lay.owner.padded else None  # padding rows zeroed so they do not shape the fit
        kf = k.float() if w is None else k.float() * w  # fp32 math (a copy for bf16 models)
        if _spans_keys(lay):  # lrkv shared proxy: all heads' true scores vs one A_K; B_K: rope(k_s)
            k_rec = lay.module.shared_key(kv, torch.arange(T, device=q.device)).float() * keep[..., None]  # (B, T, D)
            qf = q.float() if w is None else q.float() * w
            f = als_factorize(qf, kf, k_rec, cfg.rank, cfg.prefill_iters, cfg.tol, lay.owner.generator)
            self.a_k[:, :T], self.b_q, self.b_k = f.a_k, f.b_q, f.b_k
            return (f.a_k[:, None] @ f.a_q[:, :, -1, :, None])[..., 0].reshape(lay.geo["pool"], -1, T)
        # one key per proxy: its own head's (lrkv per_head) or its KV head's (GQA). The proxies are independent
        # problems, fitted a slice at a time so that no fp32 copy of every head exists at once: per KV head (with
        # its g query heads when they share A_K), or for GQA per query head, position j of every group, whose
        # keys are the KV heads themselves (never repeated per query head)
        Hk, heads = k.shape[1], lay.geo["heads"]
        per_query_head = lay.geo["proxies"] > B * Hk
        X, n = (B * Hk, H // Hk) if per_query_head else (B, Hk)
        qs, a_k = q.reshape(X, n, heads, T, D), self.a_k.view(X, n, -1, cfg.rank)
        wq = None if w is None else w.repeat_interleave(X // B, 0)  # padding weights per fitted row
        scores, b_q, b_k = [], [], []
        for i in range(n):
            qi = qs[:, i].float() if wq is None else qs[:, i].float() * wq
            ki = kf.reshape(X, 1, T, D) if per_query_head else kf[:, i, None]
            f = als_factorize(qi, ki, ki[:, 0], cfg.rank, cfg.prefill_iters, cfg.tol, lay.owner.generator)
            a_k[:, i, :T] = f.a_k
            b_q.append(f.b_q), b_k.append(f.b_k)
            scores.append((f.a_k[:, None] @ f.a_q[:, :, -1, :, None])[..., 0])  # (X, heads, T)
        self.b_q, self.b_k = torch.stack(b_q, 1).flatten(0, 1), torch.stack(b_k, 1).flatten(0, 1)
        return torch.stack(scores, 1).reshape(lay.geo["pool"], -1, T)

    def step(self, q, k_t, kv, t):
        # docs/lrqk.md §2: self score q_h . k_h,t, exact scores on the resident set Omega, q̂/k̂ solve, Kaczmarz
        # updates of B_Q, B_K, and k̂ as the new A_K row
        lay, cfg = self.layer, self.cfg
        B, H, _, D = q.shape
        qf = q[:, :, 0].float()
        s_self = lay.qk(q, k_t)[:, :, 0, 0]  # (B, H)
        pool = lay.pool
        resident, tokens = pool.token >= 0, pool.token.clamp(min=0)
        k_pool, _ = lay.keys_values(pool.slots, tokens, values=False)
        s_pool = lay.streams(lay.qk(q, k_pool)[:, :, 0]) * resident[:, None]  # (pool streams, heads, slots)
        per = self.a_k.shape[0] // tokens.shape[0]  # proxies per pool stream (lrkv per_head: H)
        a_omega = self.a_k.gather(1, tokens.repeat_interleave(per, 0)[..., None].expand(-1, -1, cfg.rank)).float()
        a_omega = a_omega * resident.repeat_interleave(per, 0)[..., None]
        if _spans_keys(lay):
            k_rec = lay.module.shared_key(kv, torch.full((1,), t, device=q.device))[:, 0].float()
        else:
            k_rec = k_t[:, :, 0].float().reshape(lay.geo["proxies"], D)
        q_p = lay.proxy_view(qf)
        with phase("lrqk.solve"):
            q_hat, k_hat = decode_solve(q_p, lay.proxy_view(s_self), k_rec, lay.proxy_view(s_pool), a_omega,
                                        self.b_q, self.b_k, cfg.decode_iters, cfg.tol)
            self.b_q, self.b_k = kaczmarz(self.b_q, q_hat, q_p), kaczmarz(self.b_k, k_hat, k_rec)
        self.a_k[:, t] = k_hat.to(self.a_k.dtype)
        L = t + 1
        # scored in the storage dtype (fp32 accumulation on GPUs): no fp32 copy of all of A_K every step
        scores = (self.a_k[:, None, :L] @ q_hat.to(self.a_k.dtype)[..., None])[..., 0].float()
        return scores.reshape(lay.geo["pool"], -1, L)


def _spans_keys(layer) -> bool:
    """One A_K for several heads that have their own keys (lrkv's shared proxy, docs/lrqk.md §7 P1): it
    reconstructs the key they share (the module's shared_key), not one head's."""
    return layer.geo["heads"] > 1 and layer.geo["key_heads"] > 1


POLICY_CLASSES = {"lrqk": LRQK, "exact": Exact, "streaming": Streaming, "h2o": H2O, "quest": Quest, "loki": Loki}


def _grown(t: torch.Tensor, size: int, fill, dim: int = 1) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_full(shape, fill)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out
