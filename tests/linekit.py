"""Helpers for tests that drive a real line: roots, alloys, daemons, waiting.

Everything here uses real processes and files; waiting is polling with a
deadline (a deadline is a hang guard, not a timing assertion).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from factory.events import read_events
from factory.line import Line
from factory.protocol import STATIONS, parse_part

FAST_CONFIG = """
[daemon]
heartbeat_interval_seconds = 0.2
rescan_seconds = 0.5
stop_grace_seconds = {grace}
settle_seconds = 0.3
max_parallel_parts = {parallel}

[forge]
max_retries = {max_retries}
retry_backoff_seconds = 0
stage_timeout_seconds = {timeout}

[protocol]
version = 1
"""


def make_root(path: Path, *, max_retries: int = 3, grace: float = 10.0, timeout: float = 600.0,
              parallel: int = 1, extra: str = "") -> Path:
    """A factory root made by the real `factory init`, with a fast node
    config (`extra`: more TOML tables, appended)."""
    subprocess.run([sys.executable, "-m", "factory.cli", "init", str(path)], check=True, capture_output=True)
    (path / "factory_node.toml").write_text(FAST_CONFIG.format(grace=grace, max_retries=max_retries,
                                                               timeout=timeout, parallel=parallel) + extra)
    return path


def selftest_alloy(*, stages: int = 1, seconds: float = 0.05, steps: int = 1, outcome: str = "pass",
                   priority: int | None = None, **stage_extra) -> dict:
    alloy = {
        "name": "selftest", "version": "1.0.0",
        "source": {"baseModel": "selftest", "architecture": "selftest"},
        "stages": [{"type": "selftest", "seconds": seconds, "steps": steps, "outcome": outcome, **stage_extra}
                   for _ in range(stages)],
    }
    if priority is not None:
        alloy["priority"] = priority
    return alloy


def write_alloy(path: Path, alloy: dict) -> Path:
    path.write_text(json.dumps(alloy, indent=2) + "\n")
    return path


def factory(*args: str, root: Path | None = None, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if root is not None:
        env["FACTORY_ROOT"] = str(root)
    return subprocess.run([sys.executable, "-m", "factory.cli", *args], capture_output=True, text=True,
                          env=env, check=check, timeout=timeout)


def start_daemon(root: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "factory.cli", "run", "--root", str(root), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e)


def wait_for(predicate, *, timeout: float = 60.0, poll: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def events(root: Path, kind: str | None = None, part: str | None = None) -> list[dict]:
    evs = read_events(root / "line" / "events.jsonl")
    return [e for e in evs if (kind is None or e["kind"] == kind) and (part is None or e["part"] == part)]


def where(root: Path) -> dict[str, list[tuple[str, int]]]:
    """base -> [(station, retry)] for every alloy file on the line."""
    out: dict[str, list[tuple[str, int]]] = {}
    for s in STATIONS:
        for f in (root / "line" / s).iterdir():
            p = parse_part(f.name)
            if p:
                out.setdefault(p.base, []).append((s, p.retry))
    return out


def wait_unlocked(root: Path, timeout: float = 30.0) -> None:
    """Until no process holds the root's worker lock: after a SIGKILLed
    daemon, its children (which inherit the lock) die a moment later."""
    from factory.locks import is_locked

    lock = root / "line/.worker.lock"
    deadline = time.monotonic() + timeout
    while is_locked(lock):
        assert time.monotonic() < deadline, "a dead worker's processes still hold the root"
        time.sleep(0.05)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def line(root: Path) -> Line:
    return Line(root)


# -- hostile-environment helpers (tests/test_daemon_hardening.py, tests/test_chaos_hostile.py) --

def start_logged_daemon(root: Path, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`factory run` with its output in a file: a pipe nobody reads fills
    up (64 KiB) and blocks a daemon that logs tracebacks."""
    e = dict(os.environ, **(env or {}))
    e.pop("NOTIFY_SOCKET", None)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "factory.cli", "run", "--root", str(root), *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=e)


def drop_by_rename(root: Path, name: str, data: bytes) -> Path:
    """Hand-drop a complete file into intake/ the way the consumer contract
    allows: written beside the root (same filesystem), then one rename(2)."""
    staging = root.parent / f".{root.name}.drops"
    staging.mkdir(exist_ok=True)
    tmp = staging / name
    tmp.write_bytes(data)
    dst = root / "line" / "intake" / name
    os.rename(tmp, dst)
    return dst


@contextmanager
def tmpfs(path: Path, *, size: str, required: bool = True) -> Iterator[bool]:
    """A real tmpfs mounted at `path` (we run as root), lazily unmounted
    afterwards. Where mounting is not allowed: skip the test, or with
    required=False yield False and let the test skip just its disk phase."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        if required:
            pytest.skip(f"cannot mount a tmpfs at {path}: {r.stderr.strip() or r.returncode}")
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(directory: Path, name: str = "filler.bin") -> Path:
    """Write a file in `directory` until its filesystem says ENOSPC; returns it."""
    filler = directory / name
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
    try:  # the last partial pages, so not even a small write fits
        with open(filler, "ab", buffering=0) as f:
            while True:
                f.write(b"\0" * 512)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
    return filler


def child_pids(pid: int) -> list[int]:
    """Pids of the processes a daemon started (its parts' children)."""
    try:
        return [k.pid for k in psutil.Process(pid).children()]
    except psutil.Error:
        return []

