"""Getting parts onto the line: enqueue, hand-dropped adoption, and the gate.

Two ways in, one gate. `factory enqueue` stages the bytes in line/.incoming
and renames them into intake/ under the line lock (atomic, never replacing a
name that exists anywhere on the line). A file copied straight into intake/
by hand may still be growing (cp is not atomic), so the daemon adopts it only
once it has settled, then gives it a ticket. Either way the alloy passes the
gate (parse + schema) first; a bad one goes to rework/ with error.json and
nothing is lost.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from factory import durable, transitions
from factory.errors import BadInput, Conflict
from factory.events import utc_now
from factory.line import Line, Part
from factory.outcomes import error_record
from factory.resources import Need, NodeResources, capacity_problem, node_resources, part_need
from factory.protocol import (
    ERROR, MAX_ALLOY_BYTES, OUTCOME_REJECTED, STAGE_INTAKE, TICKET, PartName, base_from_filename, check_base,
)


@dataclass(frozen=True)
class GateResult:
    ok: bool
    priority: int
    problems: list[dict]  # [{"level", "path", "value", "message", "fix"}]
    need: Need | None = None  # what it will hold on this node (factory.resources), when ok

    def summary(self) -> str:
        if self.ok:
            return "ok"
        first = self.problems[0]
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        from factory.validation import finding_text

        return finding_text(first["path"], first["message"], None, first["fix"]) + more


def gate(raw: bytes, *, file_name: str, line: Line, node: NodeResources | None = None,
         capacity: Callable[[Need], str | None] | None = None) -> GateResult:
    """Parse + schema check of an alloy's bytes, the plan checks that need
    no model (known architecture, a station or role for every stage), and
    its need on this node (`node`: measured now when not given), refused
    when it exceeds what the parts may have: `capacity` says why (a Ray
    dispatcher passes its cluster's); by default this node's, except on a
    node that dispatches to a cluster, where only the dispatcher knows."""
    from factory.plan import quick_findings  # pydantic models: loaded on first use
    from factory.validation import Finding, check_bytes

    report = check_bytes(raw, file_name=file_name, root=line.root)
    findings = list(report.findings)
    need = None
    if report.alloy is not None and not findings:
        findings = quick_findings(report.alloy, root=line.root, config=line.config)
    if report.alloy is not None and not findings:
        node = node or node_resources(line.config)
        need = part_need(report.alloy, root=line.root, config=line.config, node=node)
        if capacity is None and line.config.cluster.backend == "local":
            capacity = partial(capacity_problem, node=node)
        too_big = capacity(need) if capacity is not None else None
        if too_big:
            findings = [Finding("plan", "$.source.baseModel", report.alloy.source.base_model,
                                f"this part can never run on this node: {too_big}",
                                "run it on a larger node, or raise the limit in factory_node.toml")]
    problems = [
        {"level": f.level, "path": f.path, "value": f.value, "message": f.message, "fix": f.fix}
        for f in findings
    ]
    priority = 0
    if report.alloy is not None:
        priority = int(getattr(report.alloy, "priority", None) or 0)
    return GateResult(ok=not findings, priority=priority, problems=problems, need=need if not findings else None)


def _rejection(part: Part, result: GateResult) -> dict:
    return error_record({"type": STAGE_INTAKE, "index": None}, "deterministic",
                        f"{part.path.name} was refused at intake: {result.summary()}",
                        retries=part.name.retry, problems=result.problems)


def reject(line: Line, part: Part, result: GateResult) -> Part | None:
    """Send a part that failed the gate to rework with a readable error.json.
    None when the part is no longer where the caller saw it."""
    rec = _rejection(part, result)
    try:
        return transitions.set_aside(line, part, rec, kind="part/rejected", outcome="rejected",
                                     payload={"station": "rework", "message": rec["message"],
                                              "problems": result.problems})
    except Conflict:
        return None  # RACE: a foreman's cancel or a second gate moved it first: not an error


def _rejected(line: Line, moved: Part, rec: dict, result: GateResult) -> None:
    line.events.emit("part/rejected", moved.base, station="rework", message=rec["message"],
                     problems=result.problems)
    line.record_outcome(moved, OUTCOME_REJECTED)


def _ticket(result: GateResult, origin: str) -> dict:
    return {"enqueued_at": utc_now(), "priority": result.priority, "origin": origin, "not_before": None,
            "need": result.need.to_json() if result.need else None}


def enqueue(line: Line, src: Path, *, name: str | None = None) -> Part:
    """Put a copy of `src` onto the line as a new part.

    Returns the part (in intake/, or in rework/ when the gate refused it:
    the caller reports that). Raises Conflict when the name is taken.
    """
    try:
        # The operator named this file: a symlink they give is theirs to
        # follow (unlike one dropped into intake/, which is never followed).
        raw = durable.read_regular(Path(src).resolve(), limit=MAX_ALLOY_BYTES)
    except durable.NotARegularFile as err:
        raise BadInput(f"{src}: {err.strerror}; enqueue a regular alloy file") from err
    base = name or base_from_filename(src.name)
    why = check_base(base)
    if why:
        raise BadInput(f"{src}: part name {base!r} {why}; pass --as NAME to choose another")
    pn = PartName(base)
    result = gate(raw, file_name=src.name, line=line)
    # Stage durably under hidden tmp names: a crash leaves only files the
    # recovery sweep deletes, never a half-written part in intake/.
    staged_alloy = durable.tmp_path_for(Path(pn.filename), directory=line.layout.incoming)
    staged_ticket = durable.tmp_path_for(Path(pn.sidecar(TICKET)), directory=line.layout.incoming)
    durable.write_bytes(staged_alloy, raw)
    durable.write_json(staged_ticket, _ticket(result, "enqueue"))
    try:
        with line.locked():
            # RACE: the name check and both renames happen under the line
            # lock, so two enqueuers (or a concurrent move) cannot both win.
            where = line.base_taken(base)
            if where is not None:
                raise Conflict(f"{src}: a part named {base!r} is already on the line (in {where}/); "
                               "enqueue it under another name with --as NAME")
            # A refused alloy goes straight to rework/, never through intake/
            # (where the daemon's own gate would race us to reject it).
            station = "intake" if result.ok else "rework"
            part = Part(pn, station, line.layout.station(station) / pn.filename)
            rec = None if result.ok else _rejection(part, result)
            if rec is not None:
                durable.write_json(part.sidecar_path(ERROR), rec, overwrite=False)
            # Alloy first, ticket second: a crash between leaves an alloy
            # without a ticket, which the daemon adopts like a hand drop.
            durable.move(staged_alloy, part.path)
            durable.move(staged_ticket, part.sidecar_path(TICKET))
    finally:
        staged_alloy.unlink(missing_ok=True)
        staged_ticket.unlink(missing_ok=True)
    line.events.emit("part/enqueued", base, origin="enqueue", priority=result.priority,
                     bytes=len(raw), source=str(src))
    if rec is not None:
        _rejected(line, part, rec, result)
    return part


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float


def open_for_writing(path: Path) -> bool | None:
    """Does any process hold `path` open for writing? None when we cannot tell.

    The kernel grants a read lease (F_SETLEASE) only when no one has the file
    open for writing, so this is exact, not a guess from timestamps. It needs
    the file to be ours (or CAP_LEASE); otherwise the settle rule decides.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


class Adopter:
    """Decides when a hand-dropped alloy (no ticket) is complete.

    A file someone still holds open for writing is never adopted. A file no
    one holds open is adopted at once. When the kernel will not say (a file
    owned by another user), the file is adopted once its (size, mtime) held
    still for `settle` seconds, or at once after inotify reported it closed
    after writing or renamed in.
    """

    def __init__(self, line: Line, settle: float) -> None:
        self.line = line
        self.settle = settle
        self.seen: dict[str, _Seen] = {}
        self.closed: set[str] = set()  # file names inotify saw complete

    def note_complete(self, filename: str) -> None:
        self.closed.add(filename)

    def pending(self, now: float) -> list[Part]:
        """Unticketed parts in intake that are ready for adoption now."""
        ready = []
        present = set()
        for part in self.line.parts("intake"):
            if part.sidecar_path(TICKET).exists():
                continue
            present.add(part.path.name)
            try:
                st = part.path.stat()
            except FileNotFoundError:
                continue
            writing = open_for_writing(part.path)
            if writing is False:
                ready.append(part)
                continue
            prev = self.seen.get(part.path.name)
            if writing or prev is None or (prev.size, prev.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self.seen[part.path.name] = prev = _Seen(st.st_size, st.st_mtime_ns, now)
                if writing or part.path.name not in self.closed:
                    continue
            if part.path.name in self.closed or now - prev.since >= self.settle:
                ready.append(part)
        for gone in set(self.seen) - present:
            self.seen.pop(gone, None)
        self.closed &= present
        return ready

    def next_check_in(self, now: float) -> float | None:
        """When the next unsettled drop settles. Settled ones that could not
        be adopted wait for the regular rescan (else the loop would spin)."""
        waits = [self.settle - (now - s.since) for s in self.seen.values() if now - s.since < self.settle]
        return max(0.0, min(waits)) if waits else None

    def adopt(self, part: Part) -> Part | None:
        raw = durable.read_regular(part.path, limit=MAX_ALLOY_BYTES)
        result = gate(raw, file_name=part.path.name, line=self.line)
        with self.line.locked():
            # RACE: an enqueuer may have written the ticket since our scan.
            if part.sidecar_path(TICKET).exists() or not part.path.exists():
                return part
            others = [p for p in self.line.alloy_copies(part.base) if p.path != part.path]
            if not others:
                durable.write_json(part.sidecar_path(TICKET), _ticket(result, "dropped"))
        self.seen.pop(part.path.name, None)
        if others:
            return self._set_aside_duplicate(part, others[0].station)
        self.line.events.emit("part/enqueued", part.base, origin="dropped", priority=result.priority,
                              bytes=len(raw))
        if not result.ok:
            return reject(self.line, part, result)
        return part

    def _set_aside_duplicate(self, part: Part, where: str) -> Part | None:
        """A hand drop whose name is already on the line: never let it touch
        the other part's files (transitions.set_aside gives it a free name)."""
        rec = error_record({"type": STAGE_INTAKE, "index": None}, "deterministic",
                           f"{part.path.name} was dropped into intake/ but a part named {part.base!r} is already "
                           f"on the line (in {where}/); this copy was set aside under the first free name "
                           f"{part.base}-dup<N>; enqueue it under another name with `factory enqueue --as NAME`",
                           retries=0)
        try:
            return transitions.set_aside(self.line, part, rec, kind="part/rejected", outcome="rejected",
                                         payload={"station": "rework", "message": rec["message"], "problems": []})
        except Conflict:
            return None  # RACE: moved by someone else meanwhile
