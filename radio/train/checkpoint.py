"""Atomic checkpoints: write to a temporary file, fsync, rename; keep the last K.

A checkpoint is one ``torch.save`` file ``DIR/checkpoints/step_XXXXXXXX.pt``. ``os.replace`` is
atomic on POSIX, so at any moment every ``step_*.pt`` is complete: a run killed mid-save leaves
at most a ``.tmp`` file behind, which is ignored (and cleaned up by the next save).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_save",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := _NAME.match(name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` as the checkpoint of ``step``, then delete all but the newest ``keep_last``."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    folder = checkpoint_dir(run_dir)
    path = folder / f"step_{step:08d}.pt"
    atomic_save(state, path)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    for leftover in folder.glob(".step_*.tmp"):  # debris of a killed save
        leftover.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint file (weights_only=False: it holds RNG states and plain Python objects)."""
    return torch.load(path, map_location=map_location, weights_only=False)
