"""What both Triton kernel files (lrkv_attn.py, decode.py) share: the interpreter flag, exp2 scaling, padded tile
dims, stride and alignment rules. No Triton import: kernels/__init__.py reads it without compiling anything."""

from __future__ import annotations

import math
import os

import torch

# read once, when the first kernel module imports this: triton.jit decides at that import whether kernels interpret
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # softmax in exp2: scale * log2(e) folded into the scores
FUSED_HEAD_DIMS = (32, 64, 128, 256)  # head dims the fused kernels take (the model's own list is config.HEAD_DIMS)


def dot_dim(n: int) -> int:
    """A tile dimension for n elements: a power of two, at least 16 (tl.dot's minimum), loads masked beyond n."""
    return max(16, 1 << (n - 1).bit_length())


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels take strides for every dim but the last, which must be 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def alignment(z: torch.Tensor) -> int:
    """The largest power of two <= 16 dividing a latent's batch, row and head strides (elements): the hint the
    kernels give tl.multiple_of, since a stride like rank 24 carries no divisibility the JIT can see."""
    return math.gcd(16, *z.stride()[:3])
