"""OS file locks (flock): the worker lock and the short line lock.

flock locks belong to the open file description, so the kernel drops them
when the holder dies, however it dies: a crashed worker never leaves a stale
lock behind. The pid written into the worker lock file is for display only.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from factory import durable
from factory.errors import Conflict


@contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the duration of the block (blocking)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, durable.file_mode_for(path.parent))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class WorkerLock:
    """One worker per root, held for the daemon's lifetime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, durable.file_mode_for(self.path.parent))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Conflict(
                f"{self.path}: another worker holds this root ({describe_holder(self.path)}); "
                "stop it first (systemctl stop forge-factory, or kill that pid)"
            ) from None
        self.fd = fd
        try:  # the pid is for people (describe_holder); the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError:  # a full disk must not stop the worker from starting
            pass

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_locked(path: Path) -> bool:
    """True when some live process holds the worker lock on `path`."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def recorded_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def describe_holder(path: Path) -> str:
    pid = recorded_pid(path)
    return f"pid {pid}" if pid else "pid unknown"
