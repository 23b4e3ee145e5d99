"""MFU peaks come from Lightning's device table (plus the H200 names it misses); the throughput line's numbers;
the progress bar counts steps."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

import lrkv.callbacks
from lrkv.callbacks import StepProgressBar, Throughput, compute_dtype, peak_flops

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


def test_throughput_tokens_per_s_mfu_and_eta_from_the_window_since_the_last_line(monkeypatch, capsys):
    """Micro-batches of 4 x 32 tokens, 2 per optimizer step, a line every 2 steps of 10; the clock reads 10 s at the
    first batch, 12 s at step 2 and 15 s at step 4; 1 GFLOP per token on a 1 TFLOP/s device."""
    clock = iter([10.0, 12.0, 15.0])
    monkeypatch.setattr(lrkv.callbacks.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(lrkv.callbacks, "peak_flops", lambda device, dtype: 1e12)
    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=logged.append,
                             model=SimpleNamespace(num_flops_per_token=lambda seq_len: 1e9))
    trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=2, max_steps=10, precision="bf16-mixed",
                              world_size=1, is_global_zero=True, callback_metrics={},
                              optimizers=[SimpleNamespace(param_groups=[{"lr": 1e-3}])])
    cb = Throughput(every=2, seq_len=32, print_lines=True)
    cb.on_train_start(trainer, module)
    batch = (torch.zeros(4, 32), torch.zeros(4, 32))
    for i in range(8):
        cb.on_train_batch_start(trainer, module, batch, i)
        trainer.global_step = (i + 1) // 2
        cb.on_train_batch_end(trainer, module, None, batch, i)
    assert logged == [pytest.approx({"perf/tokens_per_s_per_device": 512 / 2, "perf/eta_s": 8 * 2 / 2,
                                     "perf/mfu": 1e9 * 256 / 1e12}),
                      pytest.approx({"perf/tokens_per_s_per_device": 512 / 3, "perf/eta_s": 6 * 3 / 2,
                                     "perf/mfu": 1e9 * 512 / 3 / 1e12})]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 2 | lr 1.00e-03  | 256 tok/s/device | MFU 25.6% | ETA 0:00:08"
    assert cb.average() == pytest.approx((1024 / 5, 1e9 * 1024 / 5 / 1e12))


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
