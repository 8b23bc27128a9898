"""line/.heartbeat.json: what the worker is doing, rewritten every beat.

The daemon writes it (never the busy child), atomically. A reader judges a
heartbeat stale by its age *and* by whether its pid is alive: a fresh beat
from a dead pid (just SIGKILLed) is as stale as an old beat.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from factory import __version__, durable
from factory.events import utc_now
from factory.protocol import PROTOCOL_VERSION

State = Literal["starting", "idle", "building", "stopping", "offline"]


@dataclass
class Progress:
    done: float
    total: float | None
    unit: str


@dataclass
class Heartbeat:
    pid: int
    host: str
    state: State
    started_at: str
    last_beat_at: str
    interval_seconds: float
    part: str | None = None
    stage: dict | None = None  # {"index": i, "type": t, "started_at": ts}
    progress: Progress | None = None
    versions: dict = field(default_factory=dict)


def versions() -> dict:
    return {
        "factory": __version__,
        "protocol": PROTOCOL_VERSION,
        "python": platform.python_version(),
    }


def new_heartbeat(interval: float) -> Heartbeat:
    now = utc_now()
    return Heartbeat(pid=os.getpid(), host=socket.gethostname(), state="starting", started_at=now,
                     last_beat_at=now, interval_seconds=interval, versions=versions())


def write(path: Path, beat: Heartbeat) -> None:
    beat.last_beat_at = utc_now()
    durable.write_json(path, asdict(beat))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Liveness:
    stale: bool
    age_seconds: float | None
    reason: str


def judge(beat: dict | None, *, now: float | None = None, local_host: str | None = None) -> Liveness:
    """Is the worker behind this heartbeat alive? Stale after 3 missed beats,
    or at once when its pid is gone on this host."""
    if not beat:
        return Liveness(True, None, "no heartbeat: no worker has run on this root")
    now = time.time() if now is None else now
    ts = datetime.fromisoformat(beat["last_beat_at"].replace("Z", "+00:00")).timestamp()
    age = now - ts
    if beat.get("state") == "offline":
        return Liveness(True, age, "worker stopped cleanly (state offline)")
    if beat.get("host") == (local_host or socket.gethostname()) and not pid_alive(int(beat["pid"])):
        return Liveness(True, age, f"worker pid {beat['pid']} is not running")
    limit = 3 * float(beat.get("interval_seconds", 30)) + 5
    if age > limit:
        return Liveness(True, age, f"last beat {age:.0f}s ago (limit {limit:.0f}s)")
    return Liveness(False, age, "alive")


def read(path: Path) -> dict | None:
    try:
        return durable.read_json(path)
    except (FileNotFoundError, ValueError):
        return None


