"""`factory serve`: the root's metrics over HTTP, for Prometheus.

An ASGI app (Starlette, run by uvicorn) so the web dashboard can later be
mounted beside it. Today every endpoint is read-only:

- GET /metrics: the root's metrics (factory.metrics) in the text exposition format;
- GET /healthz: "ok" while the server runs. It says nothing of the worker:
  alert on `factory_worker_up` for that.

Nothing served can change the line, so any host may be bound. `token` is
kept for the write endpoints to come (cancel, retry from the dashboard),
which will require it; the read-only endpoints never ask for it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from factory.errors import BadInput
from factory.line import Line
from factory.metrics import line_registry

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321


def make_app(root: Path, *, token: str | None = None) -> Starlette:
    """The app serving `root`. Endpoints are plain functions, so Starlette
    runs them in its thread pool: a scrape reads files and must not block
    the event loop."""
    registry = line_registry(Path(root))

    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"]),
                            Route("/healthz", healthz, methods=["GET"])])
    app.state.token = token  # for the write endpoints to come; see the module docstring
    return app


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, so a taken port is a one-line error here
    rather than a uvicorn log line and an exit."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise BadInput(f"cannot listen on {host}:{port} ({err}): give --host an address of this machine") from err
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
        sock.bind(addr)
    except OSError as err:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port} ({err.strerror or err}): pick another --port, "
                       "or stop what listens there") from err
    return sock


def serve(root: Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Serve `root` until SIGTERM or SIGINT; the exit code (uvicorn re-raises
    the signal after a graceful stop, so a signalled server dies by it).
    BadInput when `root` is not a factory root or host:port cannot be bound."""
    root = Path(root).absolute()
    Line(root).require_layout()
    sock = _listen(host, port)
    config = uvicorn.Config(make_app(root), host=host, port=port, access_log=False, log_level="info")
    server = uvicorn.Server(config)
    # uvicorn names no address for a socket it was given: say where to scrape.
    shown = f"[{host}]" if ":" in host else host
    print(f"factory serve: {root} at http://{shown}:{sock.getsockname()[1]}/metrics", file=sys.stderr, flush=True)
    with sock:
        server.run(sockets=[sock])
    return 0 if server.started else 1
