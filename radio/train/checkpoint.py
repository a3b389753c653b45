"""Checkpoints that are complete, verified, and never silently lost.

A checkpoint is one ``torch.save`` file ``DIR/checkpoints/step_XXXXXXXX.pt`` plus its SHA-256 in
``step_XXXXXXXX.pt.sha256`` (``run.parallel = "ddp"``), or, for sharded runs (``"fsdp"``), a directory
``step_XXXXXXXX/`` holding the ``torch.distributed.checkpoint`` files of every rank, ``meta.pt`` (the
replicated, non-sharded state) and ``manifest.sha256.json`` (the SHA-256 of each file); it is written
as ``.step_XXXXXXXX.tmp/`` and renamed into place once complete.

Writing a file: ``torch.save`` to a temporary file, fsync, hash what is on disk,
write the digest (atomically), then ``os.replace`` the file into place (atomic on POSIX). So at any
moment every ``step_*.pt`` is complete, and a run killed mid-save leaves at most a ``.tmp`` file behind
(ignored, and cleaned up by the next save). Older checkpoints are deleted only after the new one's
bytes on disk have been read back and matched its digest.

Reading: ``load_checkpoint`` checks the digest (when there is one: older runs have none) before
unpickling; a truncated, emptied or altered file raises ``CorruptCheckpointError`` naming the file and
why. ``load_latest_good`` walks the checkpoints newest first and falls back, saying so, to the newest
one that verifies and loads: what ``--resume`` and ``radio export`` use.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CorruptCheckpointError",
    "atomic_save",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_good",
    "load_sharded_tensors",
    "read_sharded_tensors",
    "quarantine_after",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "verify_checkpoint",
]

_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")
DIGEST_SUFFIX = ".sha256"
MANIFEST = "manifest.sha256.json"  # of a sharded checkpoint directory
META = "meta.pt"


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is truncated, empty, altered or otherwise unloadable."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_text_atomically(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save(obj)`` to ``path`` so that ``path`` is either the old file or the complete new one,
    with its SHA-256 beside it (``path.sha256``). Returns the digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)  # of the bytes on disk, read back
        # The digest first: every visible checkpoint then has its digest (a digest without its
        # checkpoint, left by a kill in between, is harmless and replaced by the next save).
        _write_text_atomically(digest + "\n", _digest_path(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return digest


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoint files of a run as (step, path), oldest first (not verified: see ``load_latest_good``)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for name in os.listdir(folder):
        m = _NAME.match(name)
        if m and (m.group(2) is not None) != (folder / name).is_dir():  # files end in .pt, directories do not
            found.append((int(m.group(1)), folder / name))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise ``CorruptCheckpointError`` unless ``path`` is a non-empty file matching its saved digest
    (files without a digest, from older runs, pass here and are judged by loading them)."""
    path = Path(path)
    if path.is_dir():
        _verify_directory(path)
        return
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is empty")
    digest_file = _digest_path(path)
    if digest_file.is_file():
        want = digest_file.read_text().strip()
        got = _sha256(path)
        if got != want:
            raise CorruptCheckpointError(
                f"checkpoint {str(path)!r} does not match its SHA-256 ({digest_file.name}): truncated or altered"
            )


