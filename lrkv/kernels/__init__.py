"""Attention ops. `lrkv_attention` is the single entry point; the reference is the oracle and the CPU path."""

from lrkv.kernels.reference import lrkv_attention as lrkv_attention_reference


def lrkv_attention(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=True, scale=None):
    """LRKV attention (spec lrkv.md §10). Dispatches to the reference implementation."""
    return lrkv_attention_reference(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=causal, scale=scale)
