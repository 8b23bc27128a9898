"""Crash-safe file operations: every write that matters goes through here.

A write is tmp file in the same directory -> fsync -> rename -> fsync of the
directory, so after a crash a reader sees either the old file or the whole new
one, never a torn one, and the rename itself survives power loss. Temporary
names start with "." and contain ".tmp." (see tmp_path_for): every station
scan ignores them and the recovery sweep deletes those of dead writers.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp."


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: Path, *, directory: Path | None = None) -> Path:
    """A unique hidden name `.<pid>.<random>.tmp.<name>`, ignored by every
    station scan; the pid lets the recovery sweep tell a live writer's file
    from a dead one's."""
    d = directory or path.parent
    return d / f".{os.getpid()}.{secrets.token_hex(4)}{TMP_MARKER}{path.name}"


def tmp_owner(name: str) -> int | None:
    """The writer pid of a tmp file name; 0 for a tmp name without one; None if not tmp."""
    if not (name.startswith(".") and TMP_MARKER in name):
        return None
    head = name[1:].split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def write_bytes(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Durably write `data` to `path`.

    With overwrite=False the final step is link(2), which fails with
    FileExistsError instead of replacing an existing file.
    """
    tmp = tmp_path_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()


def write_json(path: Path, obj: Any, *, overwrite: bool = True) -> None:
    write_bytes(path, dumps_json(obj), overwrite=overwrite)


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def move(src: Path, dst: Path) -> None:
    """Atomically move `src` to `dst` without replacing an existing `dst`.

    Both directories are fsynced so the move survives power loss on either
    side. Callers serialise moves with the line lock, so the existence check
    cannot race with another of our own moves.
    """
    if dst.exists():
        raise FileExistsError(f"refusing to overwrite {dst}")
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def append_line(path: Path, line: bytes) -> None:
    """Append one complete line and fsync it (O_APPEND: one write, no tearing
    between concurrent appenders for lines under PIPE_BUF)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
