"""LRQK hybrid GPU-CPU decoding (spec lrqk.md §1-3 reference algorithm, §7 for LRKV models).

Prefill is exact attention over the prompt; it also fits the low-rank query/key factors (ALS, §1), writes every
token's full-precision row to the per-layer CPU store (cache.py) and seeds the bounded GPU pool. Each decode
step solves the new token's proxy query/key (q̂, k̂, §2), updates the bases (Kaczmarz), scores all older tokens in
O(l r) with the proxy, keeps `sinks` first tokens + the `recent` window + the proxy top-k, fetches only the rows
missing from the pool, and attends exactly over them.

Variants (one "stream" = one independent token selection):
- mha/gqa/mqa (e.g. converted Llama/Qwen2): the reference — factors and selection per query head, the CPU
  store per KV head (rotated k | v), GPU slots per query head.
- lrkv: one selection per layer and batch row, score_j = max_h (s_h(j) - max s_h); the store row is the
  pre-RoPE payload [k_s | v_s | z_k | z_v] shared by all heads, keys rebuilt and rotated at attention time.
  proxy="shared" (P1): one A_K per layer fitted to all heads' true scores (reconstruction target: the rotated
  shared key k_s); proxy="per_head" (P0): per-head factors on the materialised rotated K_h.
The model's own modules run everything else: attention modules call `cache.attend(...)` (hook in model.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lrkv.config import ModelConfig
from lrkv.inference.cache import STAT_KEYS, HostToDevice, RowStore, SlotPool, new_stats
from lrkv.kernels.reference import causal_attention, lrkv_keys, lrkv_values, rope
from lrkv.model import GroupedQueryAttention, LRKVAttention, Transformer

PRESETS = {"paper": (32, 2048, 64), "memory": (16, 1024, 32), "accuracy": (64, 4096, 128)}  # rank, top_k, recent


@dataclass
class LRQKConfig:
    rank: int = 32
    top_k: int = 256
    recent: int = 64  # includes the token being decoded, so >= 1
    sinks: int = 0
    prefill_iters: int = 2
    decode_iters: int = 2
    tol: float = 1e-2
    proxy: str = "shared"  # LRKV: "shared" (spec §7 P1) or "per_head" (P0); mha/gqa/mqa always per query head
    gpu_capacity: int | None = None  # resident rows per pool stream; default top_k + recent + sinks
    sparse_query_tail: int = 0  # last N prompt tokens go through the sparse decode path instead of exact prefill
    scores: str = "proxy"  # "exact" = oracle selection with true q.k scores (tests, agreement evals)
    measure_recall: bool = False  # also compute the exact top-k each step; stats["recall"] per layer
    seed: int = 0  # ALS random init

    @classmethod
    def preset(cls, name: str, **overrides) -> "LRQKConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown LRQK preset '{name}', expected one of {sorted(PRESETS)}")
        rank, top_k, recent = PRESETS[name]
        return cls(rank=rank, top_k=top_k, recent=recent, **overrides)

    @property
    def slots(self) -> int:
        return self.gpu_capacity if self.gpu_capacity is not None else self.top_k + self.recent + self.sinks

    def validate(self, head_dim: int) -> None:
        rules = [
            (1 <= self.rank <= head_dim, f"rank must be in [1, head_dim={head_dim}], got {self.rank}"),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.recent >= 1, f"recent must be >= 1 (the window holds the current token), got {self.recent}"),
            (self.sinks >= 0, f"sinks must be >= 0, got {self.sinks}"),
            (self.prefill_iters >= 0 and self.decode_iters >= 1,
             f"need prefill_iters >= 0 and decode_iters >= 1, got {self.prefill_iters}, {self.decode_iters}"),
            (self.proxy in ("shared", "per_head"), f"proxy must be 'shared' or 'per_head', got '{self.proxy}'"),
            (self.scores in ("proxy", "exact"), f"scores must be 'proxy' or 'exact', got '{self.scores}'"),
            (self.slots >= self.top_k + self.recent + self.sinks,
             f"gpu_capacity {self.gpu_capacity} < top_k + recent + sinks = {self.top_k + self.recent + self.sinks}"),
            (self.sparse_query_tail >= 0, f"sparse_query_tail must be >= 0, got {self.sparse_query_tail}"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"LRQKConfig: {message}")


# ------------------------------------------------------------------------------------------ low-rank algebra


def _ridge(m: torch.Tensor) -> torch.Tensor:
    """m + eps I with eps = 1e-6 trace(m)/r (spec §8.4) and a tiny floor for all-zero systems."""
    r = m.shape[-1]
    eps = 1e-6 * m.diagonal(dim1=-2, dim2=-1).sum(-1) / r + 1e-20
    return m + eps[..., None, None] * torch.eye(r, dtype=m.dtype, device=m.device)


def _solve_right(rhs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """X with X m = rhs for symmetric r x r systems m (batched)."""
    return torch.linalg.solve(_ridge(m), rhs, left=False)


def _least_squares(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmin_B ||y - a B||: (a^T a)^-1 a^T y."""
    return torch.linalg.solve(_ridge(a.mT @ a), a.mT @ y)


