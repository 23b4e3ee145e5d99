"""Fused LRKV attention vs the rebuild-once op vs the reference (materialise K/V + SDPA) vs MHA through SDPA (flash).

    python benchmarks/kernel.py                          # CUDA: the table below, bf16
    python benchmarks/kernel.py --cpu-smoke              # no GPU: one tiny shape under the Triton interpreter

Columns: time (ms, median of triton.testing.do_bench) and TFLOP/s for forward and forward+backward, and the
peak memory a forward+backward allocates beyond its inputs (MiB). FLOP convention (docs/lrkv.md §4, the same
for all three so TFLOP/s ratios are inverse time ratios): attention core only, forward = 4·B·H·T²·D (QK^T and
PV) halved for causal, forward+backward = 3x forward; the fused kernel's K rebuild (2·T·r·D per tile pass) is
not counted as useful work. Beside each measured ratio: the work ratio it should be read against, tensor-core
multiply-adds over FlashAttention-2's (forward 2, backward 5 T x T x D products on the visible pairs): the fused
kernels' (lrkv_attn.dot_macs, at the tiles the autotuner chose: they rebuild K/V per query tile), and the
reference's, which is the rebuild-once design (per-head K_h, V_h built once by matmuls, B·T·H·(r_k+r_v)·D
multiply-adds, their backward twice that, then SDPA's flash kernel; its autograd keeps K_h, V_h as MHA keeps K, V).
The rebuild-once op (`rebuild`, attn_impl: rebuild) does the reference's work plus one more rebuild in the backward,
and keeps no K_h, V_h: its peak memory is the column to read against the reference's.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser(prog="python benchmarks/kernel.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 run under TRITON_INTERPRET=1, no timings")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="inputs' dtype on CUDA (default bfloat16)")
cli = parser.parse_args()  # before torch is imported: --help and usage errors answer at once
if cli.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import torch  # noqa: E402

if not cli.cpu_smoke and not torch.cuda.is_available():
    sys.exit("benchmarks/kernel.py needs CUDA (use --cpu-smoke for a tiny interpreter check of the script)")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from lrkv.kernels import lrkv_attn  # noqa: E402
from lrkv.kernels.lrkv_attn import lrkv_attention_fused  # noqa: E402
from lrkv.kernels.rebuild_once import lrkv_attention_rebuild_once  # noqa: E402
from lrkv.kernels.reference import lrkv_attention as lrkv_attention_reference  # noqa: E402
from lrkv.model import rope_tables  # noqa: E402

SHAPES = [(8, 32, 2048, 128), (4, 16, 4096, 128), (1, 32, 16384, 128)]  # (B, H, T, D)
RANKS = (32, 64)


def lrkv_inputs(B, H, T, D, r, dtype, device):
    """Op inputs (docs/lrkv.md §10) with unit-scale activations and B factors scaled like trained ones."""
    q = torch.randn(B, H, T, D, dtype=dtype, device=device)
    k_s, v_s = torch.randn(B, T, D, dtype=dtype, device=device), torch.randn(B, T, D, dtype=dtype, device=device)
    z_k, z_v = (torch.randn(B, H, T, r, dtype=dtype, device=device) for _ in range(2))
    b_k, b_v = ((torch.randn(H, r, D, device=device) / r ** 0.5).to(dtype) for _ in range(2))
    cos, sin = rope_tables(torch.arange(T, device=device), D, 10000.0)
    return [q, k_s, v_s, z_k, z_v, b_k, b_v], [cos, sin]


def mha_sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def methods(B, H, T, D, r, dtype):
    """name -> (fn, differentiable inputs, other inputs)."""
    lrkv, tables = lrkv_inputs(B, H, T, D, r, dtype, "cuda")
    mha = [torch.randn(B, H, T, D, dtype=dtype, device="cuda") for _ in range(3)]
    return {
        "fused": (lrkv_attention_fused, lrkv, tables),
        "reference": (lrkv_attention_reference, lrkv, tables),
        "rebuild": (lrkv_attention_rebuild_once, lrkv, tables),
        "mha_sdpa": (mha_sdpa, mha, []),
    }


def work_ratio(B, H, T, D, r):
    """(fwd, fwd+bwd) tensor-core multiply-adds of the fused kernels, at the configs the autotuner last chose,
    over FlashAttention-2's."""
    tiles = {k: (getattr(lrkv_attn, k).best_config.kwargs["BM"], getattr(lrkv_attn, k).best_config.kwargs["BN"])
             for k in lrkv_attn.TILES}
    ours, fa2 = lrkv_attn.dot_macs(B, H, T, T, D, r, r, tiles), lrkv_attn.flash_attention2_macs(B, H, T, T, D)
    rebuild = B * T * H * 2 * r * D  # K_h and V_h once; the backward's d z and d B cost twice that
    fused = ours["_fwd"] / fa2["fwd"], sum(ours.values()) / (fa2["fwd"] + fa2["bwd"])
    both = fa2["fwd"] + fa2["bwd"]
    rebuild_once = (fa2["fwd"] + rebuild) / fa2["fwd"], (both + 3 * rebuild) / both
    return fused, rebuild_once, (both + 4 * rebuild) / both, tiles  # the lean op rebuilds once more in the backward


