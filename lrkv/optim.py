"""AdamW with its weight-decay split, and the WSD / cosine / constant learning-rate schedule, as plain functions.

LitLM calls them for training; eval/compare.py and benchmarks/train_throughput.py call them directly, without the
Lightning wrapper. Weight decay goes on matrices (linear weights, LRKV's B_h, the untied lm_head); none on norms,
biases and the token embedding, whose decay would only shrink rarely-seen token rows toward zero.
Schedules are stepped once per optimizer step (not per micro-batch), so grad accumulation does not stretch them.
"""

from __future__ import annotations

import math

import torch

from lrkv.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed matrices, undecayed rest]: AdamW's two parameter groups."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 flattens p; ds_shape keeps the real shape
        (decay if ndim >= 2 and not name.startswith("embed.") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over param_groups; on GPU the fused kernel (one launch for all parameters), elsewhere torch's default."""
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                             fused=device.type == "cuda")


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


def make_schedule(opt: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """train.lr x lr_factor(step); call .step() once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t))
