"""The web dashboard's routes: pages, the live event stream, and the three writes.

Reads (GET) show what factory.pages renders. Writes (POST only: enqueue,
retry, cancel) pass `WriteGuard` first:

- the request must come from a dashboard page: its Origin (or, lacking one,
  its Referer) must name the host the request was sent to, so another site
  open in the same browser cannot post here (CSRF);
- bound to loopback, that is all: whoever reaches 127.0.0.1 already runs
  commands on this machine. On loopback the Host must be a loopback name as
  well, so a DNS-rebound page cannot pass as same-origin;
- bound anywhere else, the request must also carry the token (form field
  `token`, or `Authorization: Bearer ...`), and with no token configured
  every write is refused.

Nothing here serves files: every page is built from the line's readers, part
names are checked with factory.protocol's rules before any lookup, and the
line's readers never follow symlinks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import secrets
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from factory import pages, transitions
from factory.errors import FactoryError, printable
from factory.events import follow
from factory.forms import Form, FormTooBig, read_form
from factory.line import Line
from factory.protocol import MAX_ALLOY_BYTES, PartName, base_from_filename, check_base, parse_part
from factory.templates import SCRIPT

# A form holds one alloy plus a few short fields.
MAX_FORM_BYTES = MAX_ALLOY_BYTES + 64 * 1024
# Open event streams at once: each holds a thread following events.jsonl.
MAX_STREAMS = 16
# A new stream (no Last-Event-ID) starts with this many past events.
STREAM_BACKLOG = 50
# A comment line this often keeps proxies from closing an idle stream and
# lets the server notice a client that went away.
KEEPALIVE_SECONDS = 10.0
# factory error exit codes (factory/errors.py) as HTTP statuses.
_STATUS = {2: 400, 3: 404, 4: 409}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self'; "
                               "style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=_HEADERS)


def _problem(status: int, title: str, message: str, back: str | None = None) -> HTMLResponse:
    return _html(pages.problem_page(title, message, back=back), status)


def is_loopback(address: str) -> bool:
    """Whether a bound address or a Host name reaches only this machine."""
    host = address.strip("[]")
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WriteGuard:
    """Who may enqueue, retry and cancel (see the module docstring)."""

    token: str | None
    loopback: bool

    @property
    def need_token(self) -> bool:
        return not self.loopback

    def refusal(self, request: Request, form: Form) -> str | None:
        """Why this write is refused, or None when it may go ahead."""
        host = request.headers.get("host", "")
        claimed = request.headers.get("origin") or request.headers.get("referer")
        if not claimed or urlsplit(claimed).netloc != host:
            return ("this write did not come from a page of this dashboard (its Origin/Referer does not name "
                    f"{printable(host, 100)!r}); submit it from the dashboard's own form")
        if self.loopback:
            if not is_loopback(urlsplit(f"//{host}").hostname or ""):
                return "on loopback, writes are taken only for a loopback Host (localhost, 127.0.0.1, [::1])"
            return None
        if self.token is None:
            return ("this server listens beyond loopback and has no token, so it takes no writes: set "
                    "[serve] token in factory_node.toml or start it with --token-env NAME")
        given = form.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given or not secrets.compare_digest(given.encode(), self.token.encode()):
            return ("wrong or missing token: this server listens beyond loopback, and writes need the token of "
                    "[serve] token (or --token-env); type it into the form's token field")
        return None


def _part_base(name: str) -> str | None:
    """The base a URL's part name denotes, or None when it is not a valid name."""
    parsed = parse_part(name)
    base = parsed.base if parsed else name
    return None if check_base(base) else base


def _enqueue(line: Line, *, name: str, raw: bytes, need_token: bool) -> tuple[bool, str]:
    """Validate, plan and (when both pass) enqueue: whether it was
    enqueued, and the enqueue page that says how it went."""
    from factory.intake import enqueue
    from factory.plan import make_plan
    from factory.validation import check_file

    text = raw.decode("utf-8", "replace")
    page = dict(need_token=need_token, name=name, alloy=text)
    why = check_base(name) if name else "is empty: give the part a name (or upload a file named NAME.alloy.json)"
    if why:
        return False, pages.enqueue_page(**page, problem=f"part name {name!r} {why}")
    with tempfile.TemporaryDirectory(prefix="factory-enqueue-") as tmp:
        path = Path(tmp) / PartName(name).filename
        path.write_bytes(raw)
        report = check_file(path, root=line.root)
        if not report.ok:
            return False, pages.enqueue_page(**page, findings=report.findings)
        plan = make_plan(path, root=line.root, config=line.config)
        if not plan.ok:
            return False, pages.enqueue_page(**page, findings=plan.findings, plan=plan.render_text())
        try:
            part = enqueue(line, path, name=name)
        except FactoryError as err:
            return False, pages.enqueue_page(**page, plan=plan.render_text(), problem=str(err))
    if part.station == "rework":
        message = (part.read_sidecar("error") or {}).get("message")
        return False, pages.enqueue_page(**page, problem=f"refused at intake, in rework/: {message}")
    return True, pages.enqueue_page(need_token=need_token, enqueued=part.base, plan=plan.render_text())


