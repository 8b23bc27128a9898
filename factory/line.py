"""The line: parts as files, stations as directories, moves as renames.

A part's state is the directory its alloy file sits in. Every move and every
enqueue happens under the line lock (a flock held for milliseconds), so the
"is this name anywhere on the line?" check cannot race with a move. A part's
bundle is its alloy plus every `<base>.<tag>.json` sidecar in the same
station; sidecars move first and the alloy last, so a reader who sees the
alloy in a station sees its sidecars there too.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import stat
import logging
from datetime import datetime
from dataclasses import dataclass
from pathlib import Path

from factory import durable, locks
from factory.errors import BadInput, LineEnvironmentError, PartNotFound
from factory.events import EventLog, utc_now
from factory.nodeconfig import NodeConfig, load_node_config
from factory.protocol import (
    PROTOCOL_VERSION,
    MAX_BASE_CHARS, SCAN_ORDER, STATIONS, TICKET, Layout, PartName, base_of, parse_part,
)


log = logging.getLogger("factory.line")


@dataclass(frozen=True)
class Part:
    name: PartName
    station: str
    path: Path

    @property
    def base(self) -> str:
        return self.name.base

    def sidecar_path(self, tag: str) -> Path:
        return self.path.with_name(self.name.sidecar(tag))

    def read_sidecar(self, tag: str) -> dict | None:
        """The sidecar's object, or None when absent, unreadable, not JSON,
        not an object, or not a regular file (never followed)."""
        try:
            obj = durable.read_json(self.sidecar_path(tag))
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None


@dataclass(frozen=True)
class Waiting:
    """A part in intake with its ticket (`problem` says why the ticket is
    unusable: the daemon sets such a part aside instead of guessing)."""

    part: Part
    ticket: dict
    problem: str | None = None

    @property
    def not_before(self) -> str | None:
        """When its retry backoff ends (UTC ISO), or None."""
        return self.ticket.get("not_before")

    @property
    def priority(self) -> int:
        return self.ticket.get("priority") or 0

    @property
    def wait_for_room(self) -> dict | None:
        """Set when the part failed for want of disk: it is not claimed
        until its filesystem has room again (see transitions.wait_for_room)."""
        return self.ticket.get("wait_for_room")


def ticket_problem(ticket: object) -> str | None:
    """Why a ticket's content is unusable, or None."""
    if not isinstance(ticket, dict):
        return f"is a JSON {type(ticket).__name__}, not an object"
    pri = ticket.get("priority", 0)
    if pri is not None and (isinstance(pri, bool) or not isinstance(pri, int) or abs(pri) > 2**31):
        return f"has priority {str(pri)[:40]!r}, not an integer"
    for key in ("enqueued_at", "not_before"):
        if ticket.get(key) is not None and not _is_utc(ticket[key]):
            return f"has {key} {str(ticket[key])[:40]!r}, not a UTC timestamp"
    room = ticket.get("wait_for_room")
    if room is not None and not (isinstance(room, dict) and isinstance(room.get("path"), str)
                                 and isinstance(room.get("free_bytes"), int) and room["free_bytes"] >= 0):
        return "has a malformed wait_for_room"
    return None


_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


def _is_utc(value: object) -> bool:
    if not (isinstance(value, str) and _UTC.match(value)):
        return False
    try:  # the pattern admits month 13 or hour 99: the calendar decides
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


