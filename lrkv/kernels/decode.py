"""Flash-decoding LRKV attention: a few new queries over the LRKV cache (docs/lrkv.md §3.2, Option A).

The cache holds k_s, v_s (B, Tk, D) and the per-head latents z_k (B, Tk, H, r_k), z_v (B, Tk, H, r_v), read in
that layout (no transposed copies). One program owns one batch row and one tile of BLOCK_N cached positions
(a "split" of the context) for *all* heads: the shared k_s / v_s / RoPE tiles are read once and reused by every
head, so the bytes read per step are the LRKV cache's, about half of MHA's. Per head it rebuilds the keys on
chip (k_s + z_k @ b_k[h], then RoPE at the key positions), takes a tile-local softmax and accumulates V in rank
space (p @ v_s and p @ z_v[h]); it writes the split's partial (m, l, acc_s, acc_z). A torch epilogue merges the
splits and projects the merged latent acc_z @ b_v[h] once. Per-head K/V for the context never exist in memory.

`lrkv_decode_reference` beside the kernel is the same op through the plain PyTorch oracle.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lrkv.kernels.reference import check_lrkv_inputs
from lrkv.kernels.reference import lrkv_attention as lrkv_attention_reference
from lrkv.kernels.triton_util import INTERPRET, LOG2E, alignment, dot_dim, unit_last_stride


def decode_supported(device: torch.device) -> bool:
    """The kernel runs on CUDA, or on any device's tensors when Triton was imported in interpreter mode."""
    return device.type == "cuda" or INTERPRET


@triton.jit
def _decode_partials_kernel(
    q_ptr, ks_ptr, vs_ptr, zk_ptr, zv_ptr, bk_ptr, cos_ptr, sin_ptr, valid_ptr,
    m_ptr, l_ptr, accs_ptr, accz_ptr,
    n_head, n_q, n_k, half, qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kt, stride_vb, stride_vt,
    stride_zkb, stride_zkt, stride_zkh, stride_zvb, stride_zvt, stride_zvh,
    stride_bkh, stride_bkr, stride_ct, stride_validb,
    HAS_VALID: tl.constexpr, HAS_ZK: tl.constexpr, HAS_ZV: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, ZK_ALIGN: tl.constexpr, ZV_ALIGN: tl.constexpr,
    rank_k: tl.constexpr, rank_v: tl.constexpr,  # model constants: rank masks fold, so loads vectorize
):
    b = tl.program_id(0).to(tl.int64)  # batch offsets of a long cache overflow int32
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_n = split * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_HALF)  # over one half of the head dim: RoPE pairs dim i with i + half
    q_ok = offs_q < n_q
    n_ok = offs_n < n_k
    d_ok = offs_d < half
    nd_mask = n_ok[:, None] & d_ok[None, :]
    qd_mask = q_ok[:, None] & d_ok[None, :]

    # Shared tiles, read once for all heads.
    ks_rows = ks_ptr + b * stride_kb + offs_n[:, None] * stride_kt + offs_d[None, :]
    vs_rows = vs_ptr + b * stride_vb + offs_n[:, None] * stride_vt + offs_d[None, :]
    ks1 = tl.load(ks_rows, mask=nd_mask, other=0.0)
    ks2 = tl.load(ks_rows + half, mask=nd_mask, other=0.0)
    vs1 = tl.load(vs_rows, mask=nd_mask, other=0.0)
    vs2 = tl.load(vs_rows + half, mask=nd_mask, other=0.0)
    cs_rows = offs_n[:, None] * stride_ct + offs_d[None, :]
    cos = tl.load(cos_ptr + cs_rows, mask=nd_mask, other=0.0)
    sin = tl.load(sin_ptr + cs_rows, mask=nd_mask, other=0.0)

    # Query i sits at key position n_k - n_q + i (bottom-right causal). With padding, a query always sees its own
    # position so no row is empty (the reference's rule).
    q_pos = n_k - n_q + offs_q
    allowed = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
    if HAS_VALID:
        valid = tl.load(valid_ptr + b * stride_validb + offs_n, mask=n_ok, other=False)
        allowed = (allowed & valid[None, :]) | (offs_n[None, :] == q_pos[:, None])

    offs_rk = tl.arange(0, BLOCK_RK)
    offs_rv = tl.arange(0, BLOCK_RV)
    rk_ok = offs_rk < rank_k
    rv_ok = offs_rv < rank_v
    for h in range(n_head):
        h = tl.cast(h, tl.int64)  # like b: base offsets in int64 (aot.int32_pointer_offsets checks)
        k1 = ks1.to(tl.float32)  # kept in the input dtype across heads to save registers
        k2 = ks2.to(tl.float32)
        if HAS_ZK:
            # alignment hints (see lrkv_attn._latent_rows): a rank-24 head stride hides it from the compiler
            zk_rows = zk_ptr + tl.multiple_of(b * stride_zkb + h * stride_zkh, ZK_ALIGN)
            zk = tl.load(zk_rows + offs_n[:, None] * tl.multiple_of(stride_zkt, ZK_ALIGN) + offs_rk[None, :],
                         mask=n_ok[:, None] & rk_ok[None, :], other=0.0)
            bk_rows = bk_ptr + h * stride_bkh + offs_rk[:, None] * stride_bkr + offs_d[None, :]
            rd_mask = rk_ok[:, None] & d_ok[None, :]
            k1 += tl.dot(zk, tl.load(bk_rows, mask=rd_mask, other=0.0), input_precision="ieee")
            k2 += tl.dot(zk, tl.load(bk_rows + half, mask=rd_mask, other=0.0), input_precision="ieee")
        q_rows = q_ptr + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qt + offs_d[None, :]
        q1 = tl.load(q_rows, mask=qd_mask, other=0.0)
        q2 = tl.load(q_rows + half, mask=qd_mask, other=0.0)
        kr1 = (k1 * cos - k2 * sin).to(q1.dtype)
        kr2 = (k2 * cos + k1 * sin).to(q1.dtype)
        s = tl.dot(q1, tl.trans(kr1), input_precision="ieee") + tl.dot(q2, tl.trans(kr2), input_precision="ieee")
        s = tl.where(allowed, s * qk_scale, float("-inf"))  # log2 domain
        m = tl.max(s, 1)
        p = tl.exp2(s - tl.where(m == float("-inf"), 0.0, m)[:, None])  # a fully masked row gives p = 0, not NaN
        l = tl.sum(p, 1)
        pv = p.to(vs1.dtype)
        acc1 = tl.dot(pv, vs1, input_precision="ieee")
        acc2 = tl.dot(pv, vs2, input_precision="ieee")

        row = ((b * n_head + h) * n_split + split) * n_q + offs_q  # partial index (b, h, split, q)
        tl.store(m_ptr + row, m, mask=q_ok)
        tl.store(l_ptr + row, l, mask=q_ok)
        acc_rows = accs_ptr + row[:, None] * (2 * half) + offs_d[None, :]
        tl.store(acc_rows, acc1, mask=qd_mask)
        tl.store(acc_rows + half, acc2, mask=qd_mask)
        if HAS_ZV:
            zv_rows = zv_ptr + tl.multiple_of(b * stride_zvb + h * stride_zvh, ZV_ALIGN)
            zv = tl.load(zv_rows + offs_n[:, None] * tl.multiple_of(stride_zvt, ZV_ALIGN) + offs_rv[None, :],
                         mask=n_ok[:, None] & rv_ok[None, :], other=0.0)
            accz = tl.dot(pv, zv, input_precision="ieee")
            tl.store(accz_ptr + row[:, None] * rank_v + offs_rv[None, :], accz, mask=q_ok[:, None] & rv_ok[None, :])


