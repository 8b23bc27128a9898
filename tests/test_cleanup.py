"""`factory cleanup`, the cold tiers it evicts to, and the tier checks that
doctor, status and plan share with it.

Parts are fabricated on disk as the line leaves them (alloy + result.json in
finished/, error.json in rework/, a work dir with a model dir) instead of
being forged: cleanup only reads those files. Cold tiers that must run out
of room are real tmpfs mounts (skipped where mounting is not allowed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest

from factory import cleanup
from factory.line import Line
from factory.tiers import measure
from tests.linekit import selftest_alloy, write_alloy

DAY = 86400.0
MiB = 1 << 20
MODEL = "stages/1-package/model"


# ── helpers ──────────────────────────────────────────────────────────────────


def cli(*args: str, root: Path) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, on `root`."""
    return subprocess.run([sys.executable, "-m", "factory.cli", args[0], "--root", str(root), *args[1:]],
                          capture_output=True, text=True, timeout=120)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def add_cold(root: Path, *paths: Path, min_free_gb: float = 0) -> None:
    cfg = (root / "factory_node.toml").read_text()
    for p in paths:
        cfg += f'\n[[storage.cold]]\npath = "{p}"\nmin_free_gb = {min_free_gb}\n'
    (root / "factory_node.toml").write_text(cfg)


def fabricate(root: Path, base: str, *, station: str = "finished", ago: float = 1.0,
              alloy_age: float = 30 * DAY, model: bool = True) -> Path:
    """A part as the line leaves it: its alloy in `station` with an old mtime
    (as after `cp -p`), its record completed `ago` seconds ago, and a work
    dir whose model dir the record names as forged_dir."""
    work = root / "work" / base
    (work / "stages/0-selftest").mkdir(parents=True)
    (work / "stages/0-selftest/selftest.json").write_text("{}")
    (work / "checkpoint.json").write_text(json.dumps(
        {"stages": [{"index": 0, "type": "selftest", "completed_at": iso(time.time() - ago)}]}))
    rec: dict = {"part": base, "work_dir": str(work)}
    if model:
        (work / MODEL).mkdir(parents=True)
        (work / MODEL / "model.safetensors").write_bytes(os.urandom(300_000))
        (work / MODEL / "config.json").write_text('{"model_type": "llama"}')
        rec["forged_dir"] = str(work / MODEL)
    d = root / "line" / station
    alloy = write_alloy(d / f"{base}.alloy.json", selftest_alloy())
    os.utime(alloy, (time.time() - alloy_age,) * 2)
    if station == "finished":
        (d / f"{base}.result.json").write_text(json.dumps({"completed_at": iso(time.time() - ago), **rec}))
    elif station == "rework":
        (d / f"{base}.error.json").write_text(json.dumps(
            {"failed_at": iso(time.time() - ago), "class": "deterministic", "stage": {"type": "acceptance"},
             "message": "acceptance failed", "result": rec}))
    return work


def orphan(root: Path, base: str, files: dict[str, bytes]) -> Path:
    """A work dir whose part is no longer on the line (no checkpoint: no time)."""
    work = root / "work" / base
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    return work


