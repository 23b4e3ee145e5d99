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


def _qwen_export(name: str):
    """The real export of eval.models' QWEN[name] (fetched and converted by its command); skips, naming that
    command, when it is absent or its source.json does not name the pinned GGUF (tests never download)."""
    from eval.models import QWEN, command, find_parted_export

    model = QWEN[name]
    if find_parted_export(model) is None:
        pytest.skip(f"no {model.title} export at {model.export}: write it with `{command(name, model.export)}`")
    return model.export


@pytest.fixture(scope="session")
def qwen_coder_05b_export():
    """Qwen2.5-Coder-0.5B-Instruct as a bf16 export (24 layers, 14 q / 2 KV heads x 64), for `real_model` tests."""
    return _qwen_export("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen_coder_15b_export():
    """Qwen2.5-Coder-1.5B-Instruct as a bf16 export (28 layers, 12 q / 2 KV heads x 128), for `real_model` tests."""
    return _qwen_export("qwen2.5-coder-1.5b")
