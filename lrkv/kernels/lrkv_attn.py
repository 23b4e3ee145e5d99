"""Fused LRKV attention in Triton, forward and backward (docs/lrkv.md §8; op contract §10, as reference.py).

Per-head K_h = rope(k_s + z_k[h] @ b_k[h]) and V_h = v_s + z_v[h] @ b_v[h] exist only as tiles, on chip (the
backward's dK pass stages its tiles through a transient scratch, see below):

forward  program = (query tile, b, h); loop over key tiles: rebuild the K tile as two RoPE halves
         (k1 = k_s1 + z @ B[:, :D/2], k2 = k_s2 + z @ B[:, D/2:], rotated in registers), online softmax (FA2,
         exp2), and the V side in rank space: acc_s += P @ v_s, acc_z += P @ z_v; epilogue
         O = acc_s / l + (acc_z / l) @ b_v[h]. Saves the log-sum-exp per row for the backward.
backward _bwd_dq: program = (query tile, b, h), loop over key tiles (recompute P), dQ; also writes
                  delta = rowsum(dO * O).
         _bwd_dk, _bwd_dv: program = (key tile, b, h), loop over query tiles; two passes of one kernel
                  (_bwd_kv), each holding one fp32 (BN, D) accumulator (dK_h or dV_h) and recomputing S^T.
                  The dK pass stages its rebuilt K_h | V_h tile through a transient (B, H, T, 2D) scratch
                  (written and read back by the program that owns the rows, freed when the op returns) so
                  the compiler feeds it to tensor cores from shared memory; kept in registers it spills. The
                  dV pass keeps its K_h tile in registers. Per program: d z_h = dX_h B_h^T is written; d k_s,
                  d v_s (summed over heads) and dB_h = z_h^T dX_h (over key tiles) are fp32 atomic adds
                  (relaxed), so their summation order, unlike the reference's, varies run to run. Under
                  torch.use_deterministic_algorithms(True) each program stores its head's dX_h instead and the
                  launcher sums over heads and computes dB_h = z_h^T dX_h with torch (fixed order; one
                  transient (B, H, T, D) fp32 buffer per pass, and B·H·T·r·D more multiply-adds).
         Earlier layouts, measured with ptxas (benchmarks/kernel_aot.py): one fused dK+dV program looping over
         all heads spilled 460-1400 bytes in every config at D 128, r 64: head-invariant address tensors stay
         live across the head loop.
Per-batch and per-head base offsets are int64 (they pass 2^31 elements at B 16, T 64K, 18 heads of 128).
RoPE tables are cast to the input dtype, as reference.rope does. Autotune configs (TILES) were chosen from
ptxas register/spill reports for sm_80, sm_86, sm_89 and sm_90 (compiled ahead of time; no GPU has timed them).
Queries may be fewer than keys (bottom-right aligned causal mask, as the reference). Ranks are padded to a
power of two >= 16 with masked loads; rank 0 is padded to rank 1 with zeros. Limits: head_dim in FUSED_HEAD_DIMS
(RoPE halves are tl.dot operands, so D/2 >= 16), ranks <= head_dim, dtype fp16/bf16/fp32 (fp32 only under
the interpreter, whose bf16 tl.dot is wrong). On CUDA, rows wider than 256 bytes (fp32 at head_dim 128, head_dim
256) have no config that fits and take the reference (see kept_configs).
"""

import math
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lrkv.kernels import MAX_ROW_BYTES
from lrkv.kernels.reference import check_lrkv_inputs
from lrkv.kernels.reference import lrkv_attention as reference_attention
from lrkv.kernels.triton_util import FUSED_HEAD_DIMS, INTERPRET, LOG2E, alignment, dot_dim, unit_last_stride

DTYPES = (torch.float32,) if INTERPRET else (torch.float16, torch.bfloat16, torch.float32)
_warned: set[str] = set()  # reference fallbacks already reported
POISON_OUTPUTS = False  # tests: outputs start as NaN so elements a kernel forgets to write show up
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # per-block opt-in maximum, by arch


