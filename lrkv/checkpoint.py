"""Run folder guard and lock, resume resolution with checkpoint checks, atomic checkpoint writes, and reading a
checkpoint back (a .ckpt file or a DeepSpeed ZeRO folder) for lrkv.export.

Lightning's TorchCheckpointIO writes through an fsspec transaction whose temporary file lives in the system
temp dir; when that is another filesystem than the run dir (usual on clusters) the final move is a copy, and a
crash mid-copy leaves a truncated checkpoint. AtomicCheckpointIO writes next to the target, fsyncs, and renames.

A start that is refused changes nothing in the run folder: prepare_run_dir only reads, and the resolved config
(config.yaml) and the log of schedule changes (config_changes.log) are written by RunRecord once training starts.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lrkv.atomic import atomic_write
from lrkv.config import Config
from lrkv.lit import CheckpointMismatchError, config_differences, schedule_changes
from lrkv.rundir import RunDir


class RunDirError(ValueError):
    """The run folder belongs to another run, is in use, or would be overwritten without --run.resume."""


class DamagedCheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, not written by train.py, or without a loader
    position) or read back (a path that is no checkpoint, no tokenizer beside it)."""


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f), need=_tensor_bytes(checkpoint))


# ---------------------------------------------------------------------------------------------------- resume


@dataclass
class Resume:
    """The checkpoint a run continues from (path None: a fresh start) and what was noticed choosing it."""

    path: str | None = None
    step: int = 0
    changes: list[str] = field(default_factory=list)  # schedule fields changed since the checkpoint
    skipped: list[str] = field(default_factory=list)  # 'file: why' for damaged candidates passed over


def is_deepspeed_dir(path: Path) -> bool:
    return path.is_dir() and (path / "latest").is_file()  # DeepSpeed's save_checkpoint names its newest tag there


def _zero_client_file(folder: Path) -> tuple[str, Path]:
    """(newest tag, rank 0's model-states file) of a DeepSpeed folder: Lightning's client state (hyper_parameters,
    loops) is in that file."""
    if not is_deepspeed_dir(folder):
        raise DamagedCheckpointError("a folder without DeepSpeed's 'latest' file (an unfinished save?)")
    tag = (folder / "latest").read_text().strip()
    states = sorted((folder / tag).glob("*model_states.pt"))
    if not states:
        raise DamagedCheckpointError(f"no *model_states.pt in tag '{tag}'")
    return tag, states[0]


