"""How fast the line reacts, and what it costs per part. A benchmark, not a test.

    python bench/line_latency.py                 # JSON of figures on stdout
    python bench/line_latency.py --markdown      # plus a markdown table (docs/PERFORMANCE.md)

Three figures, all against a real `factory run --root R` subprocess on a
fresh temporary root (heartbeat every 0.2 s, no retry backoff):

1. drop-to-claim latency with inotify (the default): time from the atomic
   rename of an alloy into intake/ to the daemon's claim of it.
   - start: the `factory enqueue` code path itself (factory.intake.enqueue),
     with factory.durable.move wrapped to read the wall clock just before the
     rename(2) that puts the alloy into intake/ (the instant the daemon can
     first see it);
   - end: the `ts` of that part's `part/claimed` event. It is written just
     after the claim's rename into assembly/, so no observer in this process
     competes with the daemon for the 2 CPUs (a 1 ms poll of intake/ would),
     at the price of the event's 1 ms resolution (ts is truncated to ms: a
     figure may read up to 1 ms low).
   Each drop waits until the previous part has finished (the daemon is idle)
   plus a random 0 .. --pause-max (1 s) pause, so drops land at random phases
   of the daemon's timers. This run keeps the node default rescan_seconds
   (10 s), so a rescan can only rarely stand in for a late inotify event.
   The figures are also split by how long after the previous claim the drop
   came: watchdog holds an unpaired IN_MOVED_FROM event (the claim's rename
   out of intake/ into a separately watched assembly/) for 0.5 s and queues
   every later intake/ event behind it, so a drop within ~0.5 s of a claim
   waits out the rest of that half second.
2. the same with rescans only: the daemon runs with FACTORY_NO_INOTIFY=1 (no
   watchdog observer; factory/daemon.py) and [daemon] rescan_seconds set by
   --rescan-seconds (default 0.5). Expected: about rescan_seconds / 2 at p50.
3. per-part line overhead: --parts selftest parts (one stage, seconds=0,
   steps=1: the stage itself does nothing) enqueued up front, then
   `factory run --until-empty`; overhead = (last part/finished ts - first
   part/claimed ts) / parts. Baseline, measured in the same run: the bare
   cost of starting the part's child process, `python -c "import factory.child"`
   (median of --baseline-runs). The ratio says how much the line adds on top
   of the one process start it cannot avoid.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from factory import durable, intake
from factory.line import Line
from factory.nodeconfig import DaemonSection, load_node_config
from machine import machine  # bench/machine.py: run as a script, bench/ is on sys.path

# How long to wait for one event before calling the run broken.
EVENT_TIMEOUT_SECONDS = 30.0
# Drops later than this after the previous claim are "quiet": out of reach of
# watchdog's 0.5 s move-pairing delay (see drop_to_claim).
QUIET_AFTER_CLAIM_SECONDS = 0.6
# How often this process re-reads events.jsonl while waiting (not part of any figure).
EVENT_POLL_SECONDS = 0.005

ALLOY = {
    "name": "bench", "version": "1.0.0",
    "source": {"baseModel": "selftest", "architecture": "selftest"},
    "stages": [{"type": "selftest", "seconds": 0, "steps": 1, "outcome": "pass"}],
}


def node_config(*, rescan_seconds: float) -> str:
    return ("[daemon]\n"
            "heartbeat_interval_seconds = 0.2\n"
            f"rescan_seconds = {rescan_seconds}\n"
            "settle_seconds = 0.0\n"
            "stop_grace_seconds = 5.0\n\n"
            "[forge]\nretry_backoff_seconds = 0.0\n\n"
            "[protocol]\nversion = 1\n")


def make_root(parent: Path, name: str, *, rescan_seconds: float) -> Line:
    root = parent / name
    root.mkdir()
    (root / "factory_node.toml").write_text(node_config(rescan_seconds=rescan_seconds))
    line = Line(root, load_node_config(root / "factory_node.toml"))
    line.create()
    return line


def iso_to_epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


class EventReader:
    """Reads events.jsonl incrementally (the bench's own runs never rotate it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.buf = b""

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(raw) for raw in lines if raw.strip()]

    def wait_for(self, kind: str, part: str | None = None) -> dict:
        deadline = time.monotonic() + EVENT_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            for ev in self.poll():
                if ev["kind"] == kind and (part is None or ev.get("part") == part):
                    return ev
                if ev["kind"] in ("part/rework", "part/retried", "part/rejected"):
                    raise RuntimeError(f"bench part went wrong: {ev}")
            time.sleep(EVENT_POLL_SECONDS)
        raise TimeoutError(f"no {kind} event for {part or 'the line'} within {EVENT_TIMEOUT_SECONDS:g}s "
                           f"(see {self.path})")


