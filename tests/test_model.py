import dataclasses
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lrkv.config import ModelConfig, load_config, validate_model
from lrkv.kernels.reference import lrkv_attention, rope
from lrkv.model import (Block, DecoderCache, GroupedQueryAttention, LayerCache, LRKVAttention, Transformer,
                        cache_layout, rope_tables)

VARIANTS = ("mha", "gqa", "mqa", "mla", "lrkv")


def tiny(attn: str, **kw) -> ModelConfig:
    base = dict(attn=attn, vocab_size=97, n_layer=2, d_model=64, n_head=4, head_dim=16, rank_k=4, rank_v=6,
                n_kv_head=2 if attn == "gqa" else None, mla_kv_rank=24, mla_rope_dim=8, ffn_dim=96,
                lrkv_b_init="normal")  # normal B: the residual path is live, not the MQA starting point
    base.update(kw)
    cfg = ModelConfig(**base)
    validate_model(cfg)
    return cfg


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("attn, q_rank", [(a, 0) for a in VARIANTS] + [("mla", 16)])
def test_incremental_decoding_equals_full_forward(attn, q_rank):
    model = build(tiny(attn, mla_q_rank=q_rank))
    idx = torch.randint(0, 97, (3, 21))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        chunks = [model(idx[:, :7], cache=cache), model(idx[:, 7:10], cache=cache)]
        chunks += [model(idx[:, t : t + 1], cache=cache) for t in range(10, 21)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("attn", VARIANTS)
def test_causality(attn):
    model = build(tiny(attn))
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


@pytest.mark.parametrize("attn", VARIANTS)
def test_left_padded_batch_matches_unpadded_rows(attn):
    model = build(tiny(attn))
    lengths = [11, 6, 9]
    rows = [torch.randint(1, 97, (n,)) for n in lengths]
    T = max(lengths)
    idx = torch.zeros(3, T, dtype=torch.long)
    valid = torch.zeros(3, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r):], valid[i, T - len(r):] = r, True
    with torch.no_grad():
        cache = model.new_cache()
        padded = model(idx, cache=cache, valid=valid)
        nxt = torch.randint(1, 97, (3, 1))
        step = model(nxt, cache=cache)
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, nxt[i]])[None])
            torch.testing.assert_close(padded[i, T - len(r):], alone[0, :-1], rtol=0, atol=2e-5)
            torch.testing.assert_close(step[i, 0], alone[0, -1], rtol=0, atol=2e-5)


