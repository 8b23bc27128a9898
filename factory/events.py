"""events.jsonl: the line's event stream, one JSON object per line.

Several processes append (the daemon, foreman commands), so each append takes
the line's events lock. `seq` is strictly increasing per root whatever happens
to the log (rotation, a removed events.jsonl, a huge or torn line): the last
seq handed out is kept durably in `line/.events.seq` (the counter), and a new
seq is one more than the highest of the counter, the log's last line and what
this process handed out before. The file rotates by size to `events.jsonl.1`
.. `.N`; a follower notices the new inode and moves on (see `follow`).

Appending never raises OSError into the caller: the event stream is a report,
and a full disk must not turn a finished part into a crashed daemon. A failed
append is logged and the event returned; its seq is spent, never reused.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import stat
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from factory import durable, locks

log = logging.getLogger(__name__)

# Kinds in use (docs/FACTORY-PROTOCOL.md lists their payloads).
KINDS = frozenset({
    "daemon/started", "daemon/stopped", "daemon/recovery", "daemon/error",
    "part/enqueued", "part/rejected", "part/claimed", "part/recovered", "part/retried",
    "part/released", "part/deferred", "part/resumed", "part/vanished", "part/waiting",
    "part/set-aside", "part/stalled", "part/reattached",
    "part/finished", "part/rework", "part/cancelled",
    "stage/started", "stage/progress", "stage/completed", "stage/failed", "stage/skipped", "stage/handed-off",
    "model/load", "quant/file", "source/gguf",
})

HEAD = ("seq", "ts", "kind", "part")
# The largest seq a reader accepts: exact in every JSON implementation
# (doubles), and it fits the counter's 20 digits.
MAX_SEQ = 2**53 - 1
# One emitted line, newline included, is at most this long. The full text of
# a failure lives in the part's own files (error.json, child.log); an event
# only has to say what happened, and short lines keep followers and
# `tail -n` cheap.
MAX_EVENT_BYTES = 16 * 1024
# Readers skip longer lines unparsed: the writer never makes one, so such a
# line is garbage (or from a writer without the cap) and parsing it could
# take the reader's memory.
MAX_READ_LINE_BYTES = 1024 * 1024
# Backwards reads for the last line come in chunks this big (two capped lines).
_CHUNK = 2 * MAX_EVENT_BYTES
# Of an oversized line only its start is kept, enough for its seq.
_PREFIX_BYTES = 64
_SEQ_PREFIX = re.compile(rb'\{\s*"seq"\s*:\s*([1-9][0-9]{0,15})\s*,')
# Payload shrinking: strings cut to this many characters, lists to a 16th of
# it in items, each pass smaller, before giving up and keeping only the keys.
_STRING_LIMITS = (4096, 1024, 256, 64)
_KEYS_KEPT = 64
# Part names are at most 200 characters (protocol.check_base).
_HEAD_LIMIT = 256

# The counter file: 20 digits, a space, the crc32 of the digits, a newline.
# Fixed width, rewritten in place (see _store_counter).
_COUNTER_RE = re.compile(rb"(\d{20}) ([0-9a-f]{8})\n")
COUNTER_BYTES = 30


def utc_now() -> str:
    """UTC ISO-8601 with milliseconds and a Z, the protocol's one time format."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- reading lines ------------------------------------------------------------------


def parse_event(raw: bytes) -> dict | None:
    """The event a line holds, or None for anything that is not one: a torn
    line, another JSON value, a missing or non-integer seq, an oversized line."""
    if len(raw) > MAX_READ_LINE_BYTES:
        return None
    try:
        ev = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(ev, dict):
        return None
    seq = ev.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_SEQ:
        return None
    return ev


