"""Ahead-of-time compile of the Triton kernels for an NVIDIA target, on a machine without a GPU.

The op launchers (lrkv_attn.launch_fwd / launch_bwd, decode.decode_partials) run on meta tensors with their
kernels swapped for recorders, so what gets compiled is exactly the launch the op would make (argument dtypes,
strides, pointer alignment, constexprs). Each recorded launch is then compiled with `triton.compile` for a
`GPUTarget("cuda", arch, 32)` through every autotune config the kernel declares; ptxas's own report (its -v
log, which Triton prints when asked) gives registers and spills, Triton's metadata the shared memory.

Needs TRITON_INTERPRET unset when the kernel modules are imported (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from unittest import mock

import torch
import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import MockTensor

from lrkv.kernels import decode, lrkv_attn
from lrkv.kernels.lrkv_attn import SMEM_LIMIT

if lrkv_attn.INTERPRET or decode.INTERPRET:
    raise RuntimeError("lrkv.kernels.aot: imported with TRITON_INTERPRET=1; interpreted kernels cannot be compiled")


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    Tq: int
    Tk: int
    D: int
    r_k: int
    r_v: int
    dtype: torch.dtype = torch.bfloat16


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function and its bound arguments (meta tensors for pointers)."""

    name: str
    kernel: object  # the Autotuner (training kernels) or JITFunction (decode)
    args: dict
    options: dict  # num_warps / num_stages given at the launch (decode), else from each config


