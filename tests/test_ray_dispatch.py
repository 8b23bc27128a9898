"""`factory run` as a Ray dispatcher, on a real three-node loopback cluster.

The nodes differ in `vram_gb` (head 0 with no GPU; 8 and 24 with one GPU
each, declared: Ray counts GPUs, none exist here, and the children run on
the CPU). The dispatcher's node config declares the GPU the parts are sized
for, so each part's need comes from its real (sparse) checkpoint. Each test
drives the real daemon and reads the outcome from the shared root.
The node-loss test removes a node, so it runs last.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from factory import heartbeat as hb  # noqa: E402
from tests.linekit import (  # noqa: E402
    events, factory, make_root, selftest_alloy, start_daemon, wait_for,
    wait_unlocked, where, write_alloy)
from tests.raykit import loopback_cluster  # noqa: E402
from tests.test_placement import sparse_checkpoint  # noqa: E402

GIB_ROWS = 512 * 1024  # rows of a 1024-wide bf16 tensor per GiB


@pytest.fixture(scope="module")
def cluster():
    gpu_node = {"num_cpus": 1, "num_gpus": 1, "memory": 64 * 2**30}
    with loopback_cluster({"num_cpus": 1, "num_gpus": 0, "memory": 64 * 2**30}, {8: gpu_node, 24: gpu_node}) as c:
        yield c


def dispatcher_root(path: Path, cluster) -> Path:
    # one 40 GiB GPU per part: a 0.5 GiB model asks for ~2.2 GB of VRAM,
    # a 6 GiB one for ~9.2 GB (the 24 GB node only), 30 GiB for ~40 GB (none)
    root = make_root(path, parallel=3, extra=f'\n[resources]\ngpus = [40]\n\n[cluster]\nbackend = "ray"\n'
                                              f'address = "{cluster.address}"\nnamespace = "{path.name}"\n')
    for name, gib in (("half", 0.5), ("six", 6), ("thirty", 30)):
        sparse_checkpoint(root / "models" / name, rows=int(gib * GIB_ROWS))
    return root


def model_alloy(tmp: Path, name: str, model: str, **stage) -> Path:
    alloy = selftest_alloy(**stage)
    alloy["source"] = {"baseModel": f"models/{model}", "architecture": "llama"}
    return write_alloy(tmp / f"{name}.alloy.json", alloy)


def enqueue(root: Path, *files: Path) -> None:
    r = factory("enqueue", *map(str, files), root=root)
    assert r.returncode == 0, r.stdout + r.stderr


def heartbeat_parts(root: Path) -> dict[str, dict]:
    beat = hb.read(root / "line" / ".heartbeat.json") or {}
    return {p["part"]: p for p in beat.get("parts", [])}


def result(root: Path, base: str) -> dict:
    return json.loads((root / "line/finished" / f"{base}.result.json").read_text())


def run_until_empty(root: Path) -> None:
    r = factory("run", "--until-empty", root=root, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_dispatcher_whose_head_does_not_answer_exits_1_naming_the_address(tmp_path):
    root = make_root(tmp_path / "root", extra='\n[cluster]\nbackend = "ray"\naddress = "127.0.0.1:1"\n')
    r = factory("run", "--until-empty", root=root, timeout=60)
    assert r.returncode == 1 and "127.0.0.1:1" in r.stderr and "ray start --head" in r.stderr


def test_parts_land_only_on_nodes_that_fit_and_one_that_fits_none_is_refused(cluster, tmp_path):
    root = dispatcher_root(tmp_path / "fit", cluster)
    enqueue(root, model_alloy(tmp_path, "six", "six"), model_alloy(tmp_path, "half", "half"),
            write_alloy(tmp_path / "plain.alloy.json", selftest_alloy()),
            model_alloy(tmp_path, "thirty", "thirty"))
    run_until_empty(root)
    placed = where(root)
    assert placed["six"] == placed["half"] == placed["plain"] == [("finished", 0)]
    assert result(root, "six")["placement"]["cluster_node"] == cluster.by_vram[24]
    assert result(root, "half")["placement"]["cluster_node"] in (cluster.by_vram[8], cluster.by_vram[24])
    claimed = {e["part"]: e["need"] for e in events(root, "part/claimed")}
    assert claimed["six"]["gpus"] == 1 and 8e9 < claimed["six"]["vram_bytes"] * 1.0 < 24e9
    # fits no node: refused at the dispatcher's gate, naming the largest node
    assert placed["thirty"] == [("rework", 0)]
    err = json.loads((root / "line/rework/thirty.error.json").read_text())
    assert "no node of the Ray cluster" in err["message"] and "has 24 GB VRAM" in err["message"]
    # every record is on the shared root: the children wrote their checkpoints there
    assert all((root / "work" / b / "checkpoint.json").is_file() for b in ("six", "half", "plain"))


def test_status_shows_the_cluster_and_what_each_node_runs(cluster, tmp_path):
    root = dispatcher_root(tmp_path / "status", cluster)
    enqueue(root, model_alloy(tmp_path, "long", "six", seconds=30.0, steps=300))
    d = start_daemon(root)
    try:
        wait_for(lambda: heartbeat_parts(root).get("long", {}).get("node"), timeout=120, what="long placed")
        snap = wait_for(lambda: (s := json.loads(factory("status", "--json", root=root).stdout))["cluster"]
                        and any(n["parts"] for n in s["cluster"]["nodes"]) and s, timeout=60, what="cluster view")
        nodes = {n["node_id"]: n for n in snap["cluster"]["nodes"]}
        assert sorted(n["total"]["vram_gb"] for n in nodes.values()) == [0, 8, 24]
        assert nodes[cluster.by_vram[24]]["parts"] == ["long"]
        assert "runs long" in factory("status", root=root).stdout
        assert factory("cancel", "long", root=root).returncode == 0
        wait_for(lambda: where(root).get("long") == [("rework", 0)], timeout=120, what="long cancelled")
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=120)


def test_a_killed_dispatcher_reattaches_on_restart_and_runs_nothing_twice(cluster, tmp_path):
    root = dispatcher_root(tmp_path / "restart", cluster)
    enqueue(root, model_alloy(tmp_path, "steady", "half", stages=2, seconds=4.0, steps=20))
    d = start_daemon(root)
    wait_for(lambda: any(e["stage"]["index"] == 0 for e in events(root, "stage/completed", "steady")),
             timeout=120, what="stage 0 done")
    d.send_signal(signal.SIGKILL)  # the dispatcher dies; its detached try runs on
    d.wait()
    wait_unlocked(root)
    run_until_empty(root)
    assert where(root)["steady"] == [("finished", 0)]
    assert [e["part"] for e in events(root, "part/reattached")] == ["steady"]
    assert not events(root, "part/recovered") and not events(root, "part/retried")
    reports = (root / "work/steady/reports-r0.jsonl").read_text().splitlines()
    kinds = [json.loads(x)["t"] for x in reports]
    assert kinds.count("stage_started") == 2 and kinds[-1] == "done"  # one child, each stage once
    assert (root / "work/steady/child.log").read_text().count("on Ray node") == 1
    assert len(events(root, "part/finished", "steady")) == 1


def test_a_node_lost_mid_part_is_retried_elsewhere_and_resumes_at_its_stage(cluster, tmp_path):
    root = dispatcher_root(tmp_path / "loss", cluster)
    enqueue(root, model_alloy(tmp_path, "nomad", "half", stages=2, seconds=6.0, steps=30))
    d = start_daemon(root)
    try:
        wait_for(lambda: any(e["stage"]["index"] == 1 for e in events(root, "stage/started", "nomad")),
                 timeout=120, what="stage 1 running")
        node = wait_for(lambda: heartbeat_parts(root).get("nomad", {}).get("node"), timeout=60, what="its node")
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node))
        wait_for(lambda: where(root).get("nomad") == [("finished", 1)], timeout=180, what="finished on retry")
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=120)
    retried = events(root, "part/retried", "nomad")
    assert len(retried) == 1 and "left the cluster" in retried[0]["reason"]
    res = result(root, "nomad")
    assert res["retries"] == 1 and res["placement"]["cluster_node"] not in (node, None)
    second = [json.loads(x) for x in (root / "work/nomad/reports-r1.jsonl").read_text().splitlines()]
    assert [m["index"] for m in second if m["t"] == "stage_skipped"] == [0]  # resumed at its stage
    assert [m["index"] for m in second if m["t"] == "stage_started"] == [1]
