"""The Ray backend on a real three-node cluster on loopback.

The nodes differ in their `vram_gb` resource (head 0, then 8 and 24), so
where a try lands is decided by its need. Tries run the real factory.child
on a real root with selftest alloys. One cluster serves the whole module:
starting one costs seconds. The node-loss test removes a node, so it runs last.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")

from factory import durable, transitions  # noqa: E402
from factory.intake import enqueue  # noqa: E402
from factory.line import init_root  # noqa: E402
from factory.outcomes import EXIT_DONE, EXIT_STOPPED  # noqa: E402
from factory.protocol import CHECKPOINT, CLAIMED_ALLOY, Layout  # noqa: E402
from factory.ray_backend import (  # noqa: E402
    NodeLost, RayLauncher, submission_id,
)
from tests.linekit import selftest_alloy, write_alloy  # noqa: E402
from tests.raykit import loopback_cluster  # noqa: E402

DEADLINE_S = 120.0  # hang guard for every wait below, not a timing assertion


@dataclass(frozen=True)
class Need:
    cpus: int = 1
    gpus: int = 0
    vram_gb_total: float = 0.0
    ram_bytes: int = 0


@pytest.fixture(scope="module")
def cluster():
    with loopback_cluster({"num_cpus": 1}, {8: {"num_cpus": 1}, 24: {"num_cpus": 1}}) as c:
        yield c


@pytest.fixture(scope="module")
def root(tmp_path_factory, cluster):
    return init_root(tmp_path_factory.mktemp("root")).root


@pytest.fixture
def launcher(cluster, root):
    return RayLauncher(cluster.address, root)


def claimed_part(root: Path, base: str, **alloy) -> str:
    """A selftest part claimed into assembly/ with its work dir made, as the
    dispatcher leaves it before a launch; its file name."""
    line = init_root(root)
    src = write_alloy(root / f"{base}.src.json", selftest_alloy(**alloy))
    part = transitions.claim(line, enqueue(line, src, name=base))
    work = line.layout.work_dir(base)
    work.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(work / CLAIMED_ALLOY, part.path.read_bytes())
    return part.path.name


def wait_exit(run) -> int:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        code = run.poll()
        if code is not None:
            return code
        time.sleep(0.1)
    raise AssertionError(f"{run.name} did not end within {DEADLINE_S}s")


def wait_gone(root: Path, part_filename: str) -> bool:
    """True once no factory.child for that part lives (a hang guard bounds it)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        alive = [p for p in psutil.process_iter(["cmdline"])
                 if str(root) in (p.info["cmdline"] or []) and part_filename in (p.info["cmdline"] or [])]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def wait_report(run, kind: str) -> list[dict]:
    """Every report line so far, once one of type `kind` is among them."""
    buf, deadline = b"", time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        buf += run.read_reports()
        lines = [json.loads(x) for x in buf.splitlines()]
        if any(m["t"] == kind for m in lines):
            return lines
        time.sleep(0.1)
    raise AssertionError(f"{run.name} reported no {kind!r} within {DEADLINE_S}s: {buf[-500:]!r}")


def test_submission_id_is_deterministic_and_safe():
    assert submission_id("qwen3.5-4b", 2) == "forge-qwen3.5-4b-r2"
    assert submission_id("a b/c", 0) == submission_id("a b/c", 0) == "forge-a_b_c-r0"


def test_real_child_runs_on_the_only_node_that_fits(cluster, root, launcher):
    name = claimed_part(root, "fits24", stages=2)
    run = launcher.start(name, "fits24", 0, Need(vram_gb_total=16))

    assert wait_exit(run) == EXIT_DONE
    assert run.node() == cluster.by_vram[24]
    kinds = [json.loads(x)["t"] for x in run.read_reports().splitlines()]
    assert kinds.count("stage_started") == kinds.count("stage_completed") == 2
    assert kinds[-1] == "done"
    assert (root / "work" / "fits24" / CHECKPOINT).is_file()
    assert launcher.attach("fits24", 0) is None  # collected: the name is free again


def test_a_need_that_fits_nowhere_names_the_largest_node(launcher):
    why = launcher.fits_anywhere(Need(vram_gb_total=30))

    assert why is not None and "needs 30 GB VRAM" in why and "has 24 GB VRAM" in why
    assert launcher.fits_anywhere(Need(vram_gb_total=24)) is None
    assert launcher.largest_node().total.vram_gb == 24


def test_nodes_list_resources_and_placed_tries(cluster, root, launcher):
    name = claimed_part(root, "listed", seconds=60, steps=60)
    run = launcher.start(name, "listed", 0, Need(vram_gb_total=8))
    wait_report(run, "stage_started")

    views = {v.node_id: v for v in launcher.nodes()}
    placed = views[run.node()]
    assert sorted(v.total.vram_gb for v in views.values()) == [0, 8, 24]
    assert placed.running == (submission_id("listed", 0),)
    assert placed.available.cpus == 0 and placed.available.vram_gb == placed.total.vram_gb - 8
    run.terminate()
    assert wait_exit(run) == EXIT_STOPPED


def test_a_restarted_dispatcher_reattaches_instead_of_launching_again(cluster, root, launcher):
    name = claimed_part(root, "again", seconds=2, steps=4)
    first = launcher.start(name, "again", 0, Need())
    wait_report(first, "stage_started")
    ray.shutdown()  # the dispatcher goes away; its detached try does not

    fresh = RayLauncher(cluster.address, root)
    found = fresh.attach("again", 0)
    assert found is not None and found.poll() is None
    second = fresh.start(name, "again", 0, Need())
    assert wait_exit(second) == EXIT_DONE
    kinds = [json.loads(x)["t"] for x in second.read_reports().splitlines()]
    assert kinds.count("stage_started") == 1 and kinds[-1] == "done"  # one child, started once
    log = (root / "work" / "again" / "child.log").read_text()
    assert log.count("--- ") == 1


def test_a_lost_node_is_reported_as_node_lost(cluster, root, launcher):
    # The 24 GB node fits an 8 GB try too: keep its one CPU busy first.
    blocker = launcher.start(claimed_part(root, "blocker", seconds=120, steps=120), "blocker", 0,
                             Need(vram_gb_total=16))
    name = claimed_part(root, "lost", seconds=120, steps=120)
    run = launcher.start(name, "lost", 0, Need(vram_gb_total=8))
    wait_report(run, "stage_started")
    node = run.node()
    assert node == cluster.by_vram[8]
    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node))

    deadline = time.monotonic() + DEADLINE_S
    with pytest.raises(NodeLost, match=node) as lost:
        while time.monotonic() < deadline:
            run.poll()
            time.sleep(0.2)
    assert lost.value.node == node
    assert launcher.attach("lost", 0) is None
    assert Layout(root).report_file("lost", 0).is_file()
    assert wait_gone(root, name)  # the child died with its actor: no orphan builds on the shared root
    blocker.kill()
    assert wait_exit(blocker) < 0  # killed by SIGKILL, as Popen reports it
