"""Foreman commands: outcomes on disk, JSON output and exit codes."""

from __future__ import annotations

import json
import os
import time

from tests.linekit import events, factory, selftest_alloy, where, write_alloy


def enqueue(root, tmp_path, name, **kw):
    src = write_alloy(tmp_path / f"{name}.alloy.json", selftest_alloy(**kw))
    return factory("enqueue", str(src), root=root)


def test_no_root_is_bad_input(tmp_path):
    env_root = os.environ.pop("FACTORY_ROOT", None)
    try:
        r = factory("list")
        assert r.returncode == 2 and "--root" in r.stderr
        r = factory("list", "--root", str(tmp_path / "nowhere"))
        assert r.returncode == 2 and "factory init" in r.stderr
    finally:
        if env_root:
            os.environ["FACTORY_ROOT"] = env_root


def test_enqueue_refuses_a_taken_name_and_rejects_bad_alloys(root, tmp_path):
    assert enqueue(root, tmp_path, "a").returncode == 0
    before = (root / "line/intake/a.alloy.json").read_bytes()
    r = enqueue(root, tmp_path, "a", steps=7)
    assert r.returncode == 4 and "already on the line (in intake/)" in r.stderr
    assert (root / "line/intake/a.alloy.json").read_bytes() == before  # never overwritten
    r = factory("enqueue", str(tmp_path / "a.alloy.json"), "--as", "a-2", root=root)
    assert r.returncode == 0 and where(root)["a-2"] == [("intake", 0)]

    bad = tmp_path / "bad.alloy.json"
    bad.write_text(json.dumps({**selftest_alloy(), "stages": [{"type": "selftest", "steps": 0}]}))
    r = factory("enqueue", str(bad), root=root)
    assert r.returncode == 2 and "$.stages[0].steps" in r.stderr
    err = json.loads((root / "line/rework/bad.error.json").read_text())
    assert err["problems"][0]["path"] == "$.stages[0].steps"
    assert (root / "line/rework/bad.alloy.json").read_bytes() == bad.read_bytes()  # nothing lost
    r = factory("enqueue", str(tmp_path / "a.alloy.json"), "--as", "bad", root=root)
    assert r.returncode == 4 and "rework/" in r.stderr  # terminal names stay taken


def test_list_status_tail_json(root, tmp_path):
    enqueue(root, tmp_path, "one")
    enqueue(root, tmp_path, "two", priority=3)
    rows = json.loads(factory("list", "--json", root=root).stdout)
    assert {(r["part"], r["station"], r["priority"]) for r in rows} == {("one", "intake", 0), ("two", "intake", 3)}
    assert json.loads(factory("list", "--station", "finished", "--json", root=root).stdout) == []
    st = json.loads(factory("status", "--json", root=root).stdout)
    assert st["stations"]["intake"] == 2 and st["worker"]["stale"] is True
    assert st["tiers"][0]["name"] == "hot" and st["tiers"][0]["free_gib"] > 0
    tail = [json.loads(x) for x in factory("tail", "--json", root=root).stdout.splitlines()]
    assert [e["kind"] for e in tail] == ["part/enqueued", "part/enqueued"]
    since = factory("tail", "--json", "--since", str(tail[0]["seq"]), root=root).stdout.splitlines()
    assert [json.loads(x)["part"] for x in since] == ["two"]
    assert factory("status", "--pretty", root=root).returncode == 0


def test_defer_resume_cancel_retry(root, tmp_path):
    enqueue(root, tmp_path, "p")
    assert factory("defer", "p", root=root).returncode == 0
    assert where(root)["p"] == [("deferred", 0)]
    assert factory("defer", "p", root=root).returncode == 4
    assert factory("resume", "p", root=root).returncode == 0
    assert where(root)["p"] == [("intake", 0)]
    assert factory("cancel", "p", root=root).returncode == 0
    assert where(root)["p"] == [("rework", 0)]
    assert json.loads((root / "line/rework/p.error.json").read_text())["class"] == "cancelled"
    assert factory("cancel", "p", root=root).returncode == 4
    assert factory("retry", "nope", root=root).returncode == 3
    r = factory("retry", "p", root=root)
    assert r.returncode == 0
    assert where(root)["p"] == [("intake", 0)]
    # sidecars moved along with it
    assert sorted(f.name for f in (root / "line/intake").iterdir()) == ["p.alloy.json", "p.error.json", "p.ticket.json"]
    assert [e["kind"] for e in events(root, part="p")][-1] == "part/retried"


def test_retry_resets_retry_count(root, tmp_path):
    enqueue(root, tmp_path, "c", outcome="crash")
    assert factory("run", "--until-empty", root=root).returncode == 0
    assert where(root)["c"] == [("rework", 3)]
    assert factory("retry", "c", root=root).returncode == 0
    assert where(root)["c"] == [("intake", 0)]


def test_cleanup_evicts_only_orphans(root, tmp_path):
    cold = tmp_path / "cold"
    cold.mkdir()
    cfg = (root / "factory_node.toml").read_text()
    (root / "factory_node.toml").write_text(cfg + f'\n[[storage.cold]]\npath = "{cold}"\nmin_free_gb = 0\n')
    enqueue(root, tmp_path, "waiting")
    for name in ("waiting", "orphan"):
        (root / "work" / name).mkdir(parents=True)
        (root / "work" / name / "blob").write_bytes(b"x" * 1000)
    out = json.loads(factory("cleanup", "--dry-run", "--json", root=root).stdout)
    assert [os.path.basename(e["work_dir"]) for e in out["evictions"]] == ["orphan"]
    assert (root / "work/orphan").exists()
    assert factory("cleanup", root=root).returncode == 0
    assert not (root / "work/orphan").exists() and (root / "work/waiting/blob").exists()
    assert (cold / "factory-evicted/orphan/blob").read_bytes() == b"x" * 1000


