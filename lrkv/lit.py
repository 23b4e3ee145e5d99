"""LightningModule around `Transformer`: next-token loss, the optimizer and schedule of lrkv/optim.py, checkpoint
config guard.

A resumed run follows the schedule of its current config from the checkpoint's step on (SCHEDULE_KEYS may change).
"""

from __future__ import annotations

import lightning as L
import torch

from lrkv.config import Config
from lrkv.model import Transformer
from lrkv.optim import lr_factor, make_optimizer, make_schedule


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
        opt = make_optimizer(self.model, self.cfg.train, self.device)
        sched = make_schedule(opt, self.cfg.train)
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