def naive_lrkv_layer(attn: LRKVAttention, x: torch.Tensor) -> torch.Tensor:
    """Independent LRKV: per-head loops with explicit weights, K_h = X W_K^s + (X A_h) B_h, plain softmax."""
    H, D, rk, rv = attn.n_head, attn.head_dim, attn.rank_k, attn.rank_v
    W = attn.qkv.weight.T  # (d, out)
    Wq, Wks, Wvs = W[:, : H * D], W[:, H * D : H * D + D], W[:, H * D + D : H * D + 2 * D]
    Ak, Av = W[:, H * D + 2 * D : H * D + 2 * D + H * rk], W[:, H * D + 2 * D + H * rk :]
    T = x.shape[1]
    pos = torch.arange(T, dtype=torch.float64)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), pos[:, None] * freqs[None])

    def rotate(t):  # rotate-half RoPE via complex multiplication on (first half, second half) pairs
        c = torch.complex(t[..., : D // 2].double(), t[..., D // 2 :].double()) * rot
        return torch.cat([c.real, c.imag], dim=-1).to(t.dtype)

    heads = []
    for h in range(H):
        q = rotate(x @ Wq[:, h * D : (h + 1) * D])
        k = rotate(x @ Wks + (x @ Ak[:, h * rk : (h + 1) * rk]) @ attn.b_k[h])
        v = x @ Wvs + (x @ Av[:, h * rv : (h + 1) * rv]) @ attn.b_v[h]
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(s.softmax(-1) @ v)
    return attn.proj(torch.cat(heads, dim=-1))


def test_lrkv_layer_equals_shared_plus_low_rank_residual_computed_independently():
    torch.manual_seed(0)
    attn = LRKVAttention(tiny("lrkv", rank_k=5, rank_v=3))
    x = torch.randn(2, 13, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, torch.arange(13)), naive_lrkv_layer(attn, x), rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_rotation():
    D, T = 16, 10
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    cos, sin = rope_tables(torch.arange(T), D, 10000.0)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * (1.0 / 10000.0 ** (torch.arange(0, D, 2) / D))[None]
    c = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(rope(x, cos.double(), sin.double()), torch.cat([c.real, c.imag], -1), rtol=1e-6, atol=1e-6)


def test_lrkv_rank_zero_is_mqa_with_same_shared_weights():
    lrkv = LRKVAttention(tiny("lrkv", rank_k=0, rank_v=0))
    mqa = GroupedQueryAttention(tiny("mqa"))
    with torch.no_grad():
        mqa.qkv.weight.copy_(lrkv.qkv.weight)  # both lay out [W_Q | W_K | W_V]; LRKV's latent blocks are empty
        mqa.proj.weight.copy_(lrkv.proj.weight)
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        torch.testing.assert_close(lrkv(x, torch.arange(12)), mqa(x, torch.arange(12)), rtol=1e-6, atol=1e-6)


def test_lrkv_full_rank_represents_any_mha():
    H, D, d = 4, 16, 64
    mha = GroupedQueryAttention(tiny("mha"))
    lrkv = LRKVAttention(tiny("lrkv", rank_k=D, rank_v=D))
    Wq, Wk, Wv = mha.qkv.weight.split([H * D, H * D, H * D])  # (out, d) blocks, per-head rows
    Ws_k, Ws_v = torch.randn(D, d) * 0.1, torch.randn(D, d) * 0.1  # any shared base works
    # A_h = W_K^h - W_K^s, B_h = I  =>  K_h = X W_K^s + X (W_K^h - W_K^s) = X W_K^h
    A_k = torch.cat([Wk[h * D : (h + 1) * D] - Ws_k for h in range(H)])
    A_v = torch.cat([Wv[h * D : (h + 1) * D] - Ws_v for h in range(H)])
    with torch.no_grad():
        lrkv.qkv.weight.copy_(torch.cat([Wq, Ws_k, Ws_v, A_k, A_v]))
        lrkv.b_k.copy_(torch.eye(D).expand(H, D, D))
        lrkv.b_v.copy_(torch.eye(D).expand(H, D, D))
        lrkv.proj.weight.copy_(mha.proj.weight)
        x = torch.randn(2, 12, d)
        torch.testing.assert_close(lrkv(x, torch.arange(12)), mha(x, torch.arange(12)), rtol=1e-5, atol=1e-5)


def test_lrkv_zero_init_starts_as_mqa():
    cfg = tiny("lrkv", lrkv_b_init="zero")
    attn = LRKVAttention(cfg)
    assert attn.b_k.abs().sum() == 0 and attn.b_v.abs().sum() == 0
    assert attn.qkv.weight.std() > 0


@pytest.mark.parametrize("attn", VARIANTS)
def test_flop_formula_matches_flop_counter(attn):
    T = 24
    model = build(tiny(attn, mla_q_rank=16 if attn == "mla" else 0)).train()
    counter = FlopCounterMode(display=False)
    idx, targets = torch.randint(0, 97, (1, T)), torch.randint(0, 97, (1, T))
    with sdpa_kernel(SDPBackend.MATH), counter:  # the fused CPU SDPA op has no FLOP formula registered
        model(idx, targets).backward()
    assert counter.get_total_flops() == model.num_flops_per_token(T) * T


@pytest.mark.parametrize("attn", VARIANTS)
def test_cache_bytes_measured_equal_formula(attn):
    model = build(tiny(attn))
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 5)), cache=cache)
    measured = sum(layer.bytes_per_token() for layer in cache.layers)  # fp32 tensors
    assert measured == model.kv_bytes_per_token(dtype_bytes=4)


