"""Several parts in assembly at once: the real daemon, real children.

Placement is checked on what the line records (claim and outcome events in
seq order, the heartbeat, each child's own environment in /proc), never on
timings. GPUs are declared in the node config: none exist here, and what is
checked is which ones each child is told it has (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from factory import heartbeat as hb
from tests.linekit import (
    events, factory, make_root, selftest_alloy, start_daemon, stop, wait_for, wait_unlocked, where, write_alloy,
)
from tests.test_placement import sparse_checkpoint

TERMINAL = ("part/finished", "part/rework", "part/cancelled", "part/retried", "part/released", "part/recovered")


def enqueue(root: Path, tmp: Path, names: list[str], **alloy) -> None:
    files = [write_alloy(tmp / f"{n}.alloy.json", selftest_alloy(**alloy)) for n in names]
    r = factory("enqueue", *map(str, files), root=root)
    assert r.returncode == 0, r.stderr


def big_alloy(tmp: Path, name: str, root: Path, *, seconds: float = 0.3) -> Path:
    """A selftest stage on a real (sparse) 0.5 GiB llama checkpoint: its need
    is the model's, not a selftest's."""
    if not (root / "models" / "big").exists():
        sparse_checkpoint(root / "models" / "big", rows=256 * 1024)
    alloy = selftest_alloy(seconds=seconds)
    alloy["source"] = {"baseModel": "models/big", "architecture": "llama"}
    return write_alloy(tmp / f"{name}.alloy.json", alloy)


def running_at_once(root: Path) -> tuple[int, list[str]]:
    """The most parts the events show in assembly together, and the claim order."""
    inside: set[str] = set()
    most, claims = 0, []
    for e in events(root):
        if e["kind"] == "part/claimed":
            inside.add(e["part"])
            claims.append(e["part"])
            most = max(most, len(inside))
        elif e["kind"] in TERMINAL:
            inside.discard(e["part"])
    return most, claims


def run_until_empty(root: Path) -> None:
    r = factory("run", "--until-empty", root=root, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def heartbeat(root: Path) -> dict:
    return hb.read(root / "line" / ".heartbeat.json") or {}


def child_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def test_two_slots_build_two_parts_side_by_side_and_status_shows_both(tmp_path):
    root = make_root(tmp_path / "root", parallel=2)
    enqueue(root, tmp_path, ["a", "b", "c", "d"], seconds=1.5, steps=15)
    d = start_daemon(root, "--until-empty")
    beat = wait_for(lambda: (b := heartbeat(root)) and len(b.get("parts", [])) == 2 and
                    all(p["pid"] for p in b["parts"]) and b, timeout=60, what="two running parts")
    pids = [p["pid"] for p in beat["parts"]]
    threads = str(max(1, (os.cpu_count() or 1) // 2))  # 2 slots share the cores
    envs = [child_env(pid) for pid in pids]
    assert all(e.get("OMP_NUM_THREADS") == threads for e in envs)
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in envs)  # no GPUs declared or found: left alone
    # the single-node worker never loads ray (nor torch): neither is mapped into it
    maps = Path(f"/proc/{d.pid}/maps").read_text()
    assert "_raylet" not in maps and "libtorch" not in maps
    snap = json.loads(factory("status", "--json", root=root).stdout)
    assert len(snap["worker"]["parts"]) == 2 and snap["resources"]["cpu_slots"] == 2
    plain = factory("status", root=root).stdout
    assert sum(line.startswith("building ") for line in plain.splitlines()) == 2
    assert d.wait(timeout=120) == 0
    assert where(root) == {n: [("finished", 0)] for n in "abcd"}
    most, claims = running_at_once(root)
    assert most == 2 and claims == list("abcd")


def test_parts_wait_for_ram_and_a_part_larger_than_the_node_is_refused_at_the_gate(tmp_path):
    # the 0.5 GiB model needs 1.5 + 2 x 0.5 = 2.5 GiB on the CPU: two do not fit in 4
    root = make_root(tmp_path / "root", parallel=4, extra="\n[resources]\nram_gb = 4\n")
    files = [big_alloy(tmp_path, f"big{i}", root) for i in range(3)]
    assert factory("enqueue", *map(str, files), root=root).returncode == 0
    tickets = [json.loads((root / "line/intake" / f"big{i}.ticket.json").read_text()) for i in range(3)]
    assert {t["need"]["ram_bytes"] for t in tickets} == {int(2.5 * 2**30)}
    run_until_empty(root)
    assert where(root) == {f"big{i}": [("finished", 0)] for i in range(3)}
    assert running_at_once(root)[0] == 1

    small = make_root(tmp_path / "small", extra="\n[resources]\nram_gb = 2\n")
    r = factory("enqueue", str(big_alloy(tmp_path, "huge", small)), root=small)
    assert r.returncode == 2 and where(small) == {"huge": [("rework", 0)]}
    err = json.loads((small / "line/rework/huge.error.json").read_text())
    assert "can never run on this node" in err["message"] and "2.0 GiB" in err["message"]
    assert "resources.ram_gb" in err["message"]


def test_a_big_part_at_the_head_is_overtaken_at_most_max_overtakes_times(tmp_path):
    """s0 runs; big (its source not on the node yet: it takes the whole
    node) waits at the head; of the small parts queued behind it, two
    overtake it, then nothing starts until it has."""
    root = make_root(tmp_path / "root", parallel=4, extra="\n[resources]\ncpu_slots = 4\n")
    cfg = root / "factory_node.toml"
    cfg.write_text(cfg.read_text().replace("[daemon]\n", "[daemon]\nmax_overtakes = 2\n"))
    enqueue(root, tmp_path, ["s0"], seconds=8.0, steps=80)
    d = start_daemon(root, "--until-empty")
    wait_for(lambda: len(heartbeat(root).get("parts", [])) == 1, timeout=60, what="s0 running")
    smalls = [write_alloy(tmp_path / f"s{i}.alloy.json", selftest_alloy(seconds=1.0, steps=10)) for i in range(1, 6)]
    big = selftest_alloy(seconds=0.3)
    big["source"] = {"baseModel": "example-org/not-downloaded", "architecture": "llama"}
    r = factory("enqueue", str(write_alloy(tmp_path / "big.alloy.json", big)), *map(str, smalls), root=root)
    assert r.returncode == 0, r.stderr
    assert where(root)["s0"] == [("assembly", 0)]  # still running: the queue formed behind it
    assert d.wait(timeout=180) == 0
    assert all(copies == [("finished", 0)] for copies in where(root).values()) and len(where(root)) == 7
    _, claims = running_at_once(root)
    assert claims == ["s0", "s1", "s2", "big", "s3", "s4", "s5"]
    # big ran alone: nothing was claimed between its claim and its end
    seqs = [(e["kind"], e["part"]) for e in events(root) if e["kind"] in ("part/claimed", "part/finished")]
    at = seqs.index(("part/claimed", "big"))
    assert seqs[at + 1] == ("part/finished", "big")


def test_each_child_is_told_only_its_own_gpus(tmp_path):
    root = make_root(tmp_path / "root", parallel=3, extra="\n[resources]\ngpus = [8, 8]\ncpu_slots = 3\n")
    files = [big_alloy(tmp_path, f"g{i}", root, seconds=4.0) for i in range(2)]
    files.append(write_alloy(tmp_path / "cpu.alloy.json", selftest_alloy(seconds=4.0, steps=40)))
    assert factory("enqueue", *map(str, files), root=root).returncode == 0
    d = start_daemon(root, "--until-empty")
    beat = wait_for(lambda: (b := heartbeat(root)) and len(b.get("parts", [])) == 3 and b, timeout=60,
                    what="three running parts")
    seen = {p["part"]: (p["gpus"], child_env(p["pid"]).get("CUDA_VISIBLE_DEVICES")) for p in beat["parts"]}
    assert sorted(seen[g] for g in ("g0", "g1")) == [([0], "0"), ([1], "1")]
    assert seen["cpu"] == ([], "")  # a part that needs no GPU sees none
    assert d.wait(timeout=120) == 0
    claimed = {e["part"]: e["gpus"] for e in events(root, "part/claimed")}
    assert sorted(claimed.values()) == [[], [0], [1]]


def test_cancel_sigterm_and_a_crash_act_per_part_with_several_in_assembly(tmp_path):
    root = make_root(tmp_path / "root", parallel=3, extra="\n[resources]\ncpu_slots = 3\n")
    enqueue(root, tmp_path, ["keep1", "keep2", "doomed"], stages=2, seconds=4.0, steps=40)
    d = start_daemon(root)
    wait_for(lambda: len(heartbeat(root).get("parts", [])) == 3, timeout=60, what="three running parts")
    assert factory("cancel", "doomed", root=root).returncode == 0
    wait_for(lambda: where(root).get("doomed") == [("rework", 0)], timeout=60, what="doomed cancelled")
    assert len(list((root / "line/assembly").glob("keep*.alloy.json"))) == 2  # the others run on
    # SIGTERM: both running parts go back to intake under their names, no retry spent
    assert stop(d, signal.SIGTERM) == 0
    assert where(root)["keep1"] == where(root)["keep2"] == [("intake", 0)]
    released = {e["part"] for e in events(root, "part/released")}
    assert released == {"keep1", "keep2"}
    # a SIGKILLed worker with both in assembly: both recovered, resumed, finished once
    d = start_daemon(root)
    wait_for(lambda: len(heartbeat(root).get("parts", [])) == 2, timeout=60, what="both running again")
    d.send_signal(signal.SIGKILL)
    d.wait()
    wait_unlocked(root)
    run_until_empty(root)
    assert where(root)["keep1"] == where(root)["keep2"] == [("finished", 0)]
    assert {e["part"] for e in events(root, "part/recovered")} == {"keep1", "keep2"}
    for base in ("keep1", "keep2"):
        assert [e["part"] for e in events(root, "part/finished")].count(base) == 1


def test_the_ray_backend_without_ray_installed_is_a_config_error_naming_the_extra(tmp_path):
    """A node whose config asks for Ray but whose Python has none (here a
    `ray` package that fails to import, first on the path): exit 78, which
    the systemd unit does not restart-loop."""
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("ray is not installed here")\n')
    root = make_root(tmp_path / "root", extra='\n[cluster]\nbackend = "ray"\naddress = "127.0.0.1:6379"\n')
    env = {**os.environ, "PYTHONPATH": str(fake.parent), "FACTORY_ROOT": str(root)}
    r = subprocess.run([sys.executable, "-m", "factory.cli", "run", "--until-empty"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 78, r.stderr
    assert "pip install 'forge-factory[cluster]'" in r.stderr


def test_parts_over_the_ram_budget_together_are_retried_with_what_they_used_and_then_never_overlap(tmp_path):
    """Each selftest child holds about 35 MB, estimated at 0; the budget
    (53 MiB) holds one, not two. Together over it, the part furthest over
    its need is stopped and retried with its need raised to what it used:
    once both needs are real, placement keeps them apart."""
    root = make_root(tmp_path / "root", parallel=2, max_retries=5,
                     extra="\n[resources]\ncpu_slots = 2\nram_gb = 0.052\n")
    enqueue(root, tmp_path, ["m1", "m2"], seconds=3.0, steps=30)
    run_until_empty(root)
    placed = where(root)
    assert {b: c[0][0] for b, c in placed.items()} == {"m1": "finished", "m2": "finished"}
    retried = events(root, "part/retried")
    assert retried and all("together over this node's part memory budget" in e["reason"] for e in retried)
    tickets = {b: json.loads((root / "line/finished" / f"{b}.ticket.json").read_text()) for b in placed}
    raised = [b for b, t in tickets.items() if t.get("observed_ram_bytes")]
    assert raised and all(tickets[b]["observed_ram_bytes"] > 20 * 2**20 for b in raised)
    assert len(retried) <= 2  # each part at most once: then its need is what it used
    # the last claims came after both needs were known: those runs did not overlap
    last_claim = max(e["seq"] for e in events(root, "part/claimed"))
    first_done = min(e["seq"] for e in events(root, "part/finished"))
    assert len(raised) < 2 or last_claim > first_done