# (BM, BN, num_warps, num_stages) per kernel and target family, chosen from ptxas reports at D 128, r 64/48, bf16
# (benchmarks/kernel_aot.py; no GPU has timed them): every one compiles with zero spills there. sm_80's mma.sync
# keeps both dot operands in registers, so it gets smaller tiles; sm_90 (wgmma) reads one from shared memory.
TILES = {
    "_fwd": {90: [(128, 32, 8, 3), (64, 32, 4, 4), (64, 32, 8, 3)], 80: [(64, 16, 4, 3), (32, 32, 4, 3)],
             86: [(32, 32, 4, 3)]},
    "_bwd_dq": {90: [(128, 32, 8, 3), (64, 32, 4, 4), (64, 32, 8, 3)], 80: [(32, 16, 4, 3), (32, 32, 4, 2)],
                86: [(32, 16, 4, 3)]},
    "_bwd_dk": {90: [(64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2)], 80: [(64, 32, 4, 3), (32, 32, 4, 3)],
                86: [(64, 32, 4, 3), (32, 32, 4, 3)]},
    "_bwd_dv": {90: [(64, 64, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3)], 80: [(64, 32, 4, 3), (32, 32, 4, 3)],
                86: [(64, 32, 4, 3), (32, 32, 4, 3)]},
}


def _family(arch: int) -> int:
    """Tile set of a target: Hopper; sm_86/sm_89 (GeForce/A10/L4/L40: 99 KiB of shared memory per block, and
    ptxas spills sm_80's 64x16 forward and 32x32 two-stage dQ tiles there at D 128); other Ampere."""
    return 90 if arch >= 90 else 86 if arch in (86, 89) else 80


