"""Fused LRKV attention in Triton, forward and backward (spec lrkv.md §8; op contract §10, as reference.py).

Per-head K_h = rope(k_s + z_k[h] @ b_k[h]) and V_h = v_s + z_v[h] @ b_v[h] exist only as tiles, on chip (the
backward stages one tile per program through scratch, see below):

forward  program = (query tile, b, h); loop over key tiles: rebuild the K tile as two RoPE halves
         (k1 = k_s1 + z @ B[:, :D/2], k2 = k_s2 + z @ B[:, D/2:], rotated in registers), online softmax (FA2,
         exp2), and the V side in rank space: acc_s += P @ v_s, acc_z += P @ z_v; epilogue
         O = acc_s / l + (acc_z / l) @ b_v[h]. Saves the log-sum-exp per row for the backward.
backward _bwd_dq:   program = (query tile, b, h), loop over key tiles (recompute P), dQ; also writes
                    delta = rowsum(dO * O).
         _bwd_dkdv: program = (key tile, b), loop over all heads, then query tiles. K_h and V_h tiles are
                    rebuilt once per head and reused for every query tile (staged through a (B, T, 2D)
                    scratch so the compiler feeds them to tensor cores from shared memory; never a per-head
                    (B, H, T, D) tensor); the program owns its key rows,
                    so d k_s and d v_s are summed over heads in place (fp32, no atomics); d z_h = dK_h B_h^T
                    is written per head; dB_h = z_h^T dK_h is atomically added to one (H, r, D) fp32 buffer
                    (per-program partials would be (B T / BN) x H x r x D fp32 = 2r/BN times the size of the
                    per-head bf16 K this kernel exists to avoid). Head order is rotated per program so
                    concurrent atomics hit different heads.
RoPE tables are cast to the input dtype, as reference.rope does. Autotune configs were chosen from ptxas
register/spill reports for sm_90 (compiled ahead of time, no GPU was available to time them).
Queries may be fewer than keys (bottom-right aligned causal mask, as the reference). Ranks are padded to a
power of two >= 16 with masked loads; rank 0 is padded to rank 1 with zeros. Limits: head_dim in HEAD_DIMS
(RoPE halves are tl.dot operands, so D/2 >= 16), ranks <= head_dim, dtype fp16/bf16/fp32 (fp32 only under
the interpreter, whose bf16 tl.dot is wrong).
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lrkv.kernels.reference import check_lrkv_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once: triton.jit decides when the kernels are defined
HEAD_DIMS = (32, 64, 128, 256)
DTYPES = (torch.float32,) if INTERPRET else (torch.float16, torch.bfloat16, torch.float32)
POISON_OUTPUTS = False  # tests: outputs start as NaN so elements a kernel forgets to write show up
LOG2E = 1.4426950408889634


def _configs(tiles):
    """Autotune configs (BM, BN, num_warps, num_stages); the interpreter takes exactly one (64-wide tiles)."""
    if INTERPRET:
        tiles = [(64, 64, 4, 1)]
    return [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _fit_sm90(configs, named_args, **kwargs):
    """Keep within shared memory (227 KiB) and registers: rows wider than 256 bytes (fp32, or head_dim 256)
    get at most 2 pipeline stages, head_dim 256 only the smaller tiles."""
    D = kwargs["D"]
    if D * named_args["Q"].element_size() > 256:
        configs = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=min(c.num_stages, 2)) for c in configs]
    small = [c for c in configs if c.kwargs["BM"] * c.kwargs["BN"] <= 64 * 64]
    return small if D > 128 and small else configs


# Candidates that ptxas (sm_90, D=128, r=64, bf16) fits in registers with no or little spilling in the loops.
FWD_TILES = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 32, 8, 3)]
DQ_TILES = [(128, 32, 8, 3), (64, 32, 4, 4), (64, 32, 8, 3)]
DKDV_TILES = [(64, 64, 8, 3), (32, 128, 8, 3), (64, 32, 4, 3)]
# lengths enter the key as a power-of-two bucket: a decode loop (Tk + 1 each step) must not retune every call
KEY = ["T_BUCKET", "D", "RKP", "RVP", "CAUSAL"]


@triton.jit
def _tile(ptr, row_stride, rows, row_ok, COLS: tl.constexpr, n_cols):
    """(len(rows), COLS) tile of a matrix with unit column stride; rows out of range and columns >= n_cols
    read as 0 (an unmasked out-of-bounds load returns garbage, silently under the interpreter)."""
    cols = tl.arange(0, COLS)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :],
                   mask=row_ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _key_tile(ks_ptr, sks_t, zk_ptr, szk_t, bk_ptr, COS, SIN, rows, row_ok,
              D: tl.constexpr, RK: tl.constexpr, RKP: tl.constexpr):
    """RoPE(k_s + z @ B) for key rows `rows`, as two fp32 halves: k1 cos - k2 sin, k2 cos + k1 sin."""
    HD: tl.constexpr = D // 2
    ranks = tl.arange(0, RKP)
    z = _tile(zk_ptr, szk_t, rows, row_ok, RKP, RK)
    k1 = (_tile(ks_ptr, sks_t, rows, row_ok, HD, HD).to(tl.float32)
          + tl.dot(z, _tile(bk_ptr, D, ranks, ranks < RK, HD, HD)))
    k2 = (_tile(ks_ptr + HD, sks_t, rows, row_ok, HD, HD).to(tl.float32)
          + tl.dot(z, _tile(bk_ptr + HD, D, ranks, ranks < RK, HD, HD)))
    c = _tile(COS, HD, rows, row_ok, HD, HD).to(tl.float32)
    s = _tile(SIN, HD, rows, row_ok, HD, HD).to(tl.float32)
    return k1 * c - k2 * s, k2 * c + k1 * s


@triton.jit
def _value_tile(vs_ptr, svs_t, zv_ptr, szv_t, bv_ptr, rows, row_ok, D: tl.constexpr, RV: tl.constexpr,
                RVP: tl.constexpr):
    """v_s + z @ B for key rows `rows`, fp32 (backward only: the forward stays in rank space)."""
    ranks = tl.arange(0, RVP)
    return (_tile(vs_ptr, svs_t, rows, row_ok, D, D).to(tl.float32)
            + tl.dot(_tile(zv_ptr, szv_t, rows, row_ok, RVP, RV), _tile(bv_ptr, D, ranks, ranks < RV, D, D)))


@triton.jit
def _visible(offs_m, offs_n, n_ok, offset, CAUSAL: tl.constexpr):
    """(BM, BN) mask of visible scores: key in range and (causal) key <= query position + offset. Query rows
    past Tq are left visible: they load q = dO = 0, stay finite and are never stored."""
    ok = (offs_m[:, None] >= 0) & n_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
    return ok


@triton.autotune(configs=_configs(FWD_TILES), key=KEY, prune_configs_by={"early_config_prune": _fit_sm90})
@triton.jit
def _fwd(Q, KS, VS, ZK, ZV, BK, BV, COS, SIN, O, LSE,
         sq_b, sq_h, sq_t, sks_b, sks_t, svs_b, svs_t, szk_b, szk_h, szk_t, szv_b, szv_h, szv_t,
         H, Tq, Tk, T_BUCKET, qk_scale,
         D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, RKP: tl.constexpr, RVP: tl.constexpr,
         CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    HD: tl.constexpr = D // 2
    bh, pid_m = tl.program_id(0), tl.cdiv(Tq, BM) - 1 - tl.program_id(1)  # causal: longest tiles launch first
    b, h = bh // H, bh % H
    offset = Tk - Tq  # query i sits at key position i + offset
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < Tq
    q_ptr = Q + b * sq_b + h * sq_h
    q1 = _tile(q_ptr, sq_t, offs_m, m_ok, HD, HD)
    q2 = _tile(q_ptr + HD, sq_t, offs_m, m_ok, HD, HD)
    ks_ptr, vs_ptr = KS + b * sks_b, VS + b * svs_b
    zk_ptr, zv_ptr = ZK + b * szk_b + h * szk_h, ZV + b * szv_b + h * szv_h

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc_s = tl.zeros([BM, D], tl.float32)
    acc_z = tl.zeros([BM, RVP], tl.float32)
    hi = tl.minimum(Tk, (pid_m + 1) * BM + offset) if CAUSAL else Tk  # skip fully masked key tiles
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        n_ok = offs_n < Tk
        k1, k2 = _key_tile(ks_ptr, sks_t, zk_ptr, szk_t, BK + h * RK * D, COS, SIN, offs_n, n_ok, D, RK, RKP)
        qk = tl.dot(q1, tl.trans(k1.to(q1.dtype))) + tl.dot(q2, tl.trans(k2.to(q1.dtype)))
        qk = tl.where(_visible(offs_m, offs_n, n_ok, offset, CAUSAL), qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: key 0 is visible to every row in the first tile
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q1.dtype)
        acc_s = acc_s * alpha[:, None] + tl.dot(p, _tile(vs_ptr, svs_t, offs_n, n_ok, D, D))
        acc_z = acc_z * alpha[:, None] + tl.dot(p, _tile(zv_ptr, szv_t, offs_n, n_ok, RVP, RV))
        m_i = m_new
    ranks = tl.arange(0, RVP)
    bv = _tile(BV + h * RV * D, D, ranks, ranks < RV, D, D)
    o = acc_s / l_i[:, None] + tl.dot((acc_z / l_i[:, None]).to(bv.dtype), bv)  # V_h never built: rank space
    cols = tl.arange(0, D)
    tl.store(O + bh * Tq * D + offs_m[:, None] * D + cols[None, :], o.to(O.dtype.element_ty), mask=m_ok[:, None])
    tl.store(LSE + bh * Tq + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.autotune(configs=_configs(DQ_TILES), key=KEY, prune_configs_by={"early_config_prune": _fit_sm90})
@triton.jit
def _bwd_dq(Q, KS, VS, ZK, ZV, BK, BV, COS, SIN, O, DO, LSE, DELTA, DQ,
            sq_b, sq_h, sq_t, sks_b, sks_t, svs_b, svs_t, szk_b, szk_h, szk_t, szv_b, szv_h, szv_t,
            H, Tq, Tk, T_BUCKET, qk_scale, sm_scale,
            D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, RKP: tl.constexpr, RVP: tl.constexpr,
            CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    HD: tl.constexpr = D // 2
    bh, pid_m = tl.program_id(0), tl.cdiv(Tq, BM) - 1 - tl.program_id(1)  # causal: longest tiles launch first
    b, h = bh // H, bh % H
    offset = Tk - Tq
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < Tq
    q_ptr = Q + b * sq_b + h * sq_h
    q1 = _tile(q_ptr, sq_t, offs_m, m_ok, HD, HD)
    q2 = _tile(q_ptr + HD, sq_t, offs_m, m_ok, HD, HD)
    do = _tile(DO + bh * Tq * D, D, offs_m, m_ok, D, D)
    o = _tile(O + bh * Tq * D, D, offs_m, m_ok, D, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO * O), reused by _bwd_dkdv
    tl.store(DELTA + bh * Tq + offs_m, delta, mask=m_ok)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=0.0)
    ks_ptr, vs_ptr = KS + b * sks_b, VS + b * svs_b
    zk_ptr, zv_ptr = ZK + b * szk_b + h * szk_h, ZV + b * szv_b + h * szv_h

    dq1 = tl.zeros([BM, HD], tl.float32)
    dq2 = tl.zeros([BM, HD], tl.float32)
    hi = tl.minimum(Tk, (pid_m + 1) * BM + offset) if CAUSAL else Tk
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        n_ok = offs_n < Tk
        k1, k2 = _key_tile(ks_ptr, sks_t, zk_ptr, szk_t, BK + h * RK * D, COS, SIN, offs_n, n_ok, D, RK, RKP)
        k1, k2 = k1.to(q1.dtype), k2.to(q1.dtype)
        v = _value_tile(vs_ptr, svs_t, zv_ptr, szv_t, BV + h * RV * D, offs_n, n_ok, D, RV, RVP).to(q1.dtype)
        qk = (tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))) * qk_scale
        p = tl.exp2(tl.where(_visible(offs_m, offs_n, n_ok, offset, CAUSAL), qk - lse[:, None], float("-inf")))
        ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(q1.dtype)
        dq1 += tl.dot(ds, k1)
        dq2 += tl.dot(ds, k2)
    dq_ptr = DQ + bh * Tq * D + offs_m[:, None] * D + tl.arange(0, HD)[None, :]
    tl.store(dq_ptr, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])
    tl.store(dq_ptr + HD, (dq2 * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])


@triton.autotune(configs=_configs(DKDV_TILES), key=KEY, reset_to_zero=["DBK", "DBV"],
                 prune_configs_by={"early_config_prune": _fit_sm90})
@triton.jit
def _bwd_dkdv(Q, KS, VS, ZK, ZV, BK, BV, COS, SIN, DO, LSE, DELTA, DKS, DVS, DZK, DZV, DBK, DBV, STAGE,
              sq_b, sq_h, sq_t, sks_b, sks_t, svs_b, svs_t, szk_b, szk_h, szk_t, szv_b, szv_h, szv_t,
              B, H, Tq, Tk, T_BUCKET, qk_scale, sm_scale,
              D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, RKP: tl.constexpr, RVP: tl.constexpr,
              CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    HD: tl.constexpr = D // 2
    pid_n, b = tl.program_id(0) // B, tl.program_id(0) % B  # causal: key tile 0 has the most queries: first
    offset = Tk - Tq
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < Tk
    rk, rv = tl.arange(0, RKP), tl.arange(0, RVP)
    hd, d = tl.arange(0, HD), tl.arange(0, D)
    lo = tl.maximum(pid_n * BN - offset, 0) // BM * BM if CAUSAL else 0  # earlier query tiles see none of these keys
    ks_ptr, vs_ptr = KS + b * sks_b, VS + b * svs_b
    for i in range(0, H):
        h = (pid_n + b + i) % H
        bh = b * H + h
        zk_ptr, zv_ptr = ZK + b * szk_b + h * szk_h, ZV + b * szv_b + h * szv_h
        bk_ptr, bv_ptr = BK + h * RK * D, BV + h * RV * D
        # K_h, V_h tiles rebuilt once per head and reused by every query tile. They pass through STAGE (rows
        # owned by this program, overwritten per head, L2-resident): Triton gives a tensor-core operand shared
        # memory only when it is loaded; kept in registers across the query loop, the computed tiles spill.
        stage = STAGE + b * Tk * 2 * D
        stage_rows = stage + offs_n[:, None] * (2 * D)
        tl.debug_barrier()  # every thread has loaded the previous head's tiles
        k1, k2 = _key_tile(ks_ptr, sks_t, zk_ptr, szk_t, bk_ptr, COS, SIN, offs_n, n_ok, D, RK, RKP)
        tl.store(stage_rows + hd[None, :], k1.to(STAGE.dtype.element_ty), mask=n_ok[:, None])
        tl.store(stage_rows + HD + hd[None, :], k2.to(STAGE.dtype.element_ty), mask=n_ok[:, None])
        v = _value_tile(vs_ptr, svs_t, zv_ptr, szv_t, bv_ptr, offs_n, n_ok, D, RV, RVP)
        tl.store(stage_rows + D + d[None, :], v.to(STAGE.dtype.element_ty), mask=n_ok[:, None])
        tl.debug_barrier()  # the tiles are visible to every thread of the program
        k1 = _tile(stage, 2 * D, offs_n, n_ok, HD, HD)
        k2 = _tile(stage + HD, 2 * D, offs_n, n_ok, HD, HD)
        v = _tile(stage + D, 2 * D, offs_n, n_ok, D, D)
        dk1 = tl.zeros([BN, HD], tl.float32)
        dk2 = tl.zeros([BN, HD], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        q_ptr = Q + b * sq_b + h * sq_h
        for start_m in range(lo, Tq, BM):
            offs_m = start_m + tl.arange(0, BM)
            m_ok = offs_m < Tq
            q1 = _tile(q_ptr, sq_t, offs_m, m_ok, HD, HD)
            q2 = _tile(q_ptr + HD, sq_t, offs_m, m_ok, HD, HD)
            do = _tile(DO + bh * Tq * D, D, offs_m, m_ok, D, D)
            lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_ok, other=0.0)
            qk_t = (tl.dot(k1, tl.trans(q1)) + tl.dot(k2, tl.trans(q2))) * qk_scale  # (BN, BM): S^T
            visible = tl.trans(_visible(offs_m, offs_n, n_ok, offset, CAUSAL))
            p_t = tl.exp2(tl.where(visible, qk_t - lse[None, :], float("-inf")))
            dv += tl.dot(p_t.to(do.dtype), do)
            ds_t = (p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q1.dtype)
            dk1 += tl.dot(ds_t, q1)
            dk2 += tl.dot(ds_t, q2)
        # RoPE^T: gradient w.r.t. the un-rotated key k_s + z B
        c = _tile(COS, HD, offs_n, n_ok, HD, HD).to(tl.float32)
        s = _tile(SIN, HD, offs_n, n_ok, HD, HD).to(tl.float32)
        g1 = (dk1 * c + dk2 * s) * sm_scale
        g2 = (dk2 * c - dk1 * s) * sm_scale
        # d k_s, d v_s: this program owns these rows, so sum heads in place (first head overwrites the buffer)
        row_ok, earlier = n_ok[:, None], n_ok[:, None] & (i > 0)
        dks_ptr = DKS + b * Tk * D + offs_n[:, None] * D + hd[None, :]
        dvs_ptr = DVS + b * Tk * D + offs_n[:, None] * D + d[None, :]
        tl.store(dks_ptr, g1 + tl.load(dks_ptr, mask=earlier, other=0.0), mask=row_ok)
        tl.store(dks_ptr + HD, g2 + tl.load(dks_ptr + HD, mask=earlier, other=0.0), mask=row_ok)
        tl.store(dvs_ptr, dv + tl.load(dvs_ptr, mask=earlier, other=0.0), mask=row_ok)
        # d z_h = dK_h B_h^T and dB_h = z_h^T dK_h (summed over programs in fp32); operands in the input dtype
        # for tensor-core rate, the rounding the reference's own backward applies to dK_h
        g1, g2, dv = g1.to(Q.dtype.element_ty), g2.to(Q.dtype.element_ty), dv.to(Q.dtype.element_ty)
        bk1 = _tile(bk_ptr, D, rk, rk < RK, HD, HD)
        bk2 = _tile(bk_ptr + HD, D, rk, rk < RK, HD, HD)
        tl.store(DZK + bh * Tk * RK + offs_n[:, None] * RK + rk[None, :],
                 (tl.dot(g1, tl.trans(bk1)) + tl.dot(g2, tl.trans(bk2))).to(DZK.dtype.element_ty),
                 mask=row_ok & (rk[None, :] < RK))
        bv = _tile(bv_ptr, D, rv, rv < RV, D, D)
        tl.store(DZV + bh * Tk * RV + offs_n[:, None] * RV + rv[None, :],
                 tl.dot(dv, tl.trans(bv)).to(DZV.dtype.element_ty), mask=row_ok & (rv[None, :] < RV))
        zk_t = tl.trans(_tile(zk_ptr, szk_t, offs_n, n_ok, RKP, RK))
        dbk_ptr = DBK + h * RK * D + rk[:, None] * D + hd[None, :]
        tl.atomic_add(dbk_ptr, tl.dot(zk_t, g1), mask=rk[:, None] < RK)
        tl.atomic_add(dbk_ptr + HD, tl.dot(zk_t, g2), mask=rk[:, None] < RK)
        zv_t = tl.trans(_tile(zv_ptr, szv_t, offs_n, n_ok, RVP, RV))
        tl.atomic_add(DBV + h * RV * D + rv[:, None] * D + d[None, :], tl.dot(zv_t, dv), mask=rv[:, None] < RV)


def check_fused_supported(q, z_k, z_v) -> None:
    """Raise a ValueError naming the kernel limit a call breaks (the reference takes any shape)."""
    D, r_k, r_v = q.shape[-1], z_k.shape[-1], z_v.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"fused lrkv_attention: head_dim must be one of {HEAD_DIMS}, got {D}")
    if max(r_k, r_v) > D:
        raise ValueError(f"fused lrkv_attention: ranks must be <= head_dim {D}, got r_k={r_k}, r_v={r_v}")
    if q.dtype not in DTYPES:
        where = "under TRITON_INTERPRET=1" if INTERPRET else "on CUDA"
        raise ValueError(f"fused lrkv_attention: dtype must be one of {DTYPES} {where}, got {q.dtype}")


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dim >= 16


def _bucket(Tq: int, Tk: int) -> int:
    return triton.next_power_of_2(max(Tq, Tk))


def _new(shape, like, dtype=None):
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _unit_last(*ts):
    """Kernels take strides for every dim but the last, which must be 1."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _strides(q, k_s, v_s, z_k, z_v):
    return (*q.stride()[:3], *k_s.stride()[:2], *v_s.stride()[:2], *z_k.stride()[:3], *z_v.stride()[:3])


