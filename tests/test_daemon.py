"""The worker end to end: real daemons, real child processes, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.linekit import (
    events, factory, make_root, selftest_alloy, start_daemon, stop, wait_for, where, write_alloy,
)


def run_until_empty(root, timeout=120):
    r = factory("run", "--until-empty", root=root, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_pass_fail_crash_route_to_their_stations(root, tmp_path):
    for name, outcome in [("ok", "pass"), ("bad", "fail"), ("boom", "crash")]:
        write_alloy(tmp_path / f"{name}.alloy.json", selftest_alloy(stages=2, outcome=outcome))
        assert factory("enqueue", str(tmp_path / f"{name}.alloy.json"), root=root).returncode == 0
    run_until_empty(root)
    placed = where(root)
    assert placed == {"ok": [("finished", 0)], "bad": [("rework", 0)], "boom": [("rework", 3)]}

    result = json.loads((root / "line/finished/ok.result.json").read_text())
    assert [s["index"] for s in result["stages"]] == [0, 1]
    assert all(s["peak_rss_mb"] > 0 for s in result["stages"])

    bad = json.loads((root / "line/rework/bad.error.json").read_text())
    assert bad["class"] == "deterministic" and bad["retries"] == 0
    assert bad["stage"] == {"index": 0, "type": "selftest"}
    assert "failed on purpose" in bad["message"] and "StageFailed" in bad["traceback"]

    boom = json.loads((root / "line/rework/boom.error.json").read_text())
    assert boom["class"] == "infrastructure" and boom["retries"] == 3
    assert "SIGKILL" in boom["message"] and "gave up after 3 retries" in boom["message"]
    assert [h["retries"] for h in boom["history"]] == [1, 2, 3]
    assert len(events(root, "part/retried", "boom")) == 3


def test_stage_completed_event_carries_stage_elapsed_and_peak_rss(root, tmp_path):
    write_alloy(tmp_path / "p.alloy.json", selftest_alloy(stages=2, seconds=0.2, steps=4))
    factory("enqueue", str(tmp_path / "p.alloy.json"), root=root, check=True)
    run_until_empty(root)
    done = events(root, "stage/completed", "p")
    assert [e["stage"] for e in done] == [{"index": 0, "type": "selftest"}, {"index": 1, "type": "selftest"}]
    assert all(e["elapsed_s"] >= 0.2 and e["peak_rss_mb"] > 1 for e in done)
    assert all("peak_vram_mb" not in e for e in done)  # no GPU used
    prog = events(root, "stage/progress", "p")
    assert prog and prog[-1]["done"] == prog[-1]["total"] == 4 and prog[-1]["unit"] == "step"
    seqs = [e["seq"] for e in events(root)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_bad_alloy_dropped_straight_into_intake_lands_in_rework(root):
    d = start_daemon(root)
    try:
        wait_for(lambda: events(root, "daemon/started"), what="daemon start")
        (root / "line/intake/broken.alloy.json").write_text('{"stages": [ {"type": "selftest", }')
        (root / "line/intake/wrong.alloy.json").write_text(json.dumps({"source": {"baseModel": "selftest"}}))
        wait_for(lambda: where(root).get("broken") == [("rework", 0)] and where(root).get("wrong") == [("rework", 0)],
                 what="bad alloys in rework")
        err = json.loads((root / "line/rework/broken.error.json").read_text())
        assert err["class"] == "deterministic" and err["stage"]["type"] == "intake"
        assert "line 1" in err["message"] and err["problems"][0]["level"] == "parse"
        err2 = json.loads((root / "line/rework/wrong.error.json").read_text())
        assert err2["problems"] and err2["problems"][0]["level"] == "schema"
        assert d.poll() is None  # the daemon keeps running
    finally:
        assert stop(d) == 0


def test_half_written_hand_copy_is_never_claimed(root, tmp_path):
    raw = (json.dumps(selftest_alloy(), indent=2) + "\n").encode()
    d = start_daemon(root)
    try:
        wait_for(lambda: events(root, "daemon/started"), what="daemon start")
        target = root / "line/intake/slow.alloy.json"
        with open(target, "wb") as f:  # a slow cp: half the bytes, a pause, the rest
            f.write(raw[: len(raw) // 2])
            f.flush()
            time.sleep(1.0)  # > settle_seconds: the settle rule alone would adopt it now
            assert where(root).get("slow") == [("intake", 0)]
            assert not (root / "line/intake/slow.ticket.json").exists()
            f.write(raw[len(raw) // 2:])
        wait_for(lambda: where(root).get("slow") == [("finished", 0)], what="slow copy finished")
        assert not events(root, "part/rejected", "slow")
        assert events(root, "part/enqueued", "slow")[0]["origin"] == "dropped"
    finally:
        stop(d)


def test_claim_order_is_priority_then_enqueue_time_not_mtime(root, tmp_path):
    for name, prio in [("a-first", None), ("b-second", None), ("c-urgent", 5)]:
        write_alloy(tmp_path / f"{name}.alloy.json", selftest_alloy(priority=prio))
        factory("enqueue", str(tmp_path / f"{name}.alloy.json"), root=root, check=True)
    # Make the oldest-enqueued file look newest on disk: order must not change.
    os.utime(root / "line/intake/a-first.alloy.json", (time.time() + 100, time.time() + 100))
    run_until_empty(root)
    claimed = [e["part"] for e in events(root, "part/claimed")]
    assert claimed == ["c-urgent", "a-first", "b-second"]


def test_second_daemon_on_same_root_is_refused(root):
    d = start_daemon(root)
    try:
        wait_for(lambda: events(root, "daemon/started"), what="daemon start")
        r = factory("run", root=root, timeout=30)
        assert r.returncode == 4
        assert f"pid {d.pid}" in r.stderr and "another worker holds this root" in r.stderr
        r = factory("recover", root=root)
        assert r.returncode == 4
    finally:
        assert stop(d) == 0


def test_sigterm_mid_part_releases_without_retry_and_resumes_at_the_stage(root, tmp_path):
    write_alloy(tmp_path / "long.alloy.json", selftest_alloy(stages=3, seconds=1.5, steps=15))
    factory("enqueue", str(tmp_path / "long.alloy.json"), root=root, check=True)
    d = start_daemon(root)
    wait_for(lambda: any(e["stage"]["index"] == 1 for e in events(root, "stage/started", "long")),
             what="stage 1 started")
    time.sleep(0.3)
    assert stop(d, signal.SIGTERM) == 0
    assert where(root)["long"] == [("intake", 0)]  # same name: no retry spent
    released = events(root, "part/released", "long")
    assert len(released) == 1 and "stopping" in released[0]["reason"]
    ckpt = json.loads((root / "work/long/checkpoint.json").read_text())
    assert [s["index"] for s in ckpt["stages"]] == [0]
    first_output = (root / "work/long/stages/0-selftest/selftest.json").read_bytes()

    after = events(root)[-1]["seq"]
    run_until_empty(root)
    assert where(root)["long"] == [("finished", 0)]
    rerun = [e for e in events(root) if e["seq"] > after and e["part"] == "long"]
    assert [e["stage"]["index"] for e in rerun if e["kind"] == "stage/skipped"] == [0]
    assert [e["stage"]["index"] for e in rerun if e["kind"] == "stage/started"] == [1, 2]
    assert (root / "work/long/stages/0-selftest/selftest.json").read_bytes() == first_output
    hb = json.loads((root / "line/.heartbeat.json").read_text())
    assert hb["state"] == "offline"


def test_tampered_checkpoint_output_reruns_that_stage(root, tmp_path):
    write_alloy(tmp_path / "t.alloy.json", selftest_alloy(stages=2, seconds=1.0, steps=10))
    factory("enqueue", str(tmp_path / "t.alloy.json"), root=root, check=True)
    d = start_daemon(root)
    wait_for(lambda: any(e["stage"]["index"] == 1 for e in events(root, "stage/started", "t")), what="stage 1")
    stop(d)
    (root / "work/t/stages/0-selftest/selftest.json").write_text("tampered\n")
    after = events(root)[-1]["seq"]
    run_until_empty(root)
    rerun = [e for e in events(root) if e["seq"] > after and e["part"] == "t"]
    assert not [e for e in rerun if e["kind"] == "stage/skipped"]
    assert [e["stage"]["index"] for e in rerun if e["kind"] == "stage/started"] == [0, 1]


def test_hanging_stage_hits_the_stage_timeout_and_is_retried(tmp_path):
    root = make_root(tmp_path / "root", max_retries=1)
    write_alloy(tmp_path / "h.alloy.json", selftest_alloy(stages=1, steps=2, outcome="hang", timeoutSeconds=1.0))
    factory("enqueue", str(tmp_path / "h.alloy.json"), root=root, check=True)
    run_until_empty(root)
    assert where(root)["h"] == [("rework", 1)]
    err = json.loads((root / "line/rework/h.error.json").read_text())
    assert err["class"] == "infrastructure" and "timeout of 1s" in err["message"]


def test_sigterm_with_a_hung_child_kills_it_after_the_grace_period(tmp_path):
    root = make_root(tmp_path / "root", grace=1.0)
    write_alloy(tmp_path / "h.alloy.json", selftest_alloy(stages=1, steps=2, outcome="hang"))
    factory("enqueue", str(tmp_path / "h.alloy.json"), root=root, check=True)
    d = start_daemon(root)
    # selftest hangs right after reporting step steps//2 + 1 (here: the last)
    wait_for(lambda: any(e["done"] == 2 for e in events(root, "stage/progress", "h")), what="hang")
    t0 = time.monotonic()
    assert stop(d) == 0
    assert time.monotonic() - t0 < 30  # bounded (a hang guard, not a benchmark)
    assert where(root)["h"] == [("intake", 0)]
    assert "grace" in events(root, "part/released", "h")[0]["reason"]


def test_cancel_running_part_stops_child_and_reworks(root, tmp_path):
    write_alloy(tmp_path / "c.alloy.json", selftest_alloy(stages=1, seconds=30, steps=300))
    factory("enqueue", str(tmp_path / "c.alloy.json"), root=root, check=True)
    d = start_daemon(root)
    try:
        wait_for(lambda: events(root, "stage/progress", "c"), what="progress")
        time.sleep(0.5)  # > heartbeat_interval_seconds: the beat carries the progress
        st = json.loads(factory("status", "--json", root=root).stdout)["worker"]
        assert (st["state"], st["part"], st["stale"]) == ("building", "c", False)
        assert st["stage"]["index"] == 0 and st["progress"]["unit"] == "step" and st["progress"]["total"] == 300
        assert st["pid"] == d.pid and st["eta_s"] is not None and st["eta_s"] > 0
        r = factory("cancel", "c", root=root)
        assert r.returncode == 0, r.stderr
        assert where(root)["c"] == [("rework", 0)]
        err = json.loads((root / "line/rework/c.error.json").read_text())
        assert err["class"] == "cancelled"
        assert not (root / "line/rework/c.cancel.json").exists()
        assert events(root, "part/cancelled", "c")
    finally:
        assert stop(d) == 0


def test_daemon_kill_leaves_part_recovered_on_restart(root, tmp_path):
    """A killed worker is not the part's fault: the first interruption (and
    any after progress) resumes it without spending a retry; one without
    progress since the last costs a retry."""
    write_alloy(tmp_path / "k.alloy.json", selftest_alloy(stages=2, seconds=1.0, steps=10))
    factory("enqueue", str(tmp_path / "k.alloy.json"), root=root, check=True)
    d = start_daemon(root)
    wait_for(lambda: events(root, "stage/progress", "k"), what="progress")
    d.kill()
    d.wait()
    assert where(root)["k"] == [("assembly", 0)]
    st = json.loads(factory("status", "--json", root=root).stdout)
    assert st["worker"]["stale"] is True and st["worker"]["state"] == "offline"
    # the orphaned child died with its daemon (PDEATHSIG), so the lock is free
    wait_for(lambda: factory("recover", root=root).returncode == 0, timeout=10, what="recover")
    assert where(root)["k"] == [("intake", 0)]
    rec = events(root, "part/recovered", "k")
    assert rec and rec[0]["retry"] == 0 and rec[0]["retry_spent"] is False
    assert not (root / "line/intake/k.error.json").exists()
    assert any("recovered 'k'" in a for a in events(root, "daemon/recovery")[-1]["actions"])

    # Interrupted again in the same stage (no stage completed since): a retry.
    d = start_daemon(root)
    wait_for(lambda: len(events(root, "stage/started", "k")) >= 2, what="restart")
    d.kill()
    d.wait()
    wait_for(lambda: factory("recover", root=root).returncode == 0, timeout=10, what="recover")
    assert where(root)["k"] == [("intake", 1)]
    err = json.loads((root / "line/intake/k.error.json").read_text())
    assert err["class"] == "infrastructure" and "without finishing a stage" in err["message"]
    run_until_empty(root)
    assert where(root)["k"] == [("finished", 1)]


def test_systemd_notify_ready_watchdog_stopping(root, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    d = start_daemon(root, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"})
    got: list[str] = []
    try:
        while not any("WATCHDOG=1" in m for m in got):
            got.append(sock.recv(4096).decode())
        assert stop(d) == 0
        while not any("STOPPING=1" in m for m in got):
            got.append(sock.recv(4096).decode())
    finally:
        stop(d)
        sock.close()
    ready = [m for m in got if "READY=1" in m]
    assert ready and f"MAINPID={d.pid}" in ready[0] and "STATUS=" in ready[0]
    assert got.index(ready[0]) < next(i for i, m in enumerate(got) if "WATCHDOG=1" in m)


@pytest.mark.parametrize("toml, fragment", [
    ('[forge]\nmax_retries = "three"\n', "key forge.max_retries"),
    ('[daemon]\nheartbeat_intervl = 3\n', "key daemon.heartbeat_intervl"),
    ('[protocol]\nversion = 9\n', "protocol.version is 9"),
    ('[forge\n', "not valid TOML"),
])
def test_bad_node_config_is_a_clear_startup_error(root, toml, fragment):
    (root / "factory_node.toml").write_text(toml)
    r = factory("run", root=root)
    assert r.returncode == 78
    assert str(root / "factory_node.toml") in r.stderr and fragment in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_stations_on_two_filesystems_are_refused(root):
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(root).st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    other = f"/dev/shm/factory-test-{os.getpid()}"
    os.makedirs(other)
    try:
        shutil.rmtree(root / "line/rework")
        os.symlink(other, root / "line/rework")
        r = factory("run", root=root)
        assert r.returncode == 5 and "different filesystem" in r.stderr
    finally:
        shutil.rmtree(other)


def test_daemon_process_never_imports_torch(root):
    code = ("import sys, factory.daemon, factory.cli, factory.intake, factory.status, factory.doctor;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_inotify_disabled_rescan_still_claims(root, tmp_path):
    d = start_daemon(root, env={"FACTORY_NO_INOTIFY": "1"})
    try:
        wait_for(lambda: events(root, "daemon/started"), what="start")
        write_alloy(tmp_path / "r.alloy.json", selftest_alloy())
        factory("enqueue", str(tmp_path / "r.alloy.json"), root=root, check=True)
        wait_for(lambda: where(root).get("r") == [("finished", 0)], what="rescan claim")
    finally:
        stop(d)


def test_hand_drop_of_a_name_already_finished_is_set_aside(root, tmp_path):
    write_alloy(tmp_path / "twin.alloy.json", selftest_alloy())
    factory("enqueue", str(tmp_path / "twin.alloy.json"), root=root, check=True)
    run_until_empty(root)
    before = (root / "line/finished/twin.result.json").read_bytes()
    d = start_daemon(root)
    try:
        shutil.copy(tmp_path / "twin.alloy.json", root / "line/intake/twin.alloy.json")
        wait_for(lambda: "twin-dup1" in where(root), what="duplicate set aside")
        assert d.poll() is None
    finally:
        assert stop(d) == 0
    assert where(root) == {"twin": [("finished", 0)], "twin-dup1": [("rework", 0)]}
    assert (root / "line/finished/twin.result.json").read_bytes() == before  # untouched
    err = json.loads((root / "line/rework/twin-dup1.error.json").read_text())
    assert "already on the line (in finished/)" in err["message"] and "--as NAME" in err["message"]


def test_without_inotify_backoff_expiry_and_a_finished_part_trigger_the_next_scan(tmp_path):
    root = make_root(tmp_path / "root", max_retries=1)
    cfg = (root / "factory_node.toml").read_text()
    cfg = cfg.replace("rescan_seconds = 0.5", "rescan_seconds = 3600").replace("retry_backoff_seconds = 0",
                                                                           "retry_backoff_seconds = 0.5")
    (root / "factory_node.toml").write_text(cfg)
    for name, outcome in [("a", "pass"), ("b", "pass"), ("c", "crash")]:
        write_alloy(tmp_path / f"{name}.alloy.json", selftest_alloy(outcome=outcome))
        factory("enqueue", str(tmp_path / f"{name}.alloy.json"), root=root, check=True)
    d = start_daemon(root, env={"FACTORY_NO_INOTIFY": "1"})
    try:
        # With an hour between rescans, only "scan after each part" and "scan
        # when a backoff ends" can move these parts along (hang guard: 60 s).
        wait_for(lambda: where(root) == {"a": [("finished", 0)], "b": [("finished", 0)], "c": [("rework", 1)]},
                 timeout=60, what="all parts terminal")
    finally:
        stop(d)
    retried = events(root, "part/retried", "c")[0]
    claimed_again = [e for e in events(root, "part/claimed", "c") if e["retry"] == 1][0]
    assert claimed_again["ts"] >= retried["not_before"]  # the backoff was honoured


def test_a_part_over_the_memory_budget_is_stopped_and_reworked(root, tmp_path):
    """[forge] part_memory_gb bounds the part's process tree: the daemon kills
    it before the node runs out (a bare interpreter is well over 1 MB)."""
    cfg = root / "factory_node.toml"
    cfg.write_text(cfg.read_text().replace("[forge]\n", "[forge]\npart_memory_gb = 0.001\n"))
    write_alloy(tmp_path / "fat.alloy.json", selftest_alloy(stages=1, seconds=5.0, steps=50))
    factory("enqueue", str(tmp_path / "fat.alloy.json"), root=root, check=True)
    run_until_empty(root)
    assert where(root)["fat"] == [("rework", 0)]
    err = json.loads((root / "line/rework/fat.error.json").read_text())
    assert err["class"] == "deterministic"
    assert "memory budget" in err["message"] and "part_memory_gb" in err["message"]


def test_a_dup_of_a_name_at_the_length_limit_is_still_a_valid_name(root, tmp_path):
    from factory.protocol import check_base

    base = "n" * 200
    write_alloy(tmp_path / "src.alloy.json", selftest_alloy())
    factory("enqueue", str(tmp_path / "src.alloy.json"), "--as", base, root=root, check=True)
    run_until_empty(root)
    shutil.copy(tmp_path / "src.alloy.json", root / "line/intake" / f"{base}.alloy.json")  # a hand drop
    run_until_empty(root)
    placed = where(root)
    assert placed[base] == [("finished", 0)]
    dups = [b for b in placed if b != base]
    assert len(dups) == 1 and check_base(dups[0]) is None and dups[0].endswith("-dup1"), dups
    assert placed[dups[0]] == [("rework", 0)]
    # the set-aside copy is visible to the foreman commands
    assert factory("retry", dups[0], root=root).returncode == 0


def test_a_bad_drop_named_like_a_finished_part_is_set_aside_under_a_free_name(root, tmp_path):
    """Setting a bad file aside never touches another part's records: a
    symlink and an oversized drop named like parts already in finished/ and
    rework/ go to rework/ as <base>-dup<N>; the others' sidecars stay."""
    write_alloy(tmp_path / "x.alloy.json", selftest_alloy())
    write_alloy(tmp_path / "y.alloy.json", selftest_alloy(outcome="fail"))
    for name in ("x", "y"):
        factory("enqueue", str(tmp_path / f"{name}.alloy.json"), root=root, check=True)
    run_until_empty(root)
    result = (root / "line/finished/x.result.json").read_bytes()
    error = (root / "line/rework/y.error.json").read_bytes()
    (tmp_path / "secret").write_text("SECRET-TOKEN-123\n")
    os.symlink(tmp_path / "secret", root / "line/intake/x.alloy.json")
    with open(root / "line/intake/y.alloy.json", "wb") as f:
        f.truncate(8 * 2**20)  # over the alloy size limit: refused unread
    run_until_empty(root)
    placed = where(root)
    assert placed["x"] == [("finished", 0)] and placed["y"] == [("rework", 0)]
    assert (root / "line/finished/x.result.json").read_bytes() == result
    assert (root / "line/rework/y.error.json").read_bytes() == error
    assert {"x-dup1", "y-dup1"} <= set(placed)
    assert b"SECRET-TOKEN" not in b"".join(p.read_bytes() for p in root.rglob("*")
                                           if p.is_file() and not p.is_symlink())
    assert factory("recover", root=root).returncode == 0  # the sweep moves nothing of x's or y's
    assert (root / "line/finished/x.result.json").read_bytes() == result


def test_a_ticket_with_an_impossible_date_is_set_aside_and_the_rest_run(root, tmp_path):
    write_alloy(tmp_path / "odd.alloy.json", selftest_alloy())
    write_alloy(tmp_path / "good.alloy.json", selftest_alloy())
    factory("enqueue", str(tmp_path / "odd.alloy.json"), root=root, check=True)
    ticket = root / "line/intake/odd.ticket.json"
    t = json.loads(ticket.read_text())
    ticket.write_text(json.dumps({**t, "not_before": "2999-13-45T99:99:99Z", "priority": 10}))
    factory("enqueue", str(tmp_path / "good.alloy.json"), root=root, check=True)
    run_until_empty(root)
    assert where(root) == {"odd": [("rework", 0)], "good": [("finished", 0)]}
    assert "not_before" in json.loads((root / "line/rework/odd.error.json").read_text())["message"]