def _lines_backwards(path: Path, *, max_bytes: int | None = None) -> Iterator[tuple[bytes, bool]]:
    """(line, oversized) for the file's lines, last first, read in chunks from
    the end (at most `max_bytes` of it), so a huge line costs reading it,
    never a wrong answer. A line over MAX_READ_LINE_BYTES is not held in
    memory: only its first _PREFIX_BYTES come, flagged oversized."""
    with durable.open_regular(path) as f:
        pos = end = f.seek(0, os.SEEK_END)
        head = b""  # the start of a line that begins further back
        oversized = False  # head was dropped: that line is too long to be an event
        while pos > 0 and (max_bytes is None or end - pos < max_bytes):
            step = min(_CHUNK, pos)
            pos -= step
            f.seek(pos)
            parts = (f.read(step) + head).split(b"\n")
            if oversized:
                start = parts.pop()  # more of the oversized line; its start once a newline precedes it
                if parts or pos == 0:
                    yield start[:_PREFIX_BYTES], True
                    oversized = False
                if not parts:
                    head = b""
                    continue
            head = parts[0]
            for raw in reversed(parts[1:]):
                if raw:
                    yield raw, len(raw) > MAX_READ_LINE_BYTES
            if len(head) > MAX_READ_LINE_BYTES:
                if pos == 0:
                    yield head[:_PREFIX_BYTES], True
                head, oversized = b"", pos > 0
        if head and pos == 0:
            yield head, len(head) > MAX_READ_LINE_BYTES


def _seq_of_line(raw: bytes, oversized: bool) -> int | None:
    """The seq a line accounts for. An oversized line (from a writer without
    the size cap) is judged by its start, `{"seq": N, ...`: overestimating
    the last seq only skips numbers, while ignoring the line could repeat N."""
    if oversized:
        m = _SEQ_PREFIX.match(raw)
        return int(m[1]) if m and int(m[1]) <= MAX_SEQ else None
    ev = parse_event(raw)
    return None if ev is None else ev["seq"]


def _last_seq_of(path: Path, *, max_bytes: int | None = None) -> int | None:
    """The seq of the file's last event line (within its last `max_bytes`),
    or None."""
    try:
        for raw, oversized in _lines_backwards(path, max_bytes=max_bytes):
            seq = _seq_of_line(raw, oversized)
            if seq is not None:
                return seq
    except OSError:  # missing, or not a regular file (never followed nor read)
        return None
    return None


# -- bounding a payload ----------------------------------------------------------------


def _jsonable(value: Any, limit: int | None) -> Any:
    """`value` as plain JSON: non-finite floats become null (Infinity/NaN are
    not JSON), unknown types their str(), strings and lists cut to `limit`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v, limit) for v in value]
        cap = None if limit is None else max(1, limit // 16)
        if cap is not None and len(items) > cap:
            items = items[:cap] + [f"...[truncated {len(items) - cap} items]"]
        return items
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        return f"{text[:limit]}...[truncated {len(text) - limit} chars]"
    return text


def _dump(event: dict) -> bytes:
    return (json.dumps(event, allow_nan=False) + "\n").encode()


def encode_event(event: dict) -> tuple[bytes, dict]:
    """The line to append for `event` (at most MAX_EVENT_BYTES) and the event
    as written: the payload's strings and lists shrink until it fits; failing
    that, the payload is reduced to its keys. The head (seq, ts, kind, part)
    is never shortened below a part name's length."""
    head = _jsonable({k: event.get(k) for k in HEAD}, _HEAD_LIMIT)
    payload = {k: v for k, v in event.items() if k not in HEAD}
    try:
        for limit in (None, *_STRING_LIMITS):
            bounded = {**head, **_jsonable(payload, limit)}
            line = _dump(bounded)
            if len(line) <= MAX_EVENT_BYTES:
                return line, bounded
    except (RecursionError, ValueError):
        pass  # nested too deep (or a cycle) to be an event payload: keep its keys
    keys = list(payload)
    bounded = {**head, "truncated": {"keys": _jsonable(keys[:_KEYS_KEPT], _STRING_LIMITS[-1]),
                                     "key_count": len(keys)}}
    return _dump(bounded), bounded


