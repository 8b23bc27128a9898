"""The worker: `factory run`. One per root, small, and never the one to crash.

It claims waiting parts in the protocol's order, as many at once as their
needs fit this node's resources (factory.placement; `[daemon]
max_parallel_parts`, 1 by default), runs each in its own child process
(factory/child.py), turns the children's reports into events and
heartbeats, and moves each part to its next station when its child ends.
Everything it knows is on disk, so killing it at any moment loses nothing:
the next start runs the recovery sweep and carries on.

Wake-ups come from one selector: the children's report pipes, and a wake pipe
written by signal handlers (signal.set_wakeup_fd) and by the inotify
observer thread. A periodic full rescan is the safety net under inotify.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import psutil
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from factory import heartbeat as hb
from factory import acceptance, durable, recovery, resources, results, transitions
from factory.durable import NotARegularFile
from factory.errors import FactoryError
from factory.events import utc_now
from factory.intake import Adopter, gate, reject
from factory.integrity import sha256_hex
from factory.launch import LOST, Child, ClusterChild, LocalChild
from factory.line import Line, Part, Waiting
from factory.placement import HeadReservation, Held, fit
from factory.resources import size_text
from factory.locks import WorkerLock
from factory.outcomes import (
    EXIT_DONE, EXIT_INFRA, EXIT_STOPPED, NO_ROOM_ERRNOS, cap_message, error_record, signal_name,
)
from factory.protocol import (
    CANCEL, CHECKPOINT, CHILD_LOG, CLAIMED_ALLOY, FAILURE_TEXT, MAX_ALLOY_BYTES, STAGE_ACCEPTANCE, STAGE_INTAKE,
    STAGE_START, TICKET, parse_part,
)
from factory.sdnotify import Notifier
from factory.tiers import free_bytes_at, usage_at

GiB = 2**30

log = logging.getLogger("factory.daemon")

Mode = Literal["forever", "once", "until-empty"]

# Progress events are rate-limited per stage (the heartbeat carries every update).
PROGRESS_EVENT_MIN_SECONDS = 1.0
# Set to run on rescans alone (benchmarks and tests of the safety net; a
# node whose inotify limits are exhausted behaves the same way).
NO_INOTIFY_ENV = "FACTORY_NO_INOTIFY"
# How often a running child's memory is sampled for peak_rss_mb (and a
# cluster child's report file read).
SAMPLE_SECONDS = 0.1
# inotify events that can mean "a part arrived" or "a cancel was asked for".
WAKING_EVENTS = frozenset({"created", "moved", "closed"})
# After an unexpected error in the loop (a bug, a full disk under our own
# writes), wait this long before the next try, doubling up to the cap.
ERROR_PAUSE_SECONDS = (0.5, 30.0)
# A part waiting for disk room is claimed again once its filesystem has this
# much more free than when it filled: a sixteenth of the filesystem, at
# least 1 MiB, at most 256 MiB.
ROOM_MARGIN_BYTES = (2**20, 256 * 2**20)
# A part whose outcome cannot be recorded (moved, written) this many times
# in a row goes to rework with the reason; a full disk only waits.
ROUTE_ATTEMPTS = 5
# Progress reaches the heartbeat this soon after the child reports it (and
# the heartbeat is rewritten at most this often for progress).
BEAT_ON_CHANGE_SECONDS = 0.25
# How often a Ray dispatcher refreshes the cluster view in its heartbeat.
CLUSTER_VIEW_SECONDS = 5.0
# _consider's answer when nothing more may start ahead of the queue's head.
_STOP_SCAN = object()
# Event kinds a part's process may ask the daemon to write (docs §7).
STATION_EVENT_KINDS = frozenset({"model/load", "quant/file", "source/gguf"})


@dataclass
class Running:
    """A part being built and what the daemon has heard about it."""

    part: Part
    child: Child  # a LocalChild, or a ClusterChild on a Ray node (factory.launch)
    started: float
    alloy: dict  # parsed once at start (it passed the gate: stages is a list of objects)
    alloy_sha256: str  # bare hex, of the bytes gated at claim: what the part runs and its result names
    need: resources.Need
    gpus: tuple[int, ...]  # the CUDA indices its child sees (on a cluster: Ray's choice, not known here)
    started_at: str = ""
    buf: bytes = b""
    stage: dict | None = None
    stage_started: float = 0.0
    peak_rss: int = 0
    rss: int = 0  # at the last sample
    stage_started_at: str | None = None
    last_progress_event: float = 0.0
    progress: hb.Progress | None = None
    failure: dict | None = None
    done: bool = False
    stop_sent_at: float | None = None  # SIGTERM sent to the child (shutdown or cancel)
    killed_for: str | None = None  # "timeout" | "grace" | "cancel"
    cancelling: bool = False
    completed: list[dict] = field(default_factory=list)
    stalled: bool = False  # the child is stopped (SIGSTOP): not making progress
    budget_rss: int = 0  # the RSS that broke the memory budget, when killed for it
    budget_others: int = 0  # what the other running parts held then
    eof: bool = False  # its report pipe is closed (no longer selected)
    replaying: bool = False  # re-reading a re-attached try's reports: no events
    failure_reported: bool = False  # stage/failed emitted (routing may be retried)
    route_failures: int = 0  # failed attempts to move the part after its child ended

    @property
    def node(self) -> str | None:
        """The cluster node it runs on (None: this node, or not placed yet)."""
        return getattr(self.child, "node", None)

    @property
    def held(self) -> Held:
        return Held(self.part.base, self.need, self.gpus)

    def view(self) -> dict:
        """Its entry in the heartbeat's `parts`."""
        stage = {**self.stage, "started_at": self.stage_started_at} if self.stage else None
        return {"part": self.part.base, "pid": self.child.pid, "gpus": list(self.gpus),
                "started_at": self.started_at, "stage": stage, "progress": self.progress, "stalled": self.stalled_why,
                "node": self.node}

    @property
    def stalled_why(self) -> str | None:
        if not self.stalled:
            return None
        return (f"the part's process (pid {self.child.pid}) is stopped (SIGSTOP or a debugger) and makes no "
                f"progress; `kill -CONT` it or `factory cancel {self.part.base}`")


