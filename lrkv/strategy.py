"""Trainer placement from the config's `strategy:` block: single device, DDP, DeepSpeed ZeRO.

Kept out of the model file; train.py only calls `trainer_kwargs(cfg)`.

- single: one device.  ddp: gloo on CPU, nccl on CUDA.  auto: Lightning's choice (DDP when several devices).
- deepspeed: ZeRO stage 0-3 from `strategy.deepspeed` (a full DeepSpeed config dict; stage 2 when it names none).
  Micro-batch size, gradient accumulation and clipping always come from `train.*`. DeepSpeed on a machine
  without CUDA is refused unless `strategy.accelerator: cpu` opts in (DeepSpeed's CPU accelerator + gloo: tests/CI).
- Multi-node: under torchrun or SLURM `srun`, Lightning's cluster environments supply ranks and addresses; the
  node count and processes per node come from the launcher, and a config that disagrees is refused.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from lrkv.config import Config, ConfigError

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy without its CUDA-only guard, for DeepSpeed's CPU accelerator (gloo)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "CUDA only" check

    def setup_distributed(self) -> None:
        # DeepSpeed takes the local device rank from root_device.index; plain torch.device("cpu") has none.
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        super().setup_distributed()


@dataclass(frozen=True)
class Launch:
    """Processes started by an external launcher (torchrun or SLURM srun), one per device."""

    launcher: str
    num_nodes: int
    procs_per_node: int


def detect_launch() -> Launch | None:
    """The launcher's layout, checked in Lightning's own order (SLURM before torchrun); None when not launched."""
    if SLURMEnvironment.detect():
        nodes, tasks = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS"])
        return Launch("SLURM", nodes, tasks // nodes)
    if TorchElasticEnvironment.detect():
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
        return Launch("torchrun", world // local, local)
    return None


def _placement(cfg: Config) -> tuple[int | str, int]:
    """(devices, num_nodes): the launcher's layout when there is one, else the config's."""
    s = cfg.strategy
    launch = detect_launch()
    if launch is None:
        return s.devices, s.num_nodes
    where = f"{launch.launcher} started {launch.num_nodes} node(s) x {launch.procs_per_node} process(es) per node"
    # num_nodes 1 (the default) and devices auto follow the launcher; any other value must agree with it.
    if s.num_nodes not in (1, launch.num_nodes):
        raise ConfigError(f"strategy.num_nodes: config says {s.num_nodes} but {where}; "
                          f"set strategy.num_nodes={launch.num_nodes} or leave it at 1")
    devices = s.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if devices != "auto" and devices != launch.procs_per_node:
        raise ConfigError(f"strategy.devices: config says {s.devices!r} but {where}; "
                          f"set strategy.devices={launch.procs_per_node} or auto")
    if s.name == "single" and launch.num_nodes * launch.procs_per_node > 1:
        raise ConfigError(f"strategy.name: 'single' cannot run as several processes ({where}); use ddp or deepspeed")
    return launch.procs_per_node, launch.num_nodes


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config dict: the user's `strategy.deepspeed`, validated, with batch and clipping from train.*."""
    ds = copy.deepcopy(cfg.strategy.deepspeed)
    key = "strategy.deepspeed"
    # These are derived from train.* / Lightning; a second source of truth would silently disagree.
    owned = {"gradient_accumulation_steps": "train.grad_accum", "train_batch_size": "train.micro_batch_size",
             "optimizer": "train.lr/beta1/beta2/weight_decay", "scheduler": "train.schedule",
             "fp16": "train.precision", "bf16": "train.precision"}
    for name, instead in owned.items():
        if name in ds:
            raise ConfigError(f"{key}.{name}: set by lrkv from {instead}; remove it from the DeepSpeed config")
    for name, value in (("train_micro_batch_size_per_gpu", cfg.train.micro_batch_size),
                        ("gradient_clipping", cfg.train.grad_clip)):
        if name in ds and ds[name] != value:
            raise ConfigError(f"{key}.{name}: {ds[name]} disagrees with train.* ({value}); remove it")
        ds[name] = value

    zero = ds.setdefault("zero_optimization", {"stage": 2})
    if not isinstance(zero, dict):
        raise ConfigError(f"{key}.zero_optimization: expected a mapping, got {zero!r}")
    stage = zero.setdefault("stage", 2)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"{key}.zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
    for name, min_stage in (("offload_optimizer", 1), ("offload_param", 3)):
        offload = zero.get(name)
        if offload is None:
            continue
        where = f"{key}.zero_optimization.{name}"
        if not isinstance(offload, dict):
            raise ConfigError(f"{where}: expected a mapping like {{device: cpu}}, got {offload!r}")
        device = offload.get("device", "none")
        if device not in OFFLOAD_DEVICES:
            raise ConfigError(f"{where}.device: must be one of {OFFLOAD_DEVICES}, got {device!r}")
        if device != "none" and stage < min_stage:
            raise ConfigError(f"{where}: needs zero_optimization.stage >= {min_stage}, got stage {stage}")
        if device == "nvme" and "nvme_path" not in offload:
            raise ConfigError(f"{where}.nvme_path: required when offloading to nvme")
    # Our optimizer is a plain torch AdamW from the LightningModule, not a DeepSpeed one.
    ds.setdefault("zero_allow_untested_optimizer", True)
    if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
        # Offload otherwise insists on DeepSpeedCPUAdam, a C++ extension built at first use.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def _use_cpu_deepspeed() -> None:
    """Select DeepSpeed's CPU accelerator; it is chosen once per process, at the first DeepSpeed use."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise ConfigError("strategy.accelerator: cpu, but DeepSpeed already picked "
                              f"'{get_accelerator().device_name()}'; set DS_ACCELERATOR=cpu before starting")


def trainer_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments for lightning.Trainer: strategy, accelerator, devices, num_nodes, precision."""
    s = cfg.strategy
    has_cuda = torch.cuda.is_available()
    if s.accelerator in ("cuda", "gpu") and not has_cuda:
        raise ConfigError(f"strategy.accelerator: '{s.accelerator}' but no CUDA device is visible; use auto or cpu")
    cuda = has_cuda and s.accelerator != "cpu"
    if s.name == "deepspeed" and not cuda and s.accelerator != "cpu":
        raise ConfigError("strategy.name: DeepSpeed needs CUDA; use strategy.name=ddp, "
                          "or set strategy.accelerator=cpu to run DeepSpeed on CPU (tests)")
    devices, num_nodes = _placement(cfg)
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
    backend = "nccl" if cuda else "gloo"

    strategy: Strategy | str
    if s.name == "deepspeed":
        ds = deepspeed_config(cfg)
        if not cuda:
            _use_cpu_deepspeed()
        cls = DeepSpeedStrategy if cuda else CPUDeepSpeedStrategy
        strategy = cls(config=ds, process_group_backend=backend)
    elif s.name == "ddp":
        strategy = DDPStrategy(process_group_backend=backend)
    else:  # single: one device; auto: Lightning picks (single, or DDP when several devices are given)
        strategy = "auto"
        if s.name == "single":
            devices = 1
    return {"strategy": strategy, "accelerator": "gpu" if cuda else "cpu", "devices": devices,
            "num_nodes": num_nodes, "precision": precision}