@dataclass
class Report:
    kernel: str
    arch: int
    config: str
    kept: bool  # the op's per-target pruning keeps this config
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int  # bytes
    i32_offsets: list[str]  # scalar int32 offsets added to a pointer (see int32_pointer_offsets)
    two_byte_loads: int  # 2-byte global loads in the PTX: an operand whose alignment the compiler cannot see

    @property
    def fits(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and self.shared <= SMEM_LIMIT[self.arch]


def _jit_fn(kernel):
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


class _Recorder:
    def __init__(self, name, kernel, calls):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            fn = _jit_fn(self.kernel)
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            self.calls.append(Launch(self.name, self.kernel, dict(zip(fn.arg_names, args)) | kwargs, options))
        return launch


def _model_layout(s: Shape):
    """Meta tensors laid out as the model passes them: k_s | v_s | z_k | z_v slices of one projection, q and
    the latents transposed from (B, T, H, .)."""
    meta = dict(device="meta", dtype=s.dtype)
    kv = torch.empty(s.B, s.Tk, 2 * s.D + s.H * (s.r_k + s.r_v), **meta)
    k_s, v_s, z_k, z_v = kv.split([s.D, s.D, s.H * s.r_k, s.H * s.r_v], dim=-1)
    z_k = z_k.view(s.B, s.Tk, s.H, s.r_k).transpose(1, 2)
    z_v = z_v.view(s.B, s.Tk, s.H, s.r_v).transpose(1, 2)
    q = torch.empty(s.B, s.Tq, s.H, s.D, **meta).transpose(1, 2)
    b_k, b_v = torch.empty(s.H, s.r_k, s.D, **meta), torch.empty(s.H, s.r_v, s.D, **meta)
    cos = sin = torch.empty(s.Tk, s.D // 2, device="meta")
    return q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin


def training_launches(s: Shape, causal: bool = True, deterministic: bool = False) -> list[Launch]:
    """The forward and both backward launches of the fused op at shape s (deterministic: the fixed-order
    backward that torch.use_deterministic_algorithms selects)."""
    calls: list[Launch] = []
    names = ("_fwd", "_bwd_dq", "_bwd_dk", "_bwd_dv")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(lrkv_attn, name, _Recorder(name, getattr(lrkv_attn, name), calls)))
        inputs = _model_layout(s)
        scale = s.D ** -0.5
        o = torch.empty(s.B, s.H, s.Tq, s.D, device="meta", dtype=s.dtype)
        lse = torch.empty(s.B, s.H, s.Tq, device="meta")
        lrkv_attn.launch_fwd(*inputs, causal, scale)
        lrkv_attn.launch_bwd(torch.empty_like(o), *inputs, o, lse, causal, scale, deterministic)
    return calls


def decode_launch(s: Shape, padded: bool, block_n: int | None = None) -> Launch:
    """The split kernel of lrkv_decode_attention at shape s (cache layout), with or without a padding mask."""
    q, k_s, v_s, z_k, z_v, b_k, _, cos, sin = _model_layout(s)
    z_k, z_v = z_k.transpose(1, 2), z_v.transpose(1, 2)  # the cache's (B, T, H, r)
    valid = torch.empty(s.B, s.Tk, device="meta", dtype=torch.bool) if padded else None
    block_n = decode.default_block_n(s.D) if block_n is None else block_n
    calls: list[Launch] = []
    name = "decode"
    with mock.patch.object(decode, "_decode_partials_kernel", _Recorder(name, decode._decode_partials_kernel, calls)):
        out = decode.empty_partials(q, s.Tk, s.r_v, block_n)
        decode.decode_partials(q, k_s, v_s, z_k, z_v, b_k, cos, sin, valid, s.D ** -0.5, block_n, out)
    return calls[0]


class _Pointer(MockTensor):
    """What the JIT specialises a tensor on: its dtype and whether its address is 16-byte aligned."""

    def __init__(self, t: torch.Tensor):
        super().__init__(t.dtype)
        self.offset = t.storage_offset() * t.element_size()  # meta storage starts at 0, like an allocation

    def data_ptr(self):
        return self.offset


def _specialise(fn, args: dict):
    """(signature, constexprs, attrs) as the JIT would derive them at this launch."""
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        value = _Pointer(value) if isinstance(value, torch.Tensor) else value
        ty, attr = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[name] = attr
        elif attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return signature, constexprs, attrs


def _ptxas_numbers(log: str, name: str):
    """Registers, spill stores and spill loads of entry `name` from ptxas -v."""
    entry = log[log.index(f"Function properties for {name}"):]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
    regs = re.search(r"Used (\d+) registers", entry)
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_launch(launch: Launch, arch: int, config: triton.Config | None = None):
    """Compile a recorded launch for sm_<arch> (with one autotune config for the training kernels) and
    return (compiled kernel, registers, spill stores, spill loads)."""
    fn = _jit_fn(launch.kernel)
    args, options = dict(launch.args), dict(launch.options)
    if config is not None:
        args |= config.kwargs
        options |= dict(num_warps=config.num_warps, num_stages=config.num_stages)
    signature, constexprs, attrs = _specialise(fn, args)
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by Triton
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
    return (compiled, *_ptxas_numbers(log.getvalue(), fn.__name__))


def int32_pointer_offsets(ttir: str) -> list[str]:
    """SSA names of the non-constant int32 scalars added to a pointer in Triton IR. Per-batch and per-head base
    offsets are scalars and can pass 2^31 elements, so the kernels compute them in int64; offsets inside a
    tile (row * row stride) are int32 tensors and stay below 2^31 at every supported length."""
    names = re.findall(r"tt\.addptr %[\w.]+, %([\w.]+) : !tt\.ptr<\w+>, i32", ttir)
    return [n for n in names if not re.fullmatch(r"c\d+_i32", n)]


def config_name(c: triton.Config) -> str:
    return f"BM{c.kwargs['BM']}/BN{c.kwargs['BN']} w{c.num_warps} s{c.num_stages}"


def report(launch: Launch, arch: int, which: str = "all") -> list[Report]:
    """Compile `launch` for sm_<arch> through the configs the kernel declares (which="all"), those the op keeps
    for that target ("kept") or the first of those ("first"); one Report per config."""
    if launch.name == "decode":  # launched without autotuning: one config, given at the launch
        name = f"BN{launch.args['BLOCK_N']} Tq{launch.args['n_q']} w{launch.options['num_warps']}"
        runs = [(name + (" mask" if launch.args["HAS_VALID"] else ""), True, None)]
    else:
        kept = lrkv_attn.kept_configs(launch.name, arch, launch.args["D"], launch.args["Q"].element_size())
        runs = [(config_name(c), True, c) for c in kept[:1 if which == "first" else None]]
        if which == "all":
            names = {name for name, _, _ in runs}
            runs += [(config_name(c), False, c) for c in launch.kernel.configs if config_name(c) not in names]
    out = []
    for name, kept_, config in runs:
        compiled, regs, stores, loads = compile_launch(launch, arch, config)
        out.append(Report(launch.name, arch, name, kept_, regs, stores, loads, compiled.metadata.shared,
                          int32_pointer_offsets(compiled.asm["ttir"]),
                          len(re.findall(r"ld\.global[.\w]*\.[bu]16 ", compiled.asm["ptx"]))))
    return out
