"""Trainer placement from the config's `strategy:` block: single device, DDP, DeepSpeed ZeRO.

Kept out of the model file; train.py only calls `trainer_kwargs(cfg)`.

- single: one device.  ddp: gloo on CPU, nccl on CUDA.  auto: Lightning's choice (DDP when several devices).
- deepspeed: ZeRO stage 0-3 from `strategy.deepspeed` (a full DeepSpeed config dict; stage 2 when it names none).
  Its keys are checked by DeepSpeed's own parser: one it never reads (a typo such as `zero_optimisation`) or its
  pydantic models refuse is an error naming the dotted key, before the run starts.
  Micro-batch size, gradient accumulation and clipping always come from `train.*`. DeepSpeed on a machine
  without CUDA is refused unless `strategy.accelerator: cpu` opts in (DeepSpeed's CPU accelerator + gloo: tests/CI).
  Its checkpoint folders are published atomically (AtomicDeepSpeedStrategy).
- Multi-node: under torchrun or SLURM `srun`, Lightning's cluster environments supply ranks and addresses; the
  node count and processes per node come from the launcher, and a config that disagrees is refused.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from collections.abc import KeysView
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from lrkv.atomic import atomic_write
from lrkv.config import Config, ConfigError, _closest

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def publish_tag(folder: Path, tag: str) -> None:
    """Point `folder`/latest at `tag` (atomic replace), then remove the folder's other tags."""
    atomic_write(folder / "latest", lambda f: f.write(tag.encode()), need=len(tag))
    for old in folder.iterdir():
        if old.is_dir() and old.name != tag:
            shutil.rmtree(old)


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy whose checkpoint folders are published atomically.

    DeepSpeed writes <folder>/<tag>/ (every rank its shards) and <folder>/latest, the tag a load reads, in place.
    Here each save goes into a new tag, and rank 0 points `latest` at it only once every rank has written its
    shards (a barrier), removing the older tag after that. A kill during a save leaves `latest` on the previous
    complete tag (last.ckpt is rewritten), or a new step-N.ckpt folder without `latest`, which resume skips.
    """

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options is not supported for DeepSpeed checkpoints")
        folder = Path(self.broadcast(str(filepath)))
        step = checkpoint["global_step"]
        tag, n = f"step{step}", 1
        while self.is_global_zero and (folder / tag).exists():  # saved twice at one step (a signal, then periodic)
            tag, n = f"step{step}.{n}", n + 1
        tag = self.broadcast(tag)
        client_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.deepspeed_engine.save_checkpoint(folder, client_state=client_state, tag=tag, save_latest=False,
                                              exclude_frozen_parameters=self.exclude_frozen_parameters)
        self.barrier("lrkv_checkpoint_written")
        if self.is_global_zero:
            publish_tag(folder, tag)
        self.barrier("lrkv_checkpoint_published")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning's version first insists on a tag folder named "checkpoint"; ours are named by `latest`
        from lightning.pytorch.trainer.states import TrainerFn

        if not (Path(checkpoint_path) / "latest").is_file():
            raise FileNotFoundError(f"{checkpoint_path}: not a DeepSpeed checkpoint folder (no 'latest' file)")
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        _, client_state = self.deepspeed_engine.load_checkpoint(
            checkpoint_path, load_optimizer_states=fitting, load_lr_scheduler_states=False,
            load_module_strict=self.lightning_module.strict_loading)
        if client_state is None:
            raise FileNotFoundError(f"{checkpoint_path}: DeepSpeed could not load this checkpoint")
        return client_state


class CPUDeepSpeedStrategy(AtomicDeepSpeedStrategy):
    """The DeepSpeed strategy without Lightning's CUDA-only guard, for DeepSpeed's CPU accelerator (gloo)."""

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
        if device == "nvme" and not str(offload.get("nvme_path") or "").strip():  # "" would mean the current folder
            raise ConfigError(f"{where}.nvme_path: required (not empty) when offloading to nvme")
    # Our optimizer is a plain torch AdamW from the LightningModule, not a DeepSpeed one.
    ds.setdefault("zero_allow_untested_optimizer", True)
    if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
        # Offload otherwise insists on DeepSpeedCPUAdam, a C++ extension built at first use.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


class _AskedKeys(dict):
    """A DeepSpeed config (nested mappings too) that records which of its keys DeepSpeed's parser asks for."""

    def __init__(self, data: dict, path: str = ""):
        super().__init__({k: _AskedKeys(v, f"{path}{k}.") if isinstance(v, dict) else v for k, v in data.items()})
        self.path, self.asked = path, set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.asked.add(key)
        return super().__contains__(key)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __iter__(self):  # overridden, it also routes **unpacking into a pydantic model through __getitem__
        self.asked.update(dict.keys(self))
        return super().__iter__()

    def keys(self) -> KeysView:  # DeepSpeed often asks `key in d.keys()`
        return KeysView(self)

    def items(self):
        self.asked.update(dict.keys(self))
        return super().items()

    def unasked(self) -> list[tuple[str, set]]:
        """(dotted path, the keys asked for beside it) of each key never asked for. A nested mapping asked nothing
        went whole to one of DeepSpeed's pydantic models, which refuse unknown keys themselves."""
        checked = self.asked or not self.path
        out = [(self.path + k, self.asked) for k in dict.keys(self) if checked and k not in self.asked]
        for key, value in dict.items(self):
            if isinstance(value, _AskedKeys) and key in self.asked:
                out += value.unasked()
        return out


