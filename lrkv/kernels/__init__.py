"""Attention ops. `lrkv_attention` is the single entry point for `attn_impl: triton`: the fused Triton kernel
(lrkv_attn.py) on CUDA or under TRITON_INTERPRET=1, else the reference (reference.py, the oracle and CPU path)."""

import importlib.util
import os
import warnings

import torch

from lrkv.kernels.reference import lrkv_attention as lrkv_attention_reference

_warned: set[str] = set()


def fused_unavailable(x: torch.Tensor) -> str | None:
    """Why the fused kernel cannot run on tensors like x, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if x.is_cuda:
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernel on CPU, slowly)"
    if x.dtype != torch.float32:
        return f"the Triton interpreter computes only float32 correctly, got {x.dtype}"
    return None


def lrkv_attention(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=True, scale=None):
    """LRKV attention (spec lrkv.md §10): fused Triton kernel where it can run, else the reference with a
    one-time warning. Shapes the kernel cannot take (head_dim, rank, dtype) raise, naming the limit."""
    reason = fused_unavailable(q)
    if reason is None:
        from lrkv.kernels.lrkv_attn import lrkv_attention_fused  # imported late: TRITON_INTERPRET is read then

        return lrkv_attention_fused(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=causal, scale=scale)
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"attn_impl=triton: {reason}; using the PyTorch reference", stacklevel=2)
    return lrkv_attention_reference(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=causal, scale=scale)
