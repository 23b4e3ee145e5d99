"""Decoder-only transformer with every attention variant in one place: mha, gqa, mqa, mla, lrkv.

Pre-norm blocks (RMSNorm), rotate-half RoPE, SwiGLU MLP, no biases (except Qwen2-style q/k/v biases for
imported checkpoints), optional tied embeddings. Every attention module has the same interface,

    forward(x, positions, cache=None, key_valid=None) -> y
        x: (B, T, d); positions: (T,) absolute positions; key_valid: (B, Tk) bool, False = left padding

owns its cache layout (what it appends to a KVCache), and reports `kv_numbers_per_token` and
`num_flops_per_token(seq_len)`. Parameters are initialised inside each module's constructor, so a
DeepSpeed ZeRO-3 `zero.Init` context that partitions a module right after its __init__ sees them set.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lrkv.config import ModelConfig
from lrkv.kernels import lrkv_attend
from lrkv.kernels.reference import causal_attention, rope



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


class KVCache:
    """One layer's incremental cache: named tensors laid out (B, T, ...), grown by doubling.

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

    def bytes_per_token(self) -> int:
        """Bytes one token of one batch row occupies, measured from the cache tensors themselves."""
        return sum(b[0, 0].numel() * b.element_size() for b in self.buffers.values())


class ModelCache:
    """Per-layer KV caches plus the key-validity history of left-padded batches (kept only once padding is seen)."""

    def __init__(self, n_layer: int):
        self.layers = [KVCache() for _ in range(n_layer)]
        self.valid = KVCache()
        self.padded = False

    @property
    def length(self) -> int:
        return self.layers[0].length

    def key_valid(self, valid: torch.Tensor | None, batch: int, steps: int, device) -> torch.Tensor | None:
        """Record the new tokens' validity; return the mask over all cached keys, or None if nothing is padded."""
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
    """Shared bookkeeping: FLOPs = 6 x projection params + the attention core (non-causal convention)."""

    n_head: int
    qk_dim: int
    v_dim: int
    kv_numbers_per_token: int  # cached numbers per token for this layer

    def num_flops_per_token(self, seq_len: int) -> int:
        # core fwd: 2*T*qk (scores) + 2*T*v (mix) per head; bwd doubles it -> 6*H*T*(qk + v)
        return 6 * matmul_params(self) + 6 * self.n_head * seq_len * (self.qk_dim + self.v_dim)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return dtype_bytes * self.kv_numbers_per_token

    def rope(self, positions: torch.Tensor, dim: int):
        return rope_tables(positions, dim, self.cfg.rope_theta, self.cfg.rope_scaling)


