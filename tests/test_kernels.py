"""Fused Triton LRKV attention (lrkv/kernels/lrkv_attn.py) against the fp32 reference: output and every gradient.

Without CUDA the kernels run under the Triton interpreter (switched on in conftest.py), in fp32 with 64-wide tiles.
"""

import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import lrkv.kernels
from lrkv.config import ModelConfig, validate_model
from lrkv.kernels import lrkv_attn
from lrkv.kernels.reference import lrkv_attention as reference
from lrkv.model import Transformer, rope_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("o", "q", "k_s", "v_s", "z_k", "z_v", "b_k", "b_v")
# fp32 under the interpreter is exact up to summation order: measured max 9.8e-7; 1e-5 leaves 10x headroom
# and still catches any wrong term (those give errors of order 1e-1).
FP32_TOL = 1e-5 if lrkv_attn.INTERPRET else 5e-3  # on GPU, fp32 tl.dot runs in tf32


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernel does not write fails the comparison."""
    monkeypatch.setattr(lrkv_attn, "POISON_OUTPUTS", True)


def make_inputs(B, H, Tq, Tk, D, r_k, r_v, dtype=torch.float32, strided=False, seed=0):
    """Random op inputs as leaf tensors; `strided` lays them out as the model does (slices of one wide
    projection, latents transposed from (B, T, H, r)), so the kernel sees non-unit strides."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    if strided:
        k_s, v_s, z_k, z_v, _ = rnd(B, Tk, 2 * D + H * (r_k + r_v) + 3).split([D, D, H * r_k, H * r_v, 3], dim=-1)
        z_k, z_v = z_k.view(B, Tk, H, r_k).transpose(1, 2), z_v.view(B, Tk, H, r_v).transpose(1, 2)
        q = rnd(B, Tq, H, D).transpose(1, 2)
    else:
        q, k_s, v_s = rnd(B, H, Tq, D), rnd(B, Tk, D), rnd(B, Tk, D)
        z_k, z_v = rnd(B, H, Tk, r_k), rnd(B, H, Tk, r_v)
    b_k, b_v = rnd(H, r_k, D) / max(r_k, 1) ** 0.5, rnd(H, r_v, D) / max(r_v, 1) ** 0.5
    cos, sin = rope_tables(torch.arange(Tk, device=DEVICE), D, 10000.0)
    return [t.detach().requires_grad_() for t in (q, k_s, v_s, z_k, z_v, b_k, b_v)] + [cos, sin]


def rms(x):
    return x.double().pow(2).mean().sqrt().item()


def rel_rms(x, ref):
    return rms(x - ref) / max(rms(ref), 1e-30) if ref.numel() else 0.0  # rank 0: empty gradients


def output_and_grads(fn, inputs, do, causal=True):
    o = fn(*inputs, causal=causal)
    return [o, *torch.autograd.grad(o, inputs[:7], do)]


def errors(inputs, causal=True, dtype=torch.float32):
    """Relative RMS error of the fused output and each gradient vs the fp32 reference, by name (absolute RMS
    error where the true gradient is zero)."""
    do = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    ours = output_and_grads(lrkv_attn.lrkv_attention_fused, inputs, do, causal)
    ref_in = [t.detach().float().requires_grad_() for t in inputs[:7]] + inputs[7:]
    ref = output_and_grads(reference, ref_in, do.float(), causal)
    for name, a, b in zip(NAMES, ours, ref):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert torch.isfinite(a).all(), f"{name}: NaN/inf, an element was not written"
    errs = {name: rel_rms(a, b) for name, a, b in zip(NAMES, ours, ref)}
    if inputs[1].shape[1] == 1:  # one key: softmax is constant, so the score-side gradients are exactly zero
        errs |= {name: rms(a - b) for name, a, b in zip(NAMES, ours, ref) if name in ("q", "k_s", "z_k", "b_k")}
    return errs


