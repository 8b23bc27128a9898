"""A hive node under hostile input and a hostile environment: one test per defect.

Each test drives the real CLI (`python -m factory.cli ...`) and a real
`factory run` daemon, breaks one thing on purpose (bad alloys in a row,
malformed sidecars, a file where a directory belongs, odd signals, a full
disk, the part's file edited, deleted or swapped for a symlink, a stopped or
killed process), and asserts two things beside the defect's own outcome: the
daemon never exits outside its documented codes (0 clean stop, 4 root held,
5 unusable root, 78 bad node config), and it still builds a good part
enqueued afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from factory.events import utc_now
from tests.linekit import (
    child_pids, drop_by_rename, events, factory, fill_disk, line, make_root, selftest_alloy,
    start_logged_daemon, stop, tmpfs, wait_for, where, write_alloy,
)

# Hang guard for one wait (never a timing assertion: 2 shared cores).
WAIT = 90.0
# A Linux real-time signal with no name in Python's signal.Signals: SIGRTMIN+6 (glibc SIGRTMIN is 34).
RT_SIGNAL = 40


# -- helpers ------------------------------------------------------------------------


def _tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no daemon log)"


def _serve(root: Path, log: Path, **kw) -> subprocess.Popen:
    """A running daemon, returned once it has announced itself."""
    d = start_logged_daemon(root, log, **kw)
    _until(lambda: any(e.get("pid") == d.pid for e in events(root, "daemon/started")), d, log, "daemon start")
    return d


def _until(predicate, d: subprocess.Popen, log: Path, what: str, timeout: float = WAIT):
    """wait_for, failing at once (with the daemon's log) if the daemon exits meanwhile."""
    def check():
        if d.poll() is not None:
            raise AssertionError(f"the daemon exited {d.returncode} while waiting for {what}:\n{_tail(log)}")
        return predicate()
    return wait_for(check, timeout=timeout, what=what)


def _alive(d: subprocess.Popen, log: Path) -> None:
    assert d.poll() is None, f"the daemon exited {d.returncode}:\n{_tail(log)}"


def _stop_cleanly(d: subprocess.Popen, log: Path) -> None:
    _alive(d, log)
    rc = stop(d)
    assert rc == 0, f"SIGTERM: the daemon exited {rc}, not 0:\n{_tail(log)}"


def _kill(d: subprocess.Popen) -> None:
    """Teardown: never leave a daemon (or a stopped child) behind."""
    for pid in child_pids(d.pid):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    if d.poll() is None:
        d.kill()
        d.wait(timeout=30)


def _terminal(root: Path, base: str) -> str | None:
    copies = where(root).get(base, [])
    return copies[0][0] if len(copies) == 1 and copies[0][0] in ("finished", "rework") else None


def _enqueue(root: Path, src: Path, alloy: dict) -> None:
    write_alloy(src, alloy)
    r = factory("enqueue", str(src), root=root)
    assert r.returncode == 0, r.stderr


def _good_part_finishes(root: Path, tmp_path: Path, d: subprocess.Popen, log: Path, name: str = "after") -> None:
    """The line still serves: a good part enqueued now ends in finished/."""
    _enqueue(root, tmp_path / f"{name}.alloy.json", selftest_alloy(seconds=0))
    _until(lambda: _terminal(root, name), d, log, f"{name} to reach a terminal station")
    assert where(root)[name] == [("finished", 0)], (where(root)[name], _tail(log))


def _first_stage_started(root: Path, base: str) -> bool:
    return any(e["stage"]["index"] == 0 for e in events(root, "stage/started", base))


def _error(root: Path, station: str, base: str) -> dict:
    return json.loads((root / "line" / station / f"{base}.error.json").read_text())


# -- 1. bad alloys in a row -------------------------------------------------------------


BAD_ALLOYS = [
    b'{"stages": [ {"type": "selftest", }',  # invalid JSON
    json.dumps({"source": {"baseModel": "selftest"}}).encode(),  # schema: no name, version, stages
]


def test_twenty_bad_alloys_in_a_row_never_stop_the_daemon(root, tmp_path):
    log = tmp_path / "daemon.log"
    d = _serve(root, log)
    try:
        bad, good = [], []
        for i in range(20):
            raw = BAD_ALLOYS[i % 2]
            src = tmp_path / f"bad-e{i:02d}.alloy.json"
            src.write_bytes(raw)
            r = factory("enqueue", str(src), root=root)
            assert r.returncode == 2 and "rejected" in r.stderr, (r.returncode, r.stdout, r.stderr)
            # A hand copy (not atomic) of the same bytes straight into intake/.
            (root / "line/intake" / f"bad-h{i:02d}.alloy.json").write_bytes(raw)
            bad += [f"bad-e{i:02d}", f"bad-h{i:02d}"]
            if i % 4 == 3:
                _enqueue(root, tmp_path / f"good{i:02d}.alloy.json", selftest_alloy(seconds=0))
                good.append(f"good{i:02d}")
        _until(lambda: all(_terminal(root, b) for b in bad + good), d, log, "every part terminal")
        placed = where(root)
        for base in good:
            assert placed[base] == [("finished", 0)], base
        for base in bad:
            assert placed[base] == [("rework", 0)], base
            err = _error(root, "rework", base)
            assert err["class"] == "deterministic" and err["stage"]["type"] == "intake"
            assert err["message"] and err["problems"], (base, err)
        _good_part_finishes(root, tmp_path, d, log)
        _stop_cleanly(d, log)
    finally:
        _kill(d)


# -- 2. malformed ticket sidecars ----------------------------------------------------------


def _ticket(**override) -> bytes:
    return json.dumps({"enqueued_at": utc_now(), "priority": 0, "origin": "dropped", "not_before": None,
                       **override}).encode()


BAD_TICKETS = {
    "torn": b'{"enq',
    "list": b'[{"priority": 1}]',
    "null-priority": _ticket(priority=None),
    "word-priority": _ticket(priority="high"),
    "number-not-before": _ticket(not_before=12),
}


@pytest.mark.parametrize("kind", sorted(BAD_TICKETS))
def test_malformed_ticket_beside_a_good_alloy_never_stops_the_line(root, tmp_path, kind):
    log = tmp_path / "daemon.log"
    d = _serve(root, log)
    try:
        base = f"tk-{kind}"
        # The ticket is there first, so the daemon never writes its own: it must read ours.
        drop_by_rename(root, f"{base}.ticket.json", BAD_TICKETS[kind])
        drop_by_rename(root, f"{base}.alloy.json", json.dumps(selftest_alloy(seconds=0)).encode())
        # Either outcome is acceptable: set aside with a reason that names
        # the ticket, or run with the default priority.
        station = _until(lambda: _terminal(root, base), d, log, f"{base} to reach a terminal station")
        if station == "rework":
            err = _error(root, "rework", base)
            assert "ticket" in err["message"], err
        else:
            assert (root / "line/finished" / f"{base}.result.json").is_file()
        _good_part_finishes(root, tmp_path, d, log)
        _stop_cleanly(d, log)
    finally:
        _kill(d)


# -- 3. a file where the work directory belongs ---------------------------------------------


def test_plain_file_at_work_dir_sends_that_part_to_rework_naming_the_path(root, tmp_path):
    blocker = root / "work" / "wb"
    blocker.write_text("an operator's notes, not a directory\n")
    _enqueue(root, tmp_path / "wb.alloy.json", selftest_alloy(seconds=0))
    log = tmp_path / "daemon.log"
    d = _serve(root, log)
    try:
        assert _until(lambda: _terminal(root, "wb"), d, log, "wb to reach a terminal station") == "rework"
        err = _error(root, "rework", "wb")
        assert "work/wb" in err["message"], err
        assert blocker.read_text() == "an operator's notes, not a directory\n"  # nothing lost
        _good_part_finishes(root, tmp_path, d, log)
        _stop_cleanly(d, log)
    finally:
        _kill(d)


# -- 4. a real-time signal ends the child ------------------------------------------------


def test_child_ended_by_a_realtime_signal_is_an_infrastructure_failure(root, tmp_path):
    _enqueue(root, tmp_path / "rt.alloy.json", selftest_alloy(seconds=2.0, steps=20))
    log = tmp_path / "daemon.log"
    d = _serve(root, log)
    try:
        _until(lambda: _first_stage_started(root, "rt"), d, log, "rt's stage to start")
        kids = child_pids(d.pid)
        assert len(kids) == 1
        os.kill(kids[0], RT_SIGNAL)
        failed = _until(lambda: events(root, "stage/failed", "rt"), d, log, "rt's stage/failed event")[0]
        assert failed["failure_class"] == "infrastructure"
        assert "40" in failed["message"] or "SIGRTMIN+6" in failed["message"], failed
        assert _until(lambda: _terminal(root, "rt"), d, log, "rt to reach a terminal station") == "finished"
        assert where(root)["rt"] == [("finished", 1)]  # one retry spent, then built
        err = _error(root, "finished", "rt")
        assert err["class"] == "infrastructure" and err["message"] == failed["message"]
        _good_part_finishes(root, tmp_path, d, log)
        _stop_cleanly(d, log)
    finally:
        _kill(d)


# -- 5. a full disk before the first heartbeat ----------------------------------------------


@pytest.mark.parametrize("history", ["fresh", "restarted"])
def test_full_disk_at_start_up_does_not_crash_the_daemon(tmp_path, history):
    """"fresh": nothing of the worker's is on disk yet (no lock file, no
    heartbeat); "restarted": a worker ran here before the disk filled (the
    systemd restart after a crash), so the first write to fail is the
    heartbeat's, before the recovery sweep."""
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, size="16m"):
        root = make_root(mnt / "root")
        if history == "restarted":
            _enqueue(root, tmp_path / "g0.alloy.json", selftest_alloy(seconds=0))
            r = factory("run", "--until-empty", root=root, timeout=WAIT)
            assert r.returncode == 0 and where(root)["g0"] == [("finished", 0)], r.stdout + r.stderr
        _enqueue(root, tmp_path / "g1.alloy.json", selftest_alloy(seconds=0))
        filler = fill_disk(mnt)
        log = tmp_path / "daemon.log"  # outside the full filesystem
        d = start_logged_daemon(root, log)
        try:
            # Ten heartbeat intervals with nowhere to write: a hold, not a
            # speed limit. A daemon that dies on ENOSPC has exited by now.
            try:
                rc = d.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                rc = None
            assert rc is None, f"the daemon exited {rc} on a full disk:\n{_tail(log)}"
            filler.unlink()
            _until(lambda: _terminal(root, "g1"), d, log, "g1 to reach a terminal station once room returned")
            assert where(root)["g1"] == [("finished", 0)]
            _good_part_finishes(root, tmp_path, d, log, name="g2")
            _stop_cleanly(d, log)
        finally:
            _kill(d)


