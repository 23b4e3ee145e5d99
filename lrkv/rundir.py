"""The run folder's layout, spelled once: train.py writes it; checkpoint.py, export.py and eval/ read it.

    <run>/config.yaml          the resolved config (written when training starts)
    <run>/config_changes.log   schedule changes made on a resume, one line each
    <run>/.lock                held while a train.py runs in the folder
    <run>/tokenizer.json       trained (or copied from data.tokenizer) at the first start
    <run>/data/                the tokenized corpus cache
    <run>/checkpoints/         step-NNNNNN.ckpt (the newest train.keep_last) and last.ckpt
    <run>/csv/, tensorboard/   Lightning's loggers (a version_N folder per (re)start)
    <run>/metrics.json         loss curves, tokens, FLOPs and throughput; rewritten at each validation and at the end
    <run>/loss_curve.png
    <run>/export/              the export folder (lrkv/export.py) written at the end

Plain paths, no torch or Lightning: loading an export or reading a finished run's metrics does not import them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class RunDir:
    path: Path
    STEP_NAME: ClassVar[str] = "step-{step:06d}"  # ModelCheckpoint's filename; zero-padded, so name order is step order

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # accept a str (cfg.run.dir) too

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def changes(self) -> Path:
        return self.path / "config_changes.log"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"

    def step_checkpoints(self) -> list[Path]:
        """The step-N.ckpt files (or DeepSpeed folders) there, newest first."""
        return sorted(self.checkpoints.glob("step-*.ckpt"), key=lambda p: p.name, reverse=True)

    @property
    def csv(self) -> Path:
        return self.path / "csv"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def loss_curve(self) -> Path:
        return self.path / "loss_curve.png"

    @property
    def export(self) -> Path:
        return self.path / "export"


def export_label(export: str | Path) -> str:
    """A short name for an export folder in tables and plots: its run's name when it is a run's export/."""
    export = Path(export).resolve()  # "export" alone has a parent only once resolved
    return export.parent.name if RunDir(export.parent).export == export else export.name
