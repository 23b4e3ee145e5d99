"""Attention ops. `lrkv_attend` is the one place that picks an LRKV attention backend: the PyTorch reference
(reference.py: the oracle and the CPU path), the rebuild-once op (rebuild_once.py: the same work through the
flash attention op, keeping no per-head K/V for the backward), the fused Triton kernel (lrkv_attn.py, forward and
backward) or the flash-decoding kernel (decode.py) for cached steps. Triton modules are imported only when a kernel runs, since
TRITON_INTERPRET is read at their import (triton_util.py)."""

import importlib.util
import os
import warnings

import torch

from lrkv.kernels.reference import lrkv_attention as lrkv_attention_reference

DECODE_MAX_TOKENS = 16  # cached steps of at most this many new tokens take the flash-decoding kernel
MAX_ROW_BYTES = 256  # wider head rows (fp32 at D 128, any dtype at D 256) spill or overflow shared memory (both kernels)
_warned: set[tuple[str, str]] = set()


def fused_unavailable(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on tensors like x, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if x.is_cuda:
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernel on CPU, slowly)"
    if x.dtype != torch.float32:
        return f"the Triton interpreter computes only float32 correctly, got {x.dtype}"
    return None


def decode_unavailable(q: torch.Tensor) -> str | None:
    """Why the flash-decoding kernel cannot take q, or None: besides fused_unavailable, head rows wider than
    MAX_ROW_BYTES (fp32 at head_dim 128, any dtype at 256) spill or overflow shared memory on sm_80
    (benchmarks/kernel_aot.py); the interpreter runs any width."""
    reason = fused_unavailable(q)
    if reason is None and os.environ.get("TRITON_INTERPRET") != "1" and q.shape[-1] * q.element_size() > MAX_ROW_BYTES:
        reason = (f"the decode kernel has no spill-free config for head_dim {q.shape[-1]} in {q.dtype} "
                  f"(rows over {MAX_ROW_BYTES} bytes)")
    return reason


def _fallback(reason: str, impl: str = "triton") -> None:
    if (impl, reason) not in _warned:
        _warned.add((impl, reason))
        warnings.warn(f"attn_impl={impl}: {reason}; using the PyTorch reference", stacklevel=3)


def lrkv_attend(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=True, scale=None, key_valid=None,
                impl: str = "torch", cached: bool = False):
    """LRKV attention (docs/lrkv.md §10; shapes as reference.lrkv_attention, z_k/z_v as (B, H, T, r)).

    impl="torch" (model.attn_impl): the reference. impl="rebuild": the rebuild-once op where it applies (no padding
    mask, all queries against all keys), else the reference, with a one-time warning only under autograd (without
    one the two keep the same tensors). impl="triton": a cached step (`cached`, at most DECODE_MAX_TOKENS new
    queries, no autograd) takes the decode kernel, which reads z in the cache's (B, T, H, r) layout and takes
    padding masks; anything else the fused kernel, except with a padding mask (key_valid), which only the
    reference takes. Where a kernel cannot run, the reference with a one-time warning naming why; shapes a kernel
    cannot take (head_dim, rank, dtype) raise, naming the limit."""
    if impl == "rebuild":
        from lrkv.kernels import rebuild_once

        reason = rebuild_once.unavailable(q, k_s.shape[1], causal, key_valid)
        if reason is None:
            return rebuild_once.lrkv_attention_rebuild_once(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=causal,
                                                            scale=scale)
        if torch.is_grad_enabled():
            _fallback(reason, impl)
    elif impl == "triton":
        if cached and q.shape[2] <= DECODE_MAX_TOKENS and not torch.is_grad_enabled():
            reason = decode_unavailable(q)
            if reason is None:
                from lrkv.kernels.decode import lrkv_decode_attention

                return lrkv_decode_attention(q, k_s, v_s, z_k.transpose(1, 2), z_v.transpose(1, 2), b_k, b_v, cos,
                                             sin, key_valid=key_valid, scale=scale)
            _fallback(reason)
        elif key_valid is None:
            reason = fused_unavailable(q)
            if reason is None:
                from lrkv.kernels.lrkv_attn import lrkv_attention_fused

                return lrkv_attention_fused(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=causal, scale=scale)
            _fallback(reason)
    return lrkv_attention_reference(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=causal, scale=scale,
                                    key_valid=key_valid)
