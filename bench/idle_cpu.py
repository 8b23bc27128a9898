"""What an idle worker costs: CPU of `factory run` while its only part backs off. A benchmark, not a test.

    python bench/idle_cpu.py                     # JSON of figures on stdout
    python bench/idle_cpu.py --markdown          # plus a markdown table on stderr (docs/PERFORMANCE.md)
    python bench/idle_cpu.py --seconds 10        # a shorter window per mode

A hive node spends most of its months idle or waiting, so the worker must
sleep then, not poll. The bench makes that state on purpose, on a fresh
temporary root made by the real `factory init`, with the node defaults
except for the retry policy:

1. the root's only part is a selftest alloy whose one stage SIGKILLs its own
   process (outcome "crash", an infrastructure failure), and the node says
   `[forge] retry_backoff_seconds = 3600`, `max_retries = 3`. After the first
   crash the part sits in intake/ as `<base>.retry1.alloy.json` with a ticket
   whose `not_before` is an hour away: the line has work, none of it runnable.
2. a real `factory run --root R` subprocess runs it; the bench waits for the
   `part/retried` event and the retry file in intake/, then lets the daemon
   settle (--settle, 2 s) before measuring.
3. over --seconds (60) it reads the daemon's CPU time with psutil: user +
   system of the daemon, plus that of its reaped children and of any live
   descendant (there should be none while the part backs off). The figure is
   that time as a percentage of one core over the window's wall time. It also
   counts the daemon's context switches (voluntary + involuntary, all its
   threads, from /proc/PID/task/*/status) per second: how often it wakes.
4. the same again with FACTORY_NO_INOTIFY=1 (no watchdog observer: the
   daemon wakes on its own timers only: heartbeat, the periodic rescan, the
   backoff's end), the comparison that shows what inotify itself costs.

The run is void, and the bench exits 1, if the part was claimed again or the
daemon exited during a window: then it did not measure an idle daemon. The
target is under 1 % of one core in both modes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from machine import machine  # bench/machine.py: run as a script, bench/ is on sys.path

# The target for an idle worker, percent of one core.
TARGET_CPU_PERCENT = 1.0
# Hang guard for the set-up (init, first claim, the crash, the retry record).
SETUP_TIMEOUT_SECONDS = 60.0
# How often this process looks for the backoff state (not part of any figure).
SETUP_POLL_SECONDS = 0.05
PART = "idle-backoff"

ALLOY = {
    "name": "idle-backoff", "version": "1.0.0",
    "source": {"baseModel": "selftest", "architecture": "selftest"},
    "stages": [{"type": "selftest", "seconds": 0, "steps": 1, "outcome": "crash"}],
}

# Node defaults for [daemon] (heartbeat 30 s, rescan 10 s): the idle cost a
# real node pays. Only the retry policy is set, to park the part for an hour.
NODE_CONFIG = """\
[forge]
max_retries = 3
retry_backoff_seconds = 3600