def _locate(ds: dict, loc: tuple) -> str:
    """The dotted path of a pydantic error's `loc`, which starts at the section DeepSpeed gave the model."""
    def sections(node: dict, path: tuple):
        yield path, node
        for key, value in node.items():
            if isinstance(value, dict):
                yield from sections(value, (*path, key))

    for path, node in sections(ds, ()):
        for part in loc:
            if not (isinstance(node, dict) and part in node):
                break
            node = node[part]
        else:
            return ".".join(map(str, (*path, *loc)))
    return ".".join(map(str, loc))


def check_deepspeed_keys(ds: dict) -> None:
    """Refuse, by dotted path, a key DeepSpeed would ignore (its parser never asks for it: `zero_optimisation`
    leaves ZeRO at stage 2) or reject (a value its pydantic models refuse, an unknown key among them)."""
    from deepspeed.runtime.config import DeepSpeedConfig  # importing DeepSpeed picks its accelerator
    from pydantic import ValidationError

    config = _AskedKeys(ds)
    try:  # DeepSpeedConfig()'s parsing step, without the batch-size checks of the keys Lightning adds later
        DeepSpeedConfig.__new__(DeepSpeedConfig)._initialize_params(config)
    except ValidationError as e:
        error = e.errors()[0]
        rule = "not a DeepSpeed config key" if error["type"] == "extra_forbidden" else error["msg"]
        raise ConfigError(f"strategy.deepspeed.{_locate(ds, error['loc'])}: {rule}") from e
    unknown = config.unasked()
    if unknown:
        path, asked = unknown[0]
        hint = _closest(path.split(".")[-1], asked)
        raise ConfigError(f"strategy.deepspeed.{path}: not a DeepSpeed config key{hint}")


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
        check_deepspeed_keys(ds)
        cls = AtomicDeepSpeedStrategy if cuda else CPUDeepSpeedStrategy
        strategy = cls(config=ds, process_group_backend=backend)
    elif s.name == "ddp":
        strategy = DDPStrategy(process_group_backend=backend)
    else:  # single: one device; auto: Lightning picks (single, or DDP when several devices are given)
        strategy = "auto"
        if s.name == "single":
            devices = 1
    return {"strategy": strategy, "accelerator": "gpu" if cuda else "cpu", "devices": devices,
            "num_nodes": num_nodes, "precision": precision}
