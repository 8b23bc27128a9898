"""line/.heartbeat.json: what the worker is doing, rewritten every beat.

The daemon writes it (never the busy child), atomically. A reader judges a
heartbeat stale by its age *and* by whether its pid is alive: a fresh beat
from a dead pid (just SIGKILLed) is as stale as an old beat. A reader trusts
nothing in the file: anything malformed (not an object, a missing or
mistyped field) is judged stale with the reason, never a crash.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

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
    # Why the running part is not making progress (e.g. its process was
    # SIGSTOPped), or None: a fresh beat while "building" is not health.
    stalled: str | None = None
    # Every running part: {"part", "pid", "gpus", "started_at", "stage",
    # "progress", "stalled"}; part/stage/progress above repeat the first's.
    parts: list = field(default_factory=list)
    # A Ray dispatcher's cluster: {"backend", "address", "nodes": [{"node_id",
    # "address", "total", "available", "parts"}]}, refreshed every few seconds.
    cluster: dict | None = None


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
    """Whether a process with this pid exists. Only positive pids: kill(0)
    and kill(-1) would ask about a whole process group, or every process."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


# The reason for a worker that said goodbye (state offline): not a failure.
STOPPED_CLEANLY = "the worker stopped cleanly"


@dataclass(frozen=True)
class Liveness:
    stale: bool
    age_seconds: float | None
    reason: str


def beat_time(value: Any) -> float | None:
    """Epoch seconds of a protocol timestamp, or None when it is not one."""
    if not isinstance(value, str) or not value.endswith("Z"):
        return None
    try:
        return datetime.fromisoformat(value[:-1] + "+00:00").timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _excerpt(value: Any) -> str:
    return repr(value)[:40]


def _problem(beat: dict) -> str | None:
    """Why a heartbeat object cannot be judged, or None."""
    pid = beat.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return f"pid {_excerpt(pid)} is not a positive integer"
    if beat.get("state") not in get_args(State):
        return f"state {_excerpt(beat.get('state'))} is not one of {', '.join(get_args(State))}"
    if not isinstance(beat.get("host"), str):
        return f"host {_excerpt(beat.get('host'))} is not a string"
    interval = beat.get("interval_seconds")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval < float("inf"):
        return f"interval_seconds {_excerpt(interval)} is not a positive number"
    return None


def judge(beat: Any, *, now: float | None = None, local_host: str | None = None) -> Liveness:
    """Is the worker behind this heartbeat alive? Stale after 3 missed beats,
    at once when its pid is gone on this host, and whenever the heartbeat is
    malformed (the reason says which field)."""
    if beat is None:
        return Liveness(True, None, "no heartbeat: no worker has run on this root")
    if not isinstance(beat, dict):
        return Liveness(True, None, f"heartbeat is a JSON {type(beat).__name__}, not an object")
    ts = beat_time(beat.get("last_beat_at"))
    if ts is None:
        return Liveness(True, None, f"heartbeat unusable: last_beat_at {_excerpt(beat.get('last_beat_at'))} "
                                    "is not a UTC timestamp")
    age = (time.time() if now is None else now) - ts
    problem = _problem(beat)
    if problem:
        return Liveness(True, age, f"heartbeat unusable: {problem}")
    if beat["state"] == "offline":
        return Liveness(True, age, STOPPED_CLEANLY)
    if beat["host"] == (local_host or socket.gethostname()) and not pid_alive(beat["pid"]):
        return Liveness(True, age, f"worker pid {beat['pid']} is not running")
    limit = 3 * float(beat["interval_seconds"]) + 5
    if age > limit:
        return Liveness(True, age, f"last beat {age:.0f}s ago (limit {limit:.0f}s)")
    return Liveness(False, age, "alive")


def read(path: Path) -> dict | None:
    """The heartbeat object, or None for anything else: missing, torn, not
    JSON, not an object, not a regular file, oversized."""
    try:
        beat = durable.read_json(path)
    except (OSError, ValueError, RecursionError):
        return None
    return beat if isinstance(beat, dict) else None