class Factors(NamedTuple):
    a_q: torch.Tensor  # (N, h, l, r)
    a_k: torch.Tensor  # (N, l, r), shared by the h query heads of a proxy
    b_q: torch.Tensor  # (N, h, r, D)
    b_k: torch.Tensor  # (N, r, D)


def als_factorize(q: torch.Tensor, k: torch.Tensor, k_rec: torch.Tensor, rank: int, iters: int, tol: float,
                  generator: torch.Generator) -> Factors:
    """Spec §1 ALS (lambda = 1, Gauss-Seidel) for N independent problems with h query heads sharing A_K:

        min sum_h 1/2 ||Q_h K_h^T - A_Qh A_K^T||^2 + 1/2 ||Q_h - A_Qh B_Qh||^2 + 1/2 ||K_rec - A_K B_K||^2

    q, k: (N, h, l, D) fp32 (post-RoPE queries and the true keys of each head); k_rec: (N, l, D). With h = 1 and
    k_rec = K this is the reference; Q K^T is never formed. Padding rows must be zero in q, k, k_rec.
    """
    n, h, l, _ = q.shape
    a_q = torch.randn(n, h, l, rank, generator=generator, device=q.device)
    a_k = torch.randn(n, l, rank, generator=generator, device=q.device)
    for _ in range(iters):
        b_q, b_k = _least_squares(a_q, q), _least_squares(a_k, k_rec)
        kta = torch.einsum("nhld,nlr->nhdr", k, a_k)
        new_q = _solve_right(q @ (kta + b_q.mT), (a_k.mT @ a_k)[:, None] + b_q @ b_q.mT)
        rhs = torch.einsum("nhld,nhdr->nlr", k, q.mT @ new_q) + k_rec @ b_k.mT
        new_k = _solve_right(rhs, (new_q.mT @ new_q).sum(1) + b_k @ b_k.mT)
        delta = max(F.mse_loss(new_q, a_q).item(), F.mse_loss(new_k, a_k).item())
        a_q, a_k = new_q, new_k
        if delta < tol:
            break
    return Factors(a_q, a_k, _least_squares(a_q, q), _least_squares(a_k, k_rec))


def als_objective(q: torch.Tensor, k: torch.Tensor, k_rec: torch.Tensor, f: Factors) -> torch.Tensor:
    """The ALS objective per problem (N,), forming Q K^T explicitly (for tests on small l)."""
    scores = (q @ k.mT - f.a_q @ f.a_k[:, None].mT).square().sum((1, 2, 3))
    rec_q = (q - f.a_q @ f.b_q).square().sum((1, 2, 3))
    rec_k = (k_rec - f.a_k @ f.b_k).square().sum((1, 2))
    return 0.5 * (scores + rec_q + rec_k)