def _configs(kernel):
    """Autotune configs: every target's tiles (each target prunes to its own); the interpreter takes exactly
    one (64-wide tiles)."""
    tiles = [(64, 64, 4, 1)] if INTERPRET else list(dict.fromkeys(t for ts in TILES[kernel].values() for t in ts))
    return [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def kept_configs(kernel, arch, D, elem_size):
    """The configs `kernel` may launch on sm_<arch>: that target's tiles, none for rows wider than 256 bytes
    (fp32 at head_dim 128, any dtype at 256): there every config spills or overflows shared memory on both
    targets (benchmarks/kernel_aot.py), and the op falls back to the reference."""
    tiles = TILES[kernel][_family(arch)] if D * elem_size <= MAX_ROW_BYTES else []
    return [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _arch(device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _prune(kernel):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        return kept_configs(kernel, _arch(named_args["Q"].device), kwargs["D"], named_args["Q"].element_size())
    return prune


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
def _latent_rows(Z, b, h, sz_b, sz_h, sz_t, ALIGN: tl.constexpr):
    """Head h's latent rows of batch row b and their row stride, with the alignment (in elements) the launcher
    proved: a head stride like rank 24 carries no divisibility the JIT can see, and unhinted the loads fall
    back to 2-byte reads outside the async-copy pipeline."""
    return Z + tl.multiple_of(b * sz_b + h * sz_h, ALIGN), tl.multiple_of(sz_t, ALIGN)


@triton.jit
def _visible(offs_m, offs_n, n_ok, offset, CAUSAL: tl.constexpr):
    """(BM, BN) mask of visible scores: key in range and (causal) key <= query position + offset. Query rows
    past Tq are left visible: they load q = dO = 0, stay finite and are never stored."""
    ok = (offs_m[:, None] >= 0) & n_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
    return ok


@triton.autotune(configs=_configs("_fwd"), key=KEY, prune_configs_by={"early_config_prune": _prune("_fwd")})
@triton.jit
def _fwd(Q, KS, VS, ZK, ZV, BK, BV, COS, SIN, O, LSE,
         sq_b, sq_h, sq_t, sks_b, sks_t, svs_b, svs_t, szk_b, szk_h, szk_t, szv_b, szv_h, szv_t,
         H, Tq, Tk, T_BUCKET, qk_scale,
         D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, RKP: tl.constexpr, RVP: tl.constexpr,
         CAUSAL: tl.constexpr, ZK_ALIGN: tl.constexpr, ZV_ALIGN: tl.constexpr, BM: tl.constexpr,
         BN: tl.constexpr):
    HD: tl.constexpr = D // 2
    # int64 (b, h): per-batch and per-head base offsets pass 2^31 elements at B 16, T 64K, H 18, D 128
    bh, pid_m = tl.program_id(0).to(tl.int64), tl.cdiv(Tq, BM) - 1 - tl.program_id(1)  # causal: longest first
    b, h = bh // H, bh % H
    offset = Tk - Tq  # query i sits at key position i + offset
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < Tq
    q_ptr = Q + b * sq_b + h * sq_h
    q1 = _tile(q_ptr, sq_t, offs_m, m_ok, HD, HD)
    q2 = _tile(q_ptr + HD, sq_t, offs_m, m_ok, HD, HD)
    ks_ptr, vs_ptr = KS + b * sks_b, VS + b * svs_b
    zk_ptr, szk_t = _latent_rows(ZK, b, h, szk_b, szk_h, szk_t, ZK_ALIGN)
    zv_ptr, szv_t = _latent_rows(ZV, b, h, szv_b, szv_h, szv_t, ZV_ALIGN)

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


@triton.autotune(configs=_configs("_bwd_dq"), key=KEY, prune_configs_by={"early_config_prune": _prune("_bwd_dq")})
@triton.jit
def _bwd_dq(Q, KS, VS, ZK, ZV, BK, BV, COS, SIN, O, DO, LSE, DELTA, DQ,
            sq_b, sq_h, sq_t, sks_b, sks_t, svs_b, svs_t, szk_b, szk_h, szk_t, szv_b, szv_h, szv_t,
            H, Tq, Tk, T_BUCKET, qk_scale, sm_scale,
            D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, RKP: tl.constexpr, RVP: tl.constexpr,
            CAUSAL: tl.constexpr, ZK_ALIGN: tl.constexpr, ZV_ALIGN: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr):
    HD: tl.constexpr = D // 2
    # int64 (b, h): per-batch and per-head base offsets pass 2^31 elements at B 16, T 64K, H 18, D 128
    bh, pid_m = tl.program_id(0).to(tl.int64), tl.cdiv(Tq, BM) - 1 - tl.program_id(1)  # causal: longest first
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
    zk_ptr, szk_t = _latent_rows(ZK, b, h, szk_b, szk_h, szk_t, ZK_ALIGN)
    zv_ptr, szv_t = _latent_rows(ZV, b, h, szv_b, szv_h, szv_t, ZV_ALIGN)

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


@triton.jit
def _bwd_kv(Q, KS, VS, ZK, ZV, BK, BV, COS, SIN, DO, LSE, DELTA, DXS, DZ, DB, STAGE,
            sq_b, sq_h, sq_t, sks_b, sks_t, svs_b, svs_t, szk_b, szk_h, szk_t, szv_b, szv_h, szv_t,
            B, H, Tq, Tk, T_BUCKET, qk_scale, sm_scale,
            D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, RKP: tl.constexpr, RVP: tl.constexpr,
            CAUSAL: tl.constexpr, ZK_ALIGN: tl.constexpr, ZV_ALIGN: tl.constexpr, DK: tl.constexpr,
            DETERMINISTIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """One key-side backward pass: DK selects d k_s / d z_k / d b_k (else the value side). The passes are
    separate kernels so each holds one fp32 (BN, D) accumulator across its query loop, not two (the fused
    dK+dV loop spilled in every config at D 128, r 64); the price is S^T recomputed in each pass.
    DETERMINISTIC: DXS is (B, H, Tk, D) and each program stores its head's dX_h rows there instead of adding
    them over heads, and DB is left alone; the launcher sums both in a fixed order."""
    HD: tl.constexpr = D // 2
    pid_n, b = tl.program_id(0) // B, (tl.program_id(0) % B).to(tl.int64)  # causal: key tile 0 first
    h = tl.program_id(1).to(tl.int64)  # int64 base offsets, as in _fwd
    bh = b * H + h
    offset = Tk - Tq
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < Tk
    row_ok = n_ok[:, None]
    hd, d = tl.arange(0, HD), tl.arange(0, D)
    lo = tl.maximum(pid_n * BN - offset, 0) // BM * BM if CAUSAL else 0  # earlier query tiles see none of these keys
    ks_ptr, vs_ptr = KS + b * sks_b, VS + b * svs_b
    zk_ptr, szk_t = _latent_rows(ZK, b, h, szk_b, szk_h, szk_t, ZK_ALIGN)
    zv_ptr, szv_t = _latent_rows(ZV, b, h, szv_b, szv_h, szv_t, ZV_ALIGN)
    bk_ptr, bv_ptr = BK + h * RK * D, BV + h * RV * D
    k1, k2 = _key_tile(ks_ptr, sks_t, zk_ptr, szk_t, bk_ptr, COS, SIN, offs_n, n_ok, D, RK, RKP)
    k1, k2 = k1.to(Q.dtype.element_ty), k2.to(Q.dtype.element_ty)
    if DK:
        v = _value_tile(vs_ptr, svs_t, zv_ptr, szv_t, bv_ptr, offs_n, n_ok, D, RV, RVP).to(Q.dtype.element_ty)
        stage = STAGE + bh * Tk * 2 * D
        stage_rows = stage + offs_n[:, None] * (2 * D)
        tl.store(stage_rows + hd[None, :], k1, mask=row_ok)
        tl.store(stage_rows + HD + hd[None, :], k2, mask=row_ok)
        tl.store(stage_rows + D + d[None, :], v, mask=row_ok)
        tl.debug_barrier()
        k1 = _tile(stage, 2 * D, offs_n, n_ok, HD, HD)
        k2 = _tile(stage + HD, 2 * D, offs_n, n_ok, HD, HD)
        v = _tile(stage + D, 2 * D, offs_n, n_ok, D, D)
        acc1 = tl.zeros([BN, HD], tl.float32)  # dK_h, as its two RoPE halves
        acc2 = tl.zeros([BN, HD], tl.float32)
    else:
        acc = tl.zeros([BN, D], tl.float32)  # dV_h
    q_ptr = Q + b * sq_b + h * sq_h
    for start_m in range(lo, Tq, BM):
        offs_m = start_m + tl.arange(0, BM)
        m_ok = offs_m < Tq
        q1 = _tile(q_ptr, sq_t, offs_m, m_ok, HD, HD)
        q2 = _tile(q_ptr + HD, sq_t, offs_m, m_ok, HD, HD)
        do = _tile(DO + bh * Tq * D, D, offs_m, m_ok, D, D)
        lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=0.0)
        qk_t = (tl.dot(k1, tl.trans(q1)) + tl.dot(k2, tl.trans(q2))) * qk_scale  # (BN, BM): S^T
        visible = tl.trans(_visible(offs_m, offs_n, n_ok, offset, CAUSAL))
        p_t = tl.exp2(tl.where(visible, qk_t - lse[None, :], float("-inf")))
        if DK:
            delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_ok, other=0.0)
            ds_t = (p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q1.dtype)
            acc1 += tl.dot(ds_t, q1)
            acc2 += tl.dot(ds_t, q2)
        else:
            acc += tl.dot(p_t.to(do.dtype), do)
    # d k_s / d v_s summed over heads and dB_h = z_h^T dX_h over key tiles, by fp32 atomics; d z_h = dX_h B_h^T.
    # Operands in the input dtype for tensor-core rate, the rounding the reference's backward applies to dK_h.
    if DK:
        rk = tl.arange(0, RKP)
        c = _tile(COS, HD, offs_n, n_ok, HD, HD).to(tl.float32)
        s = _tile(SIN, HD, offs_n, n_ok, HD, HD).to(tl.float32)
        g1 = (acc1 * c + acc2 * s) * sm_scale  # RoPE^T: gradient w.r.t. the un-rotated key k_s + z B
        g2 = (acc2 * c - acc1 * s) * sm_scale
        if DETERMINISTIC:
            dxs_ptr = DXS + bh * Tk * D + offs_n[:, None] * D + hd[None, :]
            tl.store(dxs_ptr, g1, mask=row_ok)
            tl.store(dxs_ptr + HD, g2, mask=row_ok)
        else:
            dxs_ptr = DXS + b * Tk * D + offs_n[:, None] * D + hd[None, :]
            tl.atomic_add(dxs_ptr, g1, mask=row_ok, sem="relaxed")
            tl.atomic_add(dxs_ptr + HD, g2, mask=row_ok, sem="relaxed")
        g1, g2 = g1.to(Q.dtype.element_ty), g2.to(Q.dtype.element_ty)
        bk1 = _tile(bk_ptr, D, rk, rk < RK, HD, HD)
        bk2 = _tile(bk_ptr + HD, D, rk, rk < RK, HD, HD)
        tl.store(DZ + bh * Tk * RK + offs_n[:, None] * RK + rk[None, :],
                 (tl.dot(g1, tl.trans(bk1)) + tl.dot(g2, tl.trans(bk2))).to(DZ.dtype.element_ty),
                 mask=row_ok & (rk[None, :] < RK))
        if not DETERMINISTIC:
            zk_t = tl.trans(_tile(zk_ptr, szk_t, offs_n, n_ok, RKP, RK))
            db_ptr = DB + h * RK * D + rk[:, None] * D + hd[None, :]
            tl.atomic_add(db_ptr, tl.dot(zk_t, g1), mask=rk[:, None] < RK, sem="relaxed")
            tl.atomic_add(db_ptr + HD, tl.dot(zk_t, g2), mask=rk[:, None] < RK, sem="relaxed")
    else:
        rv = tl.arange(0, RVP)
        if DETERMINISTIC:
            tl.store(DXS + bh * Tk * D + offs_n[:, None] * D + d[None, :], acc, mask=row_ok)
        else:
            tl.atomic_add(DXS + b * Tk * D + offs_n[:, None] * D + d[None, :], acc, mask=row_ok, sem="relaxed")
        dv = acc.to(Q.dtype.element_ty)
        bv = _tile(bv_ptr, D, rv, rv < RV, D, D)
        tl.store(DZ + bh * Tk * RV + offs_n[:, None] * RV + rv[None, :],
                 tl.dot(dv, tl.trans(bv)).to(DZ.dtype.element_ty), mask=row_ok & (rv[None, :] < RV))
        if not DETERMINISTIC:
            zv_t = tl.trans(_tile(zv_ptr, szv_t, offs_n, n_ok, RVP, RV))
            tl.atomic_add(DB + h * RV * D + rv[:, None] * D + d[None, :], tl.dot(zv_t, dv), mask=rv[:, None] < RV,
                          sem="relaxed")


# one autotuner per pass: their configs and tuned choices differ
_bwd_dk, _bwd_dv = (triton.autotune(configs=_configs(k), key=KEY, reset_to_zero=["DXS", "DB"],
                                    prune_configs_by={"early_config_prune": _prune(k)})(_bwd_kv)
                    for k in ("_bwd_dk", "_bwd_dv"))


def dot_macs(B, H, Tq, Tk, D, r_k, r_v, tiles: dict, causal: bool = True) -> dict:
    """Multiply-adds the kernels' tl.dot calls perform, per kernel, given each kernel's (BM, BN) tiles (e.g. the
    autotuner's best_config): the loops above counted tile by tile, padded ranks included. Against
    flash_attention2_macs this is the work ratio a measured time ratio should be read against."""
    RK, RV, offset = dot_dim(max(r_k, 1)), dot_dim(max(r_v, 1)), Tk - Tq
    out = {}
    for kernel in ("_fwd", "_bwd_dq"):
        BM, BN = tiles[kernel]
        key_tiles = sum(triton.cdiv(min(Tk, (i + 1) * BM + offset) if causal else Tk, BN)
                        for i in range(triton.cdiv(Tq, BM)))
        if kernel == "_fwd":  # K rebuild, QK^T, P v_s, P z_v; epilogue acc_z B_v per query tile
            epilogue = triton.cdiv(Tq, BM) * BM * RV * D
            out[kernel] = B * H * (key_tiles * BN * (RK * D + 2 * BM * D + BM * RV) + epilogue)
        else:  # K and V rebuild, QK^T, dO V^T, dS K
            out[kernel] = B * H * key_tiles * BN * ((RK + RV) * D + 3 * BM * D)
    # rebuild: K (and V) tiles; loop: QK^T, (dO V^T,) and dK or dV; epilogue: d z = dX B^T and dB = z^T dX
    for kernel, rebuild, loop_dots, epilogue in (("_bwd_dk", RK + RV, 3, 2 * RK), ("_bwd_dv", RK, 2, 2 * RV)):
        BM, BN = tiles[kernel]
        # per key tile: rebuild and epilogue once, then its query tiles from the first that sees a key (as `lo`)
        first = [max(j * BN - offset, 0) // BM * BM if causal else 0 for j in range(triton.cdiv(Tk, BN))]
        query_tiles = sum(triton.cdiv(Tq - lo, BM) for lo in first if lo < Tq)
        per_key_tile = BN * (rebuild + epilogue) * D
        out[kernel] = B * H * (len(first) * per_key_tile + query_tiles * loop_dots * BM * BN * D)
    return out


def flash_attention2_macs(B, H, Tq, Tk, D, causal: bool = True) -> dict:
    """FlashAttention-2's multiply-adds on the visible (query, key) pairs only: forward QK^T and PV; backward
    recomputes QK^T, then dV, dP, dQ and dK."""
    pairs = sum(min(Tk, i + 1 + Tk - Tq) for i in range(Tq)) if causal else Tq * Tk
    return {"fwd": 2 * B * H * pairs * D, "bwd": 5 * B * H * pairs * D}


def check_fused_supported(q, z_k, z_v) -> None:
    """Raise a ValueError naming the kernel limit a call breaks (the reference takes any shape)."""
    D, r_k, r_v = q.shape[-1], z_k.shape[-1], z_v.shape[-1]
    if D not in FUSED_HEAD_DIMS:
        raise ValueError(f"fused lrkv_attention: head_dim must be one of {FUSED_HEAD_DIMS}, got {D}")
    if max(r_k, r_v) > D:
        raise ValueError(f"fused lrkv_attention: ranks must be <= head_dim {D}, got r_k={r_k}, r_v={r_v}")
    if q.dtype not in DTYPES:
        where = "under TRITON_INTERPRET=1" if INTERPRET else "on CUDA"
        raise ValueError(f"fused lrkv_attention: dtype must be one of {DTYPES} {where}, got {q.dtype}")


def _bucket(Tq: int, Tk: int) -> int:
    return triton.next_power_of_2(max(Tq, Tk))


def _new(shape, like, dtype=None):
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _strides(q, k_s, v_s, z_k, z_v):
    return (*q.stride()[:3], *k_s.stride()[:2], *v_s.stride()[:2], *z_k.stride()[:3], *z_v.stride()[:3])


def _meta(q, k_s, z_k, z_v, causal):
    return dict(D=q.shape[-1], RK=z_k.shape[-1], RV=z_v.shape[-1], RKP=dot_dim(z_k.shape[-1]),
                RVP=dot_dim(z_v.shape[-1]), CAUSAL=causal, ZK_ALIGN=alignment(z_k), ZV_ALIGN=alignment(z_v))


def launch_fwd(q: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, z_k: torch.Tensor, z_v: torch.Tensor,
               b_k: torch.Tensor, b_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k_s, v_s, z_k, z_v = map(unit_last_stride, (q, k_s, v_s, z_k, z_v))
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


# plain launchers (callable on meta tensors: aot.py records their kernel launches), wrapped as custom ops
_fwd_op = torch.library.custom_op("lrkv::fused_attention_fwd", mutates_args=())(launch_fwd)


@_fwd_op.register_fake
def _(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def launch_bwd(do: torch.Tensor, q: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, z_k: torch.Tensor,
               z_v: torch.Tensor, b_k: torch.Tensor, b_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               o: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
               deterministic: bool = False) -> list[torch.Tensor]:
    q, k_s, v_s, z_k, z_v = map(unit_last_stride, (q, k_s, v_s, z_k, z_v))
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
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=q.device)  # noqa: E731  atomic sums
    dzk, dzv = _new((B, H, Tk, r_k), q), _new((B, H, Tk, r_v), q)
    stage = _new((B, H, Tk, 2 * D), q)  # the dK pass's rebuilt K_h | V_h tiles (module docstring)
    grads = []  # (d k_s, d b_k), then (d v_s, d b_v)
    for kernel, z, dz, dk in ((_bwd_dk, z_k, dzk, True), (_bwd_dv, z_v, dzv, False)):
        # deterministic: per-head dX_h rows (one (B, H, Tk, D) fp32 buffer, as large as MHA's dK), summed below
        dxs = _new((B, H, Tk, D), q, torch.float32) if deterministic else zeros(B, Tk, D)
        db = zeros(H, z.shape[-1], D)
        kernel[lambda m: (triton.cdiv(Tk, m["BN"]) * B, H)](
            q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, do, lse, delta, dxs, dz, db, stage, *strides, B, *args, **meta,
            DK=dk, DETERMINISTIC=deterministic)
        if deterministic:  # fixed-order sums; dB from dX_h in the input dtype, as the atomic path's operands
            db = torch.einsum("bhtr,bhtd->hrd", z, dxs.to(q.dtype)).float()
            dxs = dxs.sum(1)
        grads.append((dxs, db))
    (dks, dbk), (dvs, dbv) = grads
    dt = q.dtype
    return [dq, dks.to(dt), dvs.to(dt), dzk, dzv, dbk.to(dt), dbv.to(dt)]


_bwd_op = torch.library.custom_op("lrkv::fused_attention_bwd", mutates_args=())(launch_bwd)


@_bwd_op.register_fake
def _(do, q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, o, lse, causal, scale, deterministic=False):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k_s, v_s, z_k, z_v, b_k, b_v)]


def _setup_context(ctx, inputs, output):
    q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, _dlse):
    # torch.use_deterministic_algorithms(True) selects the fixed-order sums, as it does for PyTorch's own ops
    grads = _bwd_op(do, *ctx.saved_tensors, ctx.causal, ctx.scale, torch.are_deterministic_algorithms_enabled())
    return (*grads, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def lrkv_attention_fused(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal: bool = True, scale: float | None = None):
    """Fused LRKV attention; same contract as reference.lrkv_attention, plus the kernel limits above. Where no
    config fits the device (kept_configs), the reference computes it, with a one-time warning."""
    check_lrkv_inputs(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin)
    check_fused_supported(q, z_k, z_v)
    if not INTERPRET:  # the interpreter runs its one config at any shape
        arch, D = _arch(q.device), q.shape[-1]
        if any(not kept_configs(k, arch, D, q.element_size()) for k in TILES):
            reason = f"no spill-free config for head_dim {D} in {q.dtype} on sm_{arch}"
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"fused lrkv_attention: {reason}; using the PyTorch reference", stacklevel=2)
            return reference_attention(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=causal, scale=scale)
    if z_k.shape[-1] == 0:  # rank 0 (MQA side): one zero rank; autograd slices the gradient back to empty
        z_k, b_k = F.pad(z_k, (0, 1)), F.pad(b_k, (0, 0, 0, 1))
    if z_v.shape[-1] == 0:
        z_v, b_v = F.pad(z_v, (0, 1)), F.pad(b_v, (0, 0, 0, 1))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _fwd_op(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal, scale)[0]
