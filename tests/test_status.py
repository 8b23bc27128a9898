"""`factory status` / `factory tail` and heartbeat.judge on whatever is on
disk: a malformed heartbeat or event line is flagged or skipped, never a crash;
a stalled part never looks healthy."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from factory import heartbeat as hb
from factory import status
from factory.events import utc_now
from factory.line import Line
from tests.linekit import factory


def beat(**overrides) -> dict:
    """A valid, fresh heartbeat of this (live) process."""
    b = asdict(hb.new_heartbeat(30.0))
    b.update(state="building", part="p", stage={"index": 0, "type": "selftest", "started_at": utc_now()},
             progress={"done": 2, "total": 8, "unit": "step"})
    b.update(overrides)
    return b


def write_beat(root: Path, content: bytes | dict) -> None:
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    (root / "line/.heartbeat.json").write_bytes(raw)


MALFORMED = {
    "not json": (b"{not json", "unreadable or not a JSON object"),
    "torn": (json.dumps(beat()).encode()[:40], "unreadable or not a JSON object"),
    "a list": (b"[1, 2, 3]", "unreadable or not a JSON object"),
    "a number": (b"5", "unreadable or not a JSON object"),
    "deep": (b"[" * 100_000, "unreadable or not a JSON object"),
    "empty object": ({}, "last_beat_at None is not a UTC timestamp"),
    "pid abc": (beat(pid="abc"), "pid 'abc' is not a positive integer"),
    "pid 0": (beat(pid=0), "pid 0 is not a positive integer"),
    "pid -1": (beat(pid=-1), "pid -1 is not a positive integer"),
    "pid true": (beat(pid=True), "pid True is not a positive integer"),
    "no pid": ({k: v for k, v in beat().items() if k != "pid"}, "pid None"),
    "last_beat_at 5": (beat(last_beat_at=5), "last_beat_at 5 is not a UTC timestamp"),
    "last_beat_at garbage": (beat(last_beat_at="yesterday"), "last_beat_at 'yesterday'"),
    "no last_beat_at": ({k: v for k, v in beat().items() if k != "last_beat_at"}, "last_beat_at None"),
    "state weird": (beat(state="dancing"), "state 'dancing' is not one of"),
    "host list": (beat(host=["h"]), "host ['h'] is not a string"),
    "interval string": (beat(interval_seconds="30"), "interval_seconds '30' is not a positive number"),
    "interval zero": (beat(interval_seconds=0), "interval_seconds 0"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_heartbeat_is_a_stale_worker_with_the_reason(root, case, capsys):
    content, reason = MALFORMED[case]
    write_beat(root, content)
    snap = status.gather(Line(root))
    w = snap["worker"]
    assert w["stale"] is True and w["state"] == "offline" and w["healthy"] is False
    assert reason in w["why"]
    assert w["part"] is None and w["stage"] is None and w["eta_s"] is None
    assert reason in status.plain(snap)
    status.render(snap)  # rich output must not raise either
    assert "offline" in capsys.readouterr().out
    json.dumps(snap, allow_nan=False)


def test_odd_fields_of_a_fresh_heartbeat_are_dropped_not_fatal(root, capsys):
    write_beat(root, beat(part=17, stage="zero", progress={"done": "lots", "total": None},
                          stalled=["x"], host="h\x1b[2Jx"))
    w = status.gather(Line(root))["worker"]
    assert w["stale"] is False and w["state"] == "building"
    assert (w["part"], w["stage"], w["progress"], w["stalled"], w["eta_s"]) == (None, None, None, None, None)
    assert w["host"] == "h\\x1b[2Jx"  # escaped: no terminal escape reaches the screen
    write_beat(root, beat(stage={"index": "0", "type": 5, "started_at": 3},
                          progress={"done": 1, "total": 4, "unit": 9}))
    snap = status.gather(Line(root))
    assert snap["worker"]["stage"] == {"index": None, "type": None, "started_at": None}
    assert snap["worker"]["progress"] == {"done": 1, "total": 4, "unit": ""} and snap["worker"]["eta_s"] is None
    status.render(snap)
    status.plain(snap)
    write_beat(root, beat(progress={"done": float("nan"), "total": 4}))  # json writes NaN; json reads it
    assert status.gather(Line(root))["worker"]["progress"] is None


def test_a_heartbeat_that_is_not_a_regular_file_is_never_followed(root):
    secret = root.parent / "secret.json"
    secret.write_text(json.dumps(beat()))
    (root / "line/.heartbeat.json").symlink_to(secret)
    assert hb.read(root / "line/.heartbeat.json") is None
    assert "unreadable or not a JSON object" in status.gather(Line(root))["worker"]["why"]
    (root / "line/.heartbeat.json").unlink()
    os.mkfifo(root / "line/.heartbeat.json")  # would block a reader that opened it plainly
    assert status.gather(Line(root))["worker"]["stale"] is True


def test_read_returns_only_objects(tmp_path):
    path = tmp_path / "hb.json"
    for raw in (b"[]", b"[1]", b'"text"', b"null", b"3.5", b"true", b"{", b"\xff"):
        path.write_bytes(raw)
        assert hb.read(path) is None
    path.write_text('{"pid": 1}')
    assert hb.read(path) == {"pid": 1}
    assert hb.read(tmp_path / "missing.json") is None


def test_judge_checks_every_field_it_uses():
    now = hb.beat_time(utc_now())
    good = beat()
    assert hb.judge(good, now=now).stale is False
    assert hb.judge(beat(state="offline"), now=now).reason == "the worker stopped cleanly"
    assert "limit" in hb.judge(good, now=now + 3 * 30 + 6).reason
    assert hb.judge([good], now=now).reason == "heartbeat is a JSON list, not an object"
    for bad in (beat(pid=None), beat(interval_seconds=float("nan")), beat(last_beat_at="2026-01-01T00:00:00")):
        live = hb.judge(bad, now=now)
        assert live.stale and live.reason.startswith("heartbeat unusable: ")


def test_pid_alive_never_asks_about_process_groups():
    assert hb.pid_alive(os.getpid())
    for pid in (0, -1, -os.getpid(), 2**40, True):
        assert not hb.pid_alive(pid)


def test_a_dead_pid_is_stale_at_once():
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    live = hb.judge(beat(pid=child.pid, host=socket.gethostname()))
    assert live.stale and f"worker pid {child.pid} is not running" == live.reason


# -- stalled: a fresh heartbeat is not health ------------------------------------------


def test_a_stalled_part_is_shown_everywhere(root, capsys):
    why = "part process 4242 is stopped (SIGSTOP, state T) for 12s"
    write_beat(root, beat(stalled=why))
    snap = status.gather(Line(root))
    w = snap["worker"]
    assert (w["stale"], w["state"], w["stalled"], w["healthy"]) == (False, "building", why, False)
    assert f"STALLED: {why}" in status.plain(snap).splitlines()[0]
    status.render(snap)
    assert "STALLED" in capsys.readouterr().out
    r = factory("status", "--json", root=root)
    assert r.returncode == 0 and json.loads(r.stdout)["worker"]["stalled"] == why
    r = factory("status", root=root)
    assert r.returncode == 0 and "STALLED" in r.stdout
    write_beat(root, beat())
    assert status.gather(Line(root))["worker"]["healthy"] is True


def test_the_heartbeat_carries_stalled(tmp_path):
    path = tmp_path / "hb.json"
    b = hb.new_heartbeat(1.0)
    assert b.stalled is None
    b.stalled = "SIGSTOPped"
    hb.write(path, b)
    assert hb.read(path)["stalled"] == "SIGSTOPped"


def test_a_really_stopped_process_reads_as_stalled_when_the_daemon_says_so(root):
    """The daemon (not this module) decides a part is stalled; status must
    surface it for a real SIGSTOPped process with a live pid and fresh beat."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        b = beat(pid=proc.pid, stalled=f"pid {proc.pid} stopped (SIGSTOP)")
        write_beat(root, b)
        w = status.gather(Line(root))["worker"]
        assert not w["stale"] and w["stalled"] and not w["healthy"]
    finally:
        proc.kill()
        proc.wait()


