"""Trainer placement from the config's `strategy:` block: single device, DDP (gloo on CPU), DeepSpeed ZeRO.

Kept out of the model file; train.py only calls `trainer_kwargs(cfg)`.
"""

import torch

from lrkv.config import Config


def trainer_kwargs(cfg: Config) -> dict:
    """Keyword arguments for lightning.Trainer: strategy, accelerator, devices, num_nodes, precision."""
    s = cfg.strategy
    cuda = torch.cuda.is_available() and s.accelerator in ("auto", "cuda", "gpu")
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
    strategy = {"auto": "auto", "single": "auto", "ddp": "ddp"}[s.name]
    devices = 1 if s.name == "single" else s.devices
    return {"strategy": strategy, "accelerator": "gpu" if cuda else "cpu", "devices": devices,
            "num_nodes": s.num_nodes, "precision": precision}