class Line:
    """One root's line. Cheap to construct; holds no locks between calls."""

    def __init__(self, root: Path, config: NodeConfig | None = None) -> None:
        self.root = Path(root).absolute()
        self.layout = Layout(self.root)
        self.config = config if config is not None else load_node_config(self.layout.node_config)
        d = self.config.daemon
        self.events = EventLog(self.layout.events, max_bytes=d.events_max_bytes, keep=d.events_keep)

    # -- layout ---------------------------------------------------------------

    def create(self) -> None:
        """Every directory of the layout, with the root's own permission
        bits (never wider: files written there take their directory's)."""
        mode = stat.S_IMODE(os.stat(self.root).st_mode)
        for d in self.layout.all_dirs():
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, mode)  # mkdir's mode is cut by the umask; chmod is exact
        durable.fsync_dir(self.layout.line)
        durable.fsync_dir(self.root)

    def require_layout(self) -> None:
        missing = [d for d in self.layout.all_dirs() if not d.is_dir()]
        if missing:
            raise BadInput(f"{self.root} is not a factory root (missing {missing[0]}); "
                           f"create it with: factory init {self.root}")

    def check_one_filesystem(self) -> None:
        """Renames are atomic only within one filesystem: refuse a split line."""
        devs = {self.layout.station(s): self.layout.station(s).stat().st_dev
                for s in (*STATIONS, "incoming")}
        if len(set(devs.values())) > 1:
            first = next(iter(devs))
            odd = next(p for p, d in devs.items() if d != devs[first])
            raise LineEnvironmentError(
                f"{odd} is on a different filesystem than {first}: moves between stations would "
                "not be atomic; put every station directory under line/ on one filesystem"
            )

    def locked(self):
        return locks.held(self.layout.line_lock)

    # -- reading --------------------------------------------------------------

    def parts(self, station: str) -> list[Part]:
        d = self.layout.station(station)
        out = []
        for entry in os.scandir(d):
            name = parse_part(entry.name)
            if name and entry.is_file(follow_symlinks=False):
                out.append(Part(name, station, Path(entry.path)))
        return sorted(out, key=lambda p: p.name)

    def irregular(self, station: str) -> list[Part]:
        """Entries named like parts that are not regular files (symlinks,
        FIFOs, directories): never read or followed, only set aside."""
        d = self.layout.station(station)
        out = []
        for entry in os.scandir(d):
            name = parse_part(entry.name)
            if name and not entry.is_file(follow_symlinks=False):
                out.append(Part(name, station, Path(entry.path)))
        return sorted(out, key=lambda p: p.name)

    def find(self, base: str) -> Part | None:
        for station in SCAN_ORDER:
            if station == "incoming":
                continue
            for p in self.parts(station):
                if p.base == base:
                    return p
        return None

    def get(self, name: str) -> Part:
        """A part by base name or file name, or PartNotFound."""
        parsed = parse_part(name)
        base = parsed.base if parsed else name
        part = self.find(base)
        if part is None:
            raise PartNotFound(f"no part named {base!r} on the line at {self.root}; "
                               "see `factory list` for the names")
        return part

    def alloy_copies(self, base: str) -> list[Part]:
        """Every alloy file of `base` on the line (more than one is a clash)."""
        return [p for s in STATIONS for p in self.parts(s) if p.base == base]

    def free_base(self, base: str) -> str:
        """`base` if unused, else the first free `<base>-dup<N>`, the base
        shortened so the result is still a valid part name."""
        n = 0
        candidate = base
        while self.base_taken(candidate) is not None:
            n += 1
            tail = f"-dup{n}"
            candidate = base[: MAX_BASE_CHARS - len(tail)].rstrip(".") + tail
        return candidate

    def base_taken(self, base: str) -> str | None:
        """The station holding any file of `base`, or None."""
        for station in SCAN_ORDER:
            for entry in os.scandir(self.layout.station(station)):
                if base_of(entry.name) == base:
                    return station
        return None

    def bundle(self, part: Part) -> list[Path]:
        """The part's sidecars in its station (the alloy itself excluded)."""
        d = part.path.parent
        return sorted(p for p in d.glob(glob_escape(part.base) + ".*")
                      if p != part.path and base_of(p.name) == part.base and parse_part(p.name) is None)

    # -- moving (callers hold the line lock) ----------------------------------

    def move(self, part: Part, station: str, *, name: PartName | None = None) -> Part:
        """Move a whole bundle, sidecars first, alloy last."""
        dst_dir = self.layout.station(station)
        name = name or part.name
        for side in self.bundle(part):
            tag = side.name[len(part.base) + 1:-len(".json")]
            target = dst_dir / name.sidecar(tag)  # renamed with the part when it gets a new base
            if target.exists():
                # The destination's copy was written there on purpose (the
                # terminal record, see finish()) or by an interrupted move:
                # it is the newer one.
                os.unlink(side)
                continue
            durable.move(side, target)
        dst = dst_dir / name.filename
        durable.move(part.path, dst)
        return Part(name, station, dst)

    def write_sidecar(self, part: Part, tag: str, obj: dict, *, station: str | None = None,
                      name: PartName | None = None) -> Path:
        d = self.layout.station(station) if station else part.path.parent
        path = d / (name or part.name).sidecar(tag)
        durable.write_json(path, obj)
        return path

    def finish(self, part: Part, station: str, tag: str, record: dict, *, name: PartName | None = None) -> Part:
        """Write the terminal sidecar into the destination first (durable),
        then move the bundle: a reader never sees a terminal alloy without it.
        Refused when any part of that base is already there: never touch
        another part's sidecars."""
        name = name or part.name
        dst = self.layout.station(station) / name.filename
        if os.path.lexists(dst) or any(p.base == name.base for p in (*self.parts(station), *self.irregular(station))):
            raise FileExistsError(f"refusing to overwrite {dst}: a part named {name.base!r} is in {station}/")
        self.write_sidecar(part, tag, record, station=station, name=name)
        return self.move(part, station, name=name)

    def clashes(self, part: Part) -> bool:
        """Does any file of another part carry `part`'s base? (Its own
        sidecars in its own station do not count.) Caller holds the lock."""
        for station in SCAN_ORDER:
            for entry in os.scandir(self.layout.station(station)):
                if base_of(entry.name) != part.base or entry.path == str(part.path):
                    continue
                if station != part.station or parse_part(entry.name) is not None:
                    return True
        return False

    # -- tickets --------------------------------------------------------------

    def ticket(self, part: Part) -> dict:
        return part.read_sidecar(TICKET) or {}

    def queue(self) -> list["Waiting"]:
        """Adopted parts in intake, in claim order (higher alloy priority
        first, then oldest enqueue, then name), each ticket read once."""
        waiting = []
        for part in self.parts("intake"):
            path = part.sidecar_path(TICKET)
            try:
                ticket = durable.read_json(path)
            except FileNotFoundError:
                continue  # no ticket: a hand drop not yet adopted
            except (OSError, ValueError) as err:
                waiting.append(Waiting(part, {}, f"is unreadable ({_short(err)})"))
                continue
            problem = ticket_problem(ticket)
            waiting.append(Waiting(part, ticket if problem is None else {}, problem))
        return sorted(waiting, key=lambda w: (-w.priority, w.ticket.get("enqueued_at") or "~", w.part.base))

    # -- throughput -----------------------------------------------------------

    def record_outcome(self, part: Part, outcome: str, **fields) -> None:
        """One line of throughput.jsonl. Statistics, not state: a failed
        append (a full disk) is logged, never raised into a move."""
        line = {"ts": utc_now(), "part": part.base, "outcome": outcome, "retry": part.name.retry, **fields}
        try:
            with locks.held(self.events.lock_path):
                durable.append_line(self.layout.throughput, (durable.dumps_json(line, indent=None) + "\n").encode())
        except OSError as err:
            log.warning("cannot append to %s: %s", self.layout.throughput, err)


def _short(err: Exception) -> str:
    """An exception as a short line that quotes no file content."""
    return type(err).__name__ if isinstance(err, ValueError) else str(err)[:200]


def glob_escape(s: str) -> str:
    return glob.escape(s)


def _starter_config(root: Path) -> str:
    """A minimal node config; every other key keeps its documented default
    (factory_node.toml.example in the repository lists them all)."""
    return (f"# forge-factory node config for {root}\n"
            "# All keys and defaults: factory_node.toml.example in the forge-factory repository.\n\n"
            f"[node]\nname = {json.dumps(socket.gethostname())}\nroles = [\"forge\"]\n\n"
            f"[protocol]\nversion = {PROTOCOL_VERSION}\n")


def init_root(root: Path) -> Line:
    """Create a root (idempotent): stations, work/, calibration/, and a
    starter factory_node.toml unless one exists."""
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = Layout(root).node_config
    if not cfg_path.exists():
        durable.write_bytes(cfg_path, _starter_config(root).encode(), overwrite=False)
    line = Line(root, load_node_config(cfg_path))
    line.create()
    line.check_one_filesystem()
    return line
