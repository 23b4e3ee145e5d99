"""Rebuild-once LRKV attention: per-head K_h, V_h built once per step by matmuls, flash attention over them, and
nothing per-head kept for the backward (docs/lrkv.md §10).

The reference (reference.lrkv_attention) does the same work, but autograd keeps the rebuilt K_h and V_h for the
backward: 2·B·H·T·D numbers per layer, as much as MHA's K and V. This op saves only its inputs, the output and the
softmax log-sum-exp, frees K_h and V_h after the forward and rebuilds them in the backward, so a layer keeps
q, k_s, v_s and the rank-r latents: fewer activation bytes than MHA's q, k, v. The rebuild costs
B·T·H·(r_k + r_v)·D multiply-adds, 1-6 % of flash attention's work at the shipped shapes (benchmarks/kernel.py).

Training shapes only: all queries against all keys (Tq == Tk when causal), no padding mask; the dispatcher sends
anything else to the reference. On CUDA the flash op needs fp16/bf16 (`unavailable` says why not).
"""

from __future__ import annotations

import torch

from lrkv.kernels.reference import check_lrkv_inputs, lrkv_keys, lrkv_values


def unavailable(q: torch.Tensor, tk: int, causal: bool, key_valid) -> str | None:
    """Why this op cannot take the call (the dispatcher then uses the reference), or None."""
    if key_valid is not None:
        return "a padding mask (key_valid)"
    if causal and q.shape[2] != tk:
        return f"causal attention with fewer queries ({q.shape[2]}) than keys ({tk})"
    if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        return f"CUDA flash attention needs fp16/bf16, got {q.dtype}"
    if q.device.type not in ("cpu", "cuda"):
        return f"no flash attention op on {q.device.type}"
    return None


def _flash_forward(q, k, v, causal, scale):
    """(out, lse, cuda): the output, its log-sum-exp and, on CUDA, what the flash backward needs besides them:
    (cum_seq_q, cum_seq_k, seed, offset) tensors (some undefined, i.e. None) and (max_q, max_k) ints."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, None
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale)
    return out, lse, ((cum_q, cum_k, seed, offset), (max_q, max_k))


def _flash_backward(do, q, k, v, out, lse, cuda, causal, scale):
    if cuda is None:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, scale=scale)
    (cum_q, cum_k, seed, offset), (max_q, max_k) = cuda
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)


class _RebuildOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal, scale):
        k, v = lrkv_keys(k_s, z_k, b_k, cos, sin), lrkv_values(v_s, z_v, b_v)
        out, lse, cuda = _flash_forward(q, k, v, causal, scale)
        tensors, ctx.max_qk = cuda if cuda is not None else ((), None)
        ctx.save_for_backward(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, out, lse, *tensors)  # k, v freed here
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, out, lse, *tensors = ctx.saved_tensors
        cuda = None if ctx.max_qk is None else (tensors, ctx.max_qk)
        leaves = [t.detach().requires_grad_() for t in (k_s, v_s, z_k, z_v, b_k, b_v)]
        with torch.enable_grad():  # rebuild K_h, V_h with their graph, only for this backward
            k = lrkv_keys(leaves[0], leaves[2], leaves[4], cos, sin)
            v = lrkv_values(leaves[1], leaves[3], leaves[5])
        dq, dk, dv = _flash_backward(do.contiguous(), q, k.detach(), v.detach(), out, lse, cuda, ctx.causal,
                                     ctx.scale)
        d_ks, d_vs, d_zk, d_zv, d_bk, d_bv = torch.autograd.grad((k, v), leaves, (dk, dv))
        return dq, d_ks, d_vs, d_zk, d_zv, d_bk, d_bv, None, None, None, None


def lrkv_attention_rebuild_once(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal: bool = True,
                                scale: float | None = None) -> torch.Tensor:
    """LRKV attention with the reference's shapes (reference.lrkv_attention), keeping no per-head K/V for backward."""
    check_lrkv_inputs(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin)
    reason = unavailable(q, k_s.shape[1], causal, None)
    if reason is not None:
        raise ValueError(f"lrkv_attention_rebuild_once: {reason}")
    return _RebuildOnce.apply(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal, scale)