def _meta(q, k_s, z_k, z_v, causal):
    return dict(D=q.shape[-1], RK=z_k.shape[-1], RV=z_v.shape[-1], RKP=_rank_pad(z_k.shape[-1]),
                RVP=_rank_pad(z_v.shape[-1]), CAUSAL=causal)


@torch.library.custom_op("lrkv::fused_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, z_k: torch.Tensor, z_v: torch.Tensor,
            b_k: torch.Tensor, b_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k_s, v_s, z_k, z_v = _unit_last(q, k_s, v_s, z_k, z_v)
    b_k, b_v = b_k.contiguous(), b_v.contiguous()
    cos, sin = cos.to(q.dtype).contiguous(), sin.to(q.dtype).contiguous()  # as reference.rope
    B, H, Tq, D = q.shape
    Tk = k_s.shape[1]
    o = _new((B, H, Tq, D), q)
    lse = _new((B, H, Tq), q, torch.float32)
    _fwd[lambda m: (B * H, triton.cdiv(Tq, m["BM"]))](
        q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, o, lse, *_strides(q, k_s, v_s, z_k, z_v), H, Tq, Tk,
        _bucket(Tq, Tk), scale * LOG2E, **_meta(q, k_s, z_k, z_v, causal))
    return o, lse


@_fwd_op.register_fake
def _(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("lrkv::fused_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, z_k: torch.Tensor,
            z_v: torch.Tensor, b_k: torch.Tensor, b_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            o: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float) -> list[torch.Tensor]:
    q, k_s, v_s, z_k, z_v = _unit_last(q, k_s, v_s, z_k, z_v)
    do, o, lse, b_k, b_v = do.contiguous(), o.contiguous(), lse.contiguous(), b_k.contiguous(), b_v.contiguous()
    cos, sin = cos.to(q.dtype).contiguous(), sin.to(q.dtype).contiguous()  # as reference.rope
    B, H, Tq, D = q.shape
    Tk, r_k, r_v = k_s.shape[1], z_k.shape[-1], z_v.shape[-1]
    strides = _strides(q, k_s, v_s, z_k, z_v)
    args = (H, Tq, Tk, _bucket(Tq, Tk), scale * LOG2E, scale)
    meta = _meta(q, k_s, z_k, z_v, causal)
    dq, delta = _new(q.shape, q), _new((B, H, Tq), q, torch.float32)
    _bwd_dq[lambda m: (B * H, triton.cdiv(Tq, m["BM"]))](
        q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, o, do, lse, delta, dq, *strides, *args, **meta)
    dks, dvs = _new((B, Tk, D), q, torch.float32), _new((B, Tk, D), q, torch.float32)
    dzk, dzv = _new((B, H, Tk, r_k), q), _new((B, H, Tk, r_v), q)
    dbk = torch.zeros((H, r_k, D), dtype=torch.float32, device=q.device)  # atomic accumulators
    dbv = torch.zeros((H, r_v, D), dtype=torch.float32, device=q.device)
    stage = _new((B, Tk, 2 * D), q)  # per-program K_h | V_h tiles, O(B T D)
    _bwd_dkdv[lambda m: (triton.cdiv(Tk, m["BN"]) * B,)](
        q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, do, lse, delta, dks, dvs, dzk, dzv, dbk, dbv, stage, *strides, B,
        *args, **meta)
    dt = q.dtype
    return [dq, dks.to(dt), dvs.to(dt), dzk, dzv, dbk.to(dt), dbv.to(dt)]


@_bwd_op.register_fake
def _(do, q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, o, lse, causal, scale):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k_s, v_s, z_k, z_v, b_k, b_v)]


def _setup_context(ctx, inputs, output):
    q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, _dlse):
    grads = _bwd_op(do, *ctx.saved_tensors, ctx.causal, ctx.scale)
    return (*grads, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def lrkv_attention_fused(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal: bool = True, scale: float | None = None):
    """Fused LRKV attention; same contract as reference.lrkv_attention, plus the kernel limits above."""
    check_lrkv_inputs(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin)
    check_fused_supported(q, z_k, z_v)
    if z_k.shape[-1] == 0:  # rank 0 (MQA side): one zero rank; autograd slices the gradient back to empty
        z_k, b_k = F.pad(z_k, (0, 1)), F.pad(b_k, (0, 0, 0, 1))
    if z_v.shape[-1] == 0:
        z_v, b_v = F.pad(z_v, (0, 1)), F.pad(b_v, (0, 0, 0, 1))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _fwd_op(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal, scale)[0]
