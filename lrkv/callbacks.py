"""Training callbacks: throughput/MFU/ETA, loss-curve PNG, metrics.json, non-finite-loss stop, checkpoint-and-exit
on signals."""

from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput as ThroughputMeter
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from lrkv.atomic import atomic_write

# Dense bf16/fp16 peaks (NVIDIA datasheets) where Lightning's table is off, matched first, in order: it files H200s
# under "h200 sxm1" / "h200 nvl1", which the names torch reports ("NVIDIA H200", "NVIDIA H200 NVL") do not match,
# and lists the sparse figures for them and for the H100 NVL.
HALF_PRECISION_PEAKS = {"h200 nvl": 835e12, "h200": 989e12, "h100 nvl": 835e12}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; nothing was checkpointed at or after that step."""


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak dense FLOP/s of one device computing in dtype, from Lightning's device table (A100, H100 SXM / PCIe /
    NVL, L4, ...); None when unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    fix = next((peak for key, peak in HALF_PRECISION_PEAKS.items() if key in name), None)
    if fix is not None:
        return fix if dtype in (torch.bfloat16, torch.float16) else None
    flops = get_available_flops(device, dtype)
    return float(flops) if flops else None


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision string: bf16-mixed / bf16-true -> bfloat16, 16-mixed -> float16."""
    # Lightning's own mapping (_plugin_to_compute_dtype) is private and takes the plugin object, not this string
    return {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}.get(str(precision).split("-")[0],
                                                                                torch.float32)


class StepProgressBar(TQDMProgressBar):
    """The bar counts optimizer steps of train.max_steps: training is step-based, so Lightning's "Epoch 0/-2" and
    the logger's v_num say nothing."""

    def on_train_epoch_start(self, trainer, *_) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description("train", refresh=False)
        bar.reset(total=trainer.max_steps)
        bar.n = trainer.global_step  # a resumed run starts where it stopped

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if trainer.global_step != bar.n and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def _step_of(trainer: L.Trainer, batch_idx: int) -> int:
    """1-based optimizer step the micro-batch `batch_idx` belongs to (global_step already counts a finished one)."""
    finished = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    return trainer.global_step if finished else trainer.global_step + 1


class Throughput(L.Callback):
    """Every `every` optimizer steps: tokens/s per device, MFU, ETA; a plain log line when there is no progress bar.

    MFU = model FLOPs per token (formula, fwd + bwd) x tokens/s per device / device peak ("n/a" when unknown).
    Lightning's Throughput does the rates over a window of two updates, this one's previous log line and now;
    ThroughputMonitor is not used: it counts micro-batches, not optimizer steps, and prints no line or ETA.
    `average()` is the whole (re)start's tokens/s per device and MFU, for metrics.json.
    """

    def __init__(self, every: int, seq_len: int, print_lines: bool):
        self.every, self.seq_len, self.print_lines = every, seq_len, print_lines
        self._t0: float | None = None
        self._batches = self._samples = self._tokens = 0  # this device's, since the first batch of this (re)start
        self._logged = (0.0, 0)  # (seconds since the first batch, tokens) at the latest log line
        self.meter: ThroughputMeter | None = None
        self.flops_per_token = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.flops_per_token = pl_module.model.num_flops_per_token(self.seq_len)
        self.meter = ThroughputMeter(available_flops=peak_flops(pl_module.device, compute_dtype(trainer.precision)),
                                     world_size=trainer.world_size, window_size=2)
        self.meter.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        self._samples += batch[0].shape[0]
        self._tokens += batch[0].numel()
        step = trainer.global_step
        if (batch_idx + 1) % trainer.accumulate_grad_batches or (step % self.every and step != trainer.max_steps):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # time the work, not the kernel launches
        now = time.perf_counter() - self._t0
        window_s, window_tokens = now - self._logged[0], self._tokens - self._logged[1]
        self.meter.update(time=now, batches=self._batches, samples=self._samples, lengths=self._tokens,
                          flops=self.flops_per_token * window_tokens)
        self._logged = (now, self._tokens)
        rates = self.meter.compute()
        tps, mfu = rates["device/items_per_sec"], rates.get("device/mfu")
        steps_in_window = window_tokens / (batch[0].numel() * trainer.accumulate_grad_batches)
        eta = (trainer.max_steps - step) * window_s / steps_in_window
        metrics = {"perf/tokens_per_s_per_device": tps, "perf/eta_s": eta}
        if mfu is not None:
            metrics["perf/mfu"] = mfu
        pl_module.log_dict(metrics)
        if self.print_lines and trainer.is_global_zero:
            m = trainer.callback_metrics
            loss = m.get("train/loss")
            grad = m.get("train/grad_norm")
            print(f"step {step}/{trainer.max_steps} | loss {float(loss):.4f}" if loss is not None else f"step {step}",
                  f"| lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}",
                  f"| grad {float(grad):.3f}" if grad is not None else "",
                  f"| {tps:,.0f} tok/s/device | MFU {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}",
                  f"| ETA {datetime.timedelta(seconds=round(eta))}", flush=True)

    def average(self) -> tuple[float | None, float | None]:
        """(tokens/s per device, MFU or None) from the first batch of this (re)start to the latest log line."""
        seconds, tokens = self._logged
        if not tokens:
            return None, None
        peak = self.meter.available_flops
        return tokens / seconds, self.flops_per_token * tokens / seconds / peak if peak else None