def tree(top: Path) -> dict[str, str]:
    """Everything under `top`: sha256 of files, targets of symlinks, dirs."""
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs at `path` for the length of the block."""
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def evicted(cold: Path) -> list[str]:
    d = cold / "factory-evicted"
    return sorted(os.listdir(d)) if d.is_dir() else []


# ── keep by completion time; forged models stay until named ─────────────────


def test_a_model_finished_a_second_ago_survives_an_old_alloy_mtime(root, tmp_path):
    cold = tmp_path / "cold"
    cold.mkdir()
    add_cold(root, cold)
    work = fabricate(root, "forged", ago=1.0, alloy_age=30 * DAY)
    before = tree(work)

    r = cli("cleanup", "--json", root=root)
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["evictions"] == [] and tree(work) == before
    assert [k["part"] for k in out["kept"]] == ["forged"]
    assert "forged_dir points into it" in out["kept"][0]["reason"]

    r = cli("cleanup", "--keep-hours", "0", root=root)  # past the window, but the result points at it
    assert r.returncode == 0 and "forged_dir points into it" in r.stdout and "--part forged" in r.stdout
    assert tree(work) == before and evicted(cold) == []

    r = cli("cleanup", "--part", "forged", root=root)  # named, yet finished within --keep-hours
    assert r.returncode == 0 and "within --keep-hours 24" in r.stdout and tree(work) == before

    r = cli("cleanup", "--keep-hours", "0", "--part", "forged", "--dry-run", root=root)
    dest = cold / "factory-evicted" / "forged"
    assert r.returncode == 0 and f"would move {work}" in r.stdout and f"-> {dest}" in r.stdout
    assert tree(work) == before and evicted(cold) == []

    r = cli("cleanup", "--keep-hours", "0", "--part", "forged", "--json", root=root)
    assert r.returncode == 0, r.stderr
    [ev] = json.loads(r.stdout)["evictions"]
    assert (ev["action"], ev["done"], ev["target"], ev["error"]) == ("move", True, str(dest), None)
    assert not work.exists() and tree(dest) == before and evicted(cold) == ["forged"]
    result = json.loads((root / "line/finished/forged.result.json").read_text())
    assert result["forged_dir"] == str(dest / MODEL) and result["work_dir"] == str(dest)
    assert (Path(result["forged_dir"]) / "model.safetensors").is_file()
    assert result["evicted"]["from"] == str(work) and result["evicted"]["action"] == "move"
    assert result["completed_at"]  # the rest of the record is kept


def test_keep_hours_count_from_completed_at_and_failed_at_not_file_times(root):
    fabricate(root, "done-2h", ago=2 * 3600, alloy_age=0, model=False)  # fresh alloy mtime
    fabricate(root, "done-10m", ago=600, alloy_age=30 * DAY, model=False)  # old alloy mtime
    fabricate(root, "failed-3h", station="rework", ago=3 * 3600, alloy_age=0, model=False)
    fabricate(root, "failed-5m", station="rework", ago=300, alloy_age=30 * DAY, model=False)
    line = Line(root)
    todo = cleanup.plan(line, keep_hours=1)
    assert sorted(e.part for e in todo.evictions) == ["done-2h", "failed-3h"]
    assert sorted(k.part for k in todo.kept) == ["done-10m", "failed-5m"]
    assert all(e.action == "delete" for e in todo.evictions)  # no cold tier
    outcomes = cleanup.apply(line, todo)
    assert [o.error for o in outcomes] == [None, None]
    assert not (root / "work/done-2h").exists() and (root / "work/done-10m").is_dir()
    result = json.loads((root / "line/finished/done-2h.result.json").read_text())
    assert result["work_dir"] is None and result["evicted"]["action"] == "delete"


def test_a_failed_acceptance_keeps_its_model_until_named_and_error_json_follows(root, tmp_path):
    cold = tmp_path / "cold"
    cold.mkdir()
    add_cold(root, cold)
    work = fabricate(root, "rejected", station="rework", ago=10 * DAY)
    before = tree(work)
    line = Line(root)
    todo = cleanup.plan(line, keep_hours=0)
    assert todo.evictions == [] and "result.forged_dir points into it" in todo.kept[0].reason
    todo = cleanup.plan(line, keep_hours=0, parts=["rejected"])
    assert [o.error for o in cleanup.apply(line, todo)] == [None]
    dest = cold / "factory-evicted/rejected"
    err = json.loads((root / "line/rework/rejected.error.json").read_text())
    assert err["result"]["forged_dir"] == str(dest / MODEL) and err["result"]["work_dir"] == str(dest)
    assert err["message"] == "acceptance failed" and tree(dest) == before and not work.exists()


def test_waiting_and_running_parts_are_never_touched(root, tmp_path):
    cold = tmp_path / "cold"
    cold.mkdir()
    add_cold(root, cold)
    works = {s: fabricate(root, f"p-{s}", station=s, ago=30 * DAY) for s in ("intake", "assembly", "deferred")}
    before = {s: tree(w) for s, w in works.items()}
    r = cli("cleanup", "--keep-hours", "0", "--json", root=root)
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["evictions"] == [] and out["kept"] == []
    assert {s: tree(w) for s, w in works.items()} == before
    r = cli("cleanup", "--keep-hours", "0", "--part", "p-assembly", root=root)
    assert r.returncode == 4 and "is in assembly/" in r.stderr and "never touches" in r.stderr
    r = cli("cleanup", "--part", "../../etc", root=root)
    assert r.returncode == 2 and "--part '../../etc'" in r.stderr
    r = cli("cleanup", "--part", "nope", root=root)
    assert r.returncode == 3 and "no work dir" in r.stderr
    assert {s: tree(w) for s, w in works.items()} == before and evicted(cold) == []


def test_a_part_retried_while_its_work_dir_is_copied_keeps_it(root, tmp_path):
    cold = tmp_path / "cold"
    cold.mkdir()
    add_cold(root, cold)
    work = fabricate(root, "again", station="rework", ago=2 * DAY, model=False)
    before = tree(work)
    line = Line(root)
    todo = cleanup.plan(line, keep_hours=1)
    assert [e.part for e in todo.evictions] == ["again"]
    assert cli("retry", "again", root=root).returncode == 0  # back in intake before the source goes
    [o] = cleanup.apply(line, todo)
    assert o.skipped and "changed on the line" in o.skipped and o.error is None
    assert tree(work) == before and evicted(cold) == []


# ── copies: hidden name, verified, never over an earlier one ────────────────


def test_a_copy_that_runs_out_of_inodes_is_removed_and_the_source_kept(root, tmp_path):
    with tmpfs(tmp_path / "tiny", "size=2m,nr_inodes=16") as tiny:
        add_cold(root, tiny)
        many = orphan(root, "many", {f"f{i:02}": b"x" * 10 for i in range(40)})
        small = orphan(root, "small", {"one": b"y" * 100})
        before = tree(many)
        for _ in range(2):  # the next cleanup must not delete the source either
            r = cli("cleanup", root=root)
            assert r.returncode == 1
            [msg] = r.stderr.strip().splitlines()
            assert msg.startswith(f"factory cleanup: could not move {many} to cold[0] {tiny}")
            assert "No space left on device" in msg and "the work dir is kept" in msg
            assert tree(many) == before
            assert evicted(tiny) == ["small"]  # carried on with the next one; no partial tree left
        assert not small.exists() and (tiny / "factory-evicted/small/one").read_bytes() == b"y" * 100


def test_a_copy_that_outgrew_its_plan_is_removed_and_goes_elsewhere_next_time(root, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    with tmpfs(tmp_path / "tiny", "size=2m") as tiny:
        add_cold(root, tiny, big)
        work = orphan(root, "grows", {"w.bin": os.urandom(200_000)})
        line = Line(root)
        todo = cleanup.plan(line, keep_hours=0)
        assert [(e.part, e.tier.name) for e in todo.evictions] == [("grows", "cold[0]")]
        (work / "w.bin").write_bytes(os.urandom(3 * MiB))  # larger than the tier since the plan
        before = tree(work)
        [o] = cleanup.apply(line, todo)
        assert o.error and "No space left on device" in o.error and o.target is None
        assert tree(work) == before and os.listdir(tiny / "factory-evicted") == []
        todo = cleanup.plan(line, keep_hours=0)
        assert [(e.part, e.tier.name) for e in todo.evictions] == [("grows", "cold[1]")]
        assert [o.error for o in cleanup.apply(line, todo)] == [None]
        assert tree(big / "factory-evicted/grows") == before and not work.exists()


def test_room_is_counted_in_allocated_blocks_and_holes_stay_holes(root, tmp_path):
    with tmpfs(tmp_path / "tiny", "size=2m") as tiny:
        add_cold(root, tiny)
        work = orphan(root, "sparse", {"dense": os.urandom(4096)})
        with open(work / "holes.bin", "wb") as f:  # 64 MiB apparent, two pages of data
            f.write(b"a" * 4096)
            f.seek(40 * MiB)
            f.write(b"b" * 4096)
            f.truncate(64 * MiB)
        os.link(work / "dense", work / "dense-link")
        assert cleanup.allocated_bytes(work) < 1 * MiB
        before = tree(work)
        line = Line(root)
        todo = cleanup.plan(line, keep_hours=0)
        assert [(e.action, e.tier.name) for e in todo.evictions] == [("move", "cold[0]")]
        assert [o.error for o in cleanup.apply(line, todo)] == [None]
        dest = tiny / "factory-evicted/sparse"
        assert tree(dest) == before
        st = os.stat(dest / "holes.bin")
        assert st.st_size == 64 * MiB and st.st_blocks * 512 < 1 * MiB
        assert os.stat(dest / "dense").st_ino == os.stat(dest / "dense-link").st_ino


def test_two_evictions_share_a_tiers_room(root, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    with tmpfs(tmp_path / "tiny", "size=2m") as tiny:
        add_cold(root, tiny, big)
        orphan(root, "a", {"w": os.urandom(1200 * 1024)})
        orphan(root, "b", {"w": os.urandom(1200 * 1024)})
        line = Line(root)
        todo = cleanup.plan(line, keep_hours=0)
        assert [(e.part, e.tier.name) for e in todo.evictions] == [("a", "cold[0]"), ("b", "cold[1]")]
        assert [o.error for o in cleanup.apply(line, todo)] == [None, None]
        assert evicted(tiny) == ["a"] and evicted(big) == ["b"]


def test_symlinks_are_copied_as_symlinks_never_followed(root, tmp_path):
    cold = tmp_path / "cold"
    cold.mkdir()
    add_cold(root, cold)
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_bytes(b"not the factory's")
    (outside / "dir/inner").write_bytes(b"nor this")
    work = orphan(root, "links", {"stages/0-x/out.json": b"{}"})
    os.symlink(outside / "secret", work / "to-file")
    os.symlink(outside / "dir", work / "to-dir")
    os.symlink("stages/0-x/out.json", work / "relative")
    os.symlink(tmp_path / "nowhere", work / "dangling")
    before, outside_before = tree(work), tree(outside)
    assert cli("cleanup", "--keep-hours", "0", root=root).returncode == 0
    dest = cold / "factory-evicted/links"
    assert tree(dest) == before and tree(outside) == outside_before
    assert all((dest / n).is_symlink() for n in ("to-file", "to-dir", "relative", "dangling"))
    assert not any("inner" in rel for rel in tree(dest))


def test_an_earlier_eviction_is_never_replaced_even_an_empty_one(root, tmp_path):
    cold = tmp_path / "cold"
    (cold / "factory-evicted/again").mkdir(parents=True)  # empty: a plain rename would replace it
    (cold / "factory-evicted/again.1").mkdir()
    (cold / "factory-evicted/again.1/old").write_bytes(b"first")
    add_cold(root, cold)
    work = orphan(root, "again", {"new": b"second"})
    r = cli("cleanup", "--keep-hours", "0", "--json", root=root)
    [ev] = json.loads(r.stdout)["evictions"]
    assert r.returncode == 0 and ev["target"] == str(cold / "factory-evicted/again.2")
    assert os.listdir(cold / "factory-evicted/again") == []
    assert (cold / "factory-evicted/again.1/old").read_bytes() == b"first"
    assert (cold / "factory-evicted/again.2/new").read_bytes() == b"second" and not work.exists()


def test_leftovers_of_a_crashed_cleanup_are_removed_but_not_a_live_ones(root, tmp_path):
    cold = tmp_path / "cold"
    (cold / "factory-evicted").mkdir(parents=True)
    add_cold(root, cold)
    dead = dead_pid()
    partial = cold / f"factory-evicted/.x.evicting-{dead}"
    (partial / "stages").mkdir(parents=True)
    (partial / "stages/half").write_bytes(b"h" * 100)
    hidden_source = root / f"work/.y.deleting-{dead}"
    hidden_source.mkdir()
    (hidden_source / "f").write_bytes(b"f")
    live = subprocess.Popen(["sleep", "60"])
    try:
        busy = cold / f"factory-evicted/.z.evicting-{live.pid}"
        busy.mkdir()
        r = cli("cleanup", root=root)
        assert r.returncode == 0 and "leftover of a crashed cleanup" in r.stdout
        assert not partial.exists() and not hidden_source.exists() and busy.is_dir()
    finally:
        live.kill()
        live.wait()


def test_a_second_cleanup_on_the_same_root_is_refused(root):
    work = orphan(root, "o", {"w": b"w"})
    fd = os.open(root / "work", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running cleanup holds
        r = cli("cleanup", root=root)
        assert r.returncode == 4 and "another `factory cleanup` is running" in r.stderr and work.is_dir()
    finally:
        os.close(fd)
    assert cli("cleanup", root=root).returncode == 0 and not work.exists()


# ── offload folders ──────────────────────────────────────────────────────────


def test_offload_folders_of_parts_not_running_are_removed(root, tmp_path):
    cold = tmp_path / "cold"
    add_cold(root, cold)
    fabricate(root, "running", station="assembly")
    fabricate(root, "waiting", station="intake")
    fabricate(root, "done", ago=1.0)
    for base in ("running", "waiting", "done", "gone"):
        (cold / "factory-offload" / base).mkdir(parents=True)
        (cold / "factory-offload" / base / "layer.dat").write_bytes(b"w" * 1000)
    r = cli("cleanup", "--part", "done", "--json", root=root)
    assert r.returncode == 0
    assert [x["part"] for x in json.loads(r.stdout)["removed"]] == ["done"]  # --part restricts
    r = cli("cleanup", "--json", root=root)
    removed = json.loads(r.stdout)["removed"]
    assert r.returncode == 0 and sorted(x["part"] for x in removed if x["done"]) == ["gone", "waiting"]
    assert os.listdir(cold / "factory-offload") == ["running"]
    assert (cold / "factory-offload/running/layer.dat").read_bytes() == b"w" * 1000
    assert (root / "work/done" / MODEL).is_dir()  # the offload went, the model stayed


# ── a cold tier whose disk is not there ─────────────────────────────────────


def test_a_tier_path_that_is_missing_or_not_a_directory_is_a_problem(tmp_path):
    (tmp_path / "mnt").mkdir()
    gone = measure(tmp_path / "mnt/cold", name="cold[0]")
    assert gone.missing and "mount the disk or create the directory" in gone.problem
    assert (gone.total_bytes, gone.free_bytes, gone.room_for(0)) == (0, 0, False)  # the parent is not measured
    (tmp_path / "file").write_text("x")
    assert "not a directory" in measure(tmp_path / "file", name="cold[0]").problem
    assert "not an absolute path" in measure(Path("relative/cold"), name="cold[0]").problem
    ok = measure(tmp_path / "mnt", name="cold[0]")
    assert ok.problem is None and ok.free_bytes > 0 and ok.room_for(0)


def test_a_missing_cold_tier_is_reported_everywhere_and_never_filled(root, tmp_path):
    (tmp_path / "mnt").mkdir()
    gone = tmp_path / "mnt/cold"  # an unmounted disk's mount point that was never made
    add_cold(root, gone)
    work = orphan(root, "orphan", {"w": b"z" * 5000})
    before = tree(work)

    r = cli("doctor", "--json", root=root)
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    tier = checks[f"tier cold[0] {gone}"]
    assert r.returncode == 1 and tier["verdict"] == "fail"
    assert "mount the disk or create the directory" in tier["detail"] and "storage.cold[0].path" in tier["detail"]

    st = json.loads(cli("status", "--json", root=root).stdout)
    assert st["tiers"][1]["missing"] is True and str(gone) in st["tiers"][1]["problem"]
    assert f"tier cold[0] MISSING: {gone}" in cli("status", root=root).stdout
    pretty = cli("status", "--pretty", root=root)
    assert pretty.returncode == 0 and "MISSING" in pretty.stdout

    alloy = write_alloy(tmp_path / "s.alloy.json", selftest_alloy())
    r = cli("plan", str(alloy), "--json", root=root)
    [finding] = [f for f in json.loads(r.stdout)["findings"] if f["value"] == str(gone)]
    assert r.returncode == 2 and "cold[0]" in finding["message"] and "storage.cold[0].path" in finding["message"]
    assert "mount the disk or create the directory" in finding["fix"]

    r = cli("cleanup", "--keep-hours", "0", root=root)
    assert r.returncode == 1 and f"tier cold[0] (storage.cold[0].path): {gone} does not exist" in r.stderr
    assert "not deleted while a cold tier is missing" in r.stdout
    assert tree(work) == before and os.listdir(tmp_path / "mnt") == []  # nothing written under the parent

    gone.mkdir()  # the disk is back
    r = cli("cleanup", "--keep-hours", "0", root=root)
    assert r.returncode == 0 and tree(gone / "factory-evicted/orphan") == before and not work.exists()
