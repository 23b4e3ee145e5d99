"""Without CUDA the Triton kernels run under the interpreter, which must be switched on before any module that
defines @triton.jit kernels is imported: conftest runs before every test module is collected, so set it here once.
It stays set for the whole pytest process; `attn_impl: triton` callers then run the interpreted kernels on fp32
CPU tensors (other dtypes fall back to the reference)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
