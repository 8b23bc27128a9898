"""events.jsonl: seq across processes, rotation, and a follower that survives it."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from factory.events import EventLog, follow, read_events


def _emit_many(args: tuple[str, int]) -> None:
    path, n = args
    log = EventLog(Path(path), max_bytes=8192, keep=50)
    for i in range(n):
        log.emit("part/enqueued", f"w{i}", origin="test", priority=0, bytes=i)


def test_seq_is_monotonic_across_processes_and_rotations(tmp_path):
    path = tmp_path / "events.jsonl"
    with ProcessPoolExecutor(max_workers=4) as pool:
        list(pool.map(_emit_many, [(str(path), 100)] * 4))
    assert path.with_name("events.jsonl.1").exists()  # it did rotate
    evs = read_events(path, keep=50)
    assert [e["seq"] for e in evs] == list(range(1, 401))
    assert all(e["ts"].endswith("Z") and len(e["ts"]) == 24 for e in evs)


def test_follower_survives_rotation_and_misses_nothing(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=2048, keep=20)
    log.emit("daemon/started", None, pid=1)
    seen: list[int] = []
    done = threading.Event()

    def reader():
        for ev in follow(path, poll=0.005, keep=20, stop=done.is_set):
            seen.append(ev["seq"])
            if ev["seq"] == 301:
                return

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        log.emit("stage/progress", "p", done=i, total=300, unit="step")
    t.join(timeout=60)
    done.set()
    assert seen == list(range(1, 302))
    assert len(list(tmp_path.glob("events.jsonl.*"))) >= 5


def test_torn_last_line_is_skipped_and_the_next_event_starts_clean(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.emit("daemon/started", None)
    with open(path, "ab") as f:
        f.write(b'{"seq": 2, "ts": "2026-')  # a crash mid-write
    ev = log.emit("daemon/stopped", None)
    assert ev["seq"] == 2  # the torn line's seq never counted
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[-1])["kind"] == "daemon/stopped"
    assert [e["seq"] for e in read_events(path)] == [1, 2]
