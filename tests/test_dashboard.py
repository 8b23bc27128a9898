"""The dashboard over real HTTP: a `factory serve` subprocess, a real line, urllib.

Pages render from the line's files with every untrusted string escaped;
names are checked before any lookup; writes are refused off loopback without
the token; the enqueue form validates and plans before it enqueues; the
event stream follows a running daemon; `factory report` writes one
self-contained file.
"""

from __future__ import annotations

import json
import time

from tests.dashkit import TOKEN, rework_part, serving, stream_events
from tests.linekit import factory, make_root, selftest_alloy, start_daemon, stop, wait_for, where, write_alloy

HOSTILE = "<script>alert('pwned')</script> & \"quotes\""
TOKEN_CONFIG = f'\n[serve]\ntoken = "{TOKEN}"\n'


def _finished_part(root, tmp_path, name="done"):
    write_alloy(tmp_path / f"{name}.alloy.json", selftest_alloy(stages=2, seconds=0.1, steps=2))
    factory("enqueue", str(tmp_path / f"{name}.alloy.json"), root=root, check=True)
    factory("run", "--until-empty", root=root, check=True)
    assert where(root)[name] == [("finished", 0)]


def test_pages_render_escape_and_refuse_bad_names(tmp_path):
    root = make_root(tmp_path / "root")
    _finished_part(root, tmp_path)
    rework_part(root, "evil", HOSTILE)
    with serving(root) as srv:
        home = srv.get("/")
        assert home.status == 200 and 'href="/parts/done"' in home.body and 'href="/parts/evil"' in home.body
        assert "content-security-policy" in home.headers and 'id="feed"' in home.body
        for path in ("/events", "/study", "/enqueue", "/fragments/running", "/dashboard.js", "/metrics"):
            assert srv.get(path).status == 200, path
        done = srv.get("/parts/done")
        assert done.status == 200 and done.body.count("<svg") >= 2 and "stage timeline" in done.body
        evil = srv.get("/parts/evil")
        assert evil.status == 200
        assert "<script>alert" not in evil.body
        assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; &amp; &#34;quotes&#34;" in evil.body
        assert srv.get("/parts/no-such-part").status == 404
        for bad in ("/parts/..%2F..%2Fetc%2Fpasswd", "/parts/..", "/parts/../../etc/passwd", "/parts/.hidden"):
            r = srv.get(bad)
            assert r.status in (400, 404), bad
            assert "root:" not in r.body


def test_writes_off_loopback_need_the_token(tmp_path):
    root = make_root(tmp_path / "root", extra=TOKEN_CONFIG)
    rework_part(root, "evil", "it failed")
    with serving(root, host="0.0.0.0") as srv:
        refused = srv.post("/parts/evil/retry", {})
        assert refused.status == 403 and "wrong or missing token" in refused.body
        assert srv.post("/parts/evil/retry", {"token": "not-the-token-at-all"}).status == 403
        assert srv.post("/parts/evil/retry", {"token": TOKEN}, origin="http://evil.example").status == 403
        assert where(root)["evil"] == [("rework", 0)]
        assert 'name="token"' in srv.get("/parts/evil").body
        ok = srv.post("/parts/evil/retry", {"token": TOKEN})
        assert ok.status == 303 and ok.headers["location"] == "/parts/evil"
        assert where(root)["evil"][0][0] == "intake"
        assert srv.post("/parts/evil/cancel", {"token": TOKEN}).status == 303
        assert where(root)["evil"][0][0] == "rework"
        assert srv.get("/enqueue").status == 200


def test_off_loopback_without_a_token_takes_no_writes_and_loopback_checks_origin(tmp_path):
    root = make_root(tmp_path / "root")
    rework_part(root, "evil", "it failed")
    with serving(root, host="0.0.0.0") as srv:
        r = srv.post("/parts/evil/retry", {"token": TOKEN})
        assert r.status == 403 and "has no token" in r.body
    with serving(root) as srv:
        assert srv.post("/parts/evil/retry", {}, origin=None).status == 403  # no Origin, no Referer: refused
        assert srv.post("/parts/evil/retry", {}, origin="http://evil.example").status == 403
        assert where(root)["evil"] == [("rework", 0)]
        assert srv.post("/parts/evil/retry", {}).status == 303  # loopback, same origin: no token needed
        assert where(root)["evil"][0][0] == "intake"