class _Wake(FileSystemEventHandler):
    """Wakes the loop for changes in intake/ (new parts) and assembly/
    (cancel requests). One recursive watch on line/ rather than one per
    station: watchdog holds an unpaired "moved from" for half a second, and
    our own claim (intake -> assembly) would be one if the stations were
    watched separately, delaying every drop right after a claim."""

    def __init__(self, daemon: "Daemon", watched: tuple[str, ...]) -> None:
        self.daemon = daemon
        self.watched = watched

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in WAKING_EVENTS:
            return  # our own scan's reads (opened, closed_no_write) must not wake us: that spins
        path = os.fsdecode(event.dest_path or event.src_path)
        if os.path.dirname(path) not in self.watched:
            return
        if event.event_type in ("closed", "moved") and parse_part(os.path.basename(path)):
            self.daemon.adopter.note_complete(os.path.basename(path))
        self.daemon.wake()


class Daemon:
    def __init__(self, root: Path, *, mode: Mode = "forever", config=None) -> None:
        self.line = Line(root, config)
        self.cfg = self.line.config
        self.mode = mode
        self.lock = WorkerLock(self.line.layout.worker_lock)
        self.notifier = Notifier()
        self.adopter = Adopter(self.line, self.cfg.daemon.settle_seconds)
        self.sel = selectors.DefaultSelector()
        self.running: dict[str, Running] = {}  # by base, in start order
        self.node = resources.node_resources(self.cfg)
        # The RAM all parts' process trees may hold together: placement
        # counts needs against it, and a part over it is stopped.
        self.memory_budget = self.node.ram_bytes
        self.reservation = HeadReservation(self.cfg.daemon.max_overtakes)
        self.started_parts = 0
        self.cluster = None  # a RayLauncher when [cluster] backend = "ray" (connected in run())
        self.next_cluster_view = 0.0
        self.stop_requested = 0  # count of SIGTERM/SIGINT received
        self.stopping_announced = False
        self.handled = 0
        # Parts whose child ended but whose move failed (e.g. a full disk
        # under error.json): routed again before anything new is claimed.
        self.unrouted: list[tuple[Running, int]] = []
        self.beat = hb.new_heartbeat(self.cfg.daemon.heartbeat_interval_seconds)
        self.next_beat = self.last_beat = 0.0
        self.next_watchdog = 0.0
        self.next_scan = 0.0
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # -- lifecycle --------------------------------------------------------------

    def run(self) -> int:
        line = self.line
        line.require_layout()
        line.check_one_filesystem()
        self.lock.acquire()
        observer = None
        try:
            self.beat_now()
            self._install_signals()
            if self.cfg.cluster.backend == "ray":
                self.cluster = _connect(self.cfg, line.root)
            self._recover()
            observer = self._observe()
            line.events.emit("daemon/started", None, pid=os.getpid(), mode=self.mode,
                             host=self.beat.host, versions=self.beat.versions)
            self.set_state("idle")
            self.notifier.ready(self.status_line())
            self._loop()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self.set_state("offline")
            line.events.emit("daemon/stopped", None, pid=os.getpid(), handled=self.handled,
                             signal=bool(self.stop_requested))
            self.notifier.close()
            self.lock.release()
        return 0

    def _observe(self) -> Observer | None:
        """The inotify watch, or None (rescans alone) when it is switched off
        or the kernel's inotify limits are exhausted: the line still works."""
        if os.environ.get(NO_INOTIFY_ENV):
            return None
        line = self.line
        try:
            observer = Observer()
            watched = (str(line.layout.intake), str(line.layout.assembly))
            observer.schedule(_Wake(self, watched), str(line.layout.line), recursive=True)
            observer.start()
        except OSError as err:
            log.warning("inotify unavailable (%s): running on rescans every %gs; raise "
                        "fs.inotify.max_user_instances / max_user_watches", err, self.cfg.daemon.rescan_seconds)
            return None
        return observer

    def _recover(self) -> None:
        """The start-up sweep. A sweep that fails (a full disk, a file it
        cannot move) is reported and the worker serves anyway: the sweep is
        idempotent and runs again at the next start or `factory recover`."""
        adopted = self._reattach() if self.cluster is not None else set()
        try:
            actions = recovery.sweep(self.line, running=adopted)
        except Exception as err:  # noqa: BLE001
            self._survive(err, where="recovery sweep")
            return
        for action in actions:
            log.info("recovery: %s", action)
        if actions:
            self.line.events.emit("daemon/recovery", None, actions=actions)

    def _reattach(self) -> set[str]:
        """Cluster tries a previous dispatcher left running (found by their
        submission ids) are adopted, not recovered: the part is neither
        released nor run twice. Their reports are replayed without events
        (those were written the first time)."""
        adopted = set()
        for part in self.line.parts("assembly"):
            try:
                run = self.cluster.attach(part.base, part.name.retry)
                if run is None:
                    continue
                raw = durable.read_regular(self.line.layout.work_dir(part.base) / CLAIMED_ALLOY,
                                           limit=MAX_ALLOY_BYTES)
            except Exception as err:  # noqa: BLE001 - one odd part must not stop the start-up
                self._survive(err, where=f"re-attaching {part.base}")
                continue
            need = resources.Need.from_json(self.line.ticket(part).get("need")) or \
                resources.whole_node_need("its ticket has no need")
            ch = Running(part=part, child=ClusterChild(run), started=time.monotonic(), alloy=json.loads(raw),
                         alloy_sha256=sha256_hex(raw), need=need, gpus=(), started_at=utc_now())
            ch.replaying = True
            self._read_reports(ch)
            ch.replaying = False
            self.running[part.base] = ch
            adopted.add(part.base)
            self.line.events.emit("part/reattached", part.base, retry=part.name.retry, stage=ch.stage,
                                  submission=run.name)
        return adopted

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Handlers only count: the loop does the work (first: finish safely,
        # second: stop hard).
        self.stop_requested += 1

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass  # already awake-pending

    # -- main loop --------------------------------------------------------------

    def _loop(self) -> None:
        pause = ERROR_PAUSE_SECONDS[0]
        while True:
            try:
                if self._turn():
                    return
                pause = ERROR_PAUSE_SECONDS[0]
            except Exception as err:  # noqa: BLE001 - one bad file or a full disk must not stop the line
                self._survive(err, where="main loop")
                if self.stop_requested and not self.running:
                    return  # stopping anyway: a part left unrouted in assembly/ is the next sweep's
                self._pause(pause)
                pause = min(2 * pause, ERROR_PAUSE_SECONDS[1])

    def _turn(self) -> bool:
        """One pass of the loop; True when the daemon should exit."""
        now = time.monotonic()
        if self.stop_requested and not self.stopping_announced:
            self.stopping_announced = True
            self.notifier.stopping()
            self.set_state("stopping")
        if self.running:
            self._tend()
        if self.unrouted:
            self._route_pending()  # before anything new is claimed
        elif self.stop_requested or (self.mode == "once" and self.started_parts >= 1):
            if not self.running:
                return True
        elif len(self.running) < self.node.max_parallel_parts:
            started = self._claim_more(time.monotonic())
            if not started and not self.running:
                if self.mode == "until-empty" and not self.line.parts("intake"):
                    return True
                self._wait(self._idle_timeout(now))
        self._periodic(time.monotonic())
        return False

    def _survive(self, err: Exception, *, where: str) -> None:
        """Log an unexpected error and say so in the event stream; the loop
        goes on after a pause (the only exits are the documented ones)."""
        log.error("%s: %s", where, err, exc_info=True)
        self.line.events.emit("daemon/error", None, where=where, message=f"{type(err).__name__}: {err}"[:500])

    def _periodic(self, now: float) -> None:
        if now >= self.next_beat:
            self.beat_now()
        if self.notifier.watchdog_interval and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_interval

    def _idle_timeout(self, now: float) -> float:
        waits = [self.next_scan - now, self.next_beat - now]
        if self.notifier.watchdog_interval:
            waits.append(self.next_watchdog - now)
        return max(0.0, min(waits))

    def _pause(self, seconds: float) -> None:
        """Sleep `seconds` whatever wakes us (our own failing writes on a
        full disk make inotify events), unless a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested and (left := deadline - time.monotonic()) > 0:
            self._wait(left)

    def _wait(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            if isinstance(key.data, Running):  # a child's reports, during a pause: read, or select spins
                self._read_reports(key.data)
            elif key.data == "wake":
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self.next_scan = 0.0  # woken: scan now

    # -- claiming ---------------------------------------------------------------

    def _claim_more(self, now: float) -> int:
        """Claim and start every waiting part that may run now; how many."""
        if now < self.next_scan:
            return 0
        self.next_scan = now + self.cfg.daemon.rescan_seconds
        for odd in self.line.irregular("intake"):
            self._set_aside(odd, f"{odd.path.name} in intake/ is not a regular file (a symlink, FIFO or "
                                 "directory); it was moved aside unread; enqueue a copy of the real file")
        for part in self.adopter.pending(now):
            try:
                self.adopter.adopt(part)
            except FileNotFoundError:
                continue  # RACE: removed by hand while we looked
            except NotARegularFile as err:
                self._set_aside(part, f"{part.path.name} cannot be read as an alloy: {err.strerror}; "
                                      "enqueue a regular file under the size limit")
            except Exception:  # noqa: BLE001 - one bad file must not stop the line
                self._set_aside(part)
        settle = self.adopter.next_check_in(now)
        if settle is not None:  # an unsettled hand drop: look again when it may have settled
            self.next_scan = min(self.next_scan, now + settle)
        started = 0
        self.reservation.begin_scan()
        try:
            for waiting in self.line.queue():
                if len(self.running) >= self.node.max_parallel_parts:
                    break
                try:
                    claimed = self._consider(waiting, now)
                except FileNotFoundError:
                    continue  # RACE: cancelled or deferred since the scan
                except Exception:  # noqa: BLE001 - one odd part must not keep the ones behind it waiting
                    self._set_aside(waiting.part)
                    continue
                if claimed is _STOP_SCAN:
                    break
                if claimed is not None:
                    try:
                        self._start(*claimed)
                    except Exception:
                        self._unclaim(claimed[0])
                        raise  # reported by the loop, which pauses before the next try
                    started += 1
                    if self.mode == "once":
                        break
        finally:
            self.reservation.end_scan()
        return started

    def _consider(self, waiting: Waiting, now: float):
        """Claim `waiting` if it may run now: its ticket is sound, its backoff
        over, its disk has room, its need fits beside the running parts and
        its bytes pass the gate. Returns (part, bytes, need, gpus), None to
        go on to the next part, or _STOP_SCAN when nothing more may start
        ahead of the head of the queue (factory.placement)."""
        part = waiting.part
        if waiting.problem:
            self._set_aside(part, f"{part.sidecar_path(TICKET).name} {waiting.problem}; the part was set "
                                  f"aside unrun; `factory retry {part.base}` gives it a fresh ticket")
            return None
        if waiting.not_before and waiting.not_before > utc_now():
            # backing off: scan again the moment its backoff ends
            until = datetime.fromisoformat(waiting.not_before.replace("Z", "+00:00")).timestamp()
            self.next_scan = min(self.next_scan, now + until - time.time() + 0.01)
            return None
        if waiting.wait_for_room:
            if not _has_room(waiting.wait_for_room):
                return None  # looked at again every rescan
            transitions.room_returned(self.line, part)
        # Placement reads the need the gate wrote into the ticket: no model
        # is opened to decide. A ticket without one (written by an older
        # factory, or malformed) is gated now for it.
        need = resources.Need.from_json(waiting.ticket.get("need"))
        if need is not None and self._placed(part, need.at_least(waiting.ticket)) is None:
            self.reservation.blocked(part.base)
            return None
        # Gated again at claim, not only at enqueue: the plan checks depend
        # on this node (stations installed, roles), which may have changed
        # while the part waited. The gated bytes are the ones the part runs
        # and its result hashes.
        try:
            raw = durable.read_regular(part.path, limit=MAX_ALLOY_BYTES)
        except NotARegularFile as err:
            self._set_aside(part, f"{part.path.name} cannot be read as an alloy: {err.strerror}")
            return None
        result = gate(raw, file_name=part.path.name, line=self.line, node=self.node,
                      capacity=self.cluster.fits_anywhere if self.cluster is not None else None)
        if not result.ok:  # e.g. queued by an older factory: reject, never run
            reject(self.line, part, result)
            return None
        need = result.need
        if need.to_json() != waiting.ticket.get("need"):  # the source changed, or the node did
            transitions.update_ticket(self.line, part, need=need.to_json())
        need = need.at_least(waiting.ticket)
        gpus = self._placed(part, need)
        if gpus is None:
            self.reservation.blocked(part.base)
            return None
        if not self.reservation.may_start(part.base):
            return _STOP_SCAN
        claimed = transitions.claim(self.line, part, gpus=list(gpus), need=need.to_json())
        return None if claimed is None else (claimed, raw, need, gpus)

    def _placed(self, part: Part, need: resources.Need) -> tuple[int, ...] | None:
        """The GPUs `need` would get now beside the running parts, or None.
        On a cluster Ray places the try (it waits there for a node that
        fits): only max_parallel_parts bounds what is dispatched."""
        if self.cluster is not None:
            return ()
        disk = free_bytes_at(self.cfg.hot_dir(self.line.root)) if self.running else None
        return fit(need, self.node, [ch.held for ch in self.running.values()], disk_free=disk)

    def _set_aside(self, part: Part, message: str | None = None) -> None:
        """Move a part the line cannot use to rework with `message`, and keep
        serving. Without a message the gate itself crashed on it (a bug of
        ours): the traceback goes into error.json."""
        tb = None
        if message is None:
            tb = traceback.format_exc()
            log.error("checking %s failed:\n%s", part.path.name, tb)
            message = (f"the factory failed while checking {part.path.name} (a bug: please report the "
                       "traceback); `factory retry` after upgrading")
        rec = error_record({"type": STAGE_INTAKE, "index": None}, "deterministic", message,
                           retries=part.name.retry, tb=tb)
        try:
            transitions.set_aside(self.line, part, rec, kind="part/set-aside", payload={
                "file": part.path.name, "station": part.station, "message": rec["message"]})
        except (FactoryError, OSError):
            log.exception("could not set %s aside", part.path.name)

    # -- running a part -----------------------------------------------------------

    def _start(self, part: Part, raw: bytes, need: resources.Need, gpus: tuple[int, ...]) -> None:
        work = self.line.layout.work_dir(part.base)
        try:
            logf = self._prepare_work_dir(work, raw)
        except OSError as err:
            self._unstartable(part, work, err)
            return
        if self.cluster is not None:
            with logf:
                logf.write(f"--- {utc_now()} {part.path.name} dispatched to Ray by pid {os.getpid()}\n".encode())
            run = self.cluster.start(part.path.name, part.base, part.name.retry, need,
                                     env=resources.thread_env(need, self.node))
            self._track(part, ClusterChild(run), raw, need, ())
            return
        r, w = os.pipe()
        os.set_blocking(r, False)
        try:
            with logf:
                logf.write(f"--- {utc_now()} {part.path.name} (daemon pid {os.getpid()}, "
                           f"gpus {list(gpus)})\n".encode())
                logf.flush()
                # The child inherits the worker lock's fd: while any child of
                # ours lives, no second daemon can take this root (belt to the
                # child's PDEATHSIG braces).
                proc = subprocess.Popen(
                    [sys.executable, "-m", "factory.child", "--root", str(self.line.root),
                     "--part", part.path.name, "--report-fd", str(w), "--parent-pid", str(os.getpid())],
                    pass_fds=(w, self.lock.fd), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    start_new_session=True, env=self._child_env(need, gpus),
                )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self._track(part, LocalChild(proc, r), raw, need, gpus)

    def _track(self, part: Part, child: Child, raw: bytes, need: resources.Need, gpus: tuple[int, ...]) -> None:
        ch = Running(part=part, child=child, started=time.monotonic(), alloy=json.loads(raw),
                     alloy_sha256=sha256_hex(raw), need=need, gpus=gpus, started_at=utc_now())
        self.running[part.base] = ch
        self.started_parts += 1
        if child.fd is not None:
            self.sel.register(child.fd, selectors.EVENT_READ, ch)
        self.set_state("building")

    def _child_env(self, need: resources.Need, gpus: tuple[int, ...]) -> dict[str, str]:
        """The worker's environment, the part's GPUs (on a node with any: a
        part that needs none sees none) and its share of the cores."""
        env = {**os.environ, **resources.thread_env(need, self.node)}
        if self.node.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpus)
        return env

    @staticmethod
    def _prepare_work_dir(work: Path, raw: bytes):
        """work/<base>/ with the claimed alloy's bytes in it; the open child.log."""
        if work.is_symlink():
            raise NotADirectoryError(errno.ENOTDIR, "is a symbolic link (never followed)", str(work))
        work.mkdir(parents=True, exist_ok=True)
        durable.write_bytes(work / CLAIMED_ALLOY, raw)
        fd = os.open(work / CHILD_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                     durable.file_mode_for(work))
        return os.fdopen(fd, "ab")

    def _unclaim(self, part: Part) -> None:
        """A claimed part that could not start (even its record could not be
        written: a full disk) goes back to intake by renames alone, so it is
        never stranded in assembly/; the next scan tries it again."""
        if part.base in self.running or not os.path.lexists(part.path):
            return
        try:
            transitions.release(self.line, part, reason="could not start it (see the daemon/error event)")
        except (FactoryError, OSError):
            log.exception("could not put %s back in intake", part.path.name)

    def _unstartable(self, part: Part, work: Path, err: OSError) -> None:
        """The part's work dir cannot be made: wait for room, or set it aside."""
        if err.errno in NO_ROOM_ERRNOS:
            stage = {"type": STAGE_START, "index": None}
            transitions.wait_for_room(self.line, part, stage=stage, path=str(self.line.layout.work),
                                      message=f"cannot write {work}: {err.strerror}",
                                      free_bytes=free_bytes_at(self.line.layout.work) or 0)
            return
        rec = error_record({"type": STAGE_START, "index": None}, "deterministic",
                           f"cannot use {work} as this part's work dir ({err.strerror or err}); move whatever is "
                           f"there away, then `factory retry {part.base}`", retries=part.name.retry)
        transitions.rework(self.line, part, rec)

    def _timeout(self, ch: Running, index: int) -> float:
        """The stage's own timeoutSeconds, else the node's stage_timeout_seconds."""
        return float(ch.alloy["stages"][index].get("timeoutSeconds") or self.cfg.forge.stage_timeout_seconds)

    def _tend(self) -> None:
        """Read every child's reports, sample them, honour stops, cancels
        and deadlines, and route each part whose child has ended."""
        self._wait(SAMPLE_SECONDS)
        for ch in list(self.running.values()):
            self._sample(ch)
        self._enforce_memory_budget()
        now = time.monotonic()
        for ch in list(self.running.values()):
            if ch.stop_sent_at is None:
                if self.stop_requested:
                    self._ask_child_to_stop(ch, now)
                elif ch.part.sidecar_path(CANCEL).exists():
                    ch.cancelling = True
                    self._ask_child_to_stop(ch, now)
            self._enforce_deadlines(ch, now)
            if ch.child.fd is None:
                self._read_reports(ch)  # a cluster child's report file: polled
            if ch.child.poll() is not None:
                self._read_reports(ch)
                self._finish_child(ch)

    def _ask_child_to_stop(self, ch: Running, now: float) -> None:
        ch.stop_sent_at = now
        ch.child.terminate()

    def _enforce_deadlines(self, ch: Running, now: float) -> None:
        if ch.child.poll() is not None or ch.killed_for:
            return
        reason = None
        if ch.stage is not None and now - ch.stage_started > self._timeout(ch, ch.stage["index"]):
            reason = "timeout"
        if ch.stop_sent_at is not None:
            grace = 0.0 if self.stop_requested > 1 else self.cfg.daemon.stop_grace_seconds
            if now - ch.stop_sent_at > grace:
                reason = "cancel" if ch.cancelling else "grace"
        if reason:
            ch.killed_for = reason
            ch.child.kill()

    def _sample(self, ch: Running) -> None:
        """RSS (and its peak) of the part's process tree; SIGSTOP. (A
        cluster child is not sampled: Ray holds its memory request.)"""
        if ch.child.pid is None:
            return
        try:
            proc = psutil.Process(ch.child.pid)
            rss = proc.memory_info().rss
            state = proc.status()
            for kid in proc.children(recursive=True):
                try:
                    rss += kid.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        ch.rss = rss
        ch.peak_rss = max(ch.peak_rss, rss)
        self._note_stall(ch, state)

    def _enforce_memory_budget(self) -> None:
        """Over the node's part memory budget, all parts together, the part
        furthest over its own declared need is stopped before the kernel's
        OOM killer picks a process (alone, that is the only part)."""
        live = [ch for ch in self.running.values()
                if ch.child.pid is not None and not ch.killed_for and ch.child.poll() is None]
        if sum(ch.rss for ch in live) <= self.memory_budget or not live:
            return
        ch = max(live, key=lambda c: c.rss - c.need.ram_bytes)
        ch.killed_for = "memory"
        ch.budget_rss = ch.rss
        ch.budget_others = sum(c.rss for c in live if c is not ch)
        ch.child.kill()

    def _note_stall(self, ch: Running, state: str) -> None:
        stopped = state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        if stopped == ch.stalled:
            return
        ch.stalled = stopped
        if stopped:
            self.line.events.emit("part/stalled", ch.part.base, pid=ch.child.pid, state=state,
                                  message=ch.stalled_why)
        self.beat_now()

    def _read_reports(self, ch: Running) -> None:
        while True:
            chunk = ch.child.read()
            if chunk is None:  # the child closed its end: stop selecting on it (EOF is always readable)
                if not ch.eof:
                    ch.eof = True
                    self.sel.unregister(ch.child.fd)
                return
            if not chunk:
                return
            ch.buf += chunk
            *lines, ch.buf = ch.buf.split(b"\n")
            for raw in lines:
                try:
                    self._on_report(ch, json.loads(raw))
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("unusable report from child of %s: %r", ch.part.base, raw[:200])

    def _on_report(self, ch: Running, msg: dict) -> None:
        ev = _SILENT if ch.replaying else self.line.events
        base = ch.part.base
        t = msg.get("t")
        stage = {"index": msg.get("index"), "type": msg.get("type")}
        if t == "stage_started":
            ch.stage, ch.stage_started, ch.progress = stage, time.monotonic(), None
            ch.stage_started_at = utc_now()
            ch.peak_rss = 0
            self._sample(ch)
            ev.emit("stage/started", base, stage=stage, retry=ch.part.name.retry)
            self.beat_now()
        elif t == "progress":
            ch.progress = hb.Progress(msg["done"], msg.get("total"), msg.get("unit", ""))
            self._beat_soon()
            now = time.monotonic()
            final = msg.get("total") is not None and msg["done"] >= msg["total"]
            if final or now - ch.last_progress_event >= PROGRESS_EVENT_MIN_SECONDS:
                ch.last_progress_event = now
                ev.emit("stage/progress", base, stage=ch.stage, done=msg["done"],
                        total=msg.get("total"), unit=msg.get("unit"))
        elif t == "stage_skipped":
            ev.emit("stage/skipped", base, stage=stage, reason=msg.get("reason"))
        elif t == "stage_handed_off":
            ev.emit("stage/handed-off", base, stage=stage, role=msg.get("role"))
        elif t == "stage_completed":
            self._sample(ch)
            payload = {"stage": stage, "elapsed_s": msg.get("elapsed_s"),
                       "peak_rss_mb": round(ch.peak_rss / 2**20, 1),
                       "outputs": len(msg.get("outputs", {})), "metrics": msg.get("metrics", {})}
            if msg.get("peak_vram_mb") is not None:
                payload["peak_vram_mb"] = msg["peak_vram_mb"]
            ch.completed.append({**msg, "peak_rss_mb": payload["peak_rss_mb"]})
            self._beat_soon()
            ev.emit("stage/completed", base, **payload)
        elif t == "failed":
            ch.failure = msg
        elif t == "done":
            ch.done = True
        elif t == "event" and msg.get("kind") in STATION_EVENT_KINDS:
            ev.emit(msg["kind"], base, stage=ch.stage, **msg.get("payload", {}))

    # -- outcomes ---------------------------------------------------------------

    def _finish_child(self, ch: Running) -> None:
        if ch.child.fd is not None:
            if not ch.eof:
                self.sel.unregister(ch.child.fd)
            os.close(ch.child.fd)
        del self.running[ch.part.base]
        self.handled += 1
        self.next_scan = 0.0  # claim the next part now, not at the next rescan
        self.unrouted.append((ch, ch.child.poll()))
        self._route_pending()

    def _route_pending(self) -> None:
        """Move every part whose child has ended; one that cannot move now
        (a full disk under its record) stays pending and is tried again."""
        while self.unrouted:
            ch, rc = self.unrouted[0]
            try:
                self._route(ch, rc)
            except Exception as err:  # noqa: BLE001
                if os.path.lexists(ch.part.path):
                    self._unroutable(ch, err)
                    raise  # the loop reports it and pauses; routed again after
                self._vanished(ch, err)  # RACE: someone removed the bundle while we moved it
            self.unrouted.pop(0)
        self.set_state("stopping" if self.stop_requested else "building" if self.running else "idle")

    def _unroutable(self, ch: Running, err: Exception) -> None:
        """After ROUTE_ATTEMPTS failed moves (not for want of disk: that
        only waits), the part goes to rework with the reason instead."""
        ch.route_failures += 1
        no_room = isinstance(err, OSError) and err.errno in NO_ROOM_ERRNOS
        if no_room or ch.route_failures < ROUTE_ATTEMPTS:
            return
        rec = error_record(ch.stage, "deterministic", f"the factory could not record how this part ended "
                           f"({type(err).__name__}: {str(err)[:300]}); its work dir is kept; `factory retry "
                           f"{ch.part.base}` runs it again", retries=ch.part.name.retry)
        try:
            transitions.rework(self.line, ch.part, rec)
        except (FactoryError, OSError):
            return
        self.unrouted.pop(0)

    def _vanished(self, ch: Running, err: Exception) -> None:
        """Someone removed the running part's bundle: nothing to move; the
        work dir is kept, the line goes on."""
        msg = (f"{ch.part.path.name} disappeared from assembly/ while it ran ({type(err).__name__}); "
               f"nothing was moved; its work dir {self.line.layout.work_dir(ch.part.base)} is kept")
        log.warning(msg)
        self.line.events.emit("part/vanished", ch.part.base, station="assembly", message=msg)

    def _route(self, ch: Running, rc: int) -> None:
        line, part = self.line, ch.part
        stage = ch.stage
        if not os.path.lexists(part.path):
            raise FileNotFoundError(errno.ENOENT, "vanished", str(part.path))
        failure = ch.failure or {}
        # RACE: a cancel asked for after the child's last look is honoured
        # here, before any move; one written during the move itself goes
        # with the bundle (finish() drops it: the part is done).
        if ch.cancelling or part.sidecar_path(CANCEL).exists():
            rec = error_record(stage, "cancelled", "cancelled by a foreman while running",
                               retries=part.name.retry)
            transitions.rework(line, part, rec, kind="part/cancelled")
        elif rc == EXIT_DONE and ch.done:
            self._finished(ch)
        elif (rc == EXIT_STOPPED and ch.stop_sent_at is not None) or ch.killed_for == "grace":
            transitions.release(line, part, reason="worker stopping" if ch.killed_for != "grace"
                                else "worker stopping (child killed after the grace period)")
        elif ch.killed_for == "timeout":
            limit = self._timeout(ch, stage["index"])
            self._infra(ch, f"stage {stage['index']} ({stage['type']}) ran past its timeout of {limit:g}s")
        elif ch.killed_for == "memory" and ch.budget_others and ch.budget_rss <= self.memory_budget:
            # It fits the budget alone: contention, not the recipe. Retried
            # with its need raised to what it used, so placement makes room.
            self._infra(ch, f"the part's processes used {size_text(ch.budget_rss)} of RAM, the other running "
                            f"parts {size_text(ch.budget_others)}, together over this node's part memory budget "
                            f"of {size_text(self.memory_budget)}; it was stopped (the part furthest over its "
                            "need) and is retried with its need raised to what it used",
                            ticket={resources.OBSERVED_RAM: max(ch.budget_rss, ch.need.ram_bytes)})
        elif ch.killed_for == "memory":
            self._deterministic(ch, rc, {"message": (
                f"the part's processes used {ch.budget_rss / GiB:.1f} GiB of RAM, over this node's part memory "
                f"budget of {self.memory_budget / GiB:.1f} GiB; the part was stopped before the node ran out. "
                "Lower the stage's calibrationTokens / batch size, or raise [resources] ram_gb (the budget "
                f"now: {self.node.basis['ram']})")})
        elif rc == LOST:
            self._infra(ch, ch.child.lost or "the part's cluster try was lost")
        elif rc < 0:
            name = signal_name(-rc)
            hint = " (usually the kernel's OOM killer: see `journalctl -k | grep -i oom`)" if name == "SIGKILL" else ""
            self._infra(ch, f"the part's process was killed by {name}{hint}")
        elif rc == EXIT_INFRA and failure.get("no_room"):
            path = failure.get("no_room_path") or str(line.layout.work_dir(part.base))
            free = failure.get("free_bytes")  # measured by the child when the disk filled
            self._stage_failed(ch, stage=stage, failure_class="infrastructure",
                             message=self._message(ch, failure["message"]))
            transitions.wait_for_room(line, part, stage=stage, path=path,
                                      free_bytes=free if isinstance(free, int) else free_bytes_at(Path(path)) or 0,
                                      message=self._message(ch, failure["message"]))
        elif rc == EXIT_INFRA:
            if not failure:
                self._infra(ch, "the part's process reported an infrastructure failure without details; "
                                f"see {line.layout.work_dir(part.base) / CHILD_LOG}")
                return
            cause = failure.get("cause")
            message = self._message(ch, failure["message"])
            self._infra(ch, f"{cause}: {message}" if cause else message, tb=failure.get("traceback"))
        else:
            self._deterministic(ch, rc, failure)

    def _finished(self, ch: Running) -> None:
        line, part = self.line, ch.part
        result = self._result(ch)
        verdict = result["acceptance"]
        if verdict["passed"] or not self.cfg.forge.rework_on_failed_acceptance:
            transitions.finish(line, part, result)
            return
        rec = error_record({"type": STAGE_ACCEPTANCE, "index": None}, "deterministic",
                           f"acceptance criteria failed: {acceptance.summary(verdict)}; the forged model "
                           f"is kept in {result.get('forged_dir')} (see result in this file)",
                           retries=part.name.retry, result=result)
        transitions.rework(line, part, rec)

    def _deterministic(self, ch: Running, rc: int, failure: dict) -> None:
        line, part, stage = self.line, ch.part, ch.stage
        message = self._message(ch, failure.get("message") or (
            f"the part's process exited with code {rc} without reporting why; "
            f"see {line.layout.work_dir(part.base) / CHILD_LOG}"))
        ev_stage = stage or {"index": failure.get("index"), "type": failure.get("type")}
        self._stage_failed(ch, stage=ev_stage, failure_class="deterministic",
                         message=message)
        rec = error_record(ev_stage, "deterministic", message, retries=part.name.retry,
                           tb=failure.get("traceback"), exception=failure.get("exception"))
        transitions.rework(line, part, rec)

    def _stage_failed(self, ch: Running, **payload) -> None:
        """The stage/failed event, once per run even when routing is retried."""
        if not ch.failure_reported:
            ch.failure_reported = True
            self.line.events.emit("stage/failed", ch.part.base, **payload)

    def _message(self, ch: Running, message: str) -> str:
        """A failure message short enough for error.json and events; the
        child wrote the whole text to work/<base>/failure.txt."""
        return cap_message(str(message), full_text_at=str(self.line.layout.work_dir(ch.part.base) / FAILURE_TEXT))

    def _infra(self, ch: Running, message: str, tb: str | None = None, ticket: dict | None = None) -> None:
        self._stage_failed(ch, stage=ch.stage, failure_class="infrastructure", message=message)
        transitions.infrastructure_failure(self.line, ch.part, stage=ch.stage, message=message, tb=tb,
                                           ticket=ticket)

    def _result(self, ch: Running) -> dict:
        ckpt = durable.read_json(self.line.layout.work_dir(ch.part.base) / CHECKPOINT)
        peaks = {c["index"]: c.get("peak_rss_mb") for c in ch.completed}
        stages = [{**s, "peak_rss_mb": peaks.get(s["index"])} for s in ckpt["stages"]]
        work_dir = self.line.layout.work_dir(ch.part.base)
        return {
            **results.summarize(work_dir, stages, ch.alloy),
            "completed_at": utc_now(),
            "part": ch.part.base,
            "retries": ch.part.name.retry,
            "alloy_sha256": ch.alloy_sha256,
            "elapsed_s": round(time.monotonic() - ch.started, 3),
            "work_dir": str(self.line.layout.work_dir(ch.part.base)),
            "node": self.cfg.node.name,
            # where it ran: its GPUs, and its cluster node when dispatched to Ray
            "placement": {"gpus": list(ch.gpus), "cluster_node": ch.node},
            "versions": self.beat.versions,
            "stages": stages,
        }

    # -- heartbeat ----------------------------------------------------------------

    def set_state(self, state: hb.State) -> None:
        self.beat.state = state
        self.beat_now()
        self.notifier.status(self.status_line())

    def beat_now(self) -> None:
        """Write the heartbeat; a failed write (a full disk) is logged and
        tried again at the next beat: it never stops the worker. `parts`
        lists every running part; `part`, `stage`, `progress` and `stalled`
        repeat the first-started one's (protocol section 6)."""
        self.last_beat = time.monotonic()
        self.next_beat = self.last_beat + self.cfg.daemon.heartbeat_interval_seconds
        views = [ch.view() for ch in self.running.values()]
        first = views[0] if views else {}
        b = self.beat
        b.parts = views
        b.part, b.stage, b.progress = first.get("part"), first.get("stage"), first.get("progress")
        b.stalled = next((v["stalled"] for v in views if v["stalled"]), None)
        if self.cluster is not None and time.monotonic() >= self.next_cluster_view:
            self.next_cluster_view = time.monotonic() + CLUSTER_VIEW_SECONDS
            b.cluster = self._cluster_view()
        try:
            hb.write(self.line.layout.heartbeat, self.beat)
        except OSError as err:
            log.warning("cannot write the heartbeat %s: %s", self.line.layout.heartbeat, err)

    def _beat_soon(self) -> None:
        """A change readers should see (progress, a stage done): the beat is
        written within BEAT_ON_CHANGE_SECONDS, and never more often."""
        self.next_beat = min(self.next_beat, self.last_beat + BEAT_ON_CHANGE_SECONDS)

    def _cluster_view(self) -> dict | None:
        """The cluster's alive nodes and the parts each runs, for `factory
        status`; a cluster that does not answer is said so, never raised."""
        view = {"backend": "ray", "address": self.cfg.cluster.address}
        try:
            nodes = self.cluster.nodes(placements=False)
        except Exception as err:  # noqa: BLE001 - a slow or lost head must not stop the beat
            return {**view, "nodes": [], "error": f"{type(err).__name__}: {str(err)[:200]}"}
        by_node: dict[str, list[str]] = {}
        for ch in self.running.values():
            by_node.setdefault(ch.node or "", []).append(ch.part.base)
        return {**view, "nodes": [
            {"node_id": n.node_id, "address": n.address, "total": asdict(n.total), "available": asdict(n.available),
             "parts": sorted(by_node.get(n.node_id, []))} for n in nodes],
            "waiting_for_a_node": sorted(by_node.get("", []))}

    def status_line(self) -> str:
        b = self.beat
        if b.state == "building" and b.part:
            st = f" stage {b.stage['index']} {b.stage['type']}" if b.stage else ""
            more = f" (+{len(self.running) - 1} more)" if len(self.running) > 1 else ""
            return f"building {b.part}{st}{more}"
        return b.state


class _Silent:
    """The event log while a re-attached try's reports are replayed."""

    @staticmethod
    def emit(*args, **kwargs) -> None:
        return None


_SILENT = _Silent()


def _connect(cfg, root: Path):
    """The Ray launcher (importing ray only now: the single-node path never does)."""
    from factory.ray_backend import RayLauncher

    return RayLauncher(cfg.cluster.address, root, namespace=cfg.cluster.namespace)


def _has_room(room: dict) -> bool:
    """Has the filesystem that filled up (room["path"]) gained room since?
    Enough means ROOM_MARGIN_BYTES more free than when the part stopped."""
    usage = usage_at(Path(room["path"]))
    if usage is None:
        return False
    low, high = ROOM_MARGIN_BYTES
    margin = min(high, max(low, usage.total // 16))
    # The free space recorded when it filled, never more than half the
    # filesystem: a figure taken late (after room came back) must not make
    # the part wait for space that cannot exist.
    then = min(int(room.get("free_bytes") or 0), usage.total // 2)
    return usage.free >= then + margin


def run(root: Path, *, mode: Mode = "forever") -> int:
    return Daemon(root, mode=mode).run()