async def _event_stream(line: Line, since: int, streams: set) -> AsyncIterator[str]:
    """events.jsonl as server-sent events, id = seq. factory.events.follow
    (blocking, rotation-safe) runs in a thread of its own and hands events
    over through a bounded queue; the thread stops when the client goes."""
    loop, queue, stop = asyncio.get_running_loop(), asyncio.Queue(maxsize=256), threading.Event()

    def pump() -> None:
        for ev in follow(line.layout.events, since=since, keep=line.config.daemon.events_keep, stop=stop.is_set,
                         poll=0.25):
            put = asyncio.run_coroutine_threadsafe(queue.put(ev), loop)
            while not stop.is_set():  # a slow client: wait for room, not forever
                try:
                    put.result(timeout=1.0)
                    break
                except concurrent.futures.TimeoutError:
                    continue
            if stop.is_set():
                put.cancel()
                return

    streams.add(stop)
    threading.Thread(target=pump, name="event-stream", daemon=True).start()
    try:
        yield "retry: 2000\n\n"
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ": keepalive\n\n"
                continue
            # json.dumps escapes every control and non-ASCII character: one data line.
            yield f"id: {ev['seq']}\ndata: {json.dumps(ev)}\n\n"
    finally:
        stop.set()
        streams.discard(stop)


def _since(request: Request, line: Line) -> int:
    """Where a stream starts: after Last-Event-ID (a reconnect), after
    ?since=N, else with the last STREAM_BACKLOG events."""
    for raw in (request.headers.get("last-event-id"), request.query_params.get("since")):
        if raw is not None and raw.strip().isdigit() and len(raw.strip()) < 19:
            return int(raw.strip())
    return max(0, line.events.last_seq() - STREAM_BACKLOG)


def routes(root: Path, guard: WriteGuard) -> list[Route]:
    """The dashboard's routes on `root`. Page handlers are plain functions
    (Starlette runs them in its thread pool: they read files)."""
    line = Line(root)
    streams: set = set()

    def overview(request: Request) -> Response:
        return _html(pages.overview(line))

    def running(request: Request) -> Response:
        return _html(pages.running_fragment(line))

    def events(request: Request) -> Response:
        return _html(pages.events_page())

    def study(request: Request) -> Response:
        return _html(pages.study_page(line))

    def script(request: Request) -> Response:
        return Response(SCRIPT, media_type="text/javascript", headers=_HEADERS)

    def part(request: Request) -> Response:
        base = _part_base(request.path_params["name"])
        if base is None:
            return _problem(400, "not a part name", "part names use only letters, digits, '.', '_' and '-'", "/")
        try:
            return _html(pages.part_page(line, base, need_token=guard.need_token))
        except FactoryError as err:
            return _problem(_STATUS.get(err.exit_code, 500), "no such part", str(err), "/")

    def stream(request: Request) -> Response:
        if len(streams) >= MAX_STREAMS:
            return Response(f"{MAX_STREAMS} event streams are open already; close one\n", status_code=503,
                            media_type="text/plain")
        return StreamingResponse(_event_stream(line, _since(request, line), streams), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def enqueue_form(request: Request) -> Response:
        return _html(pages.enqueue_page(need_token=guard.need_token))

    async def writable(request: Request) -> Form | Response:
        """The write's form, or the response that refuses it."""
        try:
            form = await read_form(request, limit=MAX_FORM_BYTES)
        except FormTooBig as err:
            return _problem(413, "too big", f"{err}; an alloy may be at most {MAX_ALLOY_BYTES} bytes", "/enqueue")
        why = guard.refusal(request, form)
        return _problem(403, "write refused", why, request.url.path) if why else form

    async def enqueue_post(request: Request) -> Response:
        form = await writable(request)
        if isinstance(form, Response):
            return form
        upload = form.files.get("file")
        raw = upload.data if upload and upload.data else form.get("alloy").encode()
        name = form.get("name").strip() or (base_from_filename(upload.filename) if upload and upload.data else "")
        ok, page = await run_in_threadpool(_enqueue, line, name=name, raw=raw, need_token=guard.need_token)
        return _html(page, 200 if ok else 400)

    def part_write(verb: str, action):
        async def handler(request: Request) -> Response:
            base = _part_base(request.path_params["name"])
            if base is None:
                return _problem(400, "not a part name", "part names use only letters, digits, '.', '_' and '-'")
            form = await writable(request)
            if isinstance(form, Response):
                return form
            try:
                await run_in_threadpool(lambda: action(line, line.get(base)))
            except FactoryError as err:
                return _problem(_STATUS.get(err.exit_code, 500), f"{verb} refused", str(err),
                                f"/parts/{base}")
            return RedirectResponse(f"/parts/{base}", status_code=303)
        return handler

    return [Route("/", overview, methods=["GET"]),
            Route("/fragments/running", running, methods=["GET"]),
            Route("/events", events, methods=["GET"]),
            Route("/events/stream", stream, methods=["GET"]),
            Route("/study", study, methods=["GET"]),
            Route("/dashboard.js", script, methods=["GET"]),
            Route("/enqueue", enqueue_form, methods=["GET"]),
            Route("/enqueue", enqueue_post, methods=["POST"]),
            Route("/parts/{name}", part, methods=["GET"]),
            Route("/parts/{name}/retry", part_write("retry", transitions.foreman_retry), methods=["POST"]),
            Route("/parts/{name}/cancel", part_write("cancel", transitions.foreman_cancel), methods=["POST"])]
