"""The rebuild-once LRKV op (lrkv/kernels/rebuild_once.py): finite-difference gradients, the reference's output and
gradients, and the activation bytes autograd keeps for the backward."""

import pytest
import torch

import lrkv.kernels
from lrkv.config import ModelConfig, validate_model
from lrkv.kernels.rebuild_once import lrkv_attention_rebuild_once
from lrkv.kernels.reference import lrkv_attention as reference
from lrkv.model import Transformer, rope_tables


def make_inputs(B, H, T, D, r_k, r_v, dtype, device="cpu", seed=0):
    """Leaf tensors laid out as the model's (slices of one projection, latents transposed from (B, T, H, r))."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(device, dtype).transpose(1, 2)
    k_s, v_s, z_k, z_v = torch.randn(B, T, 2 * D + H * (r_k + r_v), generator=g).to(device, dtype).split(
        [D, D, H * r_k, H * r_v], dim=-1)
    z_k, z_v = z_k.view(B, T, H, r_k).transpose(1, 2), z_v.view(B, T, H, r_v).transpose(1, 2)
    b_k, b_v = (0.3 * torch.randn(H, r, D, generator=g).to(device, dtype) for r in (r_k, r_v))
    leaves = [t.detach().requires_grad_() for t in (q, k_s, v_s, z_k, z_v, b_k, b_v)]
    cos, sin = (t.to(dtype) for t in rope_tables(torch.arange(T, device=device), D, 10000.0))
    return leaves, cos, sin


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_finite_differences(causal):
    leaves, cos, sin = make_inputs(1, 2, 9, 8, 3, 2, torch.float64)
    assert torch.autograd.gradcheck(lambda *x: lrkv_attention_rebuild_once(*x, cos, sin, causal=causal), leaves)


@pytest.mark.parametrize("causal", [True, False])
def test_output_and_every_gradient_match_the_reference(causal):
    leaves, cos, sin = make_inputs(2, 4, 70, 32, 8, 6, torch.float32)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    ours, ref = lrkv_attention_rebuild_once(*leaves, cos, sin, causal=causal), reference(*copies, cos, sin, causal=causal)
    do = torch.randn_like(ref)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    for name, a, b in zip(("q", "k_s", "v_s", "z_k", "z_v", "b_k", "b_v"), torch.autograd.grad(ours, leaves, do),
                          torch.autograd.grad(ref, copies, do)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for fn's backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def test_keeps_no_per_head_keys_or_values_for_the_backward():
    B, H, T, D, r_k, r_v = 2, 8, 64, 32, 8, 4
    leaves, cos, sin = make_inputs(B, H, T, D, r_k, r_v, torch.float32)
    ours, ref = saved_bytes(lrkv_attention_rebuild_once, *leaves, cos, sin), saved_bytes(reference, *leaves, cos, sin)
    assert ref - ours == 2 * B * H * T * D * 4  # the reference's K_h and V_h, nothing else
    mha = saved_bytes(torch.nn.functional.scaled_dot_product_attention, *(torch.randn(B, H, T, D, requires_grad=True)
                                                                          for _ in range(3)))
    assert ours < mha  # q, k_s, v_s and the latents: fewer bytes than MHA's q, k, v


def test_the_dispatcher_takes_it_for_training_calls_and_falls_back_with_one_warning():
    leaves, cos, sin = make_inputs(1, 2, 16, 16, 4, 4, torch.float32)
    calls = []
    real = lrkv.kernels.rebuild_once._RebuildOnce.apply
    try:
        lrkv.kernels.rebuild_once._RebuildOnce.apply = lambda *a: calls.append(1) or real(*a)
        lrkv.kernels.lrkv_attend(*leaves, cos, sin, impl="rebuild")
        assert calls == [1]
        valid = torch.ones(1, 16, dtype=torch.bool)
        with pytest.warns(UserWarning, match="attn_impl=rebuild: a padding mask"):
            lrkv.kernels.lrkv_attend(*leaves, cos, sin, key_valid=valid, impl="rebuild")
        assert calls == [1]
    finally:
        lrkv.kernels.rebuild_once._RebuildOnce.apply = real


def test_model_trains_the_same_as_with_the_reference():
    def losses(attn_impl):
        cfg = ModelConfig(attn="lrkv", vocab_size=128, n_layer=2, d_model=64, n_head=4, head_dim=16, rank_k=4,
                          rank_v=4, ffn_dim=128, max_seq_len=32, lrkv_b_init="normal", attn_impl=attn_impl)
        validate_model(cfg)
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))
        out = []
        for _ in range(5):
            loss = model(tokens[:, :-1], tokens[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return torch.tensor(out)

    ours, ref = losses("rebuild"), losses("torch")
    assert ours[-1] < ours[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_the_cuda_flash_path_plumbs_its_ops_on_the_meta_device():
    """The meta device takes the CUDA branch (its ops have meta kernels): every argument of the flash forward and
    backward is passed in its schema's place and type, and each gradient comes back in its input's shape."""
    leaves, _, _ = make_inputs(2, 4, 128, 64, 16, 8, torch.bfloat16)
    meta = [torch.empty_like(t, device="meta").requires_grad_() for t in leaves]
    cos, sin = (torch.empty(128, 32, device="meta", dtype=torch.bfloat16) for _ in range(2))
    o = lrkv.kernels.rebuild_once._RebuildOnce.apply(*meta, cos, sin, True, None)
    assert o.shape == (2, 4, 128, 64) and o.dtype == torch.bfloat16
    grads = torch.autograd.grad(o, meta, torch.empty_like(o))
    assert [g.shape for g in grads] == [t.shape for t in meta]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cuda_matches_the_fp32_reference(dtype):
    leaves, cos, sin = make_inputs(2, 8, 512, 128, 64, 48, dtype, device="cuda")
    exact = [t.detach().float().requires_grad_() for t in leaves]
    ours = lrkv_attention_rebuild_once(*leaves, cos, sin)
    ref = reference(*exact, cos.float(), sin.float())
    do = torch.randn_like(ref)
    # flash attention in bf16/fp16 against fp32 math: rounding of the inputs and of P; relative to each tensor's scale
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for name, a, b in zip(("o", "q", "k_s", "v_s", "z_k", "z_v", "b_k", "b_v"),
                          (ours, *torch.autograd.grad(ours, leaves, do.to(dtype))),
                          (ref, *torch.autograd.grad(ref, exact, do))):
        err = (a.float() - b).abs().max() / b.abs().max()
        assert err < tol, f"{name} {dtype}: max error {err:.2e} of its scale (tolerance {tol})"
