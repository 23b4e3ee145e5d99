"""Run folder guard, resume resolution and atomic checkpoint writes.

Lightning's TorchCheckpointIO writes through an fsspec transaction whose temporary file lives in the system
temp dir; when that is another filesystem than the run dir (usual on clusters) the final move is a copy, and a
crash mid-copy leaves a truncated checkpoint. AtomicCheckpointIO writes next to the target, fsyncs, and renames.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lrkv.config import Config
from lrkv.lit import config_differences

CONFIG_FILE = "config.yaml"
LAST = "last.ckpt"


class RunDirError(ValueError):
    """The run folder belongs to another run, or would be overwritten without --run.resume."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def prepare_run_dir(cfg: Config, run_dir: Path, write: bool) -> str | None:
    """Check the folder may hold this run, save the resolved config (when `write`), return the checkpoint to resume.

    A folder holds a run once it has checkpoints. Refused, touching nothing: one whose config.yaml differs in
    model/data/train, and one of this same run when --run.resume is not given (it would be overwritten).
    A folder left by an attempt that failed before its first checkpoint is reused.
    """
    saved_path = run_dir / CONFIG_FILE
    last = checkpoint_dir(run_dir) / LAST
    if saved_path.exists() and any(checkpoint_dir(run_dir).glob("*.ckpt")):
        diffs = config_differences(yaml.safe_load(saved_path.read_text()) or {}, cfg.to_dict())
        if diffs:
            raise RunDirError(f"{run_dir} already holds another run (its {CONFIG_FILE} -> now: {'; '.join(diffs)}); "
                              f"choose another --run.dir or remove that folder")
        if cfg.run.resume is None:
            raise RunDirError(f"{run_dir} already holds checkpoints of this run; continue it with --run.resume=auto "
                              f"or choose another --run.dir")
    resume = cfg.run.resume
    if resume == "auto":
        resume = str(last) if last.exists() else None
    elif resume is not None and not Path(resume).exists():
        raise RunDirError(f"--run.resume={resume}: checkpoint not found")
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{CONFIG_FILE}.tmp"
        tmp.write_text(cfg.to_yaml())
        os.replace(tmp, saved_path)
    return resume