[protocol]
version = 1
"""


def make_root(parent: Path, name: str) -> Path:
    """A root made by the real CLI (`factory init`, `factory enqueue`) with one crashing part queued."""
    root = parent / name
    _cli("init", str(root))
    (root / "factory_node.toml").write_text(NODE_CONFIG)
    src = parent / f"{PART}.alloy.json"
    src.write_text(json.dumps(ALLOY, indent=2) + "\n")
    _cli("enqueue", "--root", str(root), str(src))
    return root


def _cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "factory.cli", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"factory {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")


def _events(root: Path) -> list[dict]:
    out = []
    try:
        raw_lines = (root / "line" / "events.jsonl").read_bytes().splitlines()
    except FileNotFoundError:
        return out
    for raw in raw_lines:
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue  # a torn line: readers skip it (protocol section 7)
    return out


@contextmanager
def daemon(root: Path, *, no_inotify: bool) -> Iterator[subprocess.Popen]:
    """`factory run --root R` as a real subprocess; SIGTERM and reap on exit."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # no systemd watchdog pings: they would be extra wake-ups
    env.pop("FACTORY_NO_INOTIFY", None)
    if no_inotify:
        env["FACTORY_NO_INOTIFY"] = "1"
    with open(root / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", "--root", str(root)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_backoff(root: Path, proc: subprocess.Popen) -> dict:
    """Block until the part crashed once and waits in intake/ with a future not_before."""
    retry_file = root / "line" / "intake" / f"{PART}.retry1.alloy.json"
    ticket_file = root / "line" / "intake" / f"{PART}.ticket.json"
    deadline = time.monotonic() + SETUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited {proc.returncode} before the part backed off; "
                               f"see {root / 'daemon.log'}")
        retried = [e for e in _events(root) if e["kind"] == "part/retried" and e.get("part") == PART]
        if retried and retry_file.exists() and ticket_file.exists():
            return retried[-1]
        time.sleep(SETUP_POLL_SECONDS)
    raise TimeoutError(f"{PART} did not reach retry backoff within {SETUP_TIMEOUT_SECONDS:g}s; "
                       f"see {root / 'line' / 'events.jsonl'}")


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of a process, its reaped children, and its live descendants."""
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for kid in proc.children(recursive=True):
        try:
            k = kid.cpu_times()
            total += k.user + k.system
        except psutil.Error:
            pass  # RACE: it ended between the listing and the read; its time lands in children_*
    return total


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches summed over every thread of
    `pid` (psutil reports the main thread's only; the inotify observer is a
    thread of its own)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue  # RACE: the thread ended while we listed them
        total += sum(int(v) for v in re.findall(r"^(?:voluntary|nonvoluntary)_ctxt_switches:\s+(\d+)$",
                                                 text, re.MULTILINE))
    return total


def measure(tmp: Path, *, no_inotify: bool, seconds: float, settle: float) -> dict:
    """One mode: set up the backoff, settle, then read CPU time over the window."""
    label = "rescan" if no_inotify else "inotify"
    root = make_root(tmp, f"idle-{label}")
    with daemon(root, no_inotify=no_inotify) as popen:
        retried = wait_for_backoff(root, popen)
        time.sleep(settle)
        ps = psutil.Process(popen.pid)
        seq_before = max(e["seq"] for e in _events(root))
        cpu0, ctx0, t0 = cpu_seconds(ps), context_switches(popen.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, ctx1, t1 = cpu_seconds(ps), context_switches(popen.pid), time.monotonic()
        if popen.poll() is not None:
            raise RuntimeError(f"the daemon exited {popen.returncode} during the window; "
                               f"see {root / 'daemon.log'}")
        during = [e for e in _events(root) if e["seq"] > seq_before]
    claimed = [e for e in during if e["kind"] == "part/claimed"]
    if claimed:
        raise RuntimeError(f"{PART} was claimed during the window ({claimed[0]}): not an idle daemon")
    wall = t1 - t0
    cpu = cpu1 - cpu0
    return {
        "mode": label,
        "watcher": "rescans only (FACTORY_NO_INOTIFY=1)" if no_inotify else "inotify + rescans",
        "window_s": round(wall, 2),
        "cpu_s": round(cpu, 3),
        "cpu_percent_of_one_core": round(100 * cpu / wall, 3),
        "context_switches_per_s": round((ctx1 - ctx0) / wall, 1),
        "events_during_window": len(during),
        "not_before": retried.get("not_before"),
        "target_met": 100 * cpu / wall < TARGET_CPU_PERCENT,
    }


def markdown(fig: dict) -> str:
    rows = [
        "| daemon, only part in retry backoff | CPU % of one core | CPU s / window s | wake-ups (context switches) / s | events in window |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in ("inotify", "rescan_only"):
        m = fig[key]
        rows.append(f"| {m['watcher']} | {m['cpu_percent_of_one_core']:.2f} % | {m['cpu_s']:.2f} / {m['window_s']:.0f} "
                    f"| {m['context_switches_per_s']:.1f} | {m['events_during_window']} |")
    rows.append(f"\ntarget: under {TARGET_CPU_PERCENT:g} % of one core in both modes; "
                f"met: {all(fig[k]['target_met'] for k in ('inotify', 'rescan_only'))}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measurement window per mode (default 60)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="wait after the part reached backoff, before measuring (default 2)")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table (on stderr)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary roots (their path goes to stderr)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="factory-idle-"))
    try:
        fig = {"machine": machine(), "command": " ".join(["python", "bench/idle_cpu.py", *sys.argv[1:]])}
        fig["inotify"] = measure(tmp, no_inotify=False, seconds=args.seconds, settle=args.settle)
        fig["rescan_only"] = measure(tmp, no_inotify=True, seconds=args.seconds, settle=args.settle)
        fig["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(fig, indent=2))
    if args.markdown:
        print(markdown(fig), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