def test_doctor_reports_checks(root):
    r = factory("doctor", "--json", root=root)
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["line"]["verdict"] == "ok" and checks["node config"]["verdict"] == "ok"
    assert "inotify" in checks and "max_user_watches" in checks["inotify"]["detail"]
    from factory.catalog import QUANT_FORMATS, format_problem

    for fmt in QUANT_FORMATS:  # every format, with the plan's own reason when it is refused
        why = format_problem(fmt)
        assert checks[f"quant {fmt}"]["verdict"] == ("ok" if why is None else "warn")
        assert why is None or why in checks[f"quant {fmt}"]["detail"]
    assert r.returncode == 0
    (root / "factory_node.toml").write_text("[forge]\nmax_retries = -1\n")
    r = factory("doctor", "--json", root=root)
    assert r.returncode == 1
    assert any(c["verdict"] == "fail" and "max_retries" in c["detail"] for c in json.loads(r.stdout))


def test_selftest_batch_runs_through(root):
    assert factory("selftest", "--parts", "3", "--stages", "1", "--seconds", "0", root=root).returncode == 0
    assert factory("run", "--until-empty", root=root).returncode == 0
    placed = where(root)
    assert len(placed) == 3 and all(v[0][0] == "finished" for v in placed.values())


def test_tail_follow_prints_new_events(root, tmp_path):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "factory.cli", "tail", "-f", "--json", "--root", str(root)],
                         stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        enqueue(root, tmp_path, "followed")
        line = p.stdout.readline()
        assert json.loads(line)["part"] == "followed"
    finally:
        p.kill()
        p.wait()


def test_intake_gate_refuses_what_this_node_can_never_run(root, tmp_path):
    unknown_stage = {**selftest_alloy(), "stages": [{"type": "x-frobnicate"}]}
    unknown_arch = {**selftest_alloy(), "source": {"baseModel": "models/x", "architecture": "no-such-arch"}}
    for name, alloy in [("stage", unknown_stage), ("arch", unknown_arch)]:
        r = factory("enqueue", str(write_alloy(tmp_path / f"{name}.alloy.json", alloy)), root=root)
        assert r.returncode == 2
        err = json.loads((root / f"line/rework/{name}.error.json").read_text())
        assert err["problems"][0]["level"] == "plan"
    err = json.loads((root / "line/rework/stage.error.json").read_text())
    assert err["problems"][0]["path"] == "$.stages[0].type" and "is not a stage type" in err["message"]
    err = json.loads((root / "line/rework/arch.error.json").read_text())
    assert err["problems"][0]["path"] == "$.source.architecture" and "no-such-arch" in err["message"]


def test_unknown_stage_type_at_run_time_is_a_clear_stage_failure():
    import pytest

    from factory.catalog import load_station
    from factory.errors import StageFailed

    with pytest.raises(StageFailed, match="no station runs it here"):
        load_station("x-frobnicate")
    with pytest.raises(StageFailed, match="handed to the ship role"):
        load_station("publish")


def test_plan_and_validate_exit_codes(root, tmp_path):
    good = write_alloy(tmp_path / "good.alloy.json", selftest_alloy())
    r = factory("plan", str(good), "--json", root=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["stages"][0]["station"] == "factory.selftest:run_stage"
    assert factory("validate", str(good)).returncode == 0
    bad = write_alloy(tmp_path / "bad.alloy.json", {**selftest_alloy(), "stages": []})
    r = factory("validate", str(bad), "--json")
    assert r.returncode == 2 and json.loads(r.stdout)[0]["findings"][0]["path"] == "$.stages"
    assert factory("plan", str(bad), root=root).returncode == 2


def test_plan_refuses_unknown_benchmarks_and_quant_this_node_cannot_do(root, tmp_path):
    alloy = {**selftest_alloy(), "stages": [
        {"type": "eval", "benchmarks": [{"name": "perplexity"}, {"name": "no-such-bench"}]},
        {"type": "quant", "format": "onnx", "quantTypes": ["int8"]},  # no ONNX writer on this node
    ]}
    r = factory("enqueue", str(write_alloy(tmp_path / "q.alloy.json", alloy)), root=root)
    assert r.returncode == 2
    problems = json.loads((root / "line/rework/q.error.json").read_text())["problems"]
    paths = {p["path"]: p["message"] for p in problems}
    assert "unknown benchmark 'no-such-bench'" in paths["$.stages[0].benchmarks[1].name"]
    assert "optimum-onnx" in paths["$.stages[1].format"]


def test_score_humaneval_reproduces_a_published_figure():
    # Published: qwen2.5-coder-7b-compacted alloy, results.benchmarks humaneval pass@1 61.0
    # (/work/shared/corpus/samples/SOURCES.md); 100 of 164 problems.
    from tests.shared_corpus import SAMPLES

    path = SAMPLES / "continuum-ai_qwen2.5-coder-7b-compacted__eval_humaneval_humaneval_samples.jsonl"
    r = factory("score", "humaneval", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["passed"], out["total"]) == (100, 164) and round(100 * out["pass@1"], 1) == 61.0
    assert factory("score", "humaneval", "/nonexistent.jsonl").returncode == 2