# (B, H, Tq, Tk, D, r_k, r_v): odd lengths, both head dims, ranks 16/32/48/64, batch > 1
SHAPES = [
    (2, 2, 63, 63, 64, 16, 48),
    (2, 2, 257, 257, 64, 64, 32),
    (2, 1, 130, 130, 128, 48, 64),
    (2, 2, 500, 500, 128, 64, 48),
    (3, 2, 1, 1, 64, 32, 16),
]
SWEEP = [(2, 2, t, t, d, r, r) for t in (63, 257, 500) for d in (64, 128) for r in (16, 32, 48, 64)]


def check(shape, causal=True, strided=False):
    errs = errors(make_inputs(*shape, strided=strided), causal)
    print(shape, "causal" if causal else "full", {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(e < FP32_TOL for e in errs.values()), errs  # (NaN fails too)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape):
    check(shape)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SWEEP, ids=str)
def test_matches_reference_sweep(shape):
    check(shape)


def test_non_causal_strided_inputs():
    check((2, 2, 100, 100, 64, 16, 32), causal=False, strided=True)


@pytest.mark.parametrize("shape", [(2, 2, 37, 150, 64, 32, 48), (2, 2, 1, 77, 64, 16, 16)], ids=str)
def test_fewer_queries_than_keys_bottom_right_causal(shape):
    check(shape, strided=True)


def test_rank_zero_is_mqa():
    check((2, 2, 70, 70, 64, 0, 16))


@pytest.mark.parametrize("change, limit", [
    (dict(D=48), "head_dim must be one of"),
    (dict(r_k=80), "ranks must be <= head_dim"),
    (dict(dtype=torch.float64), "dtype must be one of"),
])
def test_unsupported_shapes_name_the_limit(change, limit):
    dims = dict(B=1, H=2, Tq=8, Tk=8, D=64, r_k=16, r_v=16) | {k: v for k, v in change.items() if k != "dtype"}
    inputs = make_inputs(*dims.values(), dtype=change.get("dtype", torch.float32))
    with pytest.raises(ValueError, match=limit):
        lrkv_attn.lrkv_attention_fused(*inputs)


def test_dispatch_uses_kernel_here_and_falls_back_once_with_a_warning(monkeypatch):
    inputs = make_inputs(1, 2, 20, 20, 32, 8, 8)
    calls = []
    monkeypatch.setattr(lrkv_attn, "lrkv_attention_fused", lambda *a, **k: calls.append(1) or reference(*a, **k))
    lrkv.kernels.lrkv_attend(*inputs, impl="triton")
    assert calls == [1]
    if DEVICE == "cpu":  # without the interpreter a CPU tensor takes the reference, warning once
        monkeypatch.delenv("TRITON_INTERPRET")
        monkeypatch.setattr(lrkv.kernels, "_warned", set())
        with pytest.warns(UserWarning, match="attn_impl=triton: no CUDA device"):
            o = lrkv.kernels.lrkv_attend(*inputs, impl="triton")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            lrkv.kernels.lrkv_attend(*inputs, impl="triton")
        assert len(calls) == 1 and torch.equal(o, reference(*inputs))


def test_no_fitting_config_falls_back_to_the_reference_with_one_warning(monkeypatch):
    """On a GPU, rows wider than 256 bytes (here fp32 at head_dim 128) have no kept config on any target
    (tests/test_kernels_aot.py compiles why): the op returns the reference's result and says so once."""
    monkeypatch.setattr(lrkv_attn, "INTERPRET", False)  # the device path, without launching a kernel
    monkeypatch.setattr(lrkv_attn, "_arch", lambda device: 80)
    monkeypatch.setattr(lrkv_attn, "_warned", set())
    inputs = make_inputs(1, 2, 20, 20, 128, 16, 16)
    with pytest.warns(UserWarning, match="no spill-free config for head_dim 128 in torch.float32 on sm_80"):
        o = lrkv_attn.lrkv_attention_fused(*inputs)
    assert torch.equal(o, reference(*inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        lrkv_attn.lrkv_attention_fused(*inputs)


def test_custom_op_opcheck():
    """Schema, fake-tensor, autograd registration and AOT dispatch of both custom ops."""
    inputs = make_inputs(1, 2, 20, 20, 32, 8, 16)
    args = (*inputs, True, 32 ** -0.5)
    torch.library.opcheck(torch.ops.lrkv.fused_attention_fwd.default, args)
    o, lse = torch.ops.lrkv.fused_attention_fwd(*args)
    bwd_args = (torch.randn_like(o), *[t.detach() for t in inputs], o.detach(), lse, True, 32 ** -0.5)
    # the backward op has no backward of its own (no double backward), so no autograd checks for it
    torch.library.opcheck(torch.ops.lrkv.fused_attention_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_inside_torch_compile_graph():
    """fullgraph capture through dynamo + AOT autograd (aot_eager: no C++ codegen needed on CPU)."""
    inputs = make_inputs(2, 2, 40, 40, 32, 8, 16)

    def loss(*a):
        return lrkv.kernels.lrkv_attend(*a, impl="triton").square().sum()  # the dispatcher, as the model calls it

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_grads = torch.autograd.grad(loss(*inputs), inputs[:7])
    compiled_grads = torch.autograd.grad(compiled(*inputs), inputs[:7])
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not lrkv_attn.INTERPRET, reason="counts the interpreter's tl.dot calls")
@pytest.mark.parametrize("causal", [True, False])
def test_dot_macs_counts_what_the_kernels_compute(monkeypatch, causal):
    """The cost model benchmarks/kernel.py prints (lrkv_attn.dot_macs) against the multiply-adds the interpreter
    executes in tl.dot, forward and backward, with fewer queries than keys and odd lengths."""
    from triton.runtime import interpreter

    counted = []
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counting(self, a, b, *args):
        counted.append(a.data.size * b.data.shape[-1])  # (..., M, K) @ (K, N)
        return create_dot(self, a, b, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)
    shape = (2, 2, 77, 150, 64, 24, 48)
    inputs = make_inputs(*shape)
    o = lrkv_attn.lrkv_attention_fused(*inputs, causal=causal)
    fwd, counted[:] = sum(counted), []
    torch.autograd.grad(o, inputs[:7], torch.ones_like(o))
    model = lrkv_attn.dot_macs(*shape, {k: (64, 64) for k in lrkv_attn.TILES}, causal)  # the interpreter's tiles
    assert (fwd, sum(counted)) == (model["_fwd"], model["_bwd_dq"] + model["_bwd_dk"] + model["_bwd_dv"])


def train_losses(attn_impl, steps=30):
    cfg = ModelConfig(attn="lrkv", vocab_size=256, n_layer=2, d_model=64, n_head=2, head_dim=32, rank_k=8,
                      rank_v=8, ffn_dim=128, max_seq_len=64, lrkv_b_init="normal", attn_impl=attn_impl)
    validate_model(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):  # learnable synthetic data: each row counts up by a random stride from a random start
        start, stride = torch.randint(0, 256, (2, 1), generator=g), torch.randint(1, 4, (2, 1), generator=g)
        tokens = ((start + stride * torch.arange(65)) % 256).to(DEVICE)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_debug_model_trains_the_same_with_the_kernel():
    t0 = time.perf_counter()
    fused, ref = train_losses("triton"), train_losses("torch")
    print(f"losses {fused[0]:.4f} -> {fused[-1]:.4f}; max |diff| {(fused - ref).abs().max():.2e} "
          f"({time.perf_counter() - t0:.1f} s)")
    assert fused[-1] < fused[0] - 1.0  # it learns
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-4)  # measured 7e-7 (fp32): only rounding differs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(2, 4, 1000, 1000, 128, 64, 48)], ids=str)  # head_dim 256: reference
def test_low_precision_on_gpu(shape, dtype):
    """The kernel in bf16/fp16 may be at most twice as far from the fp32 reference as the reference is when
    run in the same low precision (plus a floor for tiny tensors)."""
    inputs = make_inputs(*shape, dtype=dtype)
    errs = errors(inputs, dtype=dtype)
    do = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    low = output_and_grads(reference, inputs, do)
    ref_in = [t.detach().float().requires_grad_() for t in inputs[:7]] + inputs[7:]
    ref = output_and_grads(reference, ref_in, do.float())
    for name, a, b in zip(NAMES, low, ref):
        assert errs[name] <= 2 * rel_rms(a, b) + 2e-3, (name, errs[name], rel_rms(a, b))


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test (the fused backward then sums in a fixed order)."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], (2, 3, 100, 130, 64, 24, 0)], ids=str)
def test_deterministic_backward_matches_reference(deterministic, shape, monkeypatch):
    """The fixed-order path (per-head dX_h stored, summed and multiplied into dB by the launcher) is a different
    computation from the atomic one: it must give the same output and gradients, queries fewer than keys and
    rank 0 included."""
    modes = []
    bwd = lrkv_attn._bwd_op
    monkeypatch.setattr(lrkv_attn, "_bwd_op", lambda *args: modes.append(args[-1]) or bwd(*args))
    check(shape)
    assert modes == [True]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deterministic_backward_is_bitwise_repeatable(deterministic):
    inputs = make_inputs(2, 8, 1000, 1000, 128, 64, 48, dtype=torch.bfloat16)
    do = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    first, second = (output_and_grads(lrkv_attn.lrkv_attention_fused, inputs, do) for _ in range(2))
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} of {a.numel()} entries differ between runs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_atomic_gradient_sums_vary_only_by_rounding():
    """d k_s, d v_s (summed over heads) and dB (over key tiles) are fp32 atomic adds, so two identical backward
    passes may differ, but only by summation order: at most one bf16 rounding step of the largest entry."""
    inputs = make_inputs(2, 8, 1000, 1000, 128, 64, 48, dtype=torch.bfloat16)
    do = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    first, second = (output_and_grads(lrkv_attn.lrkv_attention_fused, inputs, do) for _ in range(2))
    for name, a, b in zip(NAMES, first, second):
        if name in ("o", "q", "z_k", "z_v"):  # written once per element, no atomics: bitwise equal
            assert torch.equal(a, b), name
            continue
        differ = (a != b).sum().item()
        print(f"{name}: {differ} of {a.numel()} entries differ between runs")
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2**-7 * a.float().abs().max().item())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tq", [1, 3])
def test_few_query_attention_on_cpu_matches_sdpa_in_fp64(dtype, tol, tq):
    """The explicit decode path of reference.attention (fp32 scores and softmax) against SDPA over K, V repeated per
    query head in float64, with a padding mask and grouped heads; more than FEW_QUERIES queries take SDPA itself."""
    from lrkv.kernels.reference import FEW_QUERIES, attention

    g = torch.Generator().manual_seed(0)
    B, H, Hk, Tk, D = 2, 6, 2, 37, 16
    q, k, v = (torch.randn(B, n, t, D, generator=g).to(dtype) for n, t in ((H, tq), (Hk, Tk), (Hk, Tk)))
    mask = torch.rand(B, 1, tq, Tk, generator=g) > 0.3
    mask[..., -1] = True  # no empty row
    expect = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(3, 1),
                                            v.double().repeat_interleave(3, 1), attn_mask=mask)
    got = attention(q, k, v, mask)
    assert got.dtype == dtype and got.shape == expect.shape
    torch.testing.assert_close(got.double(), expect, atol=tol, rtol=tol)
    many = torch.randn(B, H, FEW_QUERIES + 1, D, generator=g).to(dtype)
    torch.testing.assert_close(attention(many, k, v).double(), F.scaled_dot_product_attention(
        many.double(), k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1)), atol=tol, rtol=tol)
