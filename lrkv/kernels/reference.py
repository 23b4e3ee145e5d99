"""Plain PyTorch LRKV attention: the oracle every other backend is tested against (docs/lrkv.md §10).

K_h = rope(k_s + z_k[:, h] @ b_k[h]);  V_h = v_s + z_v[:, h] @ b_v[h]
o[:, h] = softmax(q[:, h] K_h^T * scale + causal_mask) V_h

Queries may be shorter than keys (incremental decoding): query i then sits at key position Tk - Tq + i
(bottom-right aligned causal mask), and cos/sin cover the Tk key positions.
"""

import torch
import torch.nn.functional as F


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (GPT-NeoX / Llama). x: (..., T, D); cos, sin: (T, D/2), broadcast over leading dims."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def causal_attention(q, k, v, causal: bool = True, scale: float | None = None,
                     key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with a bottom-right aligned causal mask. q: (B, H, Tq, E), k: (B, Hk, Tk, E), v: (B, Hk, Tk, Ev), where
    Hk = H or a divisor of it (grouped heads: query head h reads key head h // (H / Hk), without repeating K, V).

    key_valid (B, Tk) bool masks out keys (left padding in batched generation); each query still sees its own
    position so a padding query's row is never empty (its output is ignored downstream).
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if key_valid is not None:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril(diagonal=tk - tq)
        own = torch.zeros_like(allowed)
        own[torch.arange(tq), torch.arange(tk - tq, tk)] = True
        return attention(q, k, v, (allowed & key_valid[:, None, None, :]) | own, scale)
    if not causal or tq == 1:
        return attention(q, k, v, None, scale)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return attention(q, k, v, torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq), scale)


FEW_QUERIES = 16  # decode steps (and Lockstep's batched ones) on a CPU take the explicit path below


def attention(q, k, v, mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, where mask) v, grouped heads as in causal_attention; mask (bool) broadcasts to
    (B, H, Tq, Tk). SDPA, except for a few queries on a CPU: there the same softmax as explicit matmuls, scores and
    softmax in fp32 and the probabilities in v's dtype for the value product (as flash kernels do). For one bf16
    query over 4K keys that is 0.2-0.3 ms where SDPA's CPU kernel takes 3.2 ms (a Qwen2.5-0.5B layer, 2 threads)."""
    B, H, tq, D = q.shape
    Hk = k.shape[1]
    if q.device.type != "cpu" or tq > FEW_QUERIES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hk != H)
    # a group's query heads as rows of one matmul per KV head: no copy of K, V per query head
    s = (q.float().reshape(B, Hk, H // Hk * tq, D) @ k.float().mT).view(B, H, tq, -1)
    s = s * (D**-0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1).to(v.dtype)
    return (p.view(B, Hk, H // Hk * tq, -1) @ v).view(B, H, tq, -1).to(q.dtype)


def check_lrkv_inputs(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin) -> None:
    """Raise one ValueError naming the first argument whose shape or dtype breaks the op contract."""
    if q.dim() != 4:
        raise ValueError(f"lrkv_attention: q must be (B, H, T, D), got shape {tuple(q.shape)}")
    B, H, Tq, D = q.shape
    if D % 2:
        raise ValueError(f"lrkv_attention: head_dim must be even for RoPE, got {D}")
    Tk = k_s.shape[1] if k_s.dim() == 3 else -1
    r_k = z_k.shape[-1] if z_k.dim() == 4 else -1
    r_v = z_v.shape[-1] if z_v.dim() == 4 else -1
    expected = {  # name: (tensor, shape, shape in words)
        "k_s": (k_s, (B, Tk, D), "(B, T, D)"),
        "v_s": (v_s, (B, Tk, D), "(B, T, D)"),
        "z_k": (z_k, (B, H, Tk, r_k), "(B, H, T, r_k)"),
        "z_v": (z_v, (B, H, Tk, r_v), "(B, H, T, r_v)"),
        "b_k": (b_k, (H, r_k, D), "(H, r_k, D)"),
        "b_v": (b_v, (H, r_v, D), "(H, r_v, D)"),
        "cos": (cos, (Tk, D // 2), "(T, D/2)"),
        "sin": (sin, (Tk, D // 2), "(T, D/2)"),
    }
    for name, (t, shape, words) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"lrkv_attention: {name} must be {words} = {shape} given q {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
    if Tq > Tk:
        raise ValueError(f"lrkv_attention: more queries ({Tq}) than keys ({Tk})")
    for name, t in (("k_s", k_s), ("v_s", v_s), ("z_k", z_k), ("z_v", z_v), ("b_k", b_k), ("b_v", b_v)):
        if t.dtype != q.dtype:
            raise ValueError(f"lrkv_attention: {name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"lrkv_attention: expected floating-point inputs, got {q.dtype}")


def lrkv_keys(k_s, z_k, b_k, cos, sin) -> torch.Tensor:
    """Per-head keys rope(k_s + z_k[:, h] @ b_k[h]): k_s (B, T, D), z_k (B, H, T, r) -> (B, H, T, D);
    cos, sin broadcast against (B, H, T, D/2), e.g. (T, D/2) or (B, 1, T, D/2) for per-row positions."""
    return rope(k_s.unsqueeze(1) + torch.einsum("bhtr,hrd->bhtd", z_k, b_k), cos, sin)


def lrkv_values(v_s, z_v, b_v) -> torch.Tensor:
    """Per-head values v_s + z_v[:, h] @ b_v[h]: v_s (B, T, D), z_v (B, H, T, r) -> (B, H, T, D)."""
    return v_s.unsqueeze(1) + torch.einsum("bhtr,hrd->bhtd", z_v, b_v)


def lrkv_attention(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal: bool = True, scale: float | None = None,
                   key_valid: torch.Tensor | None = None):
    """Reference LRKV attention; materialises per-head K/V, then SDPA. Shapes: see module docstring / docs/lrkv.md §10.
    key_valid (B, Tk) bool, an extension beyond the §10 contract, masks padding keys (see causal_attention)."""
    check_lrkv_inputs(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin)
    return causal_attention(q, lrkv_keys(k_s, z_k, b_k, cos, sin), lrkv_values(v_s, z_v, b_v), causal, scale, key_valid)
