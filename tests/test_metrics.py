"""factory.metrics and factory.serve against real lines: a real daemon
builds the parts, the collector is scraped and its exposition parsed, and
the numbers must equal what the line's own files say."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from factory.errors import BadInput
from factory.events import read_events
from factory.line import init_root
from factory.metrics import STAGE_LABELS, LogFollower, line_registry
from factory.protocol import STATIONS, parse_part
from factory.serve import serve
from tests.linekit import factory, make_root, selftest_alloy, wait_for, write_alloy

KEEP = 50  # rotated event logs kept in the rotation test: none may fall off


Samples = dict[tuple[str, frozenset], float]


def scrape(registry) -> Samples:
    return parse(generate_latest(registry).decode())


def parse(text: str) -> Samples:
    """(sample name, labels) -> value of an exposition, via the official parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for (n, k), v in samples.items() if n == name}


def ageless(samples: Samples) -> Samples:
    """Samples without the ones that move with the clock or the disk."""
    moving = ("factory_heartbeat_age_seconds", "factory_disk_free_bytes")
    return {k: v for k, v in samples.items() if k[0] not in moving}


def enqueue_batch(root: Path, tmp: Path, tag: str) -> None:
    """Two passing parts (two stages each), one failing, one crashing (with
    max_retries=1: retried once, then reworked)."""
    plan = {"ok1": "pass", "ok2": "pass", "bad": "fail", "boom": "crash"}
    files = [str(write_alloy(tmp / f"{tag}-{name}.alloy.json",
                             selftest_alloy(stages=2 if outcome == "pass" else 1, seconds=0.02, outcome=outcome)))
             for name, outcome in plan.items()]
    r = factory("enqueue", *files, root=root)
    assert r.returncode == 0, r.stdout + r.stderr


