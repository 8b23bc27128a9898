"""events.jsonl: seq across processes, rotation, removal and a full disk; bounded
payloads; readers and a follower that survive rotation and garbage."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import threading
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from factory.events import (
    COUNTER_BYTES, MAX_EVENT_BYTES, MAX_READ_LINE_BYTES, EventLog, follow, parse_event, read_events,
)
from factory.protocol import Layout


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


# -- seq is durable: whatever happens to the log, it never goes back --------------------


def _seqs(path: Path, keep: int = 5) -> list[int]:
    return [e["seq"] for e in read_events(path, keep=keep)]


def test_the_counter_file_is_the_layouts():
    layout = Layout(Path("/srv/factory"))
    assert EventLog(layout.events).seq_path == layout.event_seq == Path("/srv/factory/line/.events.seq")


def test_seq_continues_after_events_jsonl_is_removed(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=4096, keep=2)
    for i in range(60):  # rotates several times: the oldest events are gone too
        log.emit("stage/progress", "p", done=i, total=60, unit="step")
    for f in tmp_path.glob("events.jsonl*"):
        f.unlink()
    assert EventLog(path).emit("daemon/started", None)["seq"] == 61  # a fresh process, no log left
    assert _seqs(path) == [61]


def test_seq_continues_after_a_line_over_64_kib_from_an_old_writer(tmp_path):
    """An old root (no counter) whose last line is huge: the old tail reader
    saw only garbage and restarted at 1."""
    path = tmp_path / "events.jsonl"
    lines = [{"seq": i, "ts": "2026-01-01T00:00:00.000Z", "kind": "part/claimed", "part": "p"} for i in (1, 2)]
    lines.append({"seq": 3, "ts": "2026-01-01T00:00:00.000Z", "kind": "stage/failed", "part": "p",
                  "message": "x" * 200_000})
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert EventLog(path).emit("part/rework", "p")["seq"] == 4
    assert _seqs(path) == [1, 2, 3, 4]


def test_a_line_too_long_to_read_still_counts_by_its_seq(tmp_path):
    """Over MAX_READ_LINE_BYTES a line is never parsed (readers skip it), yet
    its seq must not be handed out again."""
    path = tmp_path / "events.jsonl"
    huge = json.dumps({"seq": 7, "kind": "stage/failed", "message": "y" * (MAX_READ_LINE_BYTES + 10)})
    path.write_text(json.dumps({"seq": 6, "kind": "part/claimed"}) + "\n" + huge + "\n")
    assert EventLog(path).emit("part/rework", "p")["seq"] == 8
    assert _seqs(path) == [6, 8]  # the unreadable line is skipped, not fatal
    path.write_text(huge)  # the only line, no newline: the file's start is the line's start
    assert EventLog(path).emit("part/rework", "p")["seq"] == 9  # the counter (8) wins over the line (7)
    (tmp_path / ".events.seq").unlink()
    path.write_text(huge)
    assert EventLog(path).emit("part/rework", "p")["seq"] == 8


def test_an_old_root_without_a_counter_continues_from_its_logs(tmp_path):
    path = tmp_path / "events.jsonl"
    path.with_name("events.jsonl.1").write_text("".join(json.dumps({"seq": i}) + "\n" for i in range(1, 6)))
    path.write_text("".join(json.dumps({"seq": i}) + "\n" for i in (6, 7)) + '{"seq": 8, "ts"')  # torn
    ev = EventLog(path).emit("daemon/started", None)
    assert ev["seq"] == 8  # the torn line was never a delivered event
    assert (tmp_path / ".events.seq").read_bytes().startswith(b"00000000000000000008 ")
    (tmp_path / "events.jsonl").unlink()
    (tmp_path / "events.jsonl.1").unlink()
    assert EventLog(path).emit("daemon/stopped", None)["seq"] == 9  # now the counter carries it


@pytest.mark.parametrize("garbage", [b"", b"garbage\n", b"00000000000000000099 deadbeef\n",
                                     b"0000000000000", b"\x00" * 30, b"9" * 5000])
def test_a_torn_or_garbage_counter_falls_back_to_the_logs(tmp_path, garbage):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    for _ in range(3):
        log.emit("part/enqueued", "p")
    (tmp_path / ".events.seq").write_bytes(garbage)
    assert EventLog(path).emit("part/claimed", "p")["seq"] == 4
    assert EventLog(path).emit("part/finished", "p")["seq"] == 5  # and the counter is whole again
    assert len((tmp_path / ".events.seq").read_bytes()) == COUNTER_BYTES


def test_a_log_ahead_of_the_counter_wins(tmp_path):
    """A writer that bypassed the counter (an older factory on the same root)."""
    path = tmp_path / "events.jsonl"
    EventLog(path).emit("part/enqueued", "p")
    with open(path, "a") as f:
        f.write(json.dumps({"seq": 40, "kind": "part/claimed"}) + "\n")
    assert EventLog(path).emit("part/finished", "p")["seq"] == 41


def test_a_symlinked_counter_is_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious\n")
    line_dir = tmp_path / "line"
    line_dir.mkdir()
    (line_dir / ".events.seq").symlink_to(outside)
    log = EventLog(line_dir / "events.jsonl")
    assert [log.emit("part/enqueued", "p")["seq"] for _ in range(2)] == [1, 2]
    assert outside.read_bytes() == b"precious\n"
    assert not (line_dir / ".events.seq").is_symlink()


# -- payloads: bounded, strict JSON ---------------------------------------------------


def _strict(raw: bytes) -> dict:
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")
    return json.loads(raw, parse_constant=refuse)


def test_a_huge_string_is_truncated_with_a_marker(tmp_path):
    path = tmp_path / "events.jsonl"
    message = "boom " * 40_000  # 200,000 chars: a traceback-sized message
    ev = EventLog(path).emit("stage/failed", "p", stage={"index": 0, "type": "x"}, message=message)
    raw = path.read_bytes()
    assert len(raw) <= MAX_EVENT_BYTES
    written = _strict(raw)
    assert written == ev and written["stage"] == {"index": 0, "type": "x"}
    m = re.fullmatch(r"(.*)\.\.\.\[truncated (\d+) chars\]", written["message"], re.S)
    assert m and message.startswith(m[1]) and len(m[1]) + int(m[2]) == len(message)


def test_a_payload_that_cannot_shrink_enough_keeps_its_keys(tmp_path):
    path = tmp_path / "events.jsonl"
    metrics = {f"metric_{i}": i for i in range(5000)}
    wide = {f"k{i}": i for i in range(3000)}
    ev = EventLog(path).emit("stage/completed", "a-part", stage={"index": 1}, metrics=metrics, **wide)
    raw = path.read_bytes()
    assert len(raw) <= MAX_EVENT_BYTES
    written = _strict(raw)
    assert written == ev
    assert (written["seq"], written["kind"], written["part"]) == (1, "stage/completed", "a-part")
    assert written["truncated"]["key_count"] == 3002
    assert written["truncated"]["keys"][:3] == ["stage", "metrics", "k0"]


def test_long_lists_and_deep_nesting_are_bounded(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.emit("daemon/recovery", None, actions=[f"moved part-{i} back to intake" for i in range(5000)])
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    log.emit("model/load", "p", plan=deep)
    first, second = path.read_bytes().splitlines()
    assert len(first) < MAX_EVENT_BYTES and len(second) < MAX_EVENT_BYTES
    actions = _strict(first)["actions"]
    assert actions[0] == "moved part-0 back to intake" and re.fullmatch(r"\.\.\.\[truncated \d+ items\]", actions[-1])
    assert _strict(second)["truncated"] == {"keys": ["plan"], "key_count": 1}


def test_non_finite_floats_are_written_as_null(tmp_path):
    path = tmp_path / "events.jsonl"
    ev = EventLog(path).emit("stage/completed", "p", elapsed_s=float("inf"),
                             metrics={"ratio": float("nan"), "ppl": [1.5, float("-inf")]}, where=Path("/x"))
    written = _strict(path.read_bytes())
    assert written["elapsed_s"] is None and written["metrics"] == {"ratio": None, "ppl": [1.5, None]}
    assert written["where"] == "/x" and written == ev


def test_a_payload_key_cannot_overwrite_the_head(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.emit("part/enqueued", "p")
    ev = log.emit("model/load", "p", seq=1, ts="then", dtype="bf16")
    assert (ev["seq"], ev["dtype"]) == (2, "bf16") and ev["ts"] != "then"
    assert _seqs(path) == [1, 2]


def test_the_daemons_new_kinds_are_known(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("part/vanished", "p", station="assembly", message="bundle gone")
    log.emit("part/waiting", "p", reason="disk", needed_bytes=10, free_bytes=1, tier="hot")
    log.emit("part/set-aside", None, file="x.alloy.json", station="intake", message="symlink")
    log.emit("daemon/error", None, message="boom", where="loop")
    log.emit("part/stalled", "p", pid=123, state="T", message="stopped")
    assert [e["kind"] for e in read_events(tmp_path / "events.jsonl")] == [
        "part/vanished", "part/waiting", "part/set-aside", "daemon/error", "part/stalled"]
    with pytest.raises(ValueError, match="unknown event kind"):
        log.emit("part/teleported", "p")


# -- readers: anything that is not an event is skipped ----------------------------------

HOSTILE_LINES = [b"[1, 2]", b"42", b'"seq"', b"null", b'{"no": "seq"}', b'{"seq": "7"}', b'{"seq": true}',
                 b'{"seq": 0}', b'{"seq": -3}', b'{"seq": 1.5}', b'{"seq": 99999999999999999999999}', b"[" * 100_000, b"\xff\xfe not utf-8",
                 b'{"seq": 9, "kind": "x", "blob": "' + b"z" * (MAX_READ_LINE_BYTES + 1) + b'"}']


def _hostile_log(path: Path) -> None:
    good = [json.dumps({"seq": s, "kind": "part/claimed", "part": "p"}).encode() for s in (1, 2, 3)]
    path.write_bytes(b"\n".join([good[0], *HOSTILE_LINES, good[1], *HOSTILE_LINES, good[2]])
                     + b'\n{"seq": 4, "kind": "par')


def test_read_events_skips_what_is_not_an_event(tmp_path):
    path = tmp_path / "events.jsonl"
    _hostile_log(path)
    assert _seqs(path) == [1, 2, 3]
    assert [e["seq"] for e in read_events(path, since=1)] == [2, 3]
    assert EventLog(path).emit("part/finished", "p")["seq"] == 4
    assert _seqs(path) == [1, 2, 3, 4]


def test_follow_skips_what_is_not_an_event_and_keeps_following(tmp_path):
    path = tmp_path / "events.jsonl"
    _hostile_log(path)
    log = EventLog(path)
    seen: list[int] = []
    done = threading.Event()

    def reader():
        for ev in follow(path, poll=0.005, stop=done.is_set):
            seen.append(ev["seq"])
            if ev["seq"] == 6:
                return

    t = threading.Thread(target=reader)
    t.start()
    log.emit("part/finished", "p")  # 4
    with open(path, "ab") as f:  # garbage arriving while followed, a huge line among it
        f.write(b"\n".join(HOSTILE_LINES) + b"\n")
    log.emit("part/claimed", "q")  # 5
    log.emit("part/finished", "q")  # 6
    t.join(timeout=30)
    done.set()
    assert seen == [1, 2, 3, 4, 5, 6]


# -- a disk that refuses writes ----------------------------------------------------------


@contextmanager
def small_tmpfs(where: Path, size: str = "64k"):
    """A real tmpfs of `size` (root only); skips where mounting is not allowed."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(path: Path) -> None:
    """Write until the filesystem refuses a single byte more."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (b"x" * 4096, b"x"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def test_a_full_disk_never_raises_and_seq_never_repeats(tmp_path, caplog):
    with small_tmpfs(tmp_path / "small") as mnt:
        path = mnt / "events.jsonl"
        log = EventLog(path)
        returned = [log.emit("stage/progress", "p", done=i)["seq"] for i in range(3)]
        _fill(mnt / "filler")
        with caplog.at_level(logging.DEBUG, logger="factory.events"):
            during = [log.emit("stage/progress", "p", done=i, note="n" * 3000)["seq"] for i in range(12)]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
        assert "could not write stage/progress" in warnings[0].getMessage()
        (mnt / "filler").unlink()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="factory.events"):
            after = [log.emit("part/finished", "p")["seq"] for _ in range(3)]
        assert "works again" in caplog.text
        fresh = EventLog(path).emit("daemon/stopped", None)["seq"]  # another process, same root
        returned += during + after + [fresh]
        assert returned == sorted(set(returned))  # strictly increasing, no repeats
        assert fresh == after[-1] + 1
        on_disk = _seqs(path)
        assert on_disk == sorted(set(on_disk)) and set(on_disk) <= set(returned)
        assert set(returned[:3] + after + [fresh]) <= set(on_disk)
        for raw in path.read_bytes().splitlines():  # torn lines from the full disk are isolated
            assert raw == b"" or parse_event(raw) is not None or not raw.endswith(b"}")


def test_a_read_only_disk_never_raises(tmp_path, caplog):
    with small_tmpfs(tmp_path / "small") as mnt:
        path = mnt / "events.jsonl"
        log = EventLog(path)
        log.emit("daemon/started", None)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        try:
            with caplog.at_level(logging.WARNING, logger="factory.events"):
                lost = [log.emit("part/claimed", "p")["seq"] for _ in range(3)]
            assert lost == [2, 3, 4] and "Read-only file system" in caplog.text
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert log.emit("part/finished", "p")["seq"] == 5
        assert _seqs(path) == [1, 5]


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_counter_that_is_not_a_regular_file_is_replaced_and_events_go_on(tmp_path, kind):
    from factory.events import EventLog, read_events

    log = EventLog(tmp_path / "events.jsonl")
    log.emit("daemon/started", None)
    counter = tmp_path / ".events.seq"
    counter.unlink()
    if kind == "fifo":
        os.mkfifo(counter)
    else:
        counter.mkdir()
    log.emit("daemon/stopped", None)
    assert [e["seq"] for e in read_events(tmp_path / "events.jsonl")] == [1, 2]
    assert counter.is_file()
