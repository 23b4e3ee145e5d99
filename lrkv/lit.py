"""LightningModule around `Transformer`: next-token loss, AdamW, WSD/cosine schedule, checkpoint config guard.

Optimizer groups: weight decay on matrices (linear weights, LRKV's B_h, the untied lm_head); none on norms,
biases and the token embedding, whose decay would only shrink rarely-seen token rows toward zero.
Schedules are stepped once per optimizer step (not per micro-batch), so grad accumulation does not stretch them.
A resumed run follows the schedule of its current config from the checkpoint's step on (SCHEDULE_KEYS may change).
"""

from __future__ import annotations

import math

import lightning as L
import torch

from lrkv.config import Config, TrainConfig
from lrkv.model import Transformer


class CheckpointMismatchError(ValueError):
    """A checkpoint saved by a run with another model/data/train config."""


IDENTITY_SECTIONS = ("model", "data", "train")  # what must match to resume; run/log/strategy may change
# train.* keys that only shape the lr schedule and the bookkeeping: they may change when a run is resumed
# (train longer, lower the lr after a NaN stop); everything else in IDENTITY_SECTIONS defines the run.
SCHEDULE_KEYS = ("max_steps", "lr", "min_lr_ratio", "schedule", "warmup_steps", "decay_fraction", "val_every",
                 "val_batches", "ckpt_every", "keep_last")


def _differences(old: dict, new: dict, schedule: bool) -> list[str]:
    out = []
    for section in IDENTITY_SECTIONS:
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key) and (section == "train" and key in SCHEDULE_KEYS) == schedule:
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for every identity key (model, data, train minus the schedule) that differs."""
    return _differences(old, new, schedule=False)


def schedule_changes(old: dict, new: dict) -> list[str]:
    """'train.key: old -> new' for every SCHEDULE_KEYS field that differs."""
    return _differences(old, new, schedule=True)


def lr_factor(step: int, t: TrainConfig) -> float:
    """Multiplier of train.lr for optimizer step `step` (0-based).

    warmup  (step + 1) / warmup_steps for step < warmup_steps
    wsd     1 until the last decay_fraction of max_steps, then linear to min_lr_ratio at max_steps
    cosine  min + (1 - min) * (1 + cos(pi * p)) / 2, p = (step - warmup) / (max_steps - warmup)
    """
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    lo = t.min_lr_ratio
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "cosine":
        p = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    decay_start = max(t.warmup_steps, t.max_steps - round(t.decay_fraction * t.max_steps))
    if step < decay_start:
        return 1.0
    p = (step - decay_start) / max(1, t.max_steps - decay_start)
    return 1.0 - (1.0 - lo) * min(p, 1.0)


class LitLM(L.LightningModule):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.model: Transformer | None = None

    def configure_model(self) -> None:
        # Lightning calls this inside the strategy's init context (ZeRO-3 shards layers as they are built);
        # it may be called again (e.g. trainer.fit after trainer.validate), so build once.
        if self.model is not None:
            return
        self.model = Transformer(self.cfg.model)
        self.model.activation_checkpointing = self.cfg.train.activation_checkpointing

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", self.model(x, y), prog_bar=True, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # norm before clipping; under DeepSpeed ZeRO the grads live in the engine and p.grad is None
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def configure_optimizers(self):
        t = self.cfg.train
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 flattens p; ds_shape keeps the real shape
            (decay if ndim >= 2 and not name.startswith("embed.") else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        # After a resume the optimizer and LambdaLR hold the checkpoint's lr; the schedule (a closure over
        # self.cfg.train) is already the new one. Re-derive the lr for the current step from the new train.lr,
        # the same product LambdaLR computes, so a resume with an unchanged config is bit-identical.
        t, sched = self.cfg.train, self.lr_schedulers()
        sched.base_lrs = [t.lr] * len(sched.base_lrs)
        for group in sched.optimizer.param_groups:
            group["initial_lr"] = t.lr
            group["lr"] = t.lr * lr_factor(sched.last_epoch, t)
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]  # what get_last_lr() reports

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("config")
        if saved is None:
            raise CheckpointMismatchError("checkpoint holds no lrkv config; it was not written by train.py")
        diffs = config_differences(saved, self.cfg.to_dict())
        if diffs:
            raise CheckpointMismatchError("checkpoint was trained with another config (checkpoint -> now): "
                                          + "; ".join(diffs))
