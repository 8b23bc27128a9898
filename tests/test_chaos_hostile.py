"""Chaos with hostile input: kills, bad alloys, malformed sidecars and a full disk at once.

tests/test_chaos.py proves the line loses and duplicates nothing when its
processes are SIGKILLed at random. This one adds what a shared node also
throws at a worker while that happens: alloys that are not JSON or fail the
schema (enqueued and hand-dropped), good alloys dropped beside torn, listed
or mistyped tickets and garbage error.json files, and (where a tmpfs can be
mounted) a phase with the root's filesystem full.

At the end: every good part is in finished/ exactly once with a result.json
whose retries match its file name; every bad one is in rework/ with an
error.json that carries a message; a part with a malformed ticket is in one
of the two, exactly once; every daemon exited 0 (SIGTERM), -9 (our SIGKILL)
or 4 (the root still held by the previous daemon's dying child), never by
itself; and seq in events.jsonl never decreases.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from factory.events import utc_now
from tests.linekit import (
    child_pids, drop_by_rename, events, factory, fill_disk, make_root, selftest_alloy, start_logged_daemon,
    tmpfs, wait_unlocked, where, write_alloy,
)

# How a daemon may end here: SIGTERM, our SIGKILL, or refused because the
# previous daemon's child still held the root for a moment.
ALLOWED_EXITS = {0, -signal.SIGKILL, 4}
# Hang guard for the whole run (a passing run takes ~40 s on 2 shared cores).
DEADLINE_SECONDS = 180.0

GOOD = selftest_alloy(stages=2, seconds=0.02, steps=2)
BAD_ALLOYS = [
    b'{"name": "x", "stages": [',  # not JSON
    json.dumps({"source": {"baseModel": "selftest"}}).encode(),  # schema: no name, version, stages
    json.dumps({**GOOD, "stages": "selftest"}).encode(),  # schema: stages is not a list
]


def _ticket(**override) -> bytes:
    return json.dumps({"enqueued_at": utc_now(), "priority": 0, "origin": "dropped", "not_before": None,
                       **override}).encode()


ODD_TICKETS = [b'{"enq', b'[]', _ticket(priority=None), _ticket(priority="high"), _ticket(not_before=7)]
GARBAGE_ERRORS = [b'{"hist', b'[1, 2]', json.dumps({"history": 5}).encode(),
                  json.dumps({"history": ["x"], "class": 3}).encode(), b'\xff\xfe not utf-8']


@dataclass(frozen=True)
class Item:
    """One part the test feeds to the line, and where it must end."""

    base: str
    expect: str  # "finished" | "rework" | "either"
    how: str  # "enqueue" | "drop" | "drop-bad" | "sidecar"
    data: bytes = b""
    sidecar: tuple[str, bytes] | None = None  # (tag, bytes) dropped before the alloy


def _items() -> list[Item]:
    good = json.dumps(GOOD).encode()
    items = [Item(f"g{i:03d}", "finished", "enqueue") for i in range(70)]
    items += [Item(f"d{i:03d}", "finished", "drop", good) for i in range(10)]
    items += [Item(f"b{i:03d}", "rework", "enqueue", BAD_ALLOYS[i % 3]) for i in range(10)]
    items += [Item(f"h{i:03d}", "rework", "drop-bad", BAD_ALLOYS[i % 3]) for i in range(6)]
    items += [Item(f"t{i:03d}", "either", "sidecar", good, ("ticket", t)) for i, t in enumerate(ODD_TICKETS)]
    items += [Item(f"e{i:03d}", "finished", "sidecar", good, ("error", e)) for i, e in enumerate(GARBAGE_ERRORS)]
    return items


class Feeder:
    """Puts items on the line the ways a node sees them arrive."""

    def __init__(self, root: Path, src: Path) -> None:
        self.root, self.src = root, src
        src.mkdir()

    def feed(self, batch: list[Item]) -> None:
        good = [it for it in batch if it.how == "enqueue" and it.expect == "finished"]
        bad = [it for it in batch if it.how == "enqueue" and it.expect == "rework"]
        if good:
            files = [str(write_alloy(self.src / f"{it.base}.alloy.json", GOOD)) for it in good]
            r = factory("enqueue", *files, root=self.root)
            assert r.returncode == 0, r.stderr
        if bad:
            files = []
            for it in bad:
                (self.src / f"{it.base}.alloy.json").write_bytes(it.data)
                files.append(str(self.src / f"{it.base}.alloy.json"))
            r = factory("enqueue", *files, root=self.root)
            assert r.returncode == 2 and r.stderr.count("rejected") == len(bad), (r.returncode, r.stderr)
        for it in batch:
            if it.how == "drop":
                drop_by_rename(self.root, f"{it.base}.alloy.json", it.data)
            elif it.how == "drop-bad":  # a plain, non-atomic write straight into intake/
                (self.root / "line/intake" / f"{it.base}.alloy.json").write_bytes(it.data)
            elif it.how == "sidecar":
                tag, raw = it.sidecar
                drop_by_rename(self.root, f"{it.base}.{tag}.json", raw)
                drop_by_rename(self.root, f"{it.base}.alloy.json", it.data)


def _unsettled(root: Path, items: list[Item]) -> dict[str, list]:
    """Parts not yet exactly once in a terminal station, with where they are."""
    placed = where(root)
    return {it.base: placed.get(it.base, []) for it in items
            if len(placed.get(it.base, [])) != 1 or placed[it.base][0][0] not in ("finished", "rework")}


def _tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _end(d, rng: random.Random) -> int:
    if d.poll() is None:
        d.send_signal(signal.SIGTERM if rng.random() < 0.15 else signal.SIGKILL)
    return d.wait(timeout=60)


def _kill_children(pid: int) -> None:
    for kid in child_pids(pid):
        try:
            os.kill(kid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_hostile_chaos_loses_nothing_and_never_stops_the_line(tmp_path):
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, size="64m", required=False) as on_tmpfs:
        root = make_root((mnt if on_tmpfs else tmp_path) / "root", max_retries=1000)
        _chaos(root, tmp_path, disk_phase=on_tmpfs)


def _chaos(root: Path, tmp_path: Path, *, disk_phase: bool) -> None:
    rng = random.Random(8)
    items = _items()
    rng.shuffle(items)
    waiting = list(items)
    feeder = Feeder(root, tmp_path / "src")
    log = tmp_path / "daemons.log"  # off the root's filesystem, so the full phase cannot eat it
    exits: list[int] = []
    full_done = not disk_phase
    rounds = 0
    deadline = time.monotonic() + DEADLINE_SECONDS
    while waiting or _unsettled(root, items):
        assert time.monotonic() < deadline, f"after {rounds} rounds, not settled: {_unsettled(root, items)}"
        rounds += 1
        if not full_done and rounds >= 3:
            # The full-disk round needs a daemon that really runs: let the last
            # round's dying child drop the root first, or this one exits 4.
            wait_unlocked(root)
        d = start_logged_daemon(root, log)
        batch = waiting[:rng.randint(4, 14)]
        waiting = waiting[len(batch):]
        feeder.feed(batch)
        time.sleep(rng.uniform(0.2, 1.2) if waiting else rng.uniform(0.5, 2.5))
        if not full_done and rounds >= 3:
            full_done = True
            filler = fill_disk(root.parent)
            time.sleep(rng.uniform(1.0, 2.0))  # the daemon and a child meet ENOSPC
            assert d.poll() is None, f"the daemon exited {d.returncode} on a full disk:\n{_tail(log)}"
            filler.unlink()
            time.sleep(0.5)
        if rng.random() < 0.4:
            _kill_children(d.pid)
            time.sleep(rng.uniform(0.0, 0.3))
        rc = _end(d, rng)
        exits.append(rc)
        assert rc in ALLOWED_EXITS, f"round {rounds}: the daemon exited {rc} by itself:\n{_tail(log)}"
    # A last clean pass finishes what the last kill interrupted.
    r = factory("run", "--until-empty", root=root, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert exits.count(-signal.SIGKILL) >= 5
    _check_outcome(root, items)


def _check_outcome(root: Path, items: list[Item]) -> None:
    placed = where(root)
    assert sorted(placed) == sorted(it.base for it in items)  # none lost, none invented
    for it in items:
        copies = placed[it.base]
        assert len(copies) == 1, f"{it.base} on the line {len(copies)} times: {copies}"
        station, retry = copies[0]
        assert it.expect in (station, "either"), f"{it.base} ({it.how}) in {station}, expected {it.expect}"
        if station == "finished":
            result = json.loads((root / "line/finished" / f"{it.base}.result.json").read_text())
            assert result["retries"] == retry, it.base
        else:
            err = json.loads((root / "line/rework" / f"{it.base}.error.json").read_text())
            assert isinstance(err.get("message"), str) and err["message"], (it.base, err)
    assert not list((root / "line/assembly").iterdir())
    assert not list((root / "line").rglob(".*.tmp.*"))
    seqs = [e["seq"] for e in events(root)]
    assert all(a <= b for a, b in zip(seqs, seqs[1:])), "seq went backwards in events.jsonl"
    finished = [e["part"] for e in events(root, "part/finished")]
    assert len(finished) == len(set(finished)), "a part/finished event repeated"