def decode_solve(q: torch.Tensor, s_self: torch.Tensor, k_rec: torch.Tensor, s_omega: torch.Tensor,
                 a_omega: torch.Tensor, b_q: torch.Tensor, b_k: torch.Tensor, iters: int, tol: float):
    """Spec §2 step 2 with h heads sharing k̂ (lambda1 = lambda2 = 1). q (N, h, D); s_self (N, h) = q_h . k_h,t;
    k_rec (N, D); s_omega (N, h, C) exact scores on resident tokens, a_omega (N, C, r) their A_K rows (zero rows
    for empty slots). Returns q̂ (N, h, r), k̂ (N, r)."""
    k_hat = _solve_right((k_rec[:, None] @ b_k.mT), b_k @ b_k.mT)  # (N, 1, r)
    q_base = torch.einsum("nhd,nhrd->nhr", q, b_q) + s_omega @ a_omega
    m_base = b_q @ b_q.mT + (a_omega.mT @ a_omega)[:, None]
    k_base, mk_base = k_rec[:, None] @ b_k.mT, b_k @ b_k.mT
    for _ in range(iters):
        rhs = q_base + s_self[..., None] * k_hat
        q_hat = _solve_right(rhs[..., None, :], m_base + (k_hat.mT @ k_hat)[:, None])[..., 0, :]
        rhs_k = k_base + (s_self[..., None] * q_hat).sum(1, keepdim=True)
        new_k = _solve_right(rhs_k, mk_base + q_hat.mT @ q_hat)
        delta = F.mse_loss(new_k, k_hat).item()
        k_hat = new_k
        if delta < tol:
            break
    return q_hat, k_hat[:, 0]


def kaczmarz(b: torch.Tensor, x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Exact line-search step on 1/2||x̂ B - x||^2 (spec §2 step 3): afterwards x̂ B = x exactly.
    b (..., r, D), x_hat (..., r), target (..., D)."""
    resid = (x_hat[..., None, :] @ b)[..., 0, :] - target
    norm = x_hat.square().sum(-1).clamp_min(torch.finfo(x_hat.dtype).tiny)
    return b - x_hat[..., :, None] * resid[..., None, :] / norm[..., None, None]


def select_top_k(scores: torch.Tensor, candidate: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (S, m, L) per head, candidate (S, L) bool -> ids (S, k'), ok (S, k') of the top-k tokens by
    max_h (s_h(j) - max_j' s_h(j')) over candidates (spec §7; with m = 1 plain per-head top-k)."""
    neg = torch.finfo(scores.dtype).min
    s = scores.masked_fill(~candidate[:, None], neg)
    s = (s - s.amax(-1, keepdim=True)).amax(1).masked_fill(~candidate, float("-inf"))
    vals, ids = s.topk(min(k, s.shape[-1]), dim=-1)
    ok = vals > float("-inf")
    return torch.where(ok, ids, -1), ok


# ------------------------------------------------------------------------------------------ memory plan


@dataclass
class MemoryPlan:
    cpu_bytes: int  # host memory: row stores (+ staging), pinned where possible
    gpu_bytes: int  # pool slots, slot maps, proxy factors, validity mask
    detail: dict

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.detail.items())
        return f"LRQK memory plan: CPU {self.cpu_bytes / 2**30:.3f} GiB, GPU {self.gpu_bytes / 2**30:.3f} GiB ({parts})"


class MemoryPlanError(MemoryError):
    """The decoder's memory plan does not fit the free host or device memory."""


def free_host_bytes() -> int:
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return psutil.virtual_memory().available


def _geometry(m: ModelConfig, cfg: LRQKConfig, batch: int) -> dict:
    """Stream counts and row widths shared by the plan and the allocation (so the two cannot drift)."""
    H, D = m.n_head, m.dh
    if m.attn == "lrkv":
        shared = cfg.proxy == "shared"
        return dict(pool=batch, store=batch, row=2 * D + H * (m.rank_k + m.rank_v),
                    proxies=batch if shared else batch * H, heads=H if shared else 1)
    if m.attn in ("mha", "gqa", "mqa"):
        return dict(pool=batch * H, store=batch * m.kv_heads, row=2 * D, proxies=batch * H, heads=1)
    raise ValueError(f"LRQK does not support attention '{m.attn}' (supported: lrkv, mha, gqa, mqa)")


