"""What the foreman sees: `show`, `list` columns, the run summary, live
status (fresh progress, backoffs, ignored files, pipe vs terminal),
`--version` and help on every option. Real daemons, real files."""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from factory.cli import build_parser
from tests.linekit import events, factory, make_root, selftest_alloy, start_daemon, stop, wait_for, write_alloy

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PTY_HANG_GUARD_S = 120.0  # a command on a pty that has not ended by then has hung


def enqueue(root: Path, tmp: Path, name: str, **alloy) -> None:
    r = factory("enqueue", str(write_alloy(tmp / f"{name}.alloy.json", selftest_alloy(**alloy))), root=root)
    assert r.returncode == 0, r.stderr


def test_run_ends_with_a_summary_and_show_and_list_tell_each_part_s_story(tmp_path):
    root = make_root(tmp_path / "root", max_retries=0)
    enqueue(root, tmp_path, "good", stages=2)
    enqueue(root, tmp_path, "bad", outcome="fail")
    r = factory("run", "--until-empty", root=root)
    assert r.returncode == 0
    assert re.search(r"^factory run: 1 finished, 1 rework in [0-9.]+ s$", r.stdout, re.M), r.stdout

    good = factory("show", "good", root=root).stdout
    assert good.startswith("good: finished (good.alloy.json, retry 0)")
    assert re.search(r"^    0 selftest: [0-9.]+ s, peak RSS [0-9]+ MB$", good, re.M)
    assert "need: a selftest part: no model" in good and "acceptance: passed" in good
    bad = factory("show", "bad", root=root).stdout
    assert "failed (deterministic) in stage 0 selftest" in bad and "failed on purpose" in bad
    data = json.loads(factory("show", "bad.alloy.json", "--json", root=root).stdout)
    assert data["station"] == "rework" and data["error"]["class"] == "deterministic"
    assert factory("show", "nosuch", root=root).returncode == 3

    rows = {r["part"]: r for r in json.loads(factory("list", "--json", root=root).stdout)}
    assert rows["good"]["outcome"] == "finished" and rows["good"]["reason"] is None
    assert rows["bad"]["outcome"] == "deterministic" and "failed on purpose" in rows["bad"]["reason"]
    # tail for people: no line past 250 characters (--json keeps every byte)
    enqueue(root, tmp_path, "long-" + "n" * 150)
    tail = factory("tail", "-n", "100", root=root).stdout.splitlines()
    assert tail and max(map(len, tail)) <= 250 and any(line.endswith("…") for line in tail)
    plain = factory("list", root=root).stdout
    assert re.search(r"^rework +bad +retry=0 +deterministic +selftest stage 0 failed on purpose", plain, re.M)


def test_progress_reaches_status_many_times_within_one_heartbeat_interval(tmp_path):
    """The beat interval is 30 s, the node default; progress is written on
    change (rate-limited), so readers see it move long before a beat is due."""
    root = make_root(tmp_path / "root")
    cfg = root / "factory_node.toml"
    cfg.write_text(cfg.read_text().replace("heartbeat_interval_seconds = 0.2", "heartbeat_interval_seconds = 30"))
    enqueue(root, tmp_path, "slow", seconds=6.0, steps=12)
    d = start_daemon(root)
    seen: set = set()
    try:
        wait_for(lambda: events(root, "stage/started", "slow"), timeout=60, what="stage start")
        started = time.monotonic()
        while time.monotonic() - started < 20 and len(seen) < 4:  # well inside the 30 s interval
            prog = json.loads(factory("status", "--json", root=root).stdout)["worker"]["progress"]
            if prog:
                seen.add(prog["done"])
            time.sleep(0.2)
    finally:
        stop(d)
    assert len(seen) >= 4, seen


