"""Parts per hour and slot utilisation: one part at a time against several, on one node and on a local Ray cluster. A benchmark, not a test.

    python bench/concurrency.py                 # JSON of figures on stdout
    python bench/concurrency.py --markdown      # plus the table for docs/PERFORMANCE.md on stderr
    python bench/concurrency.py --no-ray        # one node only (no cluster extra installed)

The same mixed queue runs through the real `factory run --until-empty` on
a fresh root per mode:

- 8 selftest parts of 1-4 s (20 s of stage time in all);
- 2 "big" parts: a selftest stage of 3 s on a sparse 2 GiB llama checkpoint,
  so their need is a real model's (1.5 + 2 x 2 GiB = 5.5 GiB of RAM on the
  CPU), on a node whose parts may hold 8 GiB: two bigs never run together.

Modes: the serial line (`max_parallel_parts = 1`, today's behaviour), one
node with 2 and with 4 CPU slots, and a three-node loopback Ray cluster
(ray.cluster_utils.Cluster, 1 CPU and 8 GiB of Ray memory per node; the
dispatcher keeps 3 parts in flight). Selftest stages sleep, so the figures
measure the line's scheduling, not the CPUs (this machine has 2 cores).

Figures per mode: wall time from `factory run` to its exit, parts per hour
(parts / wall), slot utilisation (the parts' claim-to-outcome time summed,
over slots x wall), the most parts seen in assembly at once (from the
events), and the speed-up over the serial line measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # bench/machine.py: run as a script, bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from factory.events import read_events  # noqa: E402
from tests.linekit import make_root, selftest_alloy, write_alloy  # noqa: E402
from tests.test_placement import sparse_checkpoint  # noqa: E402

SMALL_SECONDS = (4.0, 1.0, 2.0, 3.0, 1.0, 2.0, 4.0, 3.0)
BIG_SECONDS = 3.0
BIG_GIB = 2
RAM_GB = 8


def make_queue(root: Path, tmp: Path) -> list[Path]:
    sparse_checkpoint(root / "models" / "big", rows=BIG_GIB * 512 * 1024)
    files = []
    for i, seconds in enumerate(SMALL_SECONDS):
        files.append(write_alloy(tmp / f"small{i}.alloy.json", selftest_alloy(seconds=seconds, steps=10)))
        if i in (1, 5):
            big = selftest_alloy(seconds=BIG_SECONDS, steps=10)
            big["source"] = {"baseModel": "models/big", "architecture": "llama"}
            files.append(write_alloy(tmp / f"big{i}.alloy.json", big))
    return files


def run_mode(name: str, slots: int, extra: str, tmp: Path) -> dict:
    work = tmp / name
    work.mkdir()
    root = make_root(work / "root", parallel=slots, extra=extra)
    files = make_queue(root, work)
    env = {**os.environ, "FACTORY_ROOT": str(root)}
    subprocess.run([sys.executable, "-m", "factory.cli", "enqueue", *map(str, files)], check=True,
                   capture_output=True, env=env)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "factory.cli", "run", "--until-empty"], check=True, capture_output=True,
                   env=env, timeout=900)
    wall = time.monotonic() - t0
    evs = read_events(root / "line" / "events.jsonl")
    claimed, busy, inside, most = {}, 0.0, set(), 0
    for e in evs:
        ts = time.mktime(time.strptime(e["ts"][:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + e["ts"][19:-1])
        if e["kind"] == "part/claimed":
            claimed[e["part"]] = ts
            inside.add(e["part"])
            most = max(most, len(inside))
        elif e["kind"] in ("part/finished", "part/rework") and e["part"] in claimed:
            busy += ts - claimed.pop(e["part"])
            inside.discard(e["part"])
    finished = len(list((root / "line" / "finished").glob("*.result.json")))
    assert finished == len(files), f"{name}: {finished} of {len(files)} parts finished"
    return {"mode": name, "slots": slots, "parts": len(files), "wall_s": round(wall, 2),
            "parts_per_hour": round(len(files) / wall * 3600), "slot_utilisation": round(busy / (slots * wall), 3),
            "most_in_assembly": most, "stage_seconds": sum(SMALL_SECONDS) + 2 * BIG_SECONDS}


def ray_mode(tmp: Path) -> dict:
    from tests.raykit import loopback_cluster

    node = {"num_cpus": 1, "memory": RAM_GB * 2**30}
    with loopback_cluster(node, {1: node, 2: node}) as cluster:
        extra = f'\n[cluster]\nbackend = "ray"\naddress = "{cluster.address}"\nnamespace = "bench"\n'
        return run_mode("ray, 3 nodes", 3, extra, tmp)


def markdown(rows: list[dict]) -> str:
    serial = next(r for r in rows if r["slots"] == 1)
    out = ["| mode | slots | wall | parts/hour | slot utilisation | most in assembly | speed-up vs serial |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['slots']} | {r['wall_s']:.1f} s | {r['parts_per_hour']} | "
                   f"{100 * r['slot_utilisation']:.0f}% | {r['most_in_assembly']} | "
                   f"{serial['wall_s'] / r['wall_s']:.2f}× |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    ram = f"\n[resources]\nram_gb = {RAM_GB}\n"
    host = machine()  # the load average before the runs
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as d:
        tmp = Path(d)
        rows = [run_mode("serial", 1, ram, tmp),
                run_mode("one node, 2 slots", 2, ram + "cpu_slots = 2\n", tmp),
                run_mode("one node, 4 slots", 4, ram + "cpu_slots = 4\n", tmp)]
        if not args.no_ray:
            rows.append(ray_mode(tmp))
    print(json.dumps({"machine": host, "rows": rows}, indent=2))
    if args.markdown:
        print(markdown(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