def test_token_env_overrides_the_config(tmp_path):
    root = make_root(tmp_path / "root", extra=TOKEN_CONFIG)
    rework_part(root, "evil", "it failed")
    other = "another-token-from-the-environment"
    with serving(root, "--token-env", "FORGE_TEST_TOKEN", host="0.0.0.0", env={"FORGE_TEST_TOKEN": other}) as srv:
        assert srv.post("/parts/evil/retry", {"token": TOKEN}).status == 403
        assert srv.post("/parts/evil/retry", {"token": other}).status == 303
    r = factory("serve", "--root", str(root), "--port", "0", "--token-env", "FORGE_UNSET_TOKEN_VAR")
    assert r.returncode == 2 and "FORGE_UNSET_TOKEN_VAR is not set" in r.stderr


def test_enqueue_form_validates_plans_and_enqueues(tmp_path):
    root = make_root(tmp_path / "root")
    bad = json.dumps({"name": "selftest", "version": "1.0.0", "stages": [{"type": "no-such-stage"}]})
    with serving(root) as srv:
        r = srv.post("/enqueue", {"name": "bad-one", "alloy": bad})
        assert r.status == 400 and 'class="finding"' in r.body and "source" in r.body
        assert "bad-one" not in where(root)
        r = srv.post("/enqueue", {"name": "broken", "alloy": "{not json"})
        assert r.status == 400 and 'class="finding"' in r.body and "broken" not in where(root)
        r = srv.post("/enqueue", {"name": "../escape", "alloy": json.dumps(selftest_alloy())})
        assert r.status == 400 and "part name" in r.body
        assert not list(tmp_path.glob("escape*"))
        r = srv.post("/enqueue", {"name": "good-one", "alloy": json.dumps(selftest_alloy())})
        assert r.status == 200 and 'href="/parts/good-one"' in r.body
        assert where(root)["good-one"] == [("intake", 0)]
        assert (root / "line" / "intake" / "good-one.alloy.json").is_file()
        assert srv.post("/enqueue", {"name": "good-one", "alloy": json.dumps(selftest_alloy())}).status == 400


def test_event_stream_follows_a_running_daemon_and_resumes(tmp_path):
    root = make_root(tmp_path / "root")
    with serving(root) as srv:
        daemon = start_daemon(root)
        try:
            write_alloy(tmp_path / "live.alloy.json", selftest_alloy(seconds=1.0, steps=4))
            factory("enqueue", str(tmp_path / "live.alloy.json"), root=root, check=True)
            seen = []
            for ev in stream_events(srv):
                seen.append(ev)
                if ev["kind"] == "part/finished" and ev["part"] == "live":
                    break
            kinds = [e["kind"] for e in seen if e.get("part") == "live"]
            assert "part/claimed" in kinds or "stage/started" in kinds, kinds
            assert all(e["_id"] == e["seq"] for e in seen)
            assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)
            mid = seen[len(seen) // 2]["seq"]
            resumed = next(stream_events(srv, last_event_id=mid))
            assert resumed["seq"] == mid + 1
        finally:
            stop(daemon)


def test_report_is_one_self_contained_file(tmp_path):
    root = make_root(tmp_path / "root")
    _finished_part(root, tmp_path)
    out = tmp_path / "done.html"
    r = factory("report", "done", "--out", str(out), root=root)
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "src=" not in html and "<link" not in html
    assert html.count("<svg") >= 2 and "stage timeline" in html and "<style>" in html
    assert factory("report", "nope", "--out", str(tmp_path / "x.html"), root=root).returncode == 3