class Partials(NamedTuple):
    """Per-split softmax state, fp32: m, l (B, H, S, Tq) in log2 units; acc_s (B, H, S, Tq, D); acc_z (..., r_v)."""

    m: torch.Tensor
    l: torch.Tensor
    acc_s: torch.Tensor
    acc_z: torch.Tensor


def empty_partials(q: torch.Tensor, n_k: int, rank_v: int, block_n: int) -> Partials:
    B, H, Tq, D = q.shape
    S = triton.cdiv(n_k, block_n)
    new = lambda *shape: torch.empty(*shape, device=q.device, dtype=torch.float32)  # noqa: E731
    return Partials(new(B, H, S, Tq), new(B, H, S, Tq), new(B, H, S, Tq, D), new(B, H, S, Tq, rank_v))


def default_block_n(head_dim: int) -> int:
    """Split size: the shared (BLOCK_N, D/2) tiles stay live across the head loop, so at head_dim 128 64-key
    splits spill on sm_80 and sm_90 in every warp count (ptxas, benchmarks/kernel_aot.py); 32 do not."""
    return 64 if head_dim <= 64 else 32


def _num_warps(head_dim: int) -> int:
    return 8 if head_dim >= 128 else 4  # zero spills at D 64 / BN 64 (w4) and D 128 / BN 32 (w8)