# -- 6. the alloy edited while it runs -------------------------------------------------


def test_alloy_edited_in_assembly_mid_run_finishes_as_claimed(root, tmp_path):
    src = write_alloy(tmp_path / "ed.alloy.json", selftest_alloy(stages=2, seconds=1.0, steps=10))
    at_claim = hashlib.sha256(src.read_bytes()).hexdigest()
    assert factory("enqueue", str(src), root=root).returncode == 0
    log = tmp_path / "daemon.log"
    d = _serve(root, log)
    running = root / "line/assembly/ed.alloy.json"
    try:
        # First edit: the part's process is frozen as soon as it exists (it
        # is still importing), so it cannot have read the file yet.
        kid = _until(lambda: child_pids(d.pid), d, log, "ed's process to start")[0]
        os.kill(kid, signal.SIGSTOP)
        try:
            running.write_text(json.dumps(selftest_alloy(stages=1, outcome="fail")))  # in place, same inode
        finally:
            os.kill(kid, signal.SIGCONT)
        # Second edit while stage 0 runs: not even JSON now.
        _until(lambda: _first_stage_started(root, "ed"), d, log, "ed's stage 0 to start")
        running.write_text('{"stages": "gone"')
        assert _until(lambda: _terminal(root, "ed"), d, log, "ed to reach a terminal station") == "finished"
        result = json.loads((root / "line/finished/ed.result.json").read_text())
        assert result["alloy_sha256"].removeprefix("sha256:") == at_claim
        assert [s["index"] for s in result["stages"]] == [0, 1]  # the claimed recipe ran, not an edit
        _good_part_finishes(root, tmp_path, d, log)
        _stop_cleanly(d, log)
    finally:
        _kill(d)