class GroupedQueryAttention(Attention):
    """MHA (kv_heads = n_head), GQA (kv_heads groups) and MQA (kv_heads = 1). Caches rotated k and v per KV head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, G, D = cfg.n_head, cfg.kv_heads, cfg.dh
        self.n_head, self.n_kv_head, self.head_dim = H, G, D
        self.qk_dim = self.v_dim = D
        self.kv_numbers_per_token = 2 * G * D
        self.qkv = _linear(cfg.d_model, (H + 2 * G) * D, cfg.init_std, bias=cfg.qkv_bias)
        self.proj = _linear(H * D, cfg.d_model, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def forward(self, x, positions, cache: KVCache | None = None, key_valid: torch.Tensor | None = None):
        B, T, _ = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, G * D, G * D], dim=-1)
        cos, sin = self.rope(positions, D)
        q = rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)
        k = rope(k.view(B, T, G, D).transpose(1, 2), cos, sin)
        v = v.view(B, T, G, D).transpose(1, 2)
        if hasattr(cache, "attend"):  # LRQK decoder (lrkv/inference/lrqk/) stores K/V and attends itself
            return self.proj(cache.attend(self, q, (k, v), key_valid))
        if cache is not None:
            full = cache.append(**self.cache_entries((k, v)))
            k, v = full["k"].transpose(1, 2), full["v"].transpose(1, 2)
        y = causal_attention(q, k, v, key_valid=key_valid)  # grouped: query head h reads KV head h // (H / G)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    @staticmethod
    def cache_entries(kv):
        """What a KVCache holds for (k, v) (B, G, T, D): the rotated keys and the values, laid out (B, T, G, D)."""
        return {"k": kv[0].transpose(1, 2), "v": kv[1].transpose(1, 2)}


class LRKVAttention(Attention):
    """LRKV (spec lrkv.md §1): K_h = X W_K^s + (X A_h^K) B_h^K, V_h likewise; RoPE on the reconstructed K_h.

    One fused GEMM gives [q | k_s | v_s | z_k (H*r_k) | z_v (H*r_v)]; the cache holds k_s, v_s (pre-RoPE)
    and the per-head latents z_k, z_v, i.e. 2*d_h + H*(r_k + r_v) numbers per token.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D, rk, rv = cfg.n_head, cfg.dh, cfg.rank_k, cfg.rank_v
        self.n_head, self.head_dim, self.rank_k, self.rank_v = H, D, rk, rv
        self.qk_dim = self.v_dim = D
        self.kv_numbers_per_token = 2 * D + H * (rk + rv)
        self.qkv = _linear(cfg.d_model, H * D + 2 * D + H * (rk + rv), cfg.init_std)
        self.b_k = nn.Parameter(torch.empty(H, rk, D))
        self.b_v = nn.Parameter(torch.empty(H, rv, D))
        for b, r in ((self.b_k, rk), (self.b_v, rv)):
            if cfg.lrkv_b_init == "zero":  # step 0 is exactly MQA; heads diverge through their queries
                nn.init.zeros_(b)
            else:
                nn.init.normal_(b, std=0.5 / math.sqrt(max(r, 1)))
        self.proj = _linear(H * D, cfg.d_model, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def project(self, x):
        """x (B, T, d) -> q (B, H, T, D) un-rotated, k_s, v_s (B, T, D), z_k (B, T, H, r_k), z_v (B, T, H, r_v)."""
        B, T, _ = x.shape
        H, D, rk, rv = self.n_head, self.head_dim, self.rank_k, self.rank_v
        q, k_s, v_s, z_k, z_v = self.qkv(x).split([H * D, D, D, H * rk, H * rv], dim=-1)
        return q.view(B, T, H, D).transpose(1, 2), k_s, v_s, z_k.view(B, T, H, rk), z_v.view(B, T, H, rv)

    @staticmethod
    def cache_entries(kv):
        """What a KVCache holds: the pre-RoPE shared k_s, v_s (B, T, D) and the latents z_k, z_v (B, T, H, r)."""
        return dict(zip(("k_s", "v_s", "z_k", "z_v"), kv))

    def forward(self, x, positions, cache: KVCache | None = None, key_valid: torch.Tensor | None = None):
        B, T, _ = x.shape
        q, k_s, v_s, z_k, z_v = self.project(x)
        cos, sin = self.rope(positions, self.head_dim)
        q = rope(q, cos, sin)
        if hasattr(cache, "attend"):  # LRQK decoder (lrkv/inference/lrqk/) stores the payload and attends itself
            return self.proj(cache.attend(self, q, (k_s, v_s, z_k, z_v), key_valid))
        if cache is not None:
            full = cache.append(**self.cache_entries((k_s, v_s, z_k, z_v)))
            k_s, v_s, z_k, z_v = full["k_s"], full["v_s"], full["z_k"], full["z_v"]
            cos, sin = self.rope(torch.arange(cache.length, device=x.device), self.head_dim)
        # under autocast the projections come out in bf16 while B stays an fp32 parameter: cast it like a matmul input
        b_k, b_v = self.b_k.to(q.dtype), self.b_v.to(q.dtype)
        y = lrkv_attend(q, k_s, v_s, z_k.transpose(1, 2), z_v.transpose(1, 2), b_k, b_v, cos, sin, causal=True,
                        key_valid=key_valid, impl=self.cfg.attn_impl, cached=cache is not None)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MultiHeadLatentAttention(Attention):
    """MLA (DeepSeek-V2): KV compressed to an RMSNorm'd latent c (d_c) plus one decoupled RoPE key (d_R)
    shared by heads; queries direct or through their own latent (d_c'). Caches c and the rotated k_R."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D, dc, dq, dr = cfg.n_head, cfg.dh, cfg.mla_kv_rank, cfg.mla_q_rank, cfg.mla_rope_dim
        self.n_head, self.head_dim, self.kv_rank, self.rope_dim = H, D, dc, dr
        self.qk_dim, self.v_dim = D + dr, D
        self.kv_numbers_per_token = dc + dr
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

    def forward(self, x, positions, cache: KVCache | None = None, key_valid: torch.Tensor | None = None):
        B, T, _ = x.shape
        H, D, dr = self.n_head, self.head_dim, self.rope_dim
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.cfg.mla_q_rank > 0 else self.wq(x)
        q_nope, q_pe = q.view(B, T, H, D + dr).transpose(1, 2).split([D, dr], dim=-1)
        c, k_pe = self.wkv_a(x).split([self.kv_rank, dr], dim=-1)
        cos, sin = self.rope(positions, dr)
        q_pe, k_pe = rope(q_pe, cos, sin), rope(k_pe, cos, sin)
        c = self.kv_norm(c)
        if cache is not None:
            full = cache.append(c=c, k_pe=k_pe)
            c, k_pe = full["c"], full["k_pe"]
        Tk = c.shape[1]
        k_nope, v = self.wkv_b(c).view(B, Tk, H, 2 * D).transpose(1, 2).split([D, D], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(B, H, Tk, dr)), dim=-1)
        y = causal_attention(torch.cat((q_nope, q_pe), dim=-1), k, v, scale=1.0 / math.sqrt(D + dr), key_valid=key_valid)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


ATTENTION = {
    "mha": GroupedQueryAttention,
    "gqa": GroupedQueryAttention,
    "mqa": GroupedQueryAttention,
    "lrkv": LRKVAttention,
    "mla": MultiHeadLatentAttention,
}


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

    def forward(self, x, positions, cache: KVCache | None = None, key_valid: torch.Tensor | None = None):
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: ModelCache | None = None,
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