# -- the durable counter -----------------------------------------------------------------


def _read_counter(path: Path) -> int | None:
    """The counter's seq; None when it is missing, torn or garbage, or not a
    regular file (never followed): the caller then trusts the logs."""
    try:
        data = durable.read_regular(path, limit=COUNTER_BYTES)
    except OSError:
        return None
    m = _COUNTER_RE.fullmatch(data)
    if not m or int(m[2], 16) != zlib.crc32(m[1]):
        return None
    return int(m[1])


def _store_counter(path: Path, seq: int) -> None:
    """Record `seq` as handed out, durably, before its line is appended.

    Rewritten in place (one fixed-width pwrite + fsync), not tmp + rename: an
    existing file needs no new block, so the counter keeps working on a full
    disk, where a rename's new file could not be written. A torn write fails
    the checksum, and the reader falls back to the logs' own last seq.
    """
    digits = f"{seq:020d}".encode()
    record = digits + f" {zlib.crc32(digits):08x}\n".encode()
    created = not os.path.lexists(path)
    mode = durable.file_mode_for(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EINVAL):
            raise
        # A symlink, FIFO or directory planted under our name: never write
        # through it; replace it with a counter of our own.
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        fd, created = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), True
    try:
        os.pwrite(fd, record, 0)
        if os.fstat(fd).st_size > COUNTER_BYTES:
            os.ftruncate(fd, COUNTER_BYTES)  # garbage was longer: shrinking needs no space
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        durable.fsync_dir(path.parent)


# -- the log -------------------------------------------------------------------------------


@dataclass
class EventLog:
    path: Path
    max_bytes: int = 64 * 1024 * 1024
    keep: int = 5
    # The highest seq this process handed out: with the disk refusing every
    # write, it is the only thing that keeps seq from repeating.
    _high: int = field(default=0, init=False, repr=False, compare=False)
    _failing: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(".events.lock")

    @property
    def seq_path(self) -> Path:
        """The counter file; for a root, the same path as Layout.event_seq."""
        return self.path.with_name(".events.seq")

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _logged_seq(self) -> int:
        """The highest last seq of events.jsonl and its rotations."""
        files = (self.path, *(self.rotated(n) for n in range(1, self.keep + 1)))
        return max((s for s in map(_last_seq_of, files) if s is not None), default=0)

    def last_seq(self) -> int:
        """The last seq handed out on this root (0 before the first event)."""
        counter = _read_counter(self.seq_path)
        return max(counter or 0, self._logged_seq(), self._high)

    def _next_seq(self) -> int:
        """One more than anything handed out; called under the events lock.
        With a valid counter only the current file's tail is read (it catches
        a writer that bypassed the counter); without one, every log."""
        counter = _read_counter(self.seq_path)
        if counter is None:
            logged = self._logged_seq()
        else:
            logged = _last_seq_of(self.path, max_bytes=2 * _CHUNK) or 0
        return max(counter or 0, logged, self._high) + 1

    def emit(self, kind: str, part: str | None = None, **payload: Any) -> dict:
        """Append one event durably and return it as written (bounded).

        Never raises OSError: a write the disk refuses (ENOSPC, EIO) is logged
        as a warning and the event is returned unwritten; its seq stays spent.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        for key in payload.keys() & set(HEAD):
            log.warning("event %s: payload key %r clashes with the event's own field; dropped", kind, key)
            del payload[key]
        event: dict = {"seq": 0, "ts": utc_now(), "kind": kind, "part": part, **payload}
        try:
            with locks.held(self.lock_path):
                event["seq"] = self._high = self._next_seq()
                written = self._append(event)
        except OSError as err:
            if not event["seq"]:  # not even the lock: still never repeat within this process
                event["seq"] = self._high = self._high + 1
            self._report_failure(kind, event["seq"], err)
            return encode_event(event)[1]
        if self._failing:
            log.warning("events: writing to %s works again (from seq %d)", self.path, event["seq"])
            self._failing = False
        return written

    def _append(self, event: dict) -> dict:
        """Spend the event's seq in the counter, then append its line."""
        line, written = encode_event(event)
        _store_counter(self.seq_path, event["seq"])  # first: a failed append never reuses the seq
        self._rotate_if_needed()
        durable.append_line(self.path, line)  # closes a line a crash tore first
        return written

    def _report_failure(self, kind: str, seq: int, err: OSError) -> None:
        """One warning when writes start failing, then debug lines until one
        succeeds: a full disk must not flood the journal once a second."""
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "events: could not write %s (seq %d) to %s: %s; the event is lost, the line goes on%s",
                kind, seq, self.path, err, "" if self._failing else " (further failures at debug level)")
        self._failing = True

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


