"""Decoder-only transformer with every attention variant in one place: mha, gqa, mqa, mla, lrkv.

Pre-norm blocks (RMSNorm), rotate-half RoPE, SwiGLU MLP, no biases (except Qwen2-style q/k/v biases for
imported checkpoints), optional tied embeddings. Every attention module has the same interface,

    forward(x, positions, cache=None, key_valid=None) -> y
        x: (B, T, d); positions: (T,) absolute positions; key_valid: (B, Tk) bool, False = left padding

and describes itself once, for the decoders, converters and evaluations that need its layout: the fused
projection's blocks (`PROJ_PARTS`, `proj_split`), what one token adds to the cache (`cache_layout`, a CacheLayout),
its payload as row-store rows and the keys and values rebuilt from rows (`cache_rows`, `keys_values`: mha/gqa/mqa
and lrkv), its per-head operators (`head_weights`), `kv_numbers_per_token` and `num_flops_per_token(seq_len)`.
A layer's cache is a LayerCache, one `attend` call per forward: the exact KVCache here, or the LRQK decoder's
sparse layers. Parameters are initialised inside each module's constructor, so a DeepSpeed ZeRO-3 `zero.Init`
context that partitions a module right after its __init__ sees them set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lrkv.config import ModelConfig
from lrkv.kernels import lrkv_attend
from lrkv.kernels.reference import causal_attention, lrkv_keys, lrkv_values, rope



def rope_tables(positions: torch.Tensor, dim: int, theta: float, scaling: dict | None = None):
    """cos, sin of shape (T, dim/2) in fp32 for the given absolute positions (Llama-3 scaling optional)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    if scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, scaling)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama-3.1 frequency-dependent RoPE scaling: long wavelengths slowed by `factor`, a smooth band between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class CacheLayout:
    """What one token of one batch row adds to a layer's cache, as its attention module lays it out.

    `streams` rows of `fields` (name, width) each: mha/gqa/mqa one row [k | v] per KV head, lrkv one row
    [k_s | v_s | z_k | z_v] that every head reads, mla one row [c | k_pe]. Query head h reads row stream
    `stream_of_head(h)`; `key_heads` heads' keys are rebuilt from one row (lrkv: all H; else 1), and `group` query
    heads read each key head (GQA's group size). KVCache keeps each field as its own tensor; a row store (the LRQK
    decoder's) keeps rows with the fields concatenated, which the module's `cache_rows` builds and `split` takes
    apart.
    """

    n_head: int
    streams: int
    fields: tuple[tuple[str, int], ...]
    key_heads: int
    key_width: int  # numbers of a row the keys are rebuilt from

    @property
    def row(self) -> int:
        return sum(width for _, width in self.fields)

    @property
    def numbers_per_token(self) -> int:
        return self.streams * self.row

    @property
    def group(self) -> int:
        return self.n_head // (self.streams * self.key_heads)

    def stream_of_head(self, h: torch.Tensor) -> torch.Tensor:
        return h // (self.n_head // self.streams)

    def split(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows (..., row) -> each field (..., width), by name."""
        return dict(zip((n for n, _ in self.fields), rows.split([w for _, w in self.fields], dim=-1)))


class LayerCache(Protocol):
    """The contract between an attention module and its layer's cache at inference: one call per forward.
    KVCache (below) attends exactly; the sparse decoder's layers (lrkv/inference/sparse/engine.py) store the payload
    in their row store and attend over the rows they select."""

    def attend(self, module: "Attention", q: torch.Tensor, payload: tuple[torch.Tensor, ...],
               key_valid: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, T, D) rotated queries of T new tokens, payload their cache payload (module.cache_entries names
        it) -> the attention output (B, T, H * D_v) over every cached token, the new ones included."""
        ...


class KVCache(LayerCache):
    """One layer's exact incremental cache: named tensors laid out (B, T, ...), grown by doubling.

    Each attention variant decides what it stores (LRKV: shared k, v and per-head latents, never per-head K/V).
    Positions are implicit: the cache holds tokens 0..length-1 of every batch row.
    """

    def __init__(self):
        self.length = 0
        self.buffers: dict[str, torch.Tensor] = {}

    def append(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Append T new steps of each named tensor; return views of everything cached so far."""
        steps = next(iter(new.values())).shape[1]
        end = self.length + steps
        for name, t in new.items():
            buf = self.buffers.get(name)
            if buf is None or buf.shape[1] < end:
                grown = t.new_empty(t.shape[0], max(end, 2 * (0 if buf is None else buf.shape[1]), 16), *t.shape[2:])
                if buf is not None:
                    grown[:, : self.length] = buf[:, : self.length]
                self.buffers[name] = buf = grown
            buf[:, self.length : end] = t
        self.length = end
        return {name: buf[:, :end] for name, buf in self.buffers.items()}

    def attend(self, module, q, payload, key_valid):
        entries = self.append(**module.cache_entries(payload))
        return module.attention(q, entries, key_valid, torch.arange(self.length, device=q.device), cached=True)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Batch row i becomes row rows[i] (beam search reorders its beams)."""
        self.buffers = {name: b.index_select(0, rows.to(b.device)) for name, b in self.buffers.items()}

    def truncate(self, length: int) -> None:
        """Forget the tokens from `length` on (assisted decoding drops rejected candidates)."""
        self.length = min(self.length, length)

    def bytes_per_token(self) -> int:
        """Bytes one token of one batch row occupies, measured from the cache tensors themselves."""
        return sum(b[0, 0].numel() * b.element_size() for b in self.buffers.values())


class DecoderCache(Protocol):
    """What Transformer.forward reads of a whole-model cache: ModelCache (exact), the LRQK decoder's state, Lockstep."""

    layers: Sequence[LayerCache]

    @property
    def length(self) -> int:
        """Tokens cached so far (the next token's position)."""
        ...

    def key_valid(self, valid: torch.Tensor | None, batch: int, steps: int, device) -> torch.Tensor | None:
        """Record the new tokens' validity; return the mask over all cached keys, or None if nothing is padded."""
        ...


class ModelCache(DecoderCache):
    """Per-layer KV caches plus the key-validity history of left-padded batches (kept only once padding is seen)."""

    def __init__(self, n_layer: int):
        self.layers = [KVCache() for _ in range(n_layer)]
        self.valid = KVCache()
        self.padded = False

    @property
    def length(self) -> int:
        return self.layers[0].length

    def key_valid(self, valid: torch.Tensor | None, batch: int, steps: int, device) -> torch.Tensor | None:
        self.padded = self.padded or valid is not None
        if valid is None:
            valid = torch.ones(batch, steps, dtype=torch.bool, device=device)
        history = self.valid.append(valid=valid)["valid"]
        return history if self.padded else None


class RMSNorm(nn.Module):
    """RMSNorm in fp32, cast back before the weight (Llama/Qwen2 rounding order, so bf16 imports match exactly)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _linear(d_in: int, d_out: int, std: float, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(layer.weight, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def matmul_params(module: nn.Module) -> int:
    """Parameters that enter a matmul once per token (weights of rank >= 2); 6x this is their training FLOPs."""
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


class Attention(nn.Module):
    """The forward every variant shares, and its bookkeeping: FLOPs = 6 x projection params + the attention core
    (non-causal convention). A variant supplies its description (`cache_layout`, set in __init__ from `layout(cfg)`;
    `head_weights`) and three steps: `prepare` (rotated queries and the new tokens' payload), `cache_entries` (the
    payload as named KVCache tensors) and `attention` (exact attention over entries; key_positions rotate LRKV's
    keys, `cached` lets a cached step take the decode kernel)."""

    n_head: int
    qk_dim: int
    v_dim: int
    cache_layout: CacheLayout

    def forward(self, x, positions, cache: LayerCache | None = None, key_valid: torch.Tensor | None = None):
        q, payload = self.prepare(x, positions)
        if cache is None:
            y = self.attention(q, self.cache_entries(payload), key_valid, positions, cached=False)
        else:
            y = cache.attend(self, q, payload, key_valid)
        return self.proj(y)

    @property
    def kv_numbers_per_token(self) -> int:  # cached numbers per token for this layer
        return self.cache_layout.numbers_per_token

    def num_flops_per_token(self, seq_len: int) -> int:
        # core fwd: 2*T*qk (scores) + 2*T*v (mix) per head; bwd doubles it -> 6*H*T*(qk + v)
        return 6 * matmul_params(self) + 6 * self.n_head * seq_len * (self.qk_dim + self.v_dim)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return dtype_bytes * self.kv_numbers_per_token

    def rope(self, positions: torch.Tensor, dim: int):
        return rope_tables(positions, dim, self.cfg.rope_theta, self.cfg.rope_scaling)

    def output_head_weights(self) -> torch.Tensor:
        """W_O^h as (H, d, D) fp64: columns h*D..(h+1)*D of the output projection's (d, H*D) weight."""
        return self.proj.weight.double().view(-1, self.n_head, self.v_dim).permute(1, 0, 2)


def _per_head(w: torch.Tensor, n: int) -> torch.Tensor:
    """(n*m, d) Linear weight rows -> (n, d, m) per-head maps acting as x @ map."""
    return w.view(n, -1, w.shape[-1]).transpose(1, 2)


class GroupedQueryAttention(Attention):
    """MHA (kv_heads = n_head), GQA (kv_heads groups) and MQA (kv_heads = 1). Caches rotated k and v per KV head;
    query head h reads KV head h // (H / G)."""

    PROJ_PARTS = ("q", "k", "v")  # the blocks of the fused projection qkv, in order

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, G, D = cfg.n_head, cfg.kv_heads, cfg.dh
        self.n_head, self.n_kv_head, self.head_dim = H, G, D
        self.qk_dim = self.v_dim = D
        self.proj_split = dict(zip(self.PROJ_PARTS, (H * D, G * D, G * D)))
        self.cache_layout = self.layout(cfg)
        self.qkv = _linear(cfg.d_model, sum(self.proj_split.values()), cfg.init_std, bias=cfg.qkv_bias)
        self.proj = _linear(H * D, cfg.d_model, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def layout(cfg: ModelConfig) -> CacheLayout:
        return CacheLayout(cfg.n_head, cfg.kv_heads, (("k", cfg.dh), ("v", cfg.dh)), key_heads=1, key_width=cfg.dh)

    def prepare(self, x, positions):
        """x (B, T, d) -> q (B, H, T, D) rotated, payload (k rotated, v), each (B, G, T, D)."""
        B, T, _ = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split(list(self.proj_split.values()), dim=-1)
        cos, sin = self.rope(positions, D)
        q = rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)
        k = rope(k.view(B, T, G, D).transpose(1, 2), cos, sin)
        return q, (k, v.view(B, T, G, D).transpose(1, 2))

    @staticmethod
    def cache_entries(payload):
        """What a KVCache holds for (k, v) (B, G, T, D): the rotated keys and the values, laid out (B, T, G, D)."""
        return {"k": payload[0].transpose(1, 2), "v": payload[1].transpose(1, 2)}

    @staticmethod
    def cache_rows(payload) -> torch.Tensor:
        """The payload as row-store rows (B * G, T, 2 D): [k | v] per KV head."""
        return torch.cat(payload, dim=-1).flatten(0, 1)

    def attention(self, q, entries, key_valid, key_positions, cached):
        B, H, T, D = q.shape
        k, v = entries["k"].transpose(1, 2), entries["v"].transpose(1, 2)
        y = causal_attention(q, k, v, key_valid=key_valid)  # grouped: query head h reads KV head h // (H / G)
        return y.transpose(1, 2).reshape(B, T, H * D)

    def keys_values(self, rows: torch.Tensor, positions: torch.Tensor, values: bool = True):
        """Cache rows (B, S, n, row) of any S row streams (KV heads, or their copies per query head) at token
        positions (B, S, n) -> K, V (B, S, n, D) (V None unless asked): the keys are stored rotated."""
        parts = self.cache_layout.split(rows)
        return parts["k"], parts["v"] if values else None

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per query head W_Q, W_K, W_V, W_O as (H, d, D) fp64 maps (x @ W); head h's K and V are its KV head's."""
        H, G = self.n_head, self.n_kv_head
        q, k, v = self.qkv.weight.double().split(list(self.proj_split.values()))
        kv_head = self.cache_layout.stream_of_head(torch.arange(H))
        return _per_head(q, H), _per_head(k, G)[kv_head], _per_head(v, G)[kv_head], self.output_head_weights()


class LRKVAttention(Attention):
    """LRKV (docs/lrkv.md §1): K_h = X W_K^s + (X A_h^K) B_h^K, V_h likewise; RoPE on the reconstructed K_h.

    One fused GEMM gives [q | k_s | v_s | z_k (H*r_k) | z_v (H*r_v)]; the cache holds k_s, v_s (pre-RoPE)
    and the per-head latents z_k, z_v, i.e. 2*d_h + H*(r_k + r_v) numbers per token in one row every head reads.
    """

    PROJ_PARTS = ("q", "k_s", "v_s", "z_k", "z_v")  # the blocks of the fused projection qkv, in order

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D, rk, rv = cfg.n_head, cfg.dh, cfg.rank_k, cfg.rank_v
        self.n_head, self.head_dim, self.rank_k, self.rank_v = H, D, rk, rv
        self.qk_dim = self.v_dim = D
        self.proj_split = dict(zip(self.PROJ_PARTS, (H * D, D, D, H * rk, H * rv)))
        self.cache_layout = self.layout(cfg)
        self.qkv = _linear(cfg.d_model, sum(self.proj_split.values()), cfg.init_std)
        self.b_k = nn.Parameter(torch.empty(H, rk, D))
        self.b_v = nn.Parameter(torch.empty(H, rv, D))
        for b, r in ((self.b_k, rk), (self.b_v, rv)):
            if cfg.lrkv_b_init == "zero":  # step 0 is exactly MQA; heads diverge through their queries
                nn.init.zeros_(b)
            else:
                nn.init.normal_(b, std=0.5 / math.sqrt(max(r, 1)))
        self.proj = _linear(H * D, cfg.d_model, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def layout(cfg: ModelConfig) -> CacheLayout:
        H, D = cfg.n_head, cfg.dh
        fields = (("k_s", D), ("v_s", D), ("z_k", H * cfg.rank_k), ("z_v", H * cfg.rank_v))
        return CacheLayout(H, 1, fields, key_heads=H, key_width=D + H * cfg.rank_k)

    def project(self, x):
        """x (B, T, d) -> q (B, H, T, D) un-rotated, k_s, v_s (B, T, D), z_k (B, T, H, r_k), z_v (B, T, H, r_v)."""
        B, T, _ = x.shape
        H, D, rk, rv = self.n_head, self.head_dim, self.rank_k, self.rank_v
        q, k_s, v_s, z_k, z_v = self.qkv(x).split(list(self.proj_split.values()), dim=-1)
        return q.view(B, T, H, D).transpose(1, 2), k_s, v_s, z_k.view(B, T, H, rk), z_v.view(B, T, H, rv)

    def prepare(self, x, positions):
        """x (B, T, d) -> q (B, H, T, D) rotated, payload (k_s, v_s, z_k, z_v) as `project` gives them."""
        q, *payload = self.project(x)
        return rope(q, *self.rope(positions, self.head_dim)), tuple(payload)

    @staticmethod
    def cache_entries(payload):
        """What a KVCache holds: the pre-RoPE shared k_s, v_s (B, T, D) and the latents z_k, z_v (B, T, H, r)."""
        return dict(zip(("k_s", "v_s", "z_k", "z_v"), payload))

    @staticmethod
    def cache_rows(payload) -> torch.Tensor:
        """The payload as row-store rows (B, T, row): [k_s | v_s | z_k | z_v], one row per token for every head."""
        k_s, v_s, z_k, z_v = payload
        return torch.cat((k_s, v_s, z_k.flatten(2), z_v.flatten(2)), dim=-1)

    def attention(self, q, entries, key_valid, key_positions, cached):
        B, H, T, D = q.shape
        cos, sin = self.rope(key_positions, D)
        # under autocast the projections come out in bf16 while B stays an fp32 parameter: cast it like a matmul input
        b_k, b_v = self.b_k.to(q.dtype), self.b_v.to(q.dtype)
        y = lrkv_attend(q, entries["k_s"], entries["v_s"], entries["z_k"].transpose(1, 2),
                        entries["z_v"].transpose(1, 2), b_k, b_v, cos, sin, causal=True, key_valid=key_valid,
                        impl=self.cfg.attn_impl, cached=cached)
        return y.transpose(1, 2).reshape(B, T, H * D)

    def keys_values(self, rows: torch.Tensor, positions: torch.Tensor, values: bool = True):
        """Cache rows (B, 1, n, row) at token positions (B, 1, n) -> every head's rebuilt K (rotated at those
        positions), V (B, H, n, D); V None unless asked."""
        B, _, n, _ = rows.shape
        H, D = self.n_head, self.head_dim
        parts = self.cache_layout.split(rows[:, 0])
        cos, sin = self.rope(positions.flatten(), D)
        cos, sin = cos.view(B, 1, n, -1), sin.view(B, 1, n, -1)
        k = lrkv_keys(parts["k_s"], parts["z_k"].view(B, n, H, self.rank_k).transpose(1, 2), self.b_k, cos, sin)
        if not values:
            return k, None
        return k, lrkv_values(parts["v_s"], parts["z_v"].view(B, n, H, self.rank_v).transpose(1, 2), self.b_v)

    def shared_key(self, payload, positions: torch.Tensor) -> torch.Tensor:
        """The rotated shared key rope(k_s) (B, T, D) of payload's tokens at `positions` (T,): what every head's key
        has in common (LRQK's shared proxy fits it, docs/lrqk.md §7)."""
        return rope(payload[0], *self.rope(positions, self.head_dim))

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per head W_Q, W_K^h = W_K^s + A_h B_h, W_V^h likewise, W_O as (H, d, D) fp64 maps (x @ W)."""
        H = self.n_head
        q, k_s, v_s, a_k, a_v = self.qkv.weight.double().split(list(self.proj_split.values()))
        wk = k_s.T + _per_head(a_k, H) @ self.b_k.double()
        wv = v_s.T + _per_head(a_v, H) @ self.b_v.double()
        return _per_head(q, H), wk, wv, self.output_head_weights()


class MultiHeadLatentAttention(Attention):
    """MLA (DeepSeek-V2): KV compressed to an RMSNorm'd latent c (d_c) plus one decoupled RoPE key (d_R)
    shared by heads; queries direct or through their own latent (d_c'). Caches c and the rotated k_R."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D, dc, dq, dr = cfg.n_head, cfg.dh, cfg.mla_kv_rank, cfg.mla_q_rank, cfg.mla_rope_dim
        self.n_head, self.head_dim, self.kv_rank, self.rope_dim = H, D, dc, dr
        self.qk_dim, self.v_dim = D + dr, D
        self.cache_layout = self.layout(cfg)
        std = cfg.init_std
        if dq > 0:
            self.wq_a = _linear(cfg.d_model, dq, std)
            self.q_norm = RMSNorm(dq, eps=cfg.norm_eps)
            self.wq_b = _linear(dq, H * (D + dr), std)
        else:
            self.wq = _linear(cfg.d_model, H * (D + dr), std)
        self.wkv_a = _linear(cfg.d_model, dc + dr, std)  # [W^DKV | W^KR]
        self.kv_norm = RMSNorm(dc, eps=cfg.norm_eps)
        self.wkv_b = _linear(dc, H * 2 * D, std)  # per head [W^UK_h | W^UV_h]
        self.proj = _linear(H * D, cfg.d_model, std / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def layout(cfg: ModelConfig) -> CacheLayout:
        dc, dr = cfg.mla_kv_rank, cfg.mla_rope_dim
        return CacheLayout(cfg.n_head, 1, (("c", dc), ("k_pe", dr)), key_heads=cfg.n_head, key_width=dc + dr)

    def prepare(self, x, positions):
        """x (B, T, d) -> q (B, H, T, D + d_R) rotated in its RoPE part, payload (c (B, T, d_c), k_pe (B, T, d_R))."""
        B, T, _ = x.shape
        H, D, dr = self.n_head, self.head_dim, self.rope_dim
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.cfg.mla_q_rank > 0 else self.wq(x)
        q_nope, q_pe = q.view(B, T, H, D + dr).transpose(1, 2).split([D, dr], dim=-1)
        c, k_pe = self.wkv_a(x).split([self.kv_rank, dr], dim=-1)
        cos, sin = self.rope(positions, dr)
        q_pe, k_pe = rope(q_pe, cos, sin), rope(k_pe, cos, sin)
        return torch.cat((q_nope, q_pe), dim=-1), (self.kv_norm(c), k_pe)

    @staticmethod
    def cache_entries(payload):
        return {"c": payload[0], "k_pe": payload[1]}

    def attention(self, q, entries, key_valid, key_positions, cached):
        B, H, T, _ = q.shape
        D, dr = self.head_dim, self.rope_dim
        c, k_pe = entries["c"], entries["k_pe"]
        Tk = c.shape[1]
        k_nope, v = self.wkv_b(c).view(B, Tk, H, 2 * D).transpose(1, 2).split([D, D], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(B, H, Tk, dr)), dim=-1)
        y = causal_attention(q, k, v, scale=1.0 / math.sqrt(D + dr), key_valid=key_valid)
        return y.transpose(1, 2).reshape(B, T, H * D)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per head W_Q, W_K, W_V, W_O as (H, d, D) fp64 maps (x @ W) of the content part only: the shared RoPE key
        is left out (docs/lrkv.md §7). The latents' RMSNorm gain is folded into the down-projection; its 1/rms is a
        per-token scalar common to all heads, so it scales every head's operator alike and is left out."""
        H, D, dc = self.n_head, self.head_dim, self.kv_rank
        down = self.wkv_a.weight.double()[:dc].T * self.kv_norm.weight.double()
        up = self.wkv_b.weight.double().view(H, 2 * D, dc)
        wk, wv = down @ up[:, :D].transpose(1, 2), down @ up[:, D:].transpose(1, 2)
        if self.cfg.mla_q_rank > 0:
            q_down = self.wq_a.weight.double().T * self.q_norm.weight.double()
            wq = q_down @ self.wq_b.weight.double().view(H, -1, q_down.shape[1])[:, :D].transpose(1, 2)
        else:
            wq = self.wq.weight.double().view(H, -1, self.wq.weight.shape[1])[:, :D].transpose(1, 2)
        return wq, wk, wv, self.output_head_weights()


ATTENTION = {  # the one place a variant name picks its class
    "mha": GroupedQueryAttention,
    "gqa": GroupedQueryAttention,
    "mqa": GroupedQueryAttention,
    "lrkv": LRKVAttention,
    "mla": MultiHeadLatentAttention,
}


def cache_layout(cfg: ModelConfig) -> CacheLayout:
    """cfg's attention cache layout without building the model (memory plans)."""
    return ATTENTION[cfg.attn].layout(cfg)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = _linear(cfg.d_model, 2 * cfg.ffn_dim, cfg.init_std)  # [gate | up]
        self.proj = _linear(cfg.ffn_dim, cfg.d_model, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.attn not in ATTENTION:
            raise ValueError(f"unknown attention type '{cfg.attn}', expected one of {sorted(ATTENTION)}")
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = ATTENTION[cfg.attn](cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, positions, cache: LayerCache | None = None, key_valid: torch.Tensor | None = None):
        x = x + self.attn(self.attn_norm(x), positions, cache, key_valid)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = _linear(cfg.d_model, cfg.vocab_size, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: DecoderCache | None = None,
                valid: torch.Tensor | None = None, logits_to_keep: int = 0):
        """Logits (B, T, V); with targets, the mean next-token cross-entropy instead (targets -100 ignored).
        logits_to_keep > 0 projects only the last that many positions (a long prefill needs just the last one).

        valid (B, T) bool marks real tokens of left-padded rows; RoPE is relative, so a row padded on the left
        gets the same outputs as unpadded once the padding keys are masked.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=idx.device)
        key_valid = cache.key_valid(valid, B, T, idx.device) if cache is not None else valid
        x = self.embed(idx)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, positions, layer_cache, key_valid, use_reentrant=False)
            else:
                x = layer(x, positions, layer_cache, key_valid)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100)

    def new_cache(self) -> ModelCache:
        return ModelCache(len(self.layers))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        return n - self.embed.weight.numel() if non_embedding else n

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (fwd + bwd) per token: 6 x matmul params + attention core; embedding lookup excluded."""
        body = sum(layer.attn.num_flops_per_token(seq_len) + 6 * matmul_params(layer.mlp) for layer in self.layers)
        return body + 6 * self.lm_head.weight.numel()

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes per token over all layers (bf16 by default), from each variant's layout."""
        return sum(layer.attn.kv_bytes_per_token(dtype_bytes) for layer in self.layers)
