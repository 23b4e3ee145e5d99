"""MFU peaks come from Lightning's device table (plus the H200 names it misses); the progress bar counts steps."""

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lrkv.callbacks import StepProgressBar, compute_dtype, peak_flops

# dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s
DATASHEET = {"NVIDIA H100 PCIe": 756, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 NVL": 835,
             "NVIDIA A100-SXM4-80GB": 312, "NVIDIA H200": 989, "NVIDIA H200 NVL": 835, "NVIDIA L4": 121}


@pytest.mark.parametrize("name", sorted(DATASHEET))
def test_peak_flops_knows_each_device_by_the_name_torch_reports(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == pytest.approx(DATASHEET[name] * 1e12, rel=1e-3)


def test_no_peak_on_cpu_or_an_unknown_gpu(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(torch.device("cuda", 0)) is None


def test_compute_dtype_of_lightning_precisions():
    assert [compute_dtype(p) for p in ("bf16-mixed", "bf16-true", "16-mixed", "32-true", "64-true")] == \
        [torch.bfloat16, torch.bfloat16, torch.float16, torch.float32, torch.float64]


def test_progress_bar_counts_optimizer_steps_without_epoch_or_v_num(tmp_path, capsys):
    bar = StepProgressBar()
    trainer = L.Trainer(accelerator="cpu", max_steps=6, accumulate_grad_batches=2, limit_val_batches=0,
                        callbacks=[bar], default_root_dir=tmp_path, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(BoringModel())
    drawn = capsys.readouterr()
    text = drawn.out + drawn.err
    assert bar.train_progress_bar.total == 6 and bar.train_progress_bar.n == 6
    assert "6/6" in text and "Epoch" not in text and "v_num" not in text