@contextmanager
def daemon(line: Line, *, no_inotify: bool, until_empty: bool = False) -> Iterator[subprocess.Popen]:
    """`factory run --root R` as a real subprocess; SIGTERM and reap on exit."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("FACTORY_NO_INOTIFY", None)
    if no_inotify:
        env["FACTORY_NO_INOTIFY"] = "1"
    cmd = [sys.executable, "-m", "factory.cli", "run", "--root", str(line.root)]
    if until_empty:
        cmd.append("--until-empty")
    with open(line.root / "daemon.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
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


@contextmanager
def rename_clock(line: Line) -> Iterator[dict[str, float]]:
    """Wrap durable.move so enqueue() records when each alloy is renamed into intake/."""
    stamps: dict[str, float] = {}
    original = durable.move

    def timed_move(src: Path, dst: Path) -> None:
        if dst.parent == line.layout.intake and dst.name.endswith(".alloy.json"):
            stamps[dst.name] = time.time()  # just before rename(2): the file is visible right after
        original(src, dst)

    durable.move = timed_move
    try:
        yield stamps
    finally:
        durable.move = original


def percentiles(samples_s: list[float]) -> dict:
    ms = sorted(x * 1000 for x in samples_s)

    def pct(p: float) -> float:  # nearest-rank
        return ms[min(len(ms) - 1, max(0, round(p / 100 * len(ms) + 0.5) - 1))]

    return {"n": len(ms), "p50_ms": round(pct(50), 2), "p90_ms": round(pct(90), 2),
            "p99_ms": round(pct(99), 2), "max_ms": round(ms[-1], 2), "min_ms": round(ms[0], 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


def drop_to_claim(tmp: Path, *, drops: int, no_inotify: bool, rescan_seconds: float,
                  pause_max: float, seed: int) -> dict:
    """Latency from the rename into intake/ to part/claimed, over `drops` parts."""
    label = "rescan" if no_inotify else "inotify"
    line = make_root(tmp, f"latency-{label}", rescan_seconds=rescan_seconds)
    src = tmp / f"{label}.alloy.json"
    src.write_text(json.dumps(ALLOY))
    rng = random.Random(seed)
    reader = EventReader(line.layout.events)
    samples, quiet, after_claim = [], [], []
    with daemon(line, no_inotify=no_inotify), rename_clock(line) as stamps:
        reader.wait_for("daemon/started")
        prev_claim = 0.0
        for i in range(drops):
            time.sleep(rng.uniform(0, pause_max))  # a random phase of the rescan timer
            name = f"drop-{i:04d}"
            part = intake.enqueue(line, src, name=name)
            dropped = stamps[part.path.name]
            claimed = iso_to_epoch(reader.wait_for("part/claimed", name)["ts"])
            samples.append(claimed - dropped)
            # watchdog holds an unpaired IN_MOVED_FROM (the previous claim's
            # rename out of intake/) for 0.5 s and queues later events behind it.
            (after_claim if dropped - prev_claim < QUIET_AFTER_CLAIM_SECONDS else quiet).append(claimed - dropped)
            prev_claim = claimed
            reader.wait_for("part/finished", name)  # idle again before the next drop
    out = {"mode": label, "rescan_seconds": rescan_seconds,
           "watcher": "rescans only (FACTORY_NO_INOTIFY=1)" if no_inotify else "inotify + rescans",
           **percentiles(samples)}
    for key, subset in (("quiet", quiet), ("within_0.6s_of_previous_claim", after_claim)):
        if subset:
            out[key] = percentiles(subset)
    return out


def child_import_baseline(runs: int) -> dict:
    """Wall time of `python -c "import factory.child"`: the child's unavoidable start-up."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import factory.child"], check=True)
        times.append(time.perf_counter() - t0)
    return {"runs": runs, "median_ms": round(statistics.median(times) * 1000, 2),
            "min_ms": round(min(times) * 1000, 2)}