def decode_partials(q, k_s, v_s, z_k, z_v, b_k, cos, sin, key_valid: torch.Tensor | None, scale: float,
                    block_n: int, out: Partials) -> Partials:
    """Launch the split kernel, writing every entry of `out` (from empty_partials with the same block_n)."""
    B, H, Tq, D = q.shape
    Tk, rank_k, rank_v = k_s.shape[1], z_k.shape[-1], z_v.shape[-1]
    S = triton.cdiv(Tk, block_n)
    if block_n < 16 or block_n & (block_n - 1) or out.m.shape[2] != S:
        raise ValueError(f"decode_partials: block_n must be a power of two >= 16 matching out, got {block_n}")
    q, k_s, v_s, z_k, z_v, b_k = map(unit_last_stride, (q, k_s, v_s, z_k, z_v, b_k))
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    valid = unit_last_stride(key_valid) if key_valid is not None else q.new_ones(1, 1, dtype=torch.bool)
    block_half = dot_dim(D // 2)
    _decode_partials_kernel[(B, S)](
        q, k_s, v_s, z_k, z_v, b_k, cos, sin, valid,
        out.m, out.l, out.acc_s, out.acc_z,
        H, Tq, Tk, D // 2, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_s.stride(0), k_s.stride(1), v_s.stride(0), v_s.stride(1),
        z_k.stride(0), z_k.stride(1), z_k.stride(2), z_v.stride(0), z_v.stride(1), z_v.stride(2),
        b_k.stride(0), b_k.stride(1), cos.stride(0), valid.stride(0),
        HAS_VALID=key_valid is not None, HAS_ZK=rank_k > 0, HAS_ZV=rank_v > 0,
        BLOCK_Q=dot_dim(Tq), BLOCK_N=block_n, BLOCK_HALF=block_half,
        BLOCK_RK=dot_dim(rank_k), BLOCK_RV=dot_dim(rank_v),
        ZK_ALIGN=alignment(z_k), ZV_ALIGN=alignment(z_v),
        rank_k=rank_k, rank_v=rank_v,
        num_warps=_num_warps(D),
    )
    return out


def combine_partials(p: Partials, b_v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Merge the splits' softmax states and project the merged value latent once: o (B, H, Tq, D)."""
    m_max = p.m.amax(dim=2, keepdim=True)  # finite: every query sees at least its own position
    w = torch.exp2(p.m - m_max)  # (B, H, S, Tq); a fully masked split has m = -inf -> weight 0
    l = (w * p.l).sum(2)
    acc_s = (w[..., None] * p.acc_s).sum(2)
    acc_z = (w[..., None] * p.acc_z).sum(2)
    o = acc_s + torch.einsum("bhqr,hrd->bhqd", acc_z, b_v.float())
    return (o / l[..., None]).to(dtype)


def lrkv_decode_attention(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, key_valid: torch.Tensor | None = None,
                          scale: float | None = None, block_n: int | None = None) -> torch.Tensor:
    """LRKV attention of a few (Tq) new queries over Tk cached positions, bottom-right causal.

    q (B, H, Tq, D) rotated; k_s, v_s (B, Tk, D); z_k (B, Tk, H, r_k), z_v (B, Tk, H, r_v) (cache layout);
    b_k (H, r_k, D), b_v (H, r_v, D); cos, sin (Tk, D/2) for key positions 0..Tk-1; key_valid (B, Tk) bool
    (False = left padding). Returns o (B, H, Tq, D) in q's dtype. The context is split into tiles of block_n
    (default_block_n(D) when None).
    Shape errors name the argument as the docs/lrkv.md §10 contract does, i.e. z_k / z_v as their (B, H, T, r)
    transposes.
    """
    check_lrkv_inputs(q, k_s, v_s, z_k.transpose(1, 2), z_v.transpose(1, 2), b_k, b_v, cos, sin)
    B, Tk = k_s.shape[:2]
    if key_valid is not None and tuple(key_valid.shape) != (B, Tk):
        raise ValueError(f"lrkv_decode_attention: key_valid must be (B, Tk) = {(B, Tk)}, got {tuple(key_valid.shape)}")
    if not decode_supported(q.device):
        raise ValueError(f"lrkv_decode_attention: needs CUDA or TRITON_INTERPRET=1, got a {q.device.type} tensor")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    block_n = default_block_n(q.shape[-1]) if block_n is None else block_n
    out = empty_partials(q, Tk, z_v.shape[-1], block_n)
    return combine_partials(decode_partials(q, k_s, v_s, z_k, z_v, b_k, cos, sin, key_valid, scale, block_n, out),
                            b_v, q.dtype)


def lrkv_decode_reference(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, key_valid: torch.Tensor | None = None,
                          scale: float | None = None) -> torch.Tensor:
    """The same op through the reference (materialises per-head K/V): the oracle for the kernel."""
    return lrkv_attention_reference(q, k_s, v_s, z_k.transpose(1, 2), z_v.transpose(1, 2), b_k, b_v, cos, sin,
                                    causal=True, scale=scale, key_valid=key_valid)
