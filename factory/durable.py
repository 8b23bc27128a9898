"""Crash-safe file operations: every write that matters goes through here.

A write is tmp file in the same directory -> fsync -> rename -> fsync of the
directory, so after a crash a reader sees either the old file or the whole new
one, never a torn one, and the rename itself survives power loss. Temporary
names start with "." and contain ".tmp." (see tmp_path_for): every station
scan ignores them and the recovery sweep deletes those of dead writers.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp."
# The most a protocol file (alloy, sidecar, checkpoint) may hold. Real ones
# are kilobytes; a bigger one is hostile or broken and is refused unread.
MAX_PROTOCOL_FILE_BYTES = 16 * 2**20


class NotARegularFile(OSError):
    """A line file that is a symlink, FIFO, device or directory: never
    followed or read (a symlink in intake/ could point at a secret)."""


# What a file that is not regular is, in words, for every message that refuses one.
FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
              stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symbolic link"}


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is ("a FIFO (named pipe)", ...)."""
    return None if stat.S_ISREG(mode) else FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def file_mode_for(directory: Path) -> int:
    """Files get their directory's permissions minus execute, never wider:
    an operator who closes the root to other users closes its files too."""
    try:
        return stat.S_IMODE(os.stat(directory).st_mode) & 0o666
    except OSError:
        return 0o600


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory bottom-up: a
    tree written in a tmp place is on disk before it is renamed into view."""
    for dirpath, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode_for(path.parent))
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


def finite(obj: Any) -> Any:
    """`obj` with every inf/nan float replaced by None: JSON has no
    Infinity or NaN, and other programs read these files."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps_json(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text (never Infinity/NaN: non-finite floats become null)."""
    try:
        return json.dumps(obj, indent=indent, default=str, allow_nan=False)
    except ValueError:
        return json.dumps(finite(obj), indent=indent, default=str, allow_nan=False)


def write_json(path: Path, obj: Any, *, overwrite: bool = True) -> None:
    write_bytes(path, (dumps_json(obj) + "\n").encode(), overwrite=overwrite)


def _open_regular_fd(path: Path) -> int:
    """An fd on `path` if it is a regular file: never through a symlink,
    never blocking on a FIFO, never a device or directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotARegularFile(errno.ELOOP, "is a symbolic link (never followed)", str(path)) from None
        raise
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise NotARegularFile(errno.EINVAL, f"is {kind}, not a regular file", str(path))
    return fd


def open_regular(path: Path):
    """A binary reader on a regular file (see _open_regular_fd), for logs
    read in pieces."""
    return os.fdopen(_open_regular_fd(path), "rb")


def read_regular(path: Path, *, limit: int = MAX_PROTOCOL_FILE_BYTES) -> bytes:
    """The bytes of a regular file, refusing symlinks (never followed),
    FIFOs, devices and directories, and files over `limit` bytes."""
    fd = _open_regular_fd(path)
    try:
        st = os.fstat(fd)
        if st.st_size > limit:
            raise NotARegularFile(errno.EFBIG, f"is {st.st_size} bytes, over the {limit}-byte limit", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise NotARegularFile(errno.EFBIG, f"grew past the {limit}-byte limit while read", str(path))
    return data


def read_json(path: Path) -> Any:
    """A protocol file's JSON (regular files only, see read_regular)."""
    return json.loads(read_regular(path))


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
    between concurrent appenders for lines under PIPE_BUF). A last line torn
    by a crash or a short write is closed first, so this record never merges
    with it. Callers that may race hold a lock around it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 file_mode_for(path.parent))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # O_NONBLOCK: a FIFO without a reader fails, never blocks
            raise NotARegularFile(errno.EINVAL, "is not a regular file", str(path))
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:  # a nearly full disk gives a short write before ENOSPC
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.ENOSPC, "short write", str(path))
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
