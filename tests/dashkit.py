"""Helpers for the dashboard's tests: a real `factory serve` subprocess and plain HTTP.

The server is started on port 0 and its address read from the line it
prints, so tests never race for a port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.linekit import wait_for

_ADDRESS = re.compile(r"at http://(?P<host>[^ /]+):(?P<port>\d+)/")
TOKEN = "dashboard-test-token-0123456789"


@dataclass(frozen=True)
class Reply:
    status: int
    body: str
    headers: dict


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT, whatever address it is bound to
    proc: subprocess.Popen

    def get(self, path: str, headers: dict | None = None) -> Reply:
        return _send(urllib.request.Request(self.url + path, headers=headers or {}))

    def post(self, path: str, fields: dict, *, origin: str | None = "same", headers: dict | None = None) -> Reply:
        """A form POST; `origin` "same" sends this server's own Origin, None none at all."""
        h = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        if origin is not None:
            h["Origin"] = self.url if origin == "same" else origin
        data = urllib.parse.urlencode(fields).encode()
        return _send(urllib.request.Request(self.url + path, data=data, headers=h, method="POST"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _send(req: urllib.request.Request) -> Reply:
    try:
        with _OPENER.open(req, timeout=30) as r:
            return Reply(r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()})
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read().decode(), {k.lower(): v for k, v in err.headers.items()})


@contextmanager
def serving(root: Path, *extra: str, host: str = "127.0.0.1", env: dict | None = None) -> Iterator[Server]:
    """`factory serve --root ROOT --port 0` until the block ends (SIGTERM)."""
    log = root.parent / f"serve-{root.name}-{os.getpid()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "serve", "--root", str(root), "--host", host,
                                 "--port", "0", *extra], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **(env or {})))
    try:
        def address():
            assert proc.poll() is None, f"factory serve exited: {log.read_text()}"
            m = _ADDRESS.search(log.read_text())
            return m and m["port"]
        port = wait_for(address, timeout=30, what="factory serve to listen")
        server = Server(f"http://127.0.0.1:{port}", proc)
        wait_for(lambda: _healthy(server), timeout=30, what="factory serve to answer")
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _healthy(server: Server) -> bool:
    try:
        return server.get("/healthz").status == 200
    except OSError:
        return False


def stream_events(server: Server, *, last_event_id: int | None = None, timeout: float = 60) -> Iterator[dict]:
    """Events from /events/stream as they arrive (each with its SSE id)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    with urllib.request.urlopen(urllib.request.Request(server.url + "/events/stream", headers=headers),
                                timeout=timeout) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        ident = None
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                ident = int(line[4:])
            elif line.startswith("data: "):
                yield {**json.loads(line[6:]), "_id": ident}


def rework_part(root: Path, base: str, message: str) -> None:
    """A part in rework/ with an error.json saying `message` (as a failed part leaves it)."""
    rework = root / "line" / "rework"
    (rework / f"{base}.alloy.json").write_text(json.dumps({"name": "x", "version": "1.0.0"}))
    (rework / f"{base}.error.json").write_text(json.dumps({
        "class": "deterministic", "stage": {"index": 0, "type": "selftest"}, "message": message,
        "failed_at": "2026-01-01T00:00:00Z", "retries": 0}))