def line_overhead(tmp: Path, *, parts: int, baseline_runs: int) -> dict:
    """Per-part wall time through the whole line for parts whose stage does nothing."""
    line = make_root(tmp, "overhead", rescan_seconds=10.0)
    src = tmp / "overhead.alloy.json"
    src.write_text(json.dumps(ALLOY))
    for i in range(parts):
        intake.enqueue(line, src, name=f"part-{i:04d}")
    baseline_before = child_import_baseline(baseline_runs)
    t0 = time.perf_counter()
    with daemon(line, no_inotify=False, until_empty=True) as proc:
        rc = proc.wait(timeout=EVENT_TIMEOUT_SECONDS + parts * 10)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"factory run --until-empty exited {rc}; see {line.root / 'daemon.log'}")
    baseline_after = child_import_baseline(baseline_runs)
    events = EventReader(line.layout.events).poll()
    claimed = [iso_to_epoch(e["ts"]) for e in events if e["kind"] == "part/claimed"]
    finished = [iso_to_epoch(e["ts"]) for e in events if e["kind"] == "part/finished"]
    if len(finished) != parts:
        raise RuntimeError(f"{len(finished)} of {parts} parts finished; see {line.layout.events}")
    per_part = (max(finished) - min(claimed)) / parts
    in_child = [json.loads(p.read_text())["elapsed_s"] for p in line.layout.finished.glob("*.result.json")]
    baseline_ms = statistics.median([baseline_before["median_ms"], baseline_after["median_ms"]])
    return {
        "parts": parts,
        "per_part_ms": round(per_part * 1000, 2),
        "claim_to_finish_median_ms": round(statistics.median(in_child) * 1000, 2),
        "daemon_process_wall_s": round(wall, 3),
        "baseline_import_factory_child_ms": baseline_ms,
        "baseline_detail": {"before": baseline_before, "after": baseline_after},
        "ratio_per_part_to_baseline": round(per_part * 1000 / baseline_ms, 2),
    }


def markdown(fig: dict) -> str:
    a, b, o = fig["inotify"], fig["rescan_only"], fig["overhead"]
    rows = [
        "| figure | p50 | p90 | p99 | max | n |",
        "|---|---:|---:|---:|---:|---:|",
        (f"| drop-to-claim, inotify | {a['p50_ms']:.1f} ms | {a['p90_ms']:.1f} ms | {a['p99_ms']:.1f} ms "
         f"| {a['max_ms']:.1f} ms | {a['n']} |"),
        *[f"| … inotify, drops {label} | {x['p50_ms']:.1f} ms | {x['p90_ms']:.1f} ms | {x['p99_ms']:.1f} ms "
          f"| {x['max_ms']:.1f} ms | {x['n']} |"
          for label, x in (("> 0.6 s after the previous claim", a.get("quiet")),
                           ("≤ 0.6 s after the previous claim", a.get("within_0.6s_of_previous_claim")))
          if x],
        (f"| drop-to-claim, rescans only (every {b['rescan_seconds']:g} s) | {b['p50_ms']:.1f} ms "
         f"| {b['p90_ms']:.1f} ms | {b['p99_ms']:.1f} ms | {b['max_ms']:.1f} ms | {b['n']} |"),
        "",
        "| figure | value |",
        "|---|---:|",
        f"| per-part line time (no-op stage, {o['parts']} parts) | {o['per_part_ms']:.1f} ms |",
        f"| of which claim to finish (child run, median) | {o['claim_to_finish_median_ms']:.1f} ms |",
        f"| baseline: `python -c \"import factory.child\"` (median) | {o['baseline_import_factory_child_ms']:.1f} ms |",
        f"| ratio per-part / baseline | {o['ratio_per_part_to_baseline']:.2f}× |",
        f"| ratio rescan-only p50 / inotify p50 | {fig['ratios']['rescan_p50_over_inotify_p50']:.1f}× |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drops", type=int, default=100, help="drops per watcher mode (default 100)")
    ap.add_argument("--parts", type=int, default=30, help="parts for the per-part overhead (default 30)")
    ap.add_argument("--rescan-seconds", type=float, default=0.5,
                    help="[daemon] rescan_seconds for the rescans-only run (default 0.5)")
    ap.add_argument("--pause-max", type=float, default=1.0,
                    help="each drop waits a random 0..PAUSE_MAX s after the previous part finished (default 1.0)")
    ap.add_argument("--baseline-runs", type=int, default=15, help="runs of the import baseline, before and after")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table (on stderr)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary roots (their path goes to stderr)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="factory-bench-"))
    try:
        fig = {"machine": machine(), "command": " ".join(["python", "bench/line_latency.py", *sys.argv[1:]])}
        # inotify run: the node's default rescan interval, so rescans cannot hide inotify's latency.
        fig["inotify"] = drop_to_claim(tmp, drops=args.drops, no_inotify=False,
                                       rescan_seconds=DaemonSection().rescan_seconds,
                                       pause_max=args.pause_max, seed=args.seed)
        fig["rescan_only"] = drop_to_claim(tmp, drops=args.drops, no_inotify=True,
                                           rescan_seconds=args.rescan_seconds,
                                           pause_max=args.pause_max, seed=args.seed)
        fig["overhead"] = line_overhead(tmp, parts=args.parts, baseline_runs=args.baseline_runs)
        fig["ratios"] = {"rescan_p50_over_inotify_p50":
                         round(fig["rescan_only"]["p50_ms"] / max(fig["inotify"]["p50_ms"], 0.001), 1)}
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
