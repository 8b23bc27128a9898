"""events.jsonl: the line's event stream, one JSON object per line.

Several processes append (the daemon, foreman commands), so each append
takes the line's events lock, reads the last `seq`, and writes seq+1: seq is
monotonic per root across processes and restarts. The file rotates by size to
`events.jsonl.1` .. `.N`; a follower notices the new inode and moves on (see
`follow`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from factory import durable, locks

# Kinds in use (docs/FACTORY-PROTOCOL.md lists their payloads).
KINDS = frozenset({
    "daemon/started", "daemon/stopped", "daemon/recovery",
    "part/enqueued", "part/rejected", "part/claimed", "part/recovered", "part/retried",
    "part/released", "part/deferred", "part/resumed",
    "part/finished", "part/rework", "part/cancelled",
    "stage/started", "stage/progress", "stage/completed", "stage/failed", "stage/skipped",
    "model/load",
})

_TAIL_BYTES = 64 * 1024


def utc_now() -> str:
    """UTC ISO-8601 with milliseconds and a Z, the protocol's one time format."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _last_seq_of(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for raw in reversed(lines):
        try:
            return int(json.loads(raw)["seq"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line after a crash: skip it
    return None


def _ends_with_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except (FileNotFoundError, OSError):
        return True  # missing or empty


@dataclass
class EventLog:
    path: Path
    max_bytes: int = 64 * 1024 * 1024
    keep: int = 5

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(".events.lock")

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def last_seq(self) -> int:
        for candidate in (self.path, *(self.rotated(n) for n in range(1, self.keep + 1))):
            seq = _last_seq_of(candidate)
            if seq is not None:
                return seq
        return 0

    def emit(self, kind: str, part: str | None = None, **payload: Any) -> dict:
        """Append one event durably and return it."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        with locks.held(self.lock_path):
            self._rotate_if_needed()
            event = {"seq": self.last_seq() + 1, "ts": utc_now(), "kind": kind, "part": part, **payload}
            line = (json.dumps(event, default=str) + "\n").encode()
            if not _ends_with_newline(self.path):
                line = b"\n" + line  # a crash tore the last line: start clean
            durable.append_line(self.path, line)
        return event

    def _rotate_if_needed(self) -> None:
        try:
            if self.path.stat().st_size < self.max_bytes:
                return
        except FileNotFoundError:
            return
        for n in range(self.keep - 1, 0, -1):
            if self.rotated(n).exists():
                os.replace(self.rotated(n), self.rotated(n + 1))
        os.replace(self.path, self.rotated(1))
        durable.fsync_dir(self.path.parent)


def read_events(path: Path, *, since: int = 0, keep: int = 5) -> list[dict]:
    """All parseable events with seq > since, oldest first, across rotations."""
    files = [path.with_name(f"{path.name}.{n}") for n in range(keep, 0, -1)] + [path]
    out: list[dict] = []
    for f in files:
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            continue
        for raw in data.splitlines():
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if ev.get("seq", 0) > since:
                out.append(ev)
    return out


def follow(path: Path, *, since: int = 0, poll: float = 0.2, keep: int = 5,
           stop: Callable[[], bool] = lambda: False) -> Iterator[dict]:
    """Yield events as they are appended, surviving rotation.

    The backlog (seq > since) comes first. Then the open file is read to its
    end; when the path names a new inode (rotation) the old file is drained
    once more before switching (no one appends to it after the rename), and a
    gap in seq is filled from the rotated files, so nothing is lost.
    """
    last = since
    for ev in read_events(path, since=since, keep=keep):
        last = ev["seq"]
        yield ev
    f = None
    buf = b""

    def drain() -> Iterator[dict]:
        nonlocal buf, last
        buf += f.read()
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if ev.get("seq", 0) <= last:
                continue
            if ev["seq"] > last + 1:  # rotated past us: fill the gap
                for missed in read_events(path, since=last, keep=keep):
                    if missed["seq"] < ev["seq"]:
                        yield missed
            last = ev["seq"]
            yield ev

    while not stop():
        if f is None:
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                time.sleep(poll)
                continue
        before = last
        yield from drain()
        if last != before:
            continue
        try:
            rotated = os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            rotated = True
        if rotated:
            yield from drain()
            f.close()
            f, buf = None, b""
            continue
        time.sleep(poll)
    if f is not None:
        f.close()
