"""Every move of a part between stations, with its record and its event.

The daemon, the recovery sweep and the foreman commands all move parts
through these functions, so each transition writes the same sidecars and
events wherever it starts. Each takes the line lock and re-checks that the
part is still where the caller saw it.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

from factory import locks
from factory.errors import Conflict
from factory.events import utc_now
from factory.line import Line, Part
from factory.outcomes import backoff_seconds, error_record
from factory.protocol import (
    CANCEL, ERROR, OUTCOME_CANCELLED, OUTCOME_FINISHED, OUTCOME_REWORK, RESULT, TICKET, PartName,
)


def _still_there(part: Part) -> None:
    if not os.path.lexists(part.path):  # lexists: a symlink set aside is moved, never followed
        raise Conflict(f"part {part.base!r} moved while this command ran (was {part.path}); "
                       "look again with `factory list`")


def claim(line: Line, part: Part, **placed) -> Part | None:
    """intake -> assembly; None when another process moved it first.
    `placed` (its GPUs and need) goes into the part/claimed event."""
    with line.locked():
        if not os.path.lexists(part.path):
            return None  # RACE: cancelled, deferred or claimed since the scan: not an error
        claimed = line.move(part, "assembly")
    line.events.emit("part/claimed", part.base, retry=part.name.retry, **placed)
    return claimed


def finish(line: Line, part: Part, result: dict) -> Part:
    """assembly -> finished, result.json written into finished/ first."""
    with line.locked():
        _still_there(part)
        part.sidecar_path(CANCEL).unlink(missing_ok=True)  # RACE: asked for too late: the part is done
        done = line.finish(part, "finished", RESULT, result)
    line.events.emit("part/finished", part.base, retry=part.name.retry,
                     elapsed_s=result.get("elapsed_s"))
    line.record_outcome(done, OUTCOME_FINISHED, elapsed_s=result.get("elapsed_s"))
    return done


def _with_history(part: Part, record: dict) -> dict:
    """Keep earlier failures of this part (one line each) in the new record."""
    old = part.read_sidecar(ERROR)
    if not old:
        return record
    earlier = old.get("history", []) + [{k: old.get(k) for k in ("failed_at", "class", "stage", "message", "retries")}]
    return {**record, "history": earlier}


def rework(line: Line, part: Part, record: dict, *, kind: str = "part/rework") -> Part:
    """Any station -> rework, error.json written into rework/ first."""
    with line.locked():
        _still_there(part)
        record = _with_history(part, record)
        part.sidecar_path(CANCEL).unlink(missing_ok=True)  # honoured, or moot now
        moved = line.finish(part, "rework", ERROR, record)
    line.events.emit(kind, part.base, retry=part.name.retry, failure_class=record["class"],
                     message=record["message"], stage=record.get("stage"))
    line.record_outcome(moved, OUTCOME_CANCELLED if kind == "part/cancelled" else OUTCOME_REWORK,
                        failure_class=record["class"])
    return moved


def set_aside(line: Line, part: Part, record: dict, *, kind: str = "part/rework",
              outcome: str = OUTCOME_REWORK, payload: dict | None = None) -> Part:
    """A waiting part the line cannot use -> rework with `record`. When its
    base is already used by another part's files anywhere on the line (a
    drop named like a finished part, a retry copy), it goes under the first
    free `<base>-dup<N>` instead, so no other part's record is touched."""
    with line.locked():
        _still_there(part)
        name = PartName(line.free_base(part.base)) if line.clashes(part) else part.name
        if name == part.name:
            record = _with_history(part, record)
        moved = line.finish(part, "rework", ERROR, record, name=name)
    renamed = {"renamed_from": part.path.name} if name != part.name else {}
    line.events.emit(kind, moved.base, **(payload if payload is not None else {
        "retry": part.name.retry, "failure_class": record["class"], "message": record["message"],
        "stage": record.get("stage")}), **renamed)
    line.record_outcome(moved, outcome, failure_class=record["class"])
    return moved


def infrastructure_failure(line: Line, part: Part, *, stage: dict | None, message: str,
                           tb: str | None = None, kind: str = "part/retried", ticket: dict | None = None) -> Part:
    """Retry as `<base>.retry<N+1>` after a backoff, or rework once retries
    are spent; `ticket` fields are merged into its ticket for the retry."""
    cfg = line.config.forge
    n = part.name.retry + 1
    if n > cfg.max_retries:
        rec = error_record(stage, "infrastructure",
                           f"{message}; gave up after {cfg.max_retries} retries "
                           "(fix the node, then `factory retry " + part.base + "`)",
                           retries=part.name.retry, tb=tb)
        return rework(line, part, rec)
    wait = backoff_seconds(cfg.retry_backoff_seconds, n)
    not_before = (datetime.now(timezone.utc) + timedelta(seconds=wait)).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
    rec = error_record(stage, "infrastructure", message, retries=n, tb=tb, retry_not_before=not_before)
    with line.locked():
        _still_there(part)
        line.write_sidecar(part, ERROR, _with_history(part, rec))
        line.write_sidecar(part, TICKET, {**line.ticket(part), **(ticket or {}), "not_before": not_before})
        moved = line.move(part, "intake", name=part.name.with_retry(n))
    line.events.emit(kind, part.base, retry=n, reason=message, not_before=not_before, stage=stage, retry_spent=True)
    return moved