def memory_plan(m: ModelConfig, cfg: LRQKConfig, batch: int, max_context: int,
                dtype: torch.dtype = torch.float32, offload: bool = True) -> MemoryPlan:
    """Bytes the decoder allocates for `batch` rows of up to `max_context` tokens, computed without allocating.
    Excludes weights and the transient prefill activations (exact attention over the prompt)."""
    g, C, L, r, D = _geometry(m, cfg, batch), cfg.slots, max_context, cfg.rank, m.dh
    elt = torch.empty((), dtype=dtype).element_size()
    layers = m.n_layer
    detail = {
        "store": layers * g["store"] * L * g["row"] * elt,
        "staging": g["pool"] * C * g["row"] * elt if offload else 0,
        "pool": layers * g["pool"] * C * g["row"] * elt,
        "slot_maps": layers * g["pool"] * (2 * C * 8 + L * 4),  # token + last-use per slot (int64), id -> slot (int32)
        "proxy": layers * g["proxies"] * (L * r * elt + 4 * (r * D + g["heads"] * r * D)),  # A_K (model dtype); B_K, B_Q fp32
        "valid": batch * L,
    }
    on_cpu = detail["store"] + detail["staging"] if offload else 0
    return MemoryPlan(on_cpu, sum(detail.values()) - on_cpu, detail)


def check_fits(plan: MemoryPlan, gpu_device: torch.device) -> None:
    """Refuse a plan larger than free memory, naming both numbers (GPU pools on a CPU device count as host)."""
    host_need = plan.cpu_bytes + (plan.gpu_bytes if gpu_device.type == "cpu" else 0)
    host_free = free_host_bytes()
    if host_need > host_free:
        raise MemoryPlanError(f"LRQK plan needs {host_need} bytes of host memory, only {host_free} are free ({plan})")
    if gpu_device.type == "cuda":
        dev_free, _ = torch.cuda.mem_get_info(gpu_device)
        if plan.gpu_bytes > dev_free:
            raise MemoryPlanError(f"LRQK plan needs {plan.gpu_bytes} bytes on {gpu_device}, only {dev_free} are free "
                                  f"({plan})")


# ------------------------------------------------------------------------------------------ per-layer cache