# -- readers ---------------------------------------------------------------------------------


def _file_events(path: Path) -> Iterator[dict]:
    """A log's events, read in chunks: memory is the events, not the file."""
    try:
        f = durable.open_regular(path)
    except OSError:  # missing, or not a regular file
        return
    lines = _LineBuffer()
    with f:
        for chunk in _chunks(f):
            for raw in lines.feed(chunk):
                ev = parse_event(raw)
                if ev is not None:
                    yield ev
    ev = parse_event(lines.buf)  # a last line without its newline
    if ev is not None:
        yield ev


def _chunks(f) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


def read_events(path: Path, *, since: int = 0, keep: int = 5) -> list[dict]:
    """All valid events with seq > since, oldest first, across rotations.
    Lines that are not events (torn, not an object, no integer seq) are skipped."""
    files = [path.with_name(f"{path.name}.{n}") for n in range(keep, 0, -1)] + [path]
    return [ev for f in files for ev in _file_events(f) if ev["seq"] > since]


class _LineBuffer:
    """Bytes read from a growing file, cut into complete lines; a line longer
    than MAX_READ_LINE_BYTES is dropped as it comes, not held in memory."""

    def __init__(self) -> None:
        self.buf = b""
        self.skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        *lines, self.buf = (self.buf + data).split(b"\n")
        if self.skipping and lines:
            lines, self.skipping = lines[1:], False  # the rest of the oversized line
        if len(self.buf) > MAX_READ_LINE_BYTES:
            self.buf, self.skipping = b"", True
        return lines


def follow(path: Path, *, since: int = 0, poll: float = 0.2, keep: int = 5,
           stop: Callable[[], bool] = lambda: False) -> Iterator[dict]:
    """Yield events as they are appended, surviving rotation.

    The backlog (seq > since) comes first. Then the open file is read to its
    end; when the path names a new inode (rotation, or the file was removed)
    the old file is drained once more before switching (no one appends to it
    after the rename), and a gap in seq is filled from the rotated files, so
    nothing is lost. Lines that are not events are skipped.
    """
    last = since
    for ev in read_events(path, since=since, keep=keep):
        last = ev["seq"]
        yield ev
    f = None
    lines = _LineBuffer()

    def drain() -> Iterator[dict]:
        nonlocal last
        for raw in (line for chunk in _chunks(f) for line in lines.feed(chunk)):
            ev = parse_event(raw)
            if ev is None or ev["seq"] <= last:
                continue
            if ev["seq"] > last + 1:  # rotated past us (or a spent seq): fill the gap
                for missed in read_events(path, since=last, keep=keep):
                    if missed["seq"] < ev["seq"]:
                        yield missed
            last = ev["seq"]
            yield ev

    while not stop():
        if f is None:
            try:
                f = durable.open_regular(path)
            except OSError:
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
            f, lines = None, _LineBuffer()
            continue
        time.sleep(poll)
    if f is not None:
        f.close()