def run_until_empty(root: Path) -> None:
    r = factory("run", "--until-empty", root=root, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr


def line_events(root: Path, since: int = 0) -> list[dict]:
    return read_events(root / "line/events.jsonl", since=since, keep=KEEP)


def expected(root: Path, evs: list[dict]) -> dict:
    """What the line's files say the metrics must be."""
    stations = {s: sum(1 for f in (root / "line" / s).iterdir() if parse_part(f.name)) for s in STATIONS}
    outcomes = Counter(json.loads(raw)["outcome"] for raw in (root / "line/throughput.jsonl").read_text().splitlines())
    done = [e for e in evs if e["kind"] == "stage/completed"]
    return {
        "stations": stations,
        "outcomes": outcomes,
        "completed": Counter(e["stage"]["type"] for e in done),
        "elapsed": sum(e["elapsed_s"] for e in done),
        "retries": sum(e["kind"] == "part/retried" for e in evs),
        "failures": Counter((e["failure_class"], e["stage"]["type"]) for e in evs if e["kind"] == "stage/failed"),
    }


def assert_matches(samples: Samples, want: dict) -> None:
    assert by_label(samples, "factory_parts", "station") == want["stations"]
    for outcome in ("finished", "rework", "rejected", "cancelled"):
        assert value(samples, "factory_part_outcomes_total", outcome=outcome) == want["outcomes"][outcome]
    assert by_label(samples, "factory_stage_duration_seconds_count", "stage_type") == want["completed"]
    assert by_label(samples, "factory_stage_peak_rss_bytes_count", "stage_type") == want["completed"]
    assert value(samples, "factory_stage_duration_seconds_sum", stage_type="selftest") == pytest.approx(want["elapsed"])
    assert value(samples, "factory_part_retries_total") == want["retries"]
    failures = {(dict(k)["failure_class"], dict(k)["stage_type"]): v
                for (n, k), v in samples.items() if n == "factory_stage_failures_total"}
    assert failures == want["failures"]


def test_a_batch_through_the_real_daemon_reads_exactly_as_the_line(tmp_path):
    root = make_root(tmp_path / "root", max_retries=1)
    enqueue_batch(root, tmp_path, "a")
    run_until_empty(root)

    samples = scrape(line_registry(root))
    want = expected(root, line_events(root))
    assert want["stations"] == {"intake": 0, "assembly": 0, "finished": 2, "rework": 2, "deferred": 0}
    assert want["retries"] == 1 and want["completed"] == {"selftest": 4}
    assert_matches(samples, want)
    # Buckets are cumulative and end in +Inf with the count.
    assert value(samples, "factory_stage_duration_seconds_bucket", stage_type="selftest", le="+Inf") == 4
    assert value(samples, "factory_stage_duration_seconds_bucket", stage_type="selftest", le="0.01") == 0
    assert not any(n.startswith("factory_stage_peak_vram_bytes") for n, _ in samples)  # no GPU used
    rss = value(samples, "factory_stage_peak_rss_bytes_sum", stage_type="selftest")
    assert rss > 4 * 2**20  # MB became bytes
    # The worker stopped cleanly after --until-empty.
    assert value(samples, "factory_worker_up") == 0 and value(samples, "factory_running_parts") == 0
    assert value(samples, "factory_worker_state", state="offline") == 1
    assert value(samples, "factory_heartbeat_age_seconds") >= 0
    assert value(samples, "factory_disk_free_bytes", tier="hot") > 0
    assert value(samples, "factory_disk_total_bytes", tier="hot") >= value(samples, "factory_disk_free_bytes", tier="hot")
    assert value(samples, "factory_disk_tier_missing", tier="hot") == 0
    assert value(samples, "factory_info", version="0.1.0", protocol="1") == 1
    assert set(by_label(samples, "factory_scrape_collector_success", "collector").values()) == {1}


def test_later_scrapes_add_exactly_the_new_batch_across_rotations(tmp_path):
    root = make_root(tmp_path / "root", max_retries=1)
    cfg = root / "factory_node.toml"
    cfg.write_text(cfg.read_text().replace("[daemon]\n", f"[daemon]\nevents_max_bytes = 4096\nevents_keep = {KEEP}\n"))
    registry = line_registry(root)
    assert value(scrape(registry), "factory_part_retries_total") == 0  # nothing yet: zero, not an error

    enqueue_batch(root, tmp_path, "a")
    run_until_empty(root)
    first = scrape(registry)
    rotated = sorted(root.glob("line/events.jsonl.*"))
    assert rotated  # it rotated during the batch
    assert_matches(first, expected(root, line_events(root)))

    enqueue_batch(root, tmp_path, "b")
    run_until_empty(root)
    assert len(rotated) < len(sorted(root.glob("line/events.jsonl.*"))) < KEEP  # rotated again, none dropped
    second = scrape(registry)
    assert_matches(second, expected(root, line_events(root)))
    assert value(second, "factory_part_retries_total") == 2 * value(first, "factory_part_retries_total")
    assert value(second, "factory_part_outcomes_total", outcome="finished") == 4

    # A third scrape with nothing new changes nothing (no line counted twice).
    assert ageless(scrape(registry)) == ageless(second)


def test_the_follower_reads_only_what_was_appended(tmp_path):
    log = tmp_path / "log.jsonl"
    follower = LogFollower(log)
    assert list(follower.new_lines(keep=3)) == []  # a missing file has no lines
    log.write_bytes(b"a\nb\npart")
    assert list(follower.new_lines(keep=3)) == [b"a", b"b"]  # an unfinished line waits for its newline
    with open(log, "ab") as f:
        f.write(b"ial\nc\n")
    assert list(follower.new_lines(keep=3)) == [b"partial", b"c"]
    assert list(follower.new_lines(keep=3)) == []
    # Rotation: the old file is finished from where it was, then the new one from its start.
    with open(log, "ab") as f:
        f.write(b"d\n")
    os.rename(log, tmp_path / "log.jsonl.1")
    log.write_bytes(b"e\n")
    assert list(follower.new_lines(keep=3)) == [b"d", b"e"]
    # Rewritten in place (even to the same size) or truncated: read again from the start.
    log.write_bytes(b"f\n")
    assert list(follower.new_lines(keep=3)) == [b"f"]
    with open(log, "r+b") as f:
        f.truncate(0)
    assert list(follower.new_lines(keep=3)) == []
    log.write_bytes(b"g\nh\n")
    assert list(follower.new_lines(keep=3)) == [b"g", b"h"]
    # A line too long to be an event is dropped as it streams, never held whole.
    with open(log, "ab") as f:
        f.write(b"x" * (3 << 20))
    assert list(follower.new_lines(keep=3)) == []
    with open(log, "ab") as f:
        f.write(b"xx\ni\n")
    assert list(follower.new_lines(keep=3)) == [b"i"]


def test_a_hostile_root_neither_crashes_a_scrape_nor_multiplies_series(tmp_path):
    root = init_root(tmp_path / "root").root
    line = root / "line"
    good = {"seq": 1, "ts": "2026-01-01T00:00:00.000Z", "kind": "stage/completed", "part": "p",
            "stage": {"index": 0, "type": "selftest"}, "elapsed_s": 2.5, "peak_rss_mb": 100}
    junk = [b'{"seq": 2, "kind": "stage/comp', b"[1, 2]", b"42", b"null", b'"stage/failed"',
            b'{"kind": "part/retried"}', b'{"seq": true, "kind": "part/retried"}',
            b'{"seq": -3, "kind": "part/retried"}', b'{"seq": "4", "kind": "part/retried"}',
            b"\xff\xfe not utf-8 stage/failed", b"[" * 100000 + b"stage/failed",
            b'{"seq": 5, "kind": "stage/completed", "stage": "selftest", "elapsed_s": "NaN", "peak_rss_mb": -1}',
            b'{"seq": 6, "kind": "stage/completed", "stage": {"type": ["x"]}, "elapsed_s": true, "peak_vram_mb": 1e999}',
            b'{"seq": 7, "kind": "stage\\/failed", "failure_class": "evil", "stage": null}',
            b'{"seq": 7, "kind": "part/retried"}']  # a repeated seq: not counted again
    bogus = [json.dumps({"seq": 100 + i, "kind": "stage/completed", "stage": {"index": i, "type": f"bogus-{i}"},
                         "elapsed_s": 1, "peak_rss_mb": 1, "peak_vram_mb": 1}).encode() for i in range(10_000)]
    (line / "events.jsonl").write_bytes(b"\n".join([json.dumps(good).encode(), *junk, *bogus]) + b"\n" + b"{torn")
    os.mkfifo(line / "events.jsonl.1")  # never blocks a scrape
    os.symlink("/dev/zero", line / "events.jsonl.2")  # never followed
    (line / "throughput.jsonl").write_bytes(b"\n".join(
        [b'{"outcome": "finished"}', b"garbage", b"[]", *(b'{"outcome": "x%d"}' % i for i in range(10_000))]) + b"\n")
    (line / ".heartbeat.json").write_text('["not", "a", "heartbeat"]')
    (line / "intake" / "looks.alloy.json").mkdir()  # not a regular file: not a part

    samples = scrape(line_registry(root))
    assert set(by_label(samples, "factory_scrape_collector_success", "collector").values()) == {1}
    durations = by_label(samples, "factory_stage_duration_seconds_count", "stage_type")
    # seq 5 and 6 carry no usable number (a string, a bool, -1, 1e999): nothing observed.
    assert durations == {"selftest": 1, "other": 10_000}
    assert by_label(samples, "factory_stage_peak_rss_bytes_count", "stage_type") == {"selftest": 1, "other": 10_000}
    assert by_label(samples, "factory_stage_peak_vram_bytes_count", "stage_type") == {"other": 10_000}
    assert value(samples, "factory_stage_failures_total", failure_class="other", stage_type="none") == 1
    assert value(samples, "factory_part_retries_total") == 0
    assert by_label(samples, "factory_part_outcomes_total", "outcome") == {
        "finished": 1, "rework": 0, "rejected": 0, "cancelled": 0, "other": 10_000}
    assert value(samples, "factory_parts", station="intake") == 0
    assert value(samples, "factory_worker_up") == 0 and "factory_heartbeat_age_seconds" not in {n for n, _ in samples}
    stage_labels = {dict(labels).get("stage_type") for _, labels in samples} - {None}
    assert stage_labels <= STAGE_LABELS | {"other", "none"}
    assert len(samples) < 400  # bounded, whatever the files hold

    # A broken node config: what needs it (the disk tiers) is left out and said so; the rest still reads.
    (root / "factory_node.toml").write_text("[daemon\n")
    samples = scrape(line_registry(root))
    ok = by_label(samples, "factory_scrape_collector_success", "collector")
    assert ok["config"] == 0 and "tiers" not in ok and ok["events"] == 1
    assert not any(n == "factory_disk_free_bytes" for n, _ in samples)
    assert value(samples, "factory_part_outcomes_total", outcome="finished") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


def test_the_server_serves_metrics_and_stops_on_sigterm(tmp_path):
    root = make_root(tmp_path / "root")
    write_alloy(tmp_path / "waiting.alloy.json", selftest_alloy())
    assert factory("enqueue", str(tmp_path / "waiting.alloy.json"), root=root).returncode == 0
    port = _free_port()
    log, out = tmp_path / "serve.log", tmp_path / "serve.out"
    with open(log, "wb") as err, open(out, "wb") as stdout:  # the operator's command itself
        proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "serve", "--root", str(root),
                                 "--port", str(port)], stdout=stdout, stderr=err)
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            try:
                return _get(f"{base}/healthz")
            except OSError:
                assert proc.poll() is None, log.read_text()
                return None

        assert wait_for(up, timeout=30, poll=0.1, what="the server") == (200, "text/plain; charset=utf-8", "ok\n")
        status, ctype, body = _get(f"{base}/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=")
        samples = parse(body)
        assert value(samples, "factory_parts", station="intake") == 1
        assert value(samples, "factory_part_outcomes_total", outcome="finished") == 0
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"{base}/nothing")
        assert err.value.code == 404
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc in (0, -signal.SIGTERM), log.read_text()
    assert not psutil.pid_exists(proc.pid)
    text = log.read_text()
    assert "GET /metrics" not in text  # no access log
    assert f"at http://127.0.0.1:{port}/metrics" in text and "Started server process" in text  # on stderr
    assert out.read_text() == ""


def test_serve_refuses_a_taken_port_and_a_non_root(tmp_path):
    root = init_root(tmp_path / "root").root
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(BadInput, match="pick another --port"):
            serve(root, port=busy.getsockname()[1])
    with pytest.raises(BadInput, match="not a factory root"):
        serve(tmp_path / "nowhere")