class LossCurve(L.Callback):
    """Records train loss (first step, every `every` steps, last step) and val loss; draws a PNG at the end.

    The history is callback state, so it is in every checkpoint and a resumed run plots the whole curve.
    """

    def __init__(self, every: int, png: str | Path):
        self.every, self.png = every, Path(png)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = trainer.global_step
        if step == 1 or step % self.every == 0 or step == trainer.max_steps:
            # outputs["loss"] is divided by grad_accum; the logged value is the micro-batch's plain loss
            self.train.append((step, float(trainer.callback_metrics["train/loss"])))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.train:
            self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*self.train), label="train")
        if self.val:
            ax.plot(*zip(*self.val), "o-", label="val")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.png, dpi=100)
        plt.close(fig)

    def state_dict(self) -> dict:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        self.train, self.val = [tuple(x) for x in state["train"]], [tuple(x) for x in state["val"]]


class RunMetrics(L.Callback):
    """<run>/metrics.json (rank 0), rewritten at each validation and when training ends: the loss curves
    [(optimizer step, loss)] of `curve` (restored from the checkpoint, so a resumed run's file holds the whole run),
    tokens and training FLOPs per optimizer step (all ranks), tokens seen, and this (re)start's tokens/s per device
    and MFU (None when the device's peak is unknown). eval/compare.py reads it."""

    def __init__(self, path: str | Path, curve: LossCurve, throughput: Throughput, tokens_per_micro_batch: int):
        self.path, self.curve, self.throughput = Path(path), curve, throughput
        self.tokens_per_micro_batch = tokens_per_micro_batch

    def write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        tokens_per_step = self.tokens_per_micro_batch * trainer.accumulate_grad_batches * trainer.world_size
        tokens_per_s, mfu = self.throughput.average()
        metrics = {"step": trainer.global_step, "max_steps": trainer.max_steps,
                   "tokens_per_step": tokens_per_step, "tokens_seen": trainer.global_step * tokens_per_step,
                   "flops_per_token": self.throughput.flops_per_token,
                   "flops_per_step": self.throughput.flops_per_token * tokens_per_step,
                   "train_loss": self.curve.train, "val_loss": self.curve.val,
                   "final_val_loss": self.curve.val[-1][1] if self.curve.val else None,
                   "tokens_per_s_per_device": tokens_per_s, "mfu": mfu}
        text = json.dumps(metrics, indent=1).encode()
        atomic_write(self.path, lambda f: f.write(text), need=len(text))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # after LossCurve's (callbacks run in list order): its val point is in
            self.write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer)


class NonFiniteLossGuard(L.Callback):
    """Stops the run on a NaN/inf loss on any rank, naming the step.

    It runs before ModelCheckpoint (Lightning orders checkpoint callbacks last), so the bad step is never saved.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"]
        if trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            raise NonFiniteLossError(
                f"non-finite training loss ({float(loss)}) at step {_step_of(trainer, batch_idx)} of "
                f"{trainer.max_steps}; stopped without checkpointing it. Lower train.lr or check the data, "
                f"then resume from the last good checkpoint with --run.resume=auto")


class PreemptionCheckpoint(L.Callback):
    """SIGTERM / SIGUSR1 (SLURM preemption or time limit) / SIGINT (Ctrl-C): finish the optimizer step, save
    `path`, stop cleanly. A second Ctrl-C aborts at once (KeyboardInterrupt) without saving.

    Lightning's own handlers end the run before the step completes (SIGTERM) or save mid-step (SLURM's
    SIGUSR1), so a resume would not be exact; these handlers only set a flag, and the save happens at the next
    optimizer-step boundary on every rank at once (the flag is reduced across ranks).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the step to finish
        if signum == signal.SIGINT:  # os.write: print or logging could re-enter a stream the main thread holds
            os.write(2, b"\nCtrl-C: saving at the end of this optimizer step (press again to abort without saving)\n")
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning registered its handlers; Python delivers signals to the main thread only
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            trainer.save_checkpoint(self.path, weights_only=False)
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
            rank_zero_info(f"signal received: saved {self.path} at step {trainer.global_step}; stopping")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