def _verify_directory(path: Path) -> None:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpointError(f"sharded checkpoint {str(path)!r} has no {MANIFEST} (incomplete)")
    try:
        want = json.loads(manifest.read_text())
    except ValueError:
        raise CorruptCheckpointError(f"sharded checkpoint {str(path)!r}: {MANIFEST} is unreadable") from None
    if META not in want:
        raise CorruptCheckpointError(f"sharded checkpoint {str(path)!r} lists no {META}")
    for name, digest in want.items():
        if not (path / name).is_file():
            raise CorruptCheckpointError(f"sharded checkpoint {str(path)!r} misses {name}")
        if _sha256(path / name) != digest:
            raise CorruptCheckpointError(
                f"sharded checkpoint {str(path)!r}: {name} does not match its SHA-256: truncated or altered"
            )


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
        _digest_path(path).unlink(missing_ok=True)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` as the checkpoint of ``step``, verify it, then delete all but the newest ``keep_last``."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    folder = checkpoint_dir(run_dir)
    path = folder / f"step_{step:08d}.pt"
    atomic_save(state, path)
    verify_checkpoint(path)  # before anything older is deleted
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        _remove(old)
    for leftover in folder.glob(".step_*.tmp"):  # debris of a killed save
        _remove(leftover)
    return path


def save_sharded_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    is_main: bool,
    barrier: Callable[[], None],
) -> Path:
    """Every rank writes its shards of ``tensors`` (DCP); rank 0 adds ``meta``, hashes every file, renames
    the directory into place, verifies it and prunes all but the newest ``keep_last``. Collective."""
    import torch.distributed.checkpoint as dcp

    folder = checkpoint_dir(run_dir)
    final, tmp = folder / f"step_{step:08d}", folder / f".step_{step:08d}.tmp"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    with _single_process_is_intended():
        dcp.save(tensors, checkpoint_id=str(tmp))
    barrier()
    if is_main:
        with open(tmp / META, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        digests = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_text_atomically(json.dumps(digests, indent=1) + "\n", tmp / MANIFEST)
        if final.exists():  # a step written again after a fallback
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
        verify_checkpoint(final)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            _remove(old)
    barrier()
    return final


def load_checkpoint(path: str | os.PathLike, map_location="cpu", verify: bool = True) -> dict[str, Any]:
    """Verify, then load a checkpoint file (weights_only=False: it holds RNG states and plain Python objects).

    A sharded checkpoint directory gives its ``meta`` state with ``"sharded": path`` added; its tensors
    are loaded by ``radio.train.parallel.Parallel.load_states`` (or ``load_sharded_tensors``). Raises
    ``CorruptCheckpointError`` (naming the file) when it fails the digest or cannot be unpickled.
    """
    if verify:
        verify_checkpoint(path)
    try:
        if Path(path).is_dir():
            meta = torch.load(Path(path) / META, map_location=map_location, weights_only=False)
            return {**meta, "sharded": Path(path)}
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {first_line}") from err


def load_latest_good(
    run_dir: str | os.PathLike, map_location="cpu", log: Callable[[str], None] = print
) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of ``run_dir`` that verifies and loads, as (path, state).

    Each newer one that does not is reported through ``log`` (with why) and skipped. Raises
    ``ValueError`` when the run has no checkpoint at all, ``CorruptCheckpointError`` when none is usable.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise ValueError(f"no checkpoint found in {checkpoint_dir(run_dir)} (expected step_*.pt files)")
    problems = []
    for _, path in reversed(found):
        try:
            state = load_checkpoint(path, map_location=map_location)
        except CorruptCheckpointError as err:
            problems.append(str(err))
            log(f"warning: {err}; trying the previous checkpoint")
            continue
        if problems:
            log(f"falling back to {path.name} (newer checkpoints are unusable)")
        return path, state
    raise CorruptCheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: " + "; ".join(problems))


def load_sharded_tensors(path: str | os.PathLike, template: dict[str, Any]) -> dict[str, Any]:
    """Fill ``template`` (e.g. ``{"ema": model.state_dict()}``) from a sharded checkpoint, in one process
    or collectively; DCP reshards to whatever the template's tensors are."""
    import torch.distributed.checkpoint as dcp

    with _single_process_is_intended():
        dcp.load(template, checkpoint_id=str(path))
    return template


@contextmanager
def _single_process_is_intended():
    """Silence DCP's note that it runs without a process group: one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def read_sharded_tensors(path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    """The whole state dict saved under ``key`` (e.g. "ema") in a sharded checkpoint, read in one process
    as plain tensors, whatever modules it came from (LoRA factors included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = key + "."
    template = {
        name[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.items()
        if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    return load_sharded_tensors(path, {key: template})[key]


def quarantine_after(run_dir: str | os.PathLike, step: int, log: Callable[[str], None] = print) -> list[Path]:
    """Rename the checkpoints newer than ``step`` (unusable ones a resume fell back past) to ``*.corrupt``,
    so that they are neither resumed from nor counted by ``keep_last``. Returns the new paths."""
    moved = []
    for s, path in list_checkpoints(run_dir):
        if s > step:
            target = path.with_name(path.name + ".corrupt")
            if target.exists():
                _remove(target)
            os.replace(path, target)
            _digest_path(path).unlink(missing_ok=True)
            log(f"moved the unusable {path.name} aside as {target.name}")
            moved.append(target)
    return moved
