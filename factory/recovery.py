"""The recovery sweep: makes a root consistent after any crash. Idempotent.

Run by the daemon at start-up (holding the worker lock) and by
`factory recover`. In order:

1. delete temporary files whose writer is dead (line/, stations, work dirs);
2. reunite bundles split by a crash mid-move: a part caught between
   assembly/ and a terminal station whose terminal sidecar is already there
   is rolled forward (the work was done); any other stray sidecar rejoins
   its alloy;
3. parts left in assembly/ (their worker died) go back to intake/. The part
   itself did not fail, so no retry is spent when its checkpoint advanced
   since its last interruption (or this is its first): it resumes under
   the same name. A part interrupted again without progress may be what
   kills the node (its memory took the worker down, the node reboots under
   it): that costs a retry, as `.retry<N+1>`, or rework once [forge]
   max_retries is spent.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from factory import durable, transitions
from factory.errors import FactoryError
from factory.heartbeat import pid_alive
from factory.line import Line, Part
from factory.protocol import CANCEL, CHECKPOINT, CLAIMED_ALLOY, ERROR, RESULT, STATIONS, base_of, parse_part

_ROLL_FORWARD = {"finished": RESULT, "rework": ERROR}


def _sweep_tmp(line: Line, running: set[str]) -> list[str]:
    removed = []
    work_dirs = [Path(e.path) for e in os.scandir(line.layout.work)
                 if e.is_dir(follow_symlinks=False) and e.name not in running]
    for d in [line.layout.line, *(line.layout.station(s) for s in STATIONS), line.layout.incoming, *work_dirs]:
        for entry in os.scandir(d):
            owner = durable.tmp_owner(entry.name)
            if owner is None or owner == os.getpid() or (owner and pid_alive(owner)):
                continue  # not temporary, or its writer is still writing
            try:
                os.unlink(entry.path)
            except OSError:  # a directory, or gone: one odd entry must not stop the sweep
                continue
            removed.append(entry.path)
    return removed


def _reunite(line: Line) -> list[str]:
    alloys: dict[str, list[Part]] = defaultdict(list)
    strays: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for station in STATIONS:
        for entry in os.scandir(line.layout.station(station)):
            part = parse_part(entry.name)
            if part:
                alloys[part.base].append(Part(part, station, Path(entry.path)))
            elif base_of(entry.name):
                strays[base_of(entry.name)].append((station, Path(entry.path)))
    actions = []
    for base, files in strays.items():
        found = alloys.get(base, [])
        if len(found) != 1:  # none, or a hostile clash: whose sidecars they are is unknowable
            actions.append(f"sidecars of {base!r} left in place ({len(found)} alloys of that name on the line): "
                           f"{[str(p) for _, p in files]}")
            continue
        try:
            actions += _rejoin(line, found[0], files)
        except OSError as err:  # one odd bundle must not stop the sweep
            actions.append(f"could not reunite {base!r}: {err}")
    return actions


def _rejoin(line: Line, part: Part, files: list[tuple[str, Path]]) -> list[str]:
    actions = []
    for station, path in files:
        if station == part.station:
            continue
        tag = path.name[len(part.base) + 1:-len(".json")]
        if part.station == "assembly" and _ROLL_FORWARD.get(station) == tag:
            part = line.move(part, station)
            actions.append(f"rolled {part.base!r} forward into {station}/")
        else:
            target = part.path.parent / path.name
            if target.exists():
                os.unlink(path)  # the alloy's station has the newer copy
            else:
                durable.move(path, target)
            actions.append(f"moved stray {path.name} to {part.station}/")
    return actions


def sweep(line: Line, *, running: set[str] = frozenset()) -> list[str]:
    """Run the sweep; returns one line per action taken (for the log and the
    CLI). `running`: bases whose child still runs on a cluster node (the
    dispatcher re-attached to them): left in assembly/, and their work dirs'
    temporary files are not swept (their writers' pids are another node's)."""
    with line.locked():
        actions = [f"removed temporary file {p}" for p in _sweep_tmp(line, running)]
        actions += _reunite(line)
    for odd in line.irregular("assembly"):
        actions.append(f"left {odd.path} in place: not a regular file (never followed)")
    for part in line.parts("assembly"):
        if part.base in running:
            actions.append(f"left {part.base!r} in assembly/: its try still runs on the cluster (re-attached)")
            continue
        try:
            actions.append(_recover(line, part))
        except (FactoryError, OSError, ValueError) as err:  # one odd part must not stop the sweep
            actions.append(f"could not recover {part.base!r}: {type(err).__name__}: {str(err)[:200]}")
    return actions


INTERRUPTED_MESSAGE = "the worker stopped while this part was in assembly/ (crash, kill or reboot)"


def _recover(line: Line, part: Part) -> str:
    if part.sidecar_path(CANCEL).exists():  # a foreman cancelled it while the worker was gone
        moved = transitions.cancel_waiting(line, part)
        return f"cancelled {part.base!r} as asked: {moved.station}/{moved.path.name}"
    stage, done = _last_stage(line, part)
    pending = _recorded_retry(part)
    if pending is not None:
        # The worker recorded an infrastructure failure (error.json names the
        # next retry) and died before renaming the part: finish that move, so
        # the retry it recorded is the one the part carries.
        with line.locked():
            moved = line.move(part, "intake", name=part.name.with_retry(pending))
        line.events.emit("part/recovered", part.base, retry=pending, stage=stage, retry_spent=True,
                         reason=f"{INTERRUPTED_MESSAGE}, after it recorded a failure; completing that retry")
        return f"recovered {part.base!r} to {moved.station}/{moved.path.name} (the retry it had recorded)"
    before = line.ticket(part).get("interrupted")
    before = before if isinstance(before, dict) and isinstance(before.get("stages_done"), int) else {}
    progressed = not before or done > before["stages_done"]
    if progressed:
        mark = {"interrupted": {"count": int(before.get("count") or 0) + 1, "stages_done": done}}
        moved = transitions.release(line, part, reason=f"{INTERRUPTED_MESSAGE}; resumed without spending a retry",
                                    ticket=mark, kind="part/recovered", stage=stage)
    else:
        moved = transitions.infrastructure_failure(
            line, part, stage=stage, kind="part/recovered",
            message=f"{INTERRUPTED_MESSAGE}, again without finishing a stage since the last time")
    return f"recovered {part.base!r} to {moved.station}/{moved.path.name}"


def _recorded_retry(part: Part) -> int | None:
    """The retry an infrastructure failure wrote into this part's error.json
    without the rename that goes with it (transitions.infrastructure_failure
    writes the record, then renames), else None."""
    try:
        record = part.read_sidecar(ERROR)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("class") != "infrastructure" or record.get("waiting_for_room"):
        return None
    retries = record.get("retries")
    return retries if isinstance(retries, int) and not isinstance(retries, bool) and \
        retries == part.name.retry + 1 else None


def _last_stage(line: Line, part: Part) -> tuple[dict | None, int]:
    """The stage the part was in (the first one its checkpoint lacks) and
    how many stages its checkpoint holds."""
    work = line.layout.work_dir(part.base)
    try:
        done = len(durable.read_json(work / CHECKPOINT).get("stages", []))
    except (OSError, ValueError, TypeError, AttributeError):
        return None, 0
    try:
        alloy = durable.read_json(work / CLAIMED_ALLOY)
        return {"index": done, "type": alloy["stages"][done].get("type")}, done
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, done
