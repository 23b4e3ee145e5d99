"""Without CUDA the Triton kernels run under the interpreter, which must be switched on before any module that
defines @triton.jit kernels is imported: conftest runs before every test module is collected, so set it here once.
It stays set for the whole pytest process; `attn_impl: triton` callers then run the interpreted kernels on fp32
CPU tensors (other dtypes fall back to the reference)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_export():
    """The real SmolLM2-135M-Instruct export for `real_model` tests; skips, naming the command that writes it,
    when it is absent (tests never download)."""
    from eval.models import SMOLLM2_COMMAND, SMOLLM2_EXPORT, find_export

    if find_export(SMOLLM2_EXPORT) is None:
        pytest.skip(f"no SmolLM2-135M export at {SMOLLM2_EXPORT}: write it with "
                    f"`{SMOLLM2_COMMAND.replace('DIR', str(SMOLLM2_EXPORT))}`")
    return SMOLLM2_EXPORT