def measure(fn, grads_of, rest):
    from triton.testing import do_bench

    with torch.no_grad():
        fwd = do_bench(lambda: fn(*grads_of, *rest))
    for t in grads_of:
        t.requires_grad_(True)
    do = torch.randn_like(fn(*grads_of, *rest))
    fwd_bwd = do_bench(lambda: fn(*grads_of, *rest).backward(do), grad_to_none=grads_of)
    for t in grads_of:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*grads_of, *rest).backward(do)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in grads_of:
        t.requires_grad_(False)
        t.grad = None
    return fwd, fwd_bwd, peak


def benchmark(dtype):
    print(f"{torch.cuda.get_device_name()}, {dtype}, causal. FLOPs: fwd = 4*B*H*T^2*D / 2 (causal half), "
          f"fwd+bwd = 3 x fwd, same count for every method (LRKV rebuild work not counted).")
    print(f"{'B,H,T,D':>18} {'r':>3} {'method':>10} {'fwd ms':>8} {'TFLOP/s':>8} "
          f"{'f+b ms':>8} {'TFLOP/s':>8} {'peak MiB':>9}")
    for B, H, T, D in SHAPES:
        fwd_flops = 4 * B * H * T * T * D / 2
        for r in RANKS:
            times = {}
            for name, (fn, grads_of, rest) in methods(B, H, T, D, r, dtype).items():
                fwd, fwd_bwd, peak = measure(fn, grads_of, rest)
                times[name] = fwd, fwd_bwd
                if name == "fused":
                    work = work_ratio(B, H, T, D, r)
                print(f"{str((B, H, T, D)):>18} {r:>3} {name:>10} {fwd:8.3f} {fwd_flops / fwd / 1e9:8.1f} "
                      f"{fwd_bwd:8.3f} {3 * fwd_flops / fwd_bwd / 1e9:8.1f} {peak:9.0f}")
                torch.cuda.empty_cache()
            kv_mib = 2 * B * H * T * D * torch.tensor([], dtype=dtype).element_size() / 2**20
            mha = times["mha_sdpa"][1]
            print(f"{'':>18} {'':>3} ratios: fwd+bwd / MHA: fused {times['fused'][1] / mha:.2f}, reference "
                  f"{times['reference'][1] / mha:.2f}, rebuild {times['rebuild'][1] / mha:.2f} (target <= 1.0 for "
                  f"the training path); reference fwd / fused "
                  f"fwd = {times['reference'][0] / times['fused'][0]:.2f}; per-head K+V would be {kv_mib:.0f} MiB")
            (fwd_w, total_w), (ref_fwd_w, ref_total_w), lean_w, tiles = work
            print(f"{'':>18} {'':>3} work vs FlashAttention-2 (tensor-core MACs): fused fwd {fwd_w:.2f}, fwd+bwd "
                  f"{total_w:.2f} (tiles {tiles}); reference = rebuild once + flash: fwd {ref_fwd_w:.2f}, "
                  f"fwd+bwd {ref_total_w:.2f}; rebuild (lean) fwd+bwd {lean_w:.2f}")


def cpu_smoke():
    """Runs every LRKV method once on a tiny fp32 shape and checks each against the reference: the script works."""
    lrkv, tables = lrkv_inputs(2, 2, 100, 64, 16, torch.float32, "cpu")
    for t in lrkv:
        t.requires_grad_(True)
    outs = {}
    for name, fn in (("fused", lrkv_attention_fused), ("rebuild", lrkv_attention_rebuild_once),
                     ("reference", lrkv_attention_reference)):
        o = fn(*lrkv, *tables)
        outs[name] = [o, *torch.autograd.grad(o.square().sum(), lrkv)]
    for name in ("fused", "rebuild"):
        for a, b in zip(outs[name], outs["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    (fwd, total), (ref_fwd, ref_total), lean, tiles = work_ratio(2, 2, 100, 64, 16)
    print("cpu smoke ok: fused and rebuild-once forward and 7 gradients match the reference at (B,H,T,D)=(2,2,100,64), "
          f"r=16; work vs FlashAttention-2 at the interpreter's tiles {tiles}: fused fwd {fwd:.2f}, fwd+bwd "
          f"{total:.2f}; rebuild once (reference) fwd {ref_fwd:.2f}, fwd+bwd {ref_total:.2f}; rebuild (lean) fwd+bwd "
          f"{lean:.2f}")


if __name__ == "__main__":
    if cli.cpu_smoke:
        cpu_smoke()
    else:
        benchmark(getattr(torch, cli.dtype))