# -- 7. the alloy deleted while it runs ----------------------------------------------------


def test_alloy_deleted_from_assembly_mid_run_is_reported_and_the_line_goes_on(root, tmp_path):
    _enqueue(root, tmp_path / "gone.alloy.json", selftest_alloy(stages=2, seconds=1.0, steps=10))
    log = tmp_path / "daemon.log"
    d = _serve(root, log)
    try:
        _until(lambda: _first_stage_started(root, "gone"), d, log, "gone's stage 0 to start")
        (root / "line/assembly/gone.alloy.json").unlink()
        _until(lambda: events(root, "part/vanished", "gone"), d, log, "a part/vanished event for gone")
        assert "gone" not in where(root)
        _good_part_finishes(root, tmp_path, d, log)
        _stop_cleanly(d, log)
    finally:
        _kill(d)


# -- 8. a symlink out of the root --------------------------------------------------------


SECRET = "SECRET-TOKEN-123"


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    """Every regular file under `root` (symlinks not followed) whose bytes contain `needle`."""
    hits = []
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            if needle in path.read_bytes():
                hits.append(path)
    return hits


def test_symlink_dropped_into_intake_is_never_followed(root, tmp_path):
    secret = tmp_path / "outside" / "credentials"
    secret.parent.mkdir()
    secret.write_text(f"{SECRET}\n{{")
    secret.chmod(0o600)
    log = tmp_path / "daemon.log"
    d = _serve(root, log)
    try:
        link = root / "line/intake/evil.alloy.json"
        os.symlink(secret, link)
        # Enqueued after the drop: the scan that claims it has seen the link.
        _good_part_finishes(root, tmp_path, d, log)
        _alive(d, log)
        assert _files_holding(root, SECRET.encode()) == []
        assert SECRET not in log.read_text(errors="replace")  # nor echoed to the journal
        assert secret.read_text() == f"{SECRET}\n{{" and not secret.is_symlink()  # the target untouched
        assert not (root / "work" / "evil").exists()  # never run
        assert "finished" not in [s for s, _ in where(root).get("evil", [])]
        _stop_cleanly(d, log)
    finally:
        _kill(d)