class LRQKLayer:
    """One layer's LRQK state; the attention module calls `attend` (prefill when T > 1, a decode step when T == 1)."""

    def __init__(self, owner: "_LRQKState", index: int, module):
        self.owner, self.index, self.module = owner, index, module
        self.length = 0

    def allocate(self, batch: int, capacity: int) -> None:
        o, m = self.owner, self.owner.model_cfg
        g = _geometry(m, o.cfg, batch)
        self.geo, self.batch = g, batch
        dev, dtype = o.gpu_device, o.dtype
        self.store = RowStore(g["store"], capacity, g["row"], dtype, o.store_device, o.pin)
        self.pool = SlotPool(g["pool"], o.cfg.slots, g["row"], capacity, dtype, dev)
        heads_per_pool = m.n_head if m.attn != "lrkv" else 1  # gqa: pool stream = (b, h), reads KV head h // group
        pool_ids = torch.arange(g["pool"], device=dev)
        self.batch_of = pool_ids // heads_per_pool
        group = m.n_head // m.kv_heads
        self.store_of = pool_ids if m.attn == "lrkv" else self.batch_of * m.kv_heads + (pool_ids % m.n_head) // group
        # A_K grows with the context: stored in the model dtype (half the bytes in bf16), solved in fp32
        self.a_k = torch.zeros(g["proxies"], capacity, o.cfg.rank, dtype=dtype, device=dev)
        self.recall: list[float] = []

    def grow(self, capacity: int) -> None:
        self.store.grow(capacity)
        self.pool.grow(capacity)
        grown = self.a_k.new_zeros(self.a_k.shape[0], capacity, self.a_k.shape[2])
        grown[:, : self.a_k.shape[1]] = self.a_k
        self.a_k = grown

    # -- variant-specific views -------------------------------------------------------------------------------

    @property
    def lrkv(self) -> bool:
        return isinstance(self.module, LRKVAttention)

    def rows(self, kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """New tokens' store rows (store streams, T, row)."""
        if self.lrkv:
            k_s, v_s, z_k, z_v = kv
            return torch.cat((k_s, v_s, z_k.flatten(2), z_v.flatten(2)), dim=-1)
        k, v = kv
        return torch.cat((k, v), dim=-1).flatten(0, 1)

    def keys_values(self, rows: torch.Tensor, positions: torch.Tensor, values: bool = True):
        """Rows (pool streams, n, row) at token positions (pool streams, n) -> K, V (B, H, n, D); V None if not asked."""
        mod, B, D, H = self.module, self.batch, self.module.head_dim, self.module.n_head
        if not self.lrkv:
            k, v = rows.view(B, H, -1, 2 * D).split(D, dim=-1)
            return k, v if values else None
        rk, rv = mod.rank_k, mod.rank_v
        k_s, v_s, z_k, z_v = rows.split([D, D, H * rk, H * rv], dim=-1)
        n = rows.shape[1]
        cos, sin = mod.rope(positions.flatten(), D)
        cos, sin = cos.view(B, 1, n, -1), sin.view(B, 1, n, -1)
        k = lrkv_keys(k_s, z_k.view(B, n, H, rk).transpose(1, 2), mod.b_k, cos, sin)
        if not values:
            return k, None
        return k, lrkv_values(v_s, z_v.view(B, n, H, rv).transpose(1, 2), mod.b_v)

    def proxy_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, ...) per-head tensor -> (proxies, heads per proxy, ...)."""
        return x if self.geo["heads"] > 1 else x.flatten(0, 1).unsqueeze(1)

    # -- attention ----------------------------------------------------------------------------------------------

    def attend(self, module, q: torch.Tensor, kv: tuple[torch.Tensor, ...], key_valid: torch.Tensor | None):
        if module is not self.module:
            raise RuntimeError(f"LRQK layer {self.index} was called by a different attention module")
        B, H, T, D = q.shape
        y = self.prefill(q, kv, key_valid) if T > 1 or self.length == 0 else self.decode(q, kv)
        return y.transpose(1, 2).reshape(B, T, H * D)

    def prefill(self, q, kv, key_valid):
        if self.length != 0:
            raise RuntimeError("LRQK prefill runs once, on an empty cache; decode one token per step afterwards")
        o, cfg, mod = self.owner, self.owner.cfg, self.module
        B, H, T, D = q.shape
        rows = self.rows(kv)
        self.store.write(0, rows)
        positions = torch.arange(T, device=q.device)
        if self.lrkv:
            k, v = self.keys_values(rows, positions.expand(B, T))
        else:
            k, v = (t.repeat_interleave(H // mod.n_kv_head, dim=1) for t in kv)
        y = causal_attention(q, k, v, key_valid=key_valid)
        # factors (fp32), padding rows zeroed so they do not shape the fit
        keep = o.valid[:, :T, None].float()
        qf, kf = q.float() * keep[:, None], k.float() * keep[:, None]
        if self.geo["heads"] > 1:  # lrkv shared proxy: all heads' true scores against one A_K; B_K rebuilds rope(k_s)
            k_rec = rope(kv[0], *mod.rope(positions, D)).float() * keep
            f = als_factorize(qf, kf, k_rec, cfg.rank, cfg.prefill_iters, cfg.tol, o.generator)
        else:
            kf = self.proxy_view(kf)
            f = als_factorize(self.proxy_view(qf), kf, kf[:, 0], cfg.rank, cfg.prefill_iters, cfg.tol, o.generator)
        self.a_k[:, :T] = f.a_k
        self.b_q, self.b_k = f.b_q, f.b_k
        self.length = T
        # seed the pool from the prompt rows already on the device: sinks, recent window, proxy top-k
        if cfg.scores == "exact":
            scores = q[:, :, -1:].float() @ k.float().mT
            scores = scores[:, :, 0].reshape(self.geo["pool"], -1, T)
        else:
            scores = (f.a_k[:, None] @ f.a_q[:, :, -1, :, None])[..., 0].reshape(self.geo["pool"], -1, T)
        sinks, sinks_ok, recent, recent_ok, cand = self.window(T, include_current=True)
        top, top_ok = select_top_k(scores, cand, cfg.top_k)
        fresh = torch.cat((sinks, recent, top), dim=1)
        fresh_ok = torch.cat((sinks_ok, recent_ok, top_ok), dim=1)
        pool_rows = rows[self.store_of]
        fresh_rows = pool_rows.gather(1, fresh.clamp(min=0)[..., None].expand(-1, -1, pool_rows.shape[-1]))
        none = fresh[:, :0]
        self.active, _ = self.pool.update(none, none.bool(), 0, fresh, fresh_ok, fresh_rows, self.store,
                                          self.store_of, o.h2d)
        return y

    def window(self, length: int, include_current: bool):
        """Per pool stream: sink ids, recent-window ids (the last `recent` tokens; without the current one when
        it is passed in fresh), and the candidate mask over [0, length) for top-k: valid, not sink, not recent."""
        cfg, dev = self.owner.cfg, self.a_k.device
        valid = self.owner.valid[self.batch_of, :length]
        start = max(length - cfg.recent, 0)
        recent = torch.arange(start, length if include_current else length - 1, device=dev).expand(len(valid), -1)
        recent_ok = valid.gather(1, recent)
        first = valid.int().argmax(1, keepdim=True)  # left padding: the first real token
        sinks = first + torch.arange(cfg.sinks, device=dev)
        sinks_ok = sinks < start
        sinks = torch.where(sinks_ok, sinks, -1)
        ids = torch.arange(length, device=dev)
        cand = valid & (ids >= first + cfg.sinks) & (ids < start)
        return sinks, sinks_ok, torch.where(recent_ok, recent, -1), recent_ok, cand

    def decode(self, q, kv):
        o, cfg, mod = self.owner, self.owner.cfg, self.module
        B, H, _, D = q.shape
        t = self.length
        L = t + 1
        rows = self.rows(kv)  # (store streams, 1, row)
        self.store.write(t, rows)
        pos_t = torch.full((self.geo["pool"], 1), t, device=q.device)
        fresh_rows = rows[self.store_of]
        # proxy update (spec §2): self score q_h . k_h,t, exact scores on the resident set Omega, q̂/k̂ solve,
        # Kaczmarz updates of B_Q, B_K, and k̂ as the new A_K row
        k_t, _ = self.keys_values(fresh_rows, pos_t, values=False)
        qf, kf = q[:, :, 0].float(), k_t[:, :, 0].float()
        s_self = (qf * kf).sum(-1)  # (B, H)
        pool = self.pool
        resident, tokens = pool.token >= 0, pool.token.clamp(min=0)
        k_pool, _ = self.keys_values(pool.slots, tokens, values=False)
        s_pool = (q.float() @ k_pool.float().mT)[:, :, 0] * resident.view(B, -1, resident.shape[1])
        per = self.a_k.shape[0] // tokens.shape[0]  # proxies per pool stream (lrkv per_head: H)
        a_omega = self.a_k.gather(1, tokens.repeat_interleave(per, 0)[..., None].expand(-1, -1, cfg.rank)).float()
        a_omega = a_omega * resident.repeat_interleave(per, 0)[..., None]
        if self.geo["heads"] > 1:
            k_rec = rope(kv[0][:, 0], *mod.rope(pos_t[:1, 0], D)).float()
        else:
            k_rec = kf.flatten(0, 1)
        q_p = self.proxy_view(qf)
        q_hat, k_hat = decode_solve(q_p, self.proxy_view(s_self), k_rec, self.proxy_view(s_pool), a_omega,
                                    self.b_q, self.b_k, cfg.decode_iters, cfg.tol)
        self.b_q, self.b_k = kaczmarz(self.b_q, q_hat, q_p), kaczmarz(self.b_k, k_hat, k_rec)
        self.a_k[:, t] = k_hat
        self.length = L
        # selection: sinks + recent window (kept resident) + top-k of the older tokens
        sinks, sinks_ok, recent, recent_ok, cand = self.window(L, include_current=False)
        exact = self.exact_scores(q, L) if cfg.scores == "exact" or cfg.measure_recall else None
        proxy = (self.a_k[:, None, :L].float() @ q_hat[..., None])[..., 0].reshape(self.geo["pool"], -1, L)
        top, top_ok = select_top_k(exact if cfg.scores == "exact" else proxy, cand, cfg.top_k)
        if cfg.measure_recall:
            self.recall.append(_recall(top, top_ok, *select_top_k(exact, cand, cfg.top_k)))
        self.selected, self.selected_ok = top, top_ok
        wanted = torch.cat((sinks, recent, top), dim=1)
        wanted_ok = torch.cat((sinks_ok, recent_ok, top_ok), dim=1)
        self.active, counts = pool.update(wanted, wanted_ok, sinks.shape[1] + recent.shape[1], pos_t,
                                          torch.ones_like(pos_t, dtype=torch.bool), fresh_rows, self.store,
                                          self.store_of, o.h2d)
        for key, n in counts.items():
            o.last_step[key] += n
        # exact attention over the active slots
        k, v = self.keys_values(pool.slots, pool.token.clamp(min=0))
        mask = self.active.view(B, -1, 1, self.active.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def exact_scores(self, q: torch.Tensor, length: int) -> torch.Tensor:
        """Oracle: true q_h . k_h(j) for every stored token (pool streams, heads, length); gathers the whole store."""
        self.store.ready()
        rows = self.store.rows[self.store_of.to(self.store.rows.device), :length].to(q.device)
        k, _ = self.keys_values(rows, torch.arange(length, device=q.device).expand(len(rows), -1), values=False)
        return (q.float() @ k.float().mT)[:, :, 0].reshape(self.geo["pool"], -1, length)


def _recall(top, ok, exact_top, exact_ok) -> float:
    """Mean over streams of |proxy top-k ∩ exact top-k| / |exact top-k| (streams with no candidates skipped)."""
    match = ((top[:, :, None] == exact_top[:, None, :]) & ok[:, :, None] & exact_ok[:, None, :]).sum((1, 2))
    n = exact_ok.sum(1)
    has = n > 0
    return float((match[has] / n[has]).mean()) if bool(has.any()) else 1.0


class _LRQKState:
    """Duck-types ModelCache for Transformer.forward: per-layer LRQK caches, the length and the validity history."""

    def __init__(self, decoder: "LRQKDecoder", batch: int, capacity: int):
        self.cfg, self.model_cfg = decoder.cfg, decoder.model.cfg
        self.gpu_device, self.store_device, self.pin = decoder.gpu_device, decoder.store_device, decoder.pin
        self.dtype = decoder.dtype
        self.generator = torch.Generator(self.gpu_device).manual_seed(self.cfg.seed)
        g = _geometry(self.model_cfg, self.cfg, batch)
        self.h2d = HostToDevice(g["pool"] * self.cfg.slots, g["row"], self.dtype, self.store_device,
                                self.gpu_device, self.pin, decoder.offload)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=self.gpu_device)
        self.padded = False
        self.layers = [LRQKLayer(self, i, block.attn) for i, block in enumerate(decoder.model.layers)]
        for layer in self.layers:
            layer.allocate(batch, capacity)
        self.last_step = {k: 0 for k in STAT_KEYS}

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def ensure(self, length: int) -> None:
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        for layer in self.layers:
            layer.grow(capacity)
        grown = self.valid.new_zeros(self.valid.shape[0], capacity)
        grown[:, : self.capacity] = self.valid
        self.valid = grown

    def key_valid(self, valid: torch.Tensor | None, batch: int, steps: int, device) -> torch.Tensor | None:
        start = self.length
        self.padded = self.padded or valid is not None
        self.valid[:, start : start + steps] = True if valid is None else valid
        return self.valid[:, : start + steps] if self.padded else None


class LRQKDecoder:
    """LRQK generation state over a Transformer (lrkv, mha, gqa, mqa). `prefill` once, then `step` per token.

    offload=True keeps the row store on `cpu_device` (pinned when the GPU is CUDA); offload=False keeps it on
    `gpu_device` — the same algorithm without transfers, for comparison. `max_context` sizes the store up front
    (the memory plan's number); without it the store starts at twice the prompt and doubles when full.
    """

    def __init__(self, model: Transformer, cfg: LRQKConfig, gpu_device="cpu", cpu_device="cpu", pin_memory=True,
                 offload: bool = True, max_context: int | None = None):
        m = model.cfg
        _geometry(m, cfg, 1)  # refuses unsupported attention types
        cfg.validate(m.dh)
        expected = LRKVAttention if m.attn == "lrkv" else GroupedQueryAttention
        for i, block in enumerate(model.layers):
            attn = block.attn
            if not isinstance(attn, expected) or attn.n_head != m.n_head or attn.head_dim != m.dh or (
                    m.attn != "lrkv" and attn.n_kv_head != m.kv_heads) or (
                    m.attn == "lrkv" and (attn.rank_k, attn.rank_v) != (m.rank_k, m.rank_v)):
                raise ValueError(f"layer {i}: attention module {type(attn).__name__} does not match the model "
                                 f"config (attn={m.attn}, n_head={m.n_head}, head_dim={m.dh})")
        self.model, self.cfg = model, cfg
        self.gpu_device, self.cpu_device = torch.device(gpu_device), torch.device(cpu_device)
        param = next(model.parameters())
        if param.device != self.gpu_device:
            raise ValueError(f"model is on {param.device}, expected gpu_device {self.gpu_device}")
        self.dtype = param.dtype
        self.offload, self.max_context = offload, max_context
        self.store_device = self.cpu_device if offload else self.gpu_device
        self.pin = pin_memory and offload and self.gpu_device.type == "cuda"
        self.state: _LRQKState | None = None
        self.stats = new_stats()

    @staticmethod
    def memory_plan(model_cfg: ModelConfig, cfg: LRQKConfig, batch: int, max_context: int,
                    dtype: torch.dtype = torch.float32, offload: bool = True) -> MemoryPlan:
        return memory_plan(model_cfg, cfg, batch, max_context, dtype, offload)

    @property
    def length(self) -> int:
        return self.state.length

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, valid: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Exact attention over the prompt (B, T) -> logits (B, T, V) (the last `logits_to_keep` positions if > 0);
        the last `sparse_query_tail` tokens go through the sparse decode path instead (their logits are decode logits)."""
        B, T = idx.shape
        tail = self.cfg.sparse_query_tail
        if tail >= T:
            raise ValueError(f"sparse_query_tail {tail} must be smaller than the prompt length {T}")
        if tail and valid is not None and not bool(valid[:, T - tail :].all()):
            raise ValueError("sparse_query_tail covers padding: every row must have >= sparse_query_tail real tokens")
        capacity = self.max_context if self.max_context is not None else 2 * T
        if capacity < T:
            raise ValueError(f"prompt length {T} exceeds max_context {capacity}")
        check_fits(self.memory_plan(self.model.cfg, self.cfg, B, capacity, self.dtype, self.offload), self.gpu_device)
        self.state = _LRQKState(self, B, capacity)
        self.stats = new_stats()
        head = T - tail
        keep_head = 0 if logits_to_keep == 0 else max(logits_to_keep - tail, 1)
        logits = [self.model(idx[:, :head], cache=self.state, valid=None if valid is None else valid[:, :head],
                             logits_to_keep=keep_head)]
        logits += [self.step(idx[:, i : i + 1]) for i in range(head, T)]
        logits = torch.cat(logits, dim=1)
        return logits[:, -logits_to_keep:] if logits_to_keep > 0 else logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One sparse decode step: tokens (B, 1) -> logits (B, 1, V)."""
        if self.state is None:
            raise RuntimeError("LRQKDecoder.step called before prefill")
        if tokens.shape != (self.state.valid.shape[0], 1):
            raise ValueError(f"step expects tokens of shape ({self.state.valid.shape[0]}, 1), got {tuple(tokens.shape)}")
        self.state.ensure(self.length + 1)
        self.state.last_step = {k: 0 for k in STAT_KEYS}
        logits = self.model(tokens, cache=self.state)
        last = {**self.state.last_step, "steps": 1}
        for key in STAT_KEYS:
            self.stats[key] += last[key]
        self.stats["last_step"] = last
        if self.cfg.measure_recall:
            self.stats["recall"] = [sum(layer.recall) / len(layer.recall) for layer in self.state.layers]
        return logits

    def allocated_bytes(self) -> tuple[int, int]:
        """(host, GPU) bytes actually held by the decoder state, counted from its tensors."""
        s = self.state
        stores = [layer.store.rows for layer in s.layers] + ([s.h2d.staging] if s.h2d.staging is not None else [])
        rest = [s.valid] + [t for layer in s.layers for t in (layer.pool.slots, layer.pool.token, layer.pool.slot_of,
                                                              layer.pool.last_used, layer.a_k, layer.b_q, layer.b_k)]
        host, device = (stores, rest) if self.offload else ([], stores + rest)
        return tuple(sum(t.numel() * t.element_size() for t in ts) for ts in (host, device))