# -- the CLI on malformed files -----------------------------------------------------------


def test_status_cli_survives_malformed_heartbeats_and_outcomes(root):
    (root / "line/throughput.jsonl").write_bytes(
        b'[1]\n{"part": "x"}\n7\n{"ts": "t", "part": "y", "outcome": "finished", "retry": 0}\n{"to')
    for content in (b"[1, 2]", json.dumps(beat(pid="abc", last_beat_at=5)).encode()):
        write_beat(root, content)
        for args in (("--json",), (), ("--pretty",)):
            r = factory("status", *args, root=root)
            assert r.returncode == 0, r.stderr
            assert "Traceback" not in r.stderr
        snap = json.loads(factory("status", "--json", root=root).stdout)
        assert snap["worker"]["stale"] and [o.get("part") for o in snap["recent"]] == ["x", "y"]


def test_tail_cli_skips_malformed_event_lines(root):
    good = [{"seq": s, "ts": utc_now(), "kind": "part/claimed", "part": "p"} for s in (1, 2)]
    (root / "line/events.jsonl").write_bytes(b"\n".join([
        json.dumps(good[0]).encode(), b"[1, 2]", b"42", b'{"seq": "x"}', b'{"kind": "no seq"}',
        b'{"seq": 9, "blob": "' + b"z" * (2 * 2**20) + b'"}',
        json.dumps({"seq": 3, "kind": "part/\x1b[31mred", "part": "\x1b]0;title\x07"}).encode(),
        json.dumps(good[1] | {"seq": 4, "ratio": float("nan")}).encode(), b'{"seq": 5, "ts"']))
    r = factory("tail", "--json", root=root)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["seq"] for x in r.stdout.splitlines()] == [1, 3, 4]
    assert json.loads(r.stdout.splitlines()[-1])["ratio"] is None  # strict JSON out
    r = factory("tail", root=root)
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["1", "3", "4"]
    r = factory("tail", "--since", "3", "--json", root=root)
    assert [json.loads(x)["seq"] for x in r.stdout.splitlines()] == [4]
    assert factory("tail", "-n", "0", root=root).stdout == ""
    r = factory("tail", "-n", "-1", root=root)
    assert r.returncode == 2 and "-n/--lines -1" in r.stderr