def _client_state(path: Path) -> dict:
    """The Lightning checkpoint dict without loading tensor data (mmap): a .ckpt file, or rank 0's model-states
    file of a DeepSpeed folder's newest tag."""
    if path.is_dir():
        path = _zero_client_file(path)[1]
    if path.stat().st_size == 0:
        raise DamagedCheckpointError("empty file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its index is at the end
        raise DamagedCheckpointError(f"not a complete checkpoint ({path.stat().st_size:,} bytes, no zip index at "
                                     f"the end: truncated, or another kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a damaged member, a foreign pickle, ...: all mean unreadable
        raise DamagedCheckpointError(f"unreadable ({type(e).__name__}: {str(e).split('. ')[0][:160]})") from None


def inspect_checkpoint(path: Path, cfg: Config) -> Resume:
    """Check that this run can continue from `path`; DamagedCheckpointError / CheckpointMismatchError say why not."""
    ckpt = _client_state(path)
    saved = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if saved is None:
        raise DamagedCheckpointError("holds no lrkv config; it was not written by train.py")
    diffs = config_differences(saved, cfg.to_dict())
    if diffs:
        raise CheckpointMismatchError("checkpoint was trained with another config (checkpoint -> now): "
                                      + "; ".join(diffs))
    loader = ckpt.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
    if not loader or "position" not in loader[0]:
        raise DamagedCheckpointError("holds no data-loader position, so a resume could not continue the data exactly")
    step = int(ckpt["global_step"])
    if step > cfg.train.max_steps:
        raise RunDirError(f"{path}: trained {step} steps, more than train.max_steps={cfg.train.max_steps}; "
                          f"raise train.max_steps to continue it")
    return Resume(str(path), step, schedule_changes(saved, cfg.to_dict()))


def _candidates(run: RunDir) -> list[Path]:
    """last.ckpt, then step-N.ckpt newest first."""
    return [p for p in [run.last, *run.step_checkpoints()] if p.exists()]


def prepare_run_dir(cfg: Config, run_dir: Path) -> Resume:
    """Check the folder may hold this run and choose the checkpoint to resume from; writes nothing.

    A folder holds a run once it has checkpoints. Refused: one whose config.yaml differs in model/data/train
    (schedule fields aside), and one of this same run when --run.resume is not given (it would be overwritten).
    A folder left by an attempt that failed before its first checkpoint is reused.
    --run.resume=auto takes the newest checkpoint that passes inspect_checkpoint and names the ones it skipped;
    an explicit --run.resume=PATH that does not pass is refused.
    """
    run = RunDir(run_dir)
    saved_path = run.config
    found = _candidates(run)
    if saved_path.exists() and found:
        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunDirError(f"{saved_path}: not valid YAML ({str(e).splitlines()[0]}); restore it or remove "
                              f"the folder") from None
        diffs = config_differences(saved, cfg.to_dict())
        if diffs:
            raise RunDirError(f"{run_dir} already holds another run (its {saved_path.name} -> now: {'; '.join(diffs)}); "
                              f"choose another --run.dir or remove that folder")
        if cfg.run.resume is None:
            raise RunDirError(f"{run_dir} already holds checkpoints of this run; continue it with --run.resume=auto "
                              f"or choose another --run.dir")
    if cfg.run.resume is None:
        return Resume()
    if cfg.run.resume != "auto":
        path = Path(cfg.run.resume)
        if not path.exists():
            raise RunDirError(f"--run.resume={path}: checkpoint not found")
        try:
            return inspect_checkpoint(path, cfg)
        except (DamagedCheckpointError, CheckpointMismatchError) as e:
            raise type(e)(f"--run.resume={path}: {e}") from None
    skipped = []
    for path in found:
        try:
            resume = inspect_checkpoint(path, cfg)
        except (DamagedCheckpointError, CheckpointMismatchError) as e:
            skipped.append(f"{path.name}: {e}")
            continue
        resume.skipped = skipped
        return resume
    if found:
        raise DamagedCheckpointError(f"--run.resume=auto: no usable checkpoint in {run.checkpoints} "
                                     f"({'; '.join(skipped)})")
    return Resume()


def describe(resume: Resume) -> list[str]:
    """The lines a start prints about its resume: skipped files, the checkpoint, the schedule changes."""
    lines = [f"notice: skipped {s}" for s in resume.skipped]
    if resume.path is not None:
        lines.append(f"resuming from {resume.path} (step {resume.step})")
    if resume.changes:
        lines.append(f"schedule changed since that checkpoint, followed from step {resume.step} on: "
                     + "; ".join(resume.changes))
    return lines


class RunRecord(L.Callback):
    """At the start of training (rank 0): write config.yaml, append schedule changes to config_changes.log and
    remove temporary files a killed save left in checkpoints/."""

    def __init__(self, cfg: Config, run_dir: Path, resume: Resume):
        self.cfg, self.run, self.resume = cfg, RunDir(run_dir), resume

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        text = self.cfg.to_yaml().encode()
        atomic_write(self.run.config, lambda f: f.write(text), need=len(text))
        if self.resume.changes:
            when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            with open(self.run.changes, "a") as f:
                f.write(f"{when} resumed from {self.resume.path} at step {self.resume.step}: "
                        f"{'; '.join(self.resume.changes)}\n")
        for tmp in self.run.checkpoints.glob(".*.tmp"):
            tmp.unlink()


# ---------------------------------------------------------------------------------------------------- lock


class RunLock:
    """One train.py per run folder: an exclusive flock on <run>/.lock, which the OS drops if the process dies.

    release() removes the lock file, and the folder too when this lock created it and nothing else was written
    (a refused start leaves the run folder as it was).
    """

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = Path(run_dir), RunDir(run_dir).lock
        self.created = not self.run_dir.exists()
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                self.release()
                raise RunDirError(f"{self.run_dir} is in use by another train.py (pid {holder}, {self.path}); "
                                  f"wait for it to finish or choose another --run.dir") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                os.close(fd)  # a filesystem without flock (some NFS setups): run unlocked
                return self
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the file was removed by the run that held it just before we locked: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def _open(self) -> int:
        """The lock file, opened for writing: the first write of a run, so a folder it cannot write fails here."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"run.dir: {self.run_dir} is a file, not a folder; choose another --run.dir")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only, not ours, a file on the way
            raise RunDirError(f"run.dir: cannot write in {self.run_dir} ({e.strerror}); "
                              f"choose another --run.dir") from e

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked, so no other run can lock this inode
            os.close(self.fd)
            self.fd = None
        if self.created and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()


# ---------------------------------------------------------------------------------------------------- reading back


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or DeepSpeed folder as given; a run folder resolves to its checkpoints/last.ckpt."""
    path = Path(path)
    if path.is_file() or is_deepspeed_dir(path):
        return path
    last = RunDir(path).last
    if last.exists():
        return last
    what = "has no checkpoints/last.ckpt and is not a DeepSpeed checkpoint" if path.is_dir() else "does not exist"
    raise DamagedCheckpointError(f"{path}: {what}; give a .ckpt file, a DeepSpeed checkpoint folder or a run folder")


def read_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full fp32 LightningModule state dict, the checkpoint's other entries) from a .ckpt file or a ZeRO folder.

    Checkpoints are pickles (loop and callback state): read only those of runs you trust.
    """
    try:
        if not is_deepspeed_dir(ckpt):
            meta = torch.load(ckpt, map_location="cpu", weights_only=False)
            return meta.pop("state_dict"), meta
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation is CPU work; skip accelerator detection
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag, client = _zero_client_file(ckpt)
        meta = torch.load(client, map_location="cpu", weights_only=False)
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag), meta
    except (RuntimeError, ValueError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise DamagedCheckpointError(f"{ckpt}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def find_tokenizer(ckpt: Path) -> Path:
    """tokenizer.json beside a checkpoint or in its run folder (<run>/checkpoints/last.ckpt -> <run>/tokenizer.json)."""
    for run in (RunDir(ckpt.parent), RunDir(ckpt.parent.parent)):
        if run.tokenizer.is_file():
            return run.tokenizer
    raise DamagedCheckpointError(f"{ckpt}: no {run.tokenizer.name} in its folder or run folder; pass --tokenizer PATH")
