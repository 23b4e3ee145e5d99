"""Flash-decoding LRKV kernel (lrkv/kernels/decode.py) against the reference, under the Triton interpreter on CPU
(switched on in conftest.py)."""

import pytest
import torch

import lrkv.kernels.decode as decode
from lrkv.config import ModelConfig
from lrkv.model import Transformer, rope_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, H, Tq, Tk, D, rk, rv, pad: int = 0, seed: int = 0):
    """Random decode inputs in the cache layout; the first `pad` keys of row 0 are left padding."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    cos, sin = rope_tables(torch.arange(Tk), D, 10000.0)
    key_valid = None
    if pad:
        key_valid = torch.ones(B, Tk, dtype=torch.bool)
        key_valid[0, :pad] = False
        key_valid = key_valid.to(DEVICE)
    return dict(q=randn(B, H, Tq, D), k_s=randn(B, Tk, D), v_s=randn(B, Tk, D), z_k=randn(B, Tk, H, rk),
                z_v=randn(B, Tk, H, rv), b_k=randn(H, rk, D) / 4, b_v=randn(H, rv, D) / 4,
                cos=cos.to(DEVICE), sin=sin.to(DEVICE), key_valid=key_valid)


@pytest.mark.parametrize("B,H,Tq,Tk,D,rk,rv,pad,block_n", [
    (1, 2, 1, 1, 32, 8, 8, 0, 64),  # a single cached position
    (2, 3, 1, 37, 64, 48, 16, 5, 16),  # odd context, rank 48, padding, 3 splits
    (2, 2, 1, 300, 32, 48, 48, 17, 32),  # 10 splits, the last one partial
    (2, 2, 4, 37, 32, 0, 0, 3, 16),  # rank 0 (MQA), several queries, bottom-right causal
    (1, 3, 3, 21, 16, 5, 3, 0, 16),  # head_dim 16 (half of 8 padded to 16), odd ranks
    (1, 1, 1, 20, 256, 16, 8, 0, 16),  # head_dim 256
])
def test_decode_matches_reference(B, H, Tq, Tk, D, rk, rv, pad, block_n):
    x = make_inputs(B, H, Tq, Tk, D, rk, rv, pad)
    out = decode.lrkv_decode_attention(**x, block_n=block_n)
    ref = decode.lrkv_decode_reference(**x)
    assert out.shape == ref.shape == (B, H, Tq, D)
    assert (out - ref).abs().max().item() < 1e-5


def test_every_partial_is_written():
    """NaN-poisoned partial buffers: splits that are fully masked (padding, causal) must still be written."""
    B, H, Tq, Tk, D, rv, block_n = 2, 2, 4, 64, 32, 12, 16
    x = make_inputs(B, H, Tq, Tk, D, 8, rv, pad=40)  # row 0: splits 0 and 1 are all padding
    key_valid = x.pop("key_valid")
    x.pop("b_v")
    b_v = make_inputs(B, H, Tq, Tk, D, 8, rv, seed=1)["b_v"]
    out = decode.empty_partials(x["q"], Tk, rv, block_n)
    for t in out:
        t.fill_(float("nan"))
    parts = decode.decode_partials(**x, key_valid=key_valid, scale=D ** -0.5, block_n=block_n, out=out)
    assert not any(t.isnan().any() for t in parts)
    assert (parts.m[0, :, :2] == float("-inf")).all() and (parts.l[0, :, :2] == 0).all()
    o = decode.combine_partials(parts, b_v, x["q"].dtype)
    ref = decode.lrkv_decode_reference(**x, b_v=b_v, key_valid=key_valid)
    assert (o - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("prompt_len", [9, 20])  # prefill through the kernel (<= 16 new tokens) or the reference
def test_cached_greedy_decoding_matches_reference_path(monkeypatch, prompt_len):
    """A tiny LRKV model decoding a left-padded batch: attn_impl triton (the kernel) == torch (the reference)."""
    calls = []
    kernel = decode.lrkv_decode_attention
    monkeypatch.setattr(decode, "lrkv_decode_attention",  # small tiles: several splits at these lengths
                        lambda *a, **k: calls.append(1) or kernel(*a, **k, block_n=16))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, rank_k=6, rank_v=12, ffn_dim=96,
                      lrkv_b_init="normal", max_seq_len=64)
    model = Transformer(cfg).to(DEVICE).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, prompt_len), device=DEVICE)
    valid = torch.ones_like(prompt, dtype=torch.bool)
    valid[1, :4] = False  # row 1's prompt is 4 tokens shorter, left-padded

    def greedy(impl: str, steps: int = 6):
        cfg.attn_impl = impl
        cache = model.new_cache()
        logits, tokens, step_logits = model(prompt, cache=cache, valid=valid)[:, -1], [], []
        for _ in range(steps):
            step_logits.append(logits)
            tokens.append(logits.argmax(-1))
            logits = model(tokens[-1][:, None], cache=cache)[:, -1]
        return torch.stack(tokens, 1), torch.stack(step_logits, 1)

    with torch.no_grad():
        ref_tokens, ref_logits = greedy("torch")
        assert not calls
        tokens, logits = greedy("triton")
    assert len(calls) == cfg.n_layer * (6 + (prompt_len <= 16))  # 6 single-token steps (+ prefill), every layer
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() < 1e-4


def test_bad_shapes_are_refused():
    x = make_inputs(2, 2, 1, 10, 32, 8, 8)
    with pytest.raises(ValueError, match="z_k"):
        decode.lrkv_decode_attention(**{**x, "z_k": x["z_k"][:, :9]})
    with pytest.raises(ValueError, match="key_valid"):
        decode.lrkv_decode_attention(**{**x, "key_valid": torch.ones(2, 9, dtype=torch.bool, device=DEVICE)})


def test_rows_wider_than_256_bytes_decode_through_the_reference_with_one_warning(monkeypatch):
    """On a GPU the decode kernel has no spill-free config for fp32 at head_dim 128 or any dtype at 256
    (benchmarks/kernel_aot.py): the dispatcher takes the reference there, saying so once; narrower rows keep the
    kernel."""
    import warnings

    import lrkv.kernels as kernels

    monkeypatch.delenv("TRITON_INTERPRET")  # the device rule (the interpreter runs any width)
    monkeypatch.setattr(kernels, "fused_unavailable", lambda x: None)  # as on CUDA, without launching anything
    monkeypatch.setattr(kernels, "_warned", set())
    x = make_inputs(1, 2, 1, 20, 128, 8, 8)
    args = (x["q"], x["k_s"], x["v_s"], x["z_k"].transpose(1, 2), x["z_v"].transpose(1, 2), x["b_k"], x["b_v"],
            x["cos"], x["sin"])
    with torch.no_grad():
        with pytest.warns(UserWarning, match="no spill-free config for head_dim 128 in torch.float32"):
            o = kernels.lrkv_attend(*args, impl="triton", cached=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            kernels.lrkv_attend(*args, impl="triton", cached=True)
    assert torch.equal(o, decode.lrkv_decode_reference(**x))
    for D, dtype in ((128, torch.bfloat16), (64, torch.float32)):
        assert kernels.decode_unavailable(torch.empty(1, 1, 1, D, dtype=dtype)) is None
    assert "head_dim 256" in kernels.decode_unavailable(torch.empty(1, 1, 1, 256, dtype=torch.bfloat16))