def test_status_names_a_clean_stop_backoffs_and_ignored_files_and_adapts_to_its_output(tmp_path):
    root = make_root(tmp_path / "root", max_retries=2)
    cfg = root / "factory_node.toml"
    cfg.write_text(cfg.read_text().replace("retry_backoff_seconds = 0", "retry_backoff_seconds = 3600"))
    long_name = "a-part-whose-name-is-much-longer-than-eighty-columns-" + "x" * 40
    enqueue(root, tmp_path, long_name, outcome="crash")
    (root / "line/intake/notes.json").write_text("{}")
    d = start_daemon(root)
    wait_for(lambda: events(root, "part/retried"), timeout=60, what="the retry")
    assert stop(d) == 0
    plain = factory("status", root=root).stdout
    assert "worker offline: the worker stopped cleanly" in plain and "STALE" not in plain and "((" not in plain
    assert re.search(rf"^waiting {long_name} \(retry 1\): next try at 20\d\d-", plain, re.M)
    assert "ignored in intake/ (not alloys: never read): notes.json" in plain
    snap = json.loads(factory("status", "--json", root=root).stdout)
    assert snap["waiting"][0]["why"] == "backoff" and snap["ignored"] == ["notes.json"]
    # to a pipe: the tables without colour, and no line wrapped
    piped = factory("status", "--pretty", root=root).stdout
    assert not ANSI.search(piped) and any(long_name in line for line in piped.splitlines())
    # to a terminal: colour
    assert ANSI.search(_on_a_terminal(root, "status"))


def _on_a_terminal(root: Path, *args: str, interrupt_after: float | None = None) -> str:
    """A command's output as a terminal shows it (a real pty); with
    `interrupt_after`, Ctrl-C (SIGINT) is sent that many seconds in, and
    the command must then exit 0."""
    pid, fd = pty.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal's shell starts it, whatever ours inherited
        os.environ["FACTORY_ROOT"] = str(root)
        os.environ.pop("NO_COLOR", None)
        os.environ["TERM"] = "xterm-256color"
        os.execv(sys.executable, [sys.executable, "-m", "factory.cli", *args])
    out, started, sent = b"", time.monotonic(), False
    while True:
        if interrupt_after is not None and not sent and time.monotonic() - started > interrupt_after:
            os.kill(pid, signal.SIGINT)
            sent = True
        if time.monotonic() - started > PTY_HANG_GUARD_S:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"factory {' '.join(args)} still running after {PTY_HANG_GUARD_S}s:\n"
                                 + out.decode(errors="replace")[-2000:])
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert interrupt_after is None or os.waitstatus_to_exitcode(status) == 0
    return out.decode(errors="replace")


def test_status_watch_redraws_in_place_until_ctrl_c(tmp_path):
    root = make_root(tmp_path / "root")
    out = _on_a_terminal(root, "status", "--watch", "0.3", interrupt_after=8.0)
    assert out.count("stations") >= 2 and "Ctrl-C to stop" in out
    assert re.search(r"\x1b\[\d*A", out)  # cursor up: each frame is drawn over the last


def test_version_and_every_option_of_every_command_has_help():
    r = subprocess.run([sys.executable, "-m", "factory.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and re.match(r"^factory \d+\.\d+\.\d+ \(protocol \d+, Python 3\.", r.stdout)
    missing = []
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in [("factory", parser), *sub.choices.items()]:
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    # defaults are shown
    helptext = subprocess.run([sys.executable, "-m", "factory.cli", "selftest", "--help"], capture_output=True,
                              text=True).stdout
    assert "(default: 10)" in " ".join(helptext.split())


def test_plan_and_doctor_check_the_machine_without_a_root(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FACTORY_ROOT"}
    alloy = write_alloy(tmp_path / "s.alloy.json", selftest_alloy())
    r = subprocess.run([sys.executable, "-m", "factory.cli", "plan", str(alloy)], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok") and "no root given" in r.stderr
    hub = selftest_alloy()
    hub["source"] = {"baseModel": "models/nowhere", "architecture": "llama"}
    r = subprocess.run([sys.executable, "-m", "factory.cli", "plan", str(write_alloy(tmp_path / "h.alloy.json", hub))],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert f"there is no directory {tmp_path}/models/nowhere" in r.stdout  # why it was read as a Hub id
    r = subprocess.run([sys.executable, "-m", "factory.cli", "doctor", "--json"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    checks = {c["name"]: c["verdict"] for c in json.loads(r.stdout)}
    assert checks["root"] == "warn" and checks["cpu"] == "ok" and "inotify" in checks