def release(line: Line, part: Part, *, reason: str, ticket: dict | None = None,
            kind: str = "part/released", stage: dict | None = None) -> Part:
    """assembly -> intake under the same name: no retry spent (graceful
    stop, an interrupted worker); `ticket` fields are merged into its ticket."""
    with line.locked():
        _still_there(part)
        if ticket:
            line.write_sidecar(part, TICKET, {**line.ticket(part), **ticket})
        moved = line.move(part, "intake")
    line.events.emit(kind, part.base, retry=part.name.retry, reason=reason, stage=stage, retry_spent=False)
    return moved


def wait_for_room(line: Line, part: Part, *, stage: dict | None, message: str, path: str,
                  free_bytes: int) -> Part:
    """assembly -> intake under the same name, marked to wait for disk room.

    A full disk is the node's fault and retrying at once fails again, so no
    retry is spent: the daemon claims the part again only once the
    filesystem holding `path` has room (see daemon._has_room). error.json
    says why it waits.
    """
    rec = error_record(stage, "infrastructure", f"{message}; waiting for room on the filesystem of {path}",
                       retries=part.name.retry, waiting_for_room=True)
    room = {"path": path, "free_bytes": free_bytes, "since": utc_now()}
    with line.locked():
        _still_there(part)
        line.write_sidecar(part, ERROR, _with_history(part, rec))
        line.write_sidecar(part, TICKET, {**line.ticket(part), "wait_for_room": room})
        moved = line.move(part, "intake")
    line.events.emit("part/waiting", part.base, retry=part.name.retry, reason=message, tier=path,
                     free_bytes=free_bytes, needed_bytes=None, stage=stage)
    return moved


def room_returned(line: Line, part: Part) -> None:
    """Clear a waiting part's wait_for_room mark (it may be claimed now)."""
    update_ticket(line, part, wait_for_room=None)


def update_ticket(line: Line, part: Part, **fields) -> None:
    """Merge `fields` into a waiting part's ticket (nothing if it moved)."""
    with line.locked():
        if part.path.exists():
            line.write_sidecar(part, TICKET, {**line.ticket(part), **fields})


def foreman_retry(line: Line, part: Part) -> Part:
    """rework -> intake as a fresh part: retries reset, queued at the back."""
    if part.station != "rework":
        raise Conflict(f"part {part.base!r} is in {part.station}/, not rework/; only reworked parts are retried")
    with line.locked():
        _still_there(part)
        ticket = line.ticket(part)
        line.write_sidecar(part, TICKET, {**ticket, "enqueued_at": utc_now(), "not_before": None})
        moved = line.move(part, "intake", name=PartName(part.base))
    line.events.emit("part/retried", part.base, retry=0, reason="foreman retry", previous_retry=part.name.retry)
    return moved


def _shelve(line: Line, part: Part, *, src: str, dst: str, verb: str, kind: str) -> Part:
    """intake <-> deferred: a plain move between two waiting stations."""
    if part.station != src:
        raise Conflict(f"part {part.base!r} is in {part.station}/, not {src}/; "
                       f"`factory {verb}` works on parts waiting in {src}/")
    with line.locked():
        _still_there(part)
        moved = line.move(part, dst)
    line.events.emit(kind, part.base)
    return moved


def defer(line: Line, part: Part) -> Part:
    return _shelve(line, part, src="intake", dst="deferred", verb="defer", kind="part/deferred")


def resume(line: Line, part: Part) -> Part:
    return _shelve(line, part, src="deferred", dst="intake", verb="resume", kind="part/resumed")


def cancel_waiting(line: Line, part: Part) -> Part:
    """intake/deferred -> rework with class cancelled."""
    rec = error_record(None, "cancelled", "cancelled by a foreman before it ran",
                       retries=part.name.retry)
    return rework(line, part, rec, kind="part/cancelled")


def foreman_cancel(line: Line, part: Part) -> Part | None:
    """A foreman's cancel (`factory cancel`, the dashboard): a waiting part,
    or any part when no worker runs, moves to rework/ now (returned); a
    running one gets a cancel request its worker acts on (None). Conflict
    when it is already finished or in rework."""
    if part.station in ("finished", "rework"):
        raise Conflict(f"part {part.base!r} is already in {part.station}/; nothing to cancel")
    if part.station in ("intake", "deferred") or not locks.is_locked(line.layout.worker_lock):
        return cancel_waiting(line, part)
    request_cancel(line, part)
    return None


def request_cancel(line: Line, part: Part) -> None:
    """Ask the daemon to stop a running part: a cancel sidecar in assembly/."""
    with line.locked():
        _still_there(part)
        line.write_sidecar(part, CANCEL, {"requested_at": utc_now()})
