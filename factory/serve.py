"""`factory serve`: the root's metrics for Prometheus and its web dashboard.

An ASGI app (Starlette, run by uvicorn):

- GET /metrics: the root's metrics (factory.metrics) in the text exposition format;
- GET /healthz: "ok" while the server runs. It says nothing of the worker:
  alert on `factory_worker_up` for that;
- the dashboard (factory.dashboard): pages, the live event stream, and the
  writes (enqueue, retry, cancel), which take the token when the server
  listens beyond loopback (dashboard.WriteGuard).

It binds 127.0.0.1 unless told otherwise. The token comes from the node
config's `[serve] token`, or from an environment variable named with
`--token-env` (resolve_token), so it need not sit in a world-readable file.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from pydantic import ValidationError

from factory.dashboard import WriteGuard, is_loopback
from factory.dashboard import routes as dashboard_routes
from factory.errors import BadInput
from factory.line import Line
from factory.metrics import line_registry
from factory.nodeconfig import NodeConfig, ServeSection

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321
# Seconds a stopping server waits for open event streams before closing them.
STREAM_GRACE_SECONDS = 2


def make_app(root: Path, *, token: str | None = None, loopback: bool = False) -> Starlette:
    """The app serving `root`; `loopback`: whether it listens only on this
    machine (then writes need no token; the default assumes not). Endpoints
    are plain functions, so Starlette runs them in its thread pool: a scrape
    reads files and must not block the event loop."""
    registry = line_registry(Path(root))

    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    guard = WriteGuard(token=token, loopback=loopback)
    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"]),
                             Route("/healthz", healthz, methods=["GET"]),
                             *dashboard_routes(Path(root), guard)])


def resolve_token(config: NodeConfig, env_name: str | None) -> str | None:
    """The write token: the variable `env_name` when given (BadInput when it
    is unset or malformed), else the node config's `[serve] token`."""
    if env_name is None:
        return config.serve.token
    value = os.environ.get(env_name)
    if value is None:
        raise BadInput(f"--token-env {env_name}: ${env_name} is not set; export the token there, or drop "
                       "--token-env to use [serve] token from factory_node.toml")
    try:
        return ServeSection(token=value).token
    except ValidationError as err:
        raise BadInput(f"--token-env {env_name}: the token must be 16 to 256 printable ASCII characters "
                       "without spaces") from err


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


def serve(root: Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token_env: str | None = None) -> int:
    """Serve `root` until SIGTERM or SIGINT; the exit code (uvicorn re-raises
    the signal after a graceful stop, so a signalled server dies by it).
    BadInput when `root` is not a factory root, host:port cannot be bound
    or --token-env names no usable token."""
    root = Path(root).absolute()
    line = Line(root)
    line.require_layout()
    token = resolve_token(line.config, token_env)
    sock = _listen(host, port)
    loopback = is_loopback(sock.getsockname()[0])
    # Open event streams never end on their own: give them a moment, then close them.
    config = uvicorn.Config(make_app(root, token=token, loopback=loopback), host=host, port=port, access_log=False,
                            log_level="info", timeout_graceful_shutdown=STREAM_GRACE_SECONDS)
    server = uvicorn.Server(config)
    # uvicorn names no address for a socket it was given: say where to look.
    shown = f"[{host}]" if ":" in host else host
    writes = ("writes need no token (loopback)" if loopback else
              "writes need the token" if token else "no token: writes refused")
    url = f"http://{shown}:{sock.getsockname()[1]}"
    print(f"factory serve: {root} at {url}/metrics (Prometheus), dashboard at {url}/ ({writes})",
          file=sys.stderr, flush=True)
    with sock:
        server.run(sockets=[sock])
    return 0 if server.started else 1