# -- 9. a stopped child ------------------------------------------------------------------


def _stalled(root: Path):
    r = factory("status", "--json", root=root)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["worker"].get("stalled")


def test_sigstopped_child_shows_as_stalled_and_finishes_after_sigcont(root, tmp_path):
    _enqueue(root, tmp_path / "st.alloy.json", selftest_alloy(seconds=3.0, steps=30))
    log = tmp_path / "daemon.log"
    d = _serve(root, log)
    try:
        _until(lambda: events(root, "stage/progress", "st"), d, log, "st's first progress")
        kid = child_pids(d.pid)[0]
        os.kill(kid, signal.SIGSTOP)
        try:
            stalled = _until(lambda: _stalled(root), d, log, "factory status to report the worker stalled")
            assert stalled, stalled
        finally:
            os.kill(kid, signal.SIGCONT)
        assert _until(lambda: _terminal(root, "st"), d, log, "st to reach a terminal station") == "finished"
        assert where(root)["st"] == [("finished", 0)]
        assert not _stalled(root)
        _good_part_finishes(root, tmp_path, d, log)
        _stop_cleanly(d, log)
    finally:
        _kill(d)


# -- 10. the daemon SIGKILLed mid-part -------------------------------------------------


def test_daemon_killed_after_progress_costs_the_part_no_retry(root, tmp_path):
    _enqueue(root, tmp_path / "k.alloy.json", selftest_alloy(stages=3, seconds=0.6, steps=3))
    log = tmp_path / "daemon.log"
    d = _serve(root, log)
    try:
        _until(lambda: any(e["stage"]["index"] == 1 for e in events(root, "stage/started", "k")), d, log,
               "k's stage 1 to start (stage 0 done)")
        kid = child_pids(d.pid)[0]
        d.kill()
        assert d.wait(timeout=30) == -signal.SIGKILL
    finally:
        _kill(d)
    # The child dies with the daemon (PDEATHSIG): no orphan keeps building.
    wait_for(lambda: not psutil.pid_exists(kid) or psutil.Process(kid).status() == psutil.STATUS_ZOMBIE,
             timeout=WAIT, what="the orphaned child to die")
    r = factory("run", "--until-empty", root=root, timeout=WAIT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert where(root) == {"k": [("finished", 0)]}
    result = json.loads((root / "line/finished/k.result.json").read_text())
    assert result["retries"] == 0
    assert [e["stage"]["index"] for e in events(root, "stage/skipped", "k")] == [0]  # resumed, not redone


# -- 11. `factory demo` beside a live root ------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_demo_with_factory_root_set_never_touches_that_root(root, tmp_path):
    _enqueue(root, tmp_path / "queued.alloy.json", selftest_alloy(seconds=0))
    before = _snapshot(root)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, FACTORY_ROOT=str(root), TMPDIR=str(scratch))
    env.pop("NOTIFY_SOCKET", None)
    r = subprocess.run([sys.executable, "-m", "factory.cli", "demo"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert _snapshot(root) == before  # the queued part, its ticket, the events: all as they were
    assert where(root) == {"queued": [("intake", 0)]}
    demo_results = list(scratch.glob("*/line/finished/*.result.json"))
    assert len(demo_results) == 1, sorted(str(p) for p in scratch.rglob("*.result.json"))


# -- 12. ENOSPC inside a stage ---------------------------------------------------------------


def test_stage_hitting_enospc_waits_for_room_without_spending_a_retry(root, tmp_path):
    # work/ on its own small tmpfs (it is not a station, so the line's
    # one-filesystem rule allows it): only the part's own writes, the
    # selftest stage's selftest.json among them, meet the full disk.
    work = root / "work"
    with tmpfs(work, size="4m"):
        _enqueue(root, tmp_path / "full.alloy.json", selftest_alloy(seconds=1.5, steps=15))
        log = tmp_path / "daemon.log"
        d = _serve(root, log)
        try:
            _until(lambda: _first_stage_started(root, "full"), d, log, "full's stage to start")
            filler = fill_disk(work)
            _until(lambda: events(root, "part/waiting", "full"), d, log, "a part/waiting event for full")
            assert all(retry == 0 for _, retry in where(root)["full"])
            assert not events(root, "part/retried", "full") and not events(root, "part/rework", "full")
            filler.unlink()
            assert _until(lambda: _terminal(root, "full"), d, log, "full to finish once room returned") == "finished"
            assert where(root)["full"] == [("finished", 0)]
            assert json.loads((root / "line/finished/full.result.json").read_text())["retries"] == 0
            _good_part_finishes(root, tmp_path, d, log)
            _stop_cleanly(d, log)
        finally:
            _kill(d)


def test_a_worker_killed_between_recording_a_retry_and_renaming_completes_that_retry(root, tmp_path):
    """transitions.infrastructure_failure writes error.json (retries N+1),
    then renames the part; a SIGKILL between the two left a retry-0 part
    carrying a retry-1 record. Recovery completes the rename instead of
    resuming it as retry 0 (found by tests/test_chaos.py)."""
    from factory import durable, recovery
    from factory.protocol import ERROR

    assert factory("enqueue", str(write_alloy(tmp_path / "k.alloy.json", selftest_alloy())),
                   root=root).returncode == 0
    ln = line(root)
    part = ln.move(ln.parts("intake")[0], "assembly")
    durable.write_json(part.sidecar_path(ERROR), {"class": "infrastructure", "retries": 1, "message": "killed",
                                                  "stage": None, "history": []})
    recovery.sweep(ln)
    assert where(root)["k"] == [("intake", 1)]
    assert factory("run", "--until-empty", root=root, timeout=120).returncode == 0
    assert where(root)["k"] == [("finished", 1)]
