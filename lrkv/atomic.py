"""Atomic file writes and one clear error when the disk is full.

A file is written as a hidden `.NAME.tmp` sibling (same filesystem, so the final rename is atomic), fsynced and
renamed over NAME: readers see the old file or the new one, never a partial one. On any failure the temporary
file is removed; a full disk (ENOSPC, or EDQUOT for a quota) becomes a DiskFullError naming the path, the space
the file needs and the space free, instead of a traceback from deep inside torch.save or numpy.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(RuntimeError):
    """The filesystem ran out of space (or quota) while a file was written; nothing partial was left behind."""


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _free(path: Path) -> tuple[Path, int]:
    folder = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    return folder, shutil.disk_usage(folder).free


def disk_full_message(path: Path, need: int) -> str:
    folder, free = _free(path)
    return (f"{path}: no space left on the device (needs about {human_bytes(need)}, {human_bytes(free)} free in "
            f"{folder}); free at least {human_bytes(max(need - free, 0) or need)} and try again")


def is_disk_full(e: BaseException | None) -> bool:
    # torch.save reports a failed write of its zip writer as RuntimeError with the OSError as its context;
    # Rust writers (safetensors, tokenizers) raise their own types with io::Error's "(os error 28)" text
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        if any(f"(os error {n})" in str(e) for n in DISK_FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], need: int) -> None:
    """Write `path` through `write(file)`; `need` (bytes, an estimate) goes into the disk-full message."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # numpy reports a short write as a bare OSError without errno: judge it by the space left
        if is_disk_full(e) or (isinstance(e, OSError) and e.errno is None and _free(path)[1] < need):
            raise DiskFullError(disk_full_message(path, need)) from None
        raise
