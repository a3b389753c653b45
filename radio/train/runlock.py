"""One writer per run directory: ``DIR/run.lock``, held for the whole run.

The lock file records its owner (PID, host, start time) and is held with ``flock`` on an open file
descriptor, so the kernel releases it when the owner dies, however it dies (kill -9 included). A
second writer of the directory (a second ``--resume``, or a fresh run racing for the same ``--out``)
finds the flock taken and stops with ``RunLockedError`` naming the owner.

Stale locks: a lock file whose flock is free belongs to a dead owner; on the same host its PID is
checked as well. On a shared file system whose ``flock`` does not reach across hosts, a lock of
another host counts as live while its heartbeat (the file's mtime, touched by ``heartbeat()`` as the
run goes) is younger than ``stale_after`` seconds, and as stale after that.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError"]

LOCK_FILE = "run.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(run_dir, log=print): ...``, or ``acquire()`` / ``release()``.

    ``stale_after``: seconds without a heartbeat after which another host's lock is taken over.
    """

    def __init__(self, run_dir: str | os.PathLike, log=print, stale_after: float = 600.0):
        self.path = Path(run_dir) / LOCK_FILE
        self.log, self.stale_after = log, stale_after
        self._fd: int | None = None
        self._last_beat = 0.0

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _describe(self, owner: dict) -> str:
        return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since {owner.get('since', '?')}"

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunLockedError(
                f"run directory {str(self.path.parent)!r} is in use by {self._describe(self._owner())} "
                f"({self.path} is locked); wait for that run to end or stop it"
            ) from None
        previous = self._owner()
        if previous:
            # The flock was free, so the owner is most likely dead; double-check what flock may miss
            # (file systems where it does not reach across hosts) before taking the lock over.
            age = time.time() - self.path.stat().st_mtime
            pid = previous.get("pid")
            if previous.get("host") == socket.gethostname():
                alive = isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid) and age < self.stale_after
            else:
                alive = age < self.stale_after
            if alive:
                os.close(fd)
                raise RunLockedError(
                    f"run directory {str(self.path.parent)!r} is locked by {self._describe(previous)} "
                    f"(heartbeat {age:.0f} s ago, stale after {self.stale_after:.0f} s); wait, or delete "
                    f"{self.path} if that run is gone"
                )
            self.log(f"taking over a stale lock of {self._describe(previous)} (that process is gone)")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._last_beat = time.monotonic()
        return self

    def heartbeat(self, every: float = 30.0) -> None:
        """Touch the lock file (at most every ``every`` seconds): tells other hosts the owner lives."""
        if self._fd is not None and time.monotonic() - self._last_beat >= every:
            os.utime(self.path)
            self._last_beat = time.monotonic()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
