"""Ahead-of-time compile report of the Triton kernels for sm_80/86/89/90, no GPU needed (lrkv/kernels/aot.py).

    python benchmarks/kernel_aot.py                  # shipped shapes, bf16, every arch, every declared config
    python benchmarks/kernel_aot.py --configs kept   # only the configs each target keeps (what the op launches)
    python benchmarks/kernel_aot.py --sweep          # bf16 + fp16, D 64/128, ranks 16/32/64 and 24/48

One markdown row per kernel x arch x dtype x shape x config: registers, spill stores/loads (bytes, ptxas -v),
shared memory (KiB, Triton's metadata), scalar int32 pointer offsets (base offsets that could overflow), 2-byte
global loads (an operand the compiler cannot prove aligned, read outside the async-copy pipeline),
whether the op's per-target pruning keeps the config and whether it fits (zero spills, shared memory within the
target's per-block limit). Training kernels are compiled at B 8, H 32, T 4096 in the model's strided layout;
decode over a 4096-token cache for 1 and 16 new queries, with and without a padding mask; the key-side
backward passes also in their deterministic variant (rows marked "det"). Compiles run one
after another in this process (seconds of CPU each). Exit status 1 if a kept config does not fit.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

SHIPPED = [(128, 64, 48), (128, 64, 64), (64, 32, 24)]  # (D, r_k, r_v): lrkv_2p5b, the benchmark, lrkv_125m
SWEEP = [(d, rk, rv) for d in (64, 128) for rk, rv in ((16, 16), (32, 32), (64, 64), (32, 24), (64, 48))]
KERNELS = ["_fwd", "_bwd_dq", "_bwd_dk", "_bwd_dv", "decode"]
DECODE_VARIANTS = [(1, False), (1, True), (16, False), (16, True)]  # (new queries, padding mask)
# the parser is built before torch is imported, so these mirror the kernels' (tests/test_cli.py checks they agree)
ARCHS, DTYPE_NAMES = (80, 86, 89, 90), ("bf16", "fp16", "fp32")  # lrkv_attn.SMEM_LIMIT's keys; DTYPES' below


def shape(text):
    D, rk, rv = map(int, text.split(","))
    return D, rk, rv


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch and Triton are loaded."""
    p = argparse.ArgumentParser(prog="python benchmarks/kernel_aot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="bf16 + fp16, D 64/128 and ranks 16/32/64/24/48")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS,
                   help="compute capabilities to compile for (default: all)")
    p.add_argument("--dtype", nargs="+", choices=DTYPE_NAMES, help="default bf16 (--sweep: bf16 fp16)")
    p.add_argument("--shape", type=shape, nargs="+", metavar="D,R_K,R_V", help="instead of the shipped shapes")
    p.add_argument("--configs", choices=["all", "kept", "first"], default="all",
                   help="every declared config, those each target keeps, or the first kept one")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS, help="default: all")
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of markdown")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and Triton load
    parser().parse_args()

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks/kernel_aot.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated to silence its warning

import torch  # noqa: E402

from lrkv.kernels import aot  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rows(archs, dtypes, shapes, which, kernels):
    """Yield (dtype name, (D, r_k, r_v), Report) for every combination, compiling as it goes."""
    for arch in archs:
        for dname in dtypes:
            for D, rk, rv in shapes:
                shape = aot.Shape(8, 32, 4096, 4096, D, rk, rv, DTYPES[dname])
                launches = aot.training_launches(shape) + [  # the fixed-order key-side passes, rows marked "det"
                    launch for launch in aot.training_launches(shape, deterministic=True) if "_bwd_d" in launch.name
                    and launch.name != "_bwd_dq"]
                for launch in launches:
                    for r in aot.report(launch, arch, which) if launch.name in kernels else []:
                        det = " det" if launch.args.get("DETERMINISTIC") else ""
                        yield dname, (D, rk, rv), dataclasses.replace(r, config=r.config + det)
                for tq, padded in DECODE_VARIANTS if "decode" in kernels else []:
                    launch = aot.decode_launch(aot.Shape(8, 32, tq, 4096, D, rk, rv, DTYPES[dname]), padded)
                    for r in aot.report(launch, arch):
                        yield dname, (D, rk, rv), r


def main():
    cli = parser().parse_args()
    dtypes = cli.dtype or (["bf16", "fp16"] if cli.sweep else ["bf16"])
    shapes = cli.shape or (SWEEP if cli.sweep else SHIPPED)
    if not cli.json:
        print("| kernel | arch | dtype | D | r_k/r_v | config | kept | registers | spill st/ld (B) | shared (KiB) "
              "| i32 offsets | 2-byte loads | fits |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    t0, bad = time.perf_counter(), 0
    for dname, (D, rk, rv), r in rows(cli.arch, dtypes, shapes, cli.configs, cli.kernels):
        bad += r.kept and not r.fits
        if cli.json:
            print(json.dumps(dataclasses.asdict(r) | dict(dtype=dname, D=D, r_k=rk, r_v=rv, fits=r.fits)), flush=True)
            continue
        print(f"| {r.kernel} | sm_{r.arch} | {dname} | {D} | {rk}/{rv} | {r.config} | {'yes' if r.kept else 'no'} | "
              f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {r.shared / 1024:.0f} | {len(r.i32_offsets)} | "
              f"{r.two_byte_loads} | {'yes' if r.fits else '**no**'} |", flush=True)
    print(f"{bad} kept config(s) spill or exceed shared memory; {time.perf_counter() - t0:.0f} s",
          file=sys.stderr if cli.json else sys.stdout)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