def test_2p5b_params_and_kv_fraction():
    cfg = load_config("lrkv_2p5b.yaml").model
    with torch.device("meta"):
        model, mha = Transformer(cfg), Transformer(dataclasses.replace(cfg, attn="mha"))
    assert 2.25e9 <= model.num_params() <= 2.75e9
    # independent count from docs/lrkv.md §4 + SwiGLU + untied embeddings
    d, H, Dh, L, V, F = 2304, 18, 128, 18, 65536, 14336
    attn = 2 * d * H * Dh + (d * Dh + H * 64 * (d + Dh)) + (d * Dh + H * 48 * (d + Dh))
    assert model.num_params() == L * (attn + 3 * d * F + 2 * d) + 2 * V * d + d
    assert model.kv_bytes_per_token() <= 0.55 * mha.kv_bytes_per_token()


def test_tied_embeddings_share_one_tensor():
    model = build(tiny("lrkv", tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.num_params() == build(tiny("lrkv")).num_params() - 97 * 64


def test_attention_rejects_bad_inputs_with_named_argument():
    B, H, T, D, r = 2, 4, 8, 16, 4
    args = dict(q=torch.randn(B, H, T, D), k_s=torch.randn(B, T, D), v_s=torch.randn(B, T, D),
                z_k=torch.randn(B, H, T, r), z_v=torch.randn(B, H, T, r), b_k=torch.randn(H, r, D),
                b_v=torch.randn(H, r, D), cos=torch.randn(T, D // 2), sin=torch.randn(T, D // 2))
    lrkv_attention(**args)
    with pytest.raises(ValueError, match=r"b_k must be \(H, r_k, D\)"):
        lrkv_attention(**{**args, "b_k": torch.randn(H, r + 1, D)})
    with pytest.raises(ValueError, match=r"v_s must be \(B, T, D\)"):
        lrkv_attention(**{**args, "v_s": torch.randn(B, T + 1, D)})
    with pytest.raises(ValueError, match="z_v has dtype torch.float64"):
        lrkv_attention(**{**args, "z_v": args["z_v"].double()})
    with pytest.raises(ValueError, match=r"q must be \(B, H, T, D\)"):
        lrkv_attention(**{**args, "q": torch.randn(H, T, D)})
    with pytest.raises(ValueError, match="unknown attention type 'flash'"):
        Block(dataclasses.replace(tiny("mha"), attn="flash"))


def test_logits_to_keep_projects_only_the_last_positions():
    model = build(tiny("lrkv"))
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full, last = model(idx), model(idx, logits_to_keep=3)
    assert last.shape == (2, 3, 97)
    torch.testing.assert_close(last, full[:, -3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn", VARIANTS)
def test_bf16_autocast_trains_and_tracks_fp32(attn):
    model = build(tiny(attn)).train()
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    ref = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 activations, fp32 parameters (bf16-mixed)
        loss = model(idx, targets)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def spec_layout(m: ModelConfig) -> tuple[int, dict[str, int]]:
    """Row streams per token and each cached field's width, from the README's table (independent of model.py)."""
    H, D = m.n_head, m.dh
    return {"mha": (H, {"k": D, "v": D}), "gqa": (m.n_kv_head, {"k": D, "v": D}), "mqa": (1, {"k": D, "v": D}),
            "mla": (1, {"c": m.mla_kv_rank, "k_pe": m.mla_rope_dim}),
            "lrkv": (1, {"k_s": D, "v_s": D, "z_k": H * m.rank_k, "z_v": H * m.rank_v})}[m.attn]


@pytest.mark.parametrize("attn", VARIANTS)
def test_cache_layout_describes_what_the_cache_holds(attn):
    m = tiny(attn)
    model = build(m)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 5)), cache=cache)
    streams, fields = spec_layout(m)
    for block, layer_cache in zip(model.layers, cache.layers):
        layout = block.attn.cache_layout
        assert layout == cache_layout(m) and (layout.streams, dict(layout.fields)) == (streams, fields)
        assert {name: b[0, 0].numel() for name, b in layer_cache.buffers.items()} == {
            name: streams * width for name, width in fields.items()}
        assert block.attn.kv_numbers_per_token == streams * sum(fields.values())


@pytest.mark.parametrize("attn", ["mha", "gqa", "mqa", "lrkv"])
def test_fused_projection_split_and_cache_rows_rebuild_the_forward_keys(attn):
    """proj_split matches the README's [q | k | v] / [q | k_s | v_s | z_k | z_v]; keys_values rebuilds, from the
    cache rows, the per-head keys (rotated) and values computed here from the weights by hand."""
    m = tiny(attn)
    a = build(m).layers[0].attn
    H, D, G, rk, rv = m.n_head, m.dh, m.kv_heads, m.rank_k, m.rank_v
    expected = [H * D, D, D, H * rk, H * rv] if attn == "lrkv" else [H * D, G * D, G * D]
    assert list(a.proj_split.values()) == expected and sum(expected) == a.qkv.weight.shape[0]
    B, T = 2, 7
    x, positions = torch.randn(B, T, m.d_model), torch.arange(T)
    cos, sin = rope_tables(positions, D, m.rope_theta)
    W = a.qkv.weight.split(expected)
    with torch.no_grad():
        if attn == "lrkv":
            base_k, base_v = x @ W[1].T, x @ W[2].T  # (B, T, D)
            z_k, z_v = (x @ W[3].T).view(B, T, H, rk), (x @ W[4].T).view(B, T, H, rv)
            k = rope(base_k[:, None] + torch.einsum("bthr,hrd->bhtd", z_k, a.b_k), cos, sin)
            v = base_v[:, None] + torch.einsum("bthr,hrd->bhtd", z_v, a.b_v)
        else:
            k = rope((x @ W[1].T).view(B, T, G, D).transpose(1, 2), cos, sin)
            v = (x @ W[2].T).view(B, T, G, D).transpose(1, 2)
        _, payload = a.prepare(x, positions)
        rows = a.cache_rows(payload)
        layout = a.cache_layout
        assert rows.shape == (B * layout.streams, T, layout.row)
        parts = layout.split(rows)
        assert [p.shape[-1] for p in parts.values()] == [w for _, w in layout.fields]
        k_rows, v_rows = a.keys_values(rows.view(B, layout.streams, T, -1), positions.expand(B, layout.streams, T))
    torch.testing.assert_close(k_rows, k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_rows, v, rtol=1e-5, atol=1e-5)


class ConcatCache(LayerCache):
    """A third LayerCache, written against the protocol alone: keeps the entries by concatenation."""

    def __init__(self):
        self.entries: dict[str, torch.Tensor] = {}
        self.calls = 0

    @property
    def length(self) -> int:
        return next(iter(self.entries.values())).shape[1] if self.entries else 0

    def attend(self, module, q, payload, key_valid):
        self.calls += 1
        new = module.cache_entries(payload)
        self.entries = {n: torch.cat((self.entries[n], t), 1) if self.entries else t for n, t in new.items()}
        return module.attention(q, self.entries, key_valid, torch.arange(self.length), cached=True)


class ConcatModelCache(DecoderCache):
    def __init__(self, n_layer: int):
        self.layers = [ConcatCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def key_valid(self, valid, batch, steps, device):
        return None


@pytest.mark.parametrize("attn", VARIANTS)
def test_any_cache_implementing_the_protocol_decodes_like_the_full_forward(attn):
    model = build(tiny(attn))
    idx = torch.randint(0, 97, (2, 12))
    cache = ConcatModelCache(len(model.layers))
    with torch.no_grad():
        full = model(idx)
        steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)
    assert all(c.calls == 8 for c in cache.layers)  # one attend per layer and forward
