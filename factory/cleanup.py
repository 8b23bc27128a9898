"""`factory cleanup`: evict the work dirs nobody needs, and stale offload folders.

The rules (docs/OPERATOR.md "Cleanup", docs/FACTORY-PROTOCOL.md section 5):

- a part waiting or running (intake/, assembly/, deferred/) is never touched;
- a finished or reworked part is kept for `keep_hours` after it completed
  (result.json `completed_at`, error.json `failed_at`), never judged by a
  file's mtime: an alloy's is its enqueue time, or older after `cp -p`;
- a work dir that a result.json `forged_dir` (or a failed acceptance's
  error.json `result.forged_dir`) points into holds the forged model: it is
  kept until the operator names the part;
- an evicted work dir goes to the first usable cold tier with room (room
  counted in allocated blocks) as `factory-evicted/<part>`, else is deleted;
  a move copies to a hidden name, fsyncs, verifies every file, renames, and
  only then deletes the source; records that pointed into it follow it;
- offload folders (`factory-offload/<part>`) of parts not in assembly/, and
  the hidden trees a crashed cleanup left behind, are removed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from factory import durable
from factory.errors import BadInput, Conflict, PartNotFound
from factory.events import utc_now
from factory.heartbeat import pid_alive
from factory.line import Line
from factory.protocol import CHECKPOINT, ERROR, RESULT, STATIONS, check_base, parse_part
from factory.tiers import EVICTED_DIR, OFFLOAD_DIR, Tier, node_tiers

# A finished part's work dir stays this long after it completed: shipping may still read it.
KEEP_FINISHED_HOURS = 24.0
WAITING_OR_RUNNING = frozenset({"intake", "assembly", "deferred"})
CHUNK = 8 << 20  # bytes per read while copying and hashing
_ZEROS = memoryview(bytes(CHUNK))

# Hidden names cleanup works under: `.<name>.evicting-<pid>` (a copy being
# made in factory-evicted/), `.<name>.deleting-<pid>` (a tree taken off its
# name before it is deleted). Once that pid is dead they are garbage.
EVICTING, DELETING = "evicting", "deleting"
_TEMP_RE = re.compile(r"^\..+\.(?:evicting|deleting)-(?P<pid>[1-9][0-9]*)$")


# ── what a plan holds ────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Record:
    """A terminal sidecar whose paths may point into a work dir: a
    result.json, or the `result` a failed acceptance keeps in error.json."""

    base: str
    path: Path
    nested: bool  # the paths sit under error.json's "result" key
    finished_at: float  # completed_at / failed_at (the file's mtime where absent)
    paths: dict[str, str]  # "forged_dir" / "work_dir" -> the path, when present


@dataclass(frozen=True)
class Eviction:
    """One work dir to move to a cold tier (`tier`, `target`) or to delete."""

    part: str
    work_dir: Path
    bytes: int  # allocated on disk (st_blocks x 512, each inode once): what a copy takes
    action: Literal["move", "delete"]
    tier: Tier | None
    target: Path | None  # the planned name; when it is taken the copy gets `<name>.<N>`
    records: tuple[Record, ...]  # rewritten to follow the move
    watch: tuple[Path, ...]  # sidecars whose change means the part moved on meanwhile
    seen: tuple  # `_snapshot` at plan time, compared again under the line lock


@dataclass(frozen=True)
class Kept:
    part: str
    work_dir: Path
    reason: str


@dataclass(frozen=True)
class Removal:
    """An offload folder of a part not running, or a crashed cleanup's leftover."""

    path: Path
    kind: Literal["offload", "leftover"]
    part: str | None = None  # the offload folder's part


@dataclass
class CleanupPlan:
    evictions: list[Eviction] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    removals: list[Removal] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # unusable cold tiers, one line each


@dataclass(frozen=True)
class Outcome:
    item: Eviction | Removal
    target: Path | None = None  # where a move landed
    error: str | None = None  # one line: what failed; the source is kept
    skipped: str | None = None  # why it was left alone after all (the line changed)


# ── planning ─────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class _Scan:
    """What planning read once for every work dir."""

    line: Line
    records: list[Record]
    into: dict[str, list[Record]]  # work dir name -> records with a path into it
    unreadable: dict[str, Path]  # base -> its record that cannot be read
    cutoff: float  # parts that completed after this (epoch s) are kept
    keep_hours: float
    named: bool  # the operator named the parts: forged models may go


def plan(line: Line, *, keep_hours: float = KEEP_FINISHED_HOURS, parts: list[str] | None = None) -> CleanupPlan:
    """What cleanup would do now. `parts` restricts it to those parts and
    lets it evict their forged models; nothing is changed here."""
    if keep_hours < 0:
        raise BadInput(f"--keep-hours must be 0 or more (got {keep_hours:g}); 0 evicts every finished part")
    stations = _stations(line)
    cold = node_tiers(line.root, line.config)[1:]
    named = _named(line, parts, stations, cold) if parts else None
    records, unreadable = _records(line)
    scan = _Scan(line, records, _records_by_work_dir(records, line.layout.work), unreadable,
                 time.time() - keep_hours * 3600, keep_hours, named is not None)
    out = CleanupPlan(problems=[f"tier {t.name} ({t.key}): {t.problem}; nothing is evicted there"
                                for t in cold if t.problem])
    for entry in sorted(os.scandir(line.layout.work), key=lambda e: e.name):
        if _leftover(entry.name):
            out.removals.append(Removal(Path(entry.path), "leftover"))
        elif (entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
              and not stations.get(entry.name, set()) & WAITING_OR_RUNNING
              and (named is None or entry.name in named)):
            cold = _plan_one(scan, out, Path(entry.path), cold)
    out.removals += _tier_removals(cold, stations, named)
    return out


def _plan_one(scan: _Scan, out: CleanupPlan, work_dir: Path, cold: list[Tier]) -> list[Tier]:
    """Keep or evict one work dir; returns the cold tiers less what it will take."""
    base = work_dir.name
    own = [r for r in scan.records if r.base == base]
    inside = scan.into.get(base, [])
    reason = _keep_reason(scan, base, own, inside, work_dir)
    try:
        size = allocated_bytes(work_dir) if reason is None else 0
    except OSError as err:
        reason = f"cannot be measured ({_os_text(err)})"
    i = next((i for i, t in enumerate(cold) if t.room_for(size)), None)
    missing = next((t for t in cold if t.missing), None)
    if reason is None and i is None and missing is not None:
        reason = (f"no usable cold tier has room and {missing.name} {missing.path} is missing: "
                  "not deleted while a cold tier is missing")
    if reason is not None:
        out.kept.append(Kept(base, work_dir, reason))
        return cold
    tier = cold[i] if i is not None else None
    watch = tuple(dict.fromkeys([*(r.path for r in own), *(r.path for r in inside),
                                 *([scan.unreadable[base]] if base in scan.unreadable else [])]))
    out.evictions.append(Eviction(
        base, work_dir, size, "move" if tier else "delete", tier,
        tier.path / EVICTED_DIR / base if tier else None, tuple(inside), watch,
        _snapshot(scan.line, base, work_dir, watch)))
    if tier is None:
        return cold
    return [*cold[:i], replace(tier, free_bytes=tier.free_bytes - size), *cold[i + 1:]]


def _keep_reason(scan: _Scan, base: str, own: list[Record], inside: list[Record], work_dir: Path) -> str | None:
    """Why a work dir stays: it holds a model a record points at (unless
    named), or its part completed within --keep-hours."""
    if not scan.named:
        if base in scan.unreadable:
            return (f"{scan.unreadable[base]} cannot be read, so where its model is is unknown; "
                    f"name the part (--part {base}) to evict it")
        for r in inside:
            if _work_child(r.paths.get("forged_dir", ""), scan.line.layout.work) == base:
                key = "result.forged_dir" if r.nested else "forged_dir"
                return f"{r.path} {key} points into it (the forged model); name the part (--part {base}) to evict it"
    when = max(r.finished_at for r in own) if own else _last_stage_at(work_dir)
    if when is not None and when > scan.cutoff:
        return f"completed {(time.time() - when) / 3600:.1f} h ago, within --keep-hours {scan.keep_hours:g}"
    return None


def _records_by_work_dir(records: list[Record], work: Path) -> dict[str, list[Record]]:
    """work dir name -> the records with a path (forged_dir, work_dir) into it."""
    out: dict[str, list[Record]] = {}
    for r in records:
        for child in dict.fromkeys(_work_child(p, work) for p in r.paths.values()):
            if child is not None:
                out.setdefault(child, []).append(r)
    return out


def _stations(line: Line) -> dict[str, set[str]]:
    """base -> the stations holding an alloy of it."""
    out: dict[str, set[str]] = {}
    for station in STATIONS:
        for p in line.parts(station):
            out.setdefault(p.base, set()).add(station)
    return out


def _named(line: Line, names: list[str], stations: dict[str, set[str]], cold: list[Tier]) -> set[str]:
    """The bases the operator named, refused when invalid, waiting or running,
    or with nothing to clean up."""
    out = set()
    for name in names:
        parsed = parse_part(name)
        base = parsed.base if parsed else name
        why = check_base(base)
        if why:
            raise BadInput(f"--part {name!r}: a part name {why}")
        busy = stations.get(base, set()) & WAITING_OR_RUNNING
        if busy:
            raise Conflict(f"--part {base}: the part is in {min(busy)}/ and cleanup never touches a waiting or "
                           "running part; cancel it or let it finish first")
        work = line.layout.work_dir(base)
        if not os.path.lexists(work) and not any(os.path.lexists(t.path / OFFLOAD_DIR / base) for t in cold):
            raise PartNotFound(f"--part {base}: there is no work dir {work} and no offload folder of it to "
                               "clean up; see `factory list` for the parts")
        out.add(base)
    return out


def _records(line: Line) -> tuple[list[Record], dict[str, Path]]:
    """Every terminal record, and the bases whose record cannot be read."""
    records, unreadable = [], {}
    for station, tag, nested in (("finished", RESULT, False), ("rework", ERROR, True)):
        for part in line.parts(station):
            path = part.sidecar_path(tag)
            try:
                mtime = os.stat(path).st_mtime
                data = durable.read_json(path)
            except (OSError, ValueError):
                unreadable[part.base] = path
                continue
            if not isinstance(data, dict):
                unreadable[part.base] = path
                continue
            holder = data.get("result") if nested else data
            paths = {k: holder[k] for k in ("forged_dir", "work_dir")
                     if isinstance(holder, dict) and isinstance(holder.get(k), str)}
            when = _parse_ts(data.get("failed_at" if nested else "completed_at"))
            records.append(Record(part.base, path, nested, mtime if when is None else when, paths))
    return records, unreadable


def _last_stage_at(work_dir: Path) -> float | None:
    """When a work dir whose part left the line last completed a stage."""
    try:
        stages = durable.read_json(work_dir / CHECKPOINT).get("stages", [])
    except (OSError, ValueError, AttributeError):
        return None
    times = [_parse_ts(s.get("completed_at")) for s in stages if isinstance(s, dict)]
    return max((t for t in times if t is not None), default=None)


def _tier_removals(cold: list[Tier], stations: dict[str, set[str]], named: set[str] | None) -> list[Removal]:
    """Offload folders of parts not in assembly/, and dead cleanups' leftovers, on the usable cold tiers."""
    out = []
    for tier in cold:
        if tier.missing:
            continue
        for sub in (OFFLOAD_DIR, EVICTED_DIR):
            d = tier.path / sub
            if d.is_symlink() or not d.is_dir():
                continue
            for entry in sorted(os.scandir(d), key=lambda e: e.name):
                if _leftover(entry.name):
                    out.append(Removal(Path(entry.path), "leftover"))
                elif (sub == OFFLOAD_DIR and not entry.name.startswith(".")
                      and "assembly" not in stations.get(entry.name, set())
                      and (named is None or entry.name in named)):
                    out.append(Removal(Path(entry.path), "offload", entry.name))
    return out


def _snapshot(line: Line, base: str, work_dir: Path, watch: tuple[Path, ...]) -> tuple:
    """What must not change between planning and deleting a source: where
    the part's alloys are, its records, the work dir itself."""
    return (tuple(sorted(p.station for p in line.alloy_copies(base))),
            tuple(_stamp(p) for p in watch), _stamp(work_dir))


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _leftover(name: str) -> bool:
    """A hidden tree of a cleanup that died (never one of a live one)."""
    m = _TEMP_RE.match(name)
    return bool(m) and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))


def _temp_name(name: str, what: str) -> str:
    return f".{name}.{what}-{os.getpid()}"


def _parse_ts(value: object) -> float | None:
    """A protocol timestamp (UTC ISO-8601, `Z` suffix) as epoch seconds."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _relative(path: object, d: Path) -> str | None:
    """`path` relative to directory `d` when it lies inside it, lexically or
    once symlinks are resolved (a root reached through a symlink), else None."""
    if not isinstance(path, str) or not path:
        return None
    for p, top in ((os.path.normpath(path), os.path.normpath(d)), (os.path.realpath(path), os.path.realpath(d))):
        if p == top or p.startswith(top.rstrip(os.sep) + os.sep):
            return os.path.relpath(p, top)
    return None


def _work_child(path: str, work: Path) -> str | None:
    """The work dir (name under work/) that `path` lies in, or None."""
    rel = _relative(path, work)
    return None if rel is None or rel == "." else rel.split(os.sep, 1)[0]


# ── walking and measuring (symlinks are never followed) ─────────────────────


def _walk(top: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything under `top`, parents first."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(top, rel)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            r = os.path.join(rel, e.name) if rel else e.name
            st = e.stat(follow_symlinks=False)
            yield r, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(r)


def allocated_bytes(path: Path) -> int:
    """What `path` occupies on disk: st_blocks x 512, each inode once. A
    sparse file's apparent size would refuse evictions that fit; a hard
    link counted twice would too."""
    seen, total = set(), os.lstat(path).st_blocks * 512
    for _, st in _walk(path):
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


# ── carrying a plan out ──────────────────────────────────────────────────────


def apply(line: Line, todo: CleanupPlan) -> list[Outcome]:
    """Removals first (they free room), then evictions; each item on its own:
    a failure is reported and the next one goes on."""
    with _one_cleanup(line):
        outcomes = [_remove_item(line, r) for r in todo.removals]
        outcomes += [_evict(line, ev) for ev in todo.evictions]
    return outcomes


@contextmanager
def _one_cleanup(line: Line) -> Iterator[None]:
    """One cleanup per root at a time: a flock on work/ itself (no new file on the line)."""
    fd = os.open(line.layout.work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"{line.layout.work}: another `factory cleanup` is running on this root; "
                           "let it finish, then run it again") from None
        yield
    finally:
        os.close(fd)


def _remove_item(line: Line, r: Removal) -> Outcome:
    try:
        if r.kind == "offload":
            with line.locked():
                # RACE: a claim moves the part into assembly/ under this lock;
                # taking the folder off its name under it means the part's
                # loader never writes into a folder being deleted.
                if any(p.base == r.part for p in line.parts("assembly")):
                    return Outcome(r, skipped=f"part {r.part} started running")
                doomed = _hide(r.path)
        else:
            doomed = r.path
        _remove(doomed)
    except OSError as err:
        return Outcome(r, error=f"could not remove {r.path}: {_os_text(err)}")
    return Outcome(r)


def _evict(line: Line, ev: Eviction) -> Outcome:
    """Copy (for a move), then under the line lock check the part did not
    move on, point its records at the copy and take the source off its
    name; delete it last. Any failure before that keeps the source."""
    target = copy = None
    try:
        if ev.action == "move":
            copy = target = _copy_to_tier(ev)  # verified, still under its hidden .evicting name
        with line.locked():
            # RACE: while we copied, the part may have gone back on the line
            # (factory retry, a claim) or its record been rewritten; no move
            # can start while we hold the lock, so the check holds until the
            # source is off its name.
            moved_on = _snapshot(line, ev.part, ev.work_dir, ev.watch) != ev.seen
            if not moved_on:
                # The copy takes its final name only now, next to the records'
                # rewrite: a cleanup killed before this leaves a hidden copy
                # of a dead pid, which the next cleanup removes.
                if copy is not None:
                    target = _rename_unique(copy, ev.target)
                    durable.fsync_dir(target.parent)
                doomed = _retire(ev, target)
    except OSError as err:
        where = f" to {ev.tier.name} {ev.tier.path}" if ev.tier else ""
        kept = "; the work dir is kept" + (f" and so is its verified copy {target}" if target else "")
        return Outcome(ev, error=f"could not {ev.action} {ev.work_dir}{where}: {_os_text(err)}{kept}")
    if moved_on:
        why = f"part {ev.part} changed on the line during cleanup; its work dir is kept"
        try:
            if target is not None:
                _remove(target)  # ours alone: nothing points at it yet
        except OSError as err:
            return Outcome(ev, skipped=f"{why}, and so is the copy {target} ({_os_text(err)})")
        return Outcome(ev, skipped=why)
    try:
        _remove(doomed)
    except OSError as err:  # off its name already: the next cleanup removes the rest
        return Outcome(ev, target=target, error=f"{ev.action} of {ev.work_dir}: could not delete all of "
                                                f"{doomed} ({_os_text(err)}); the next cleanup removes it")
    return Outcome(ev, target=target)


def _follow(ev: Eviction, target: Path | None) -> None:
    """Point every record that pointed into the work dir at its copy (null
    after a delete), durably: readers of finished/ find the model where it is.
    Called under the line lock, right after the records were seen unchanged."""
    for rec in ev.records:
        data = durable.read_json(rec.path)
        holder = data["result"] if rec.nested else data
        for key in ("forged_dir", "work_dir"):
            rel = _relative(holder.get(key), ev.work_dir)
            if rel is not None:
                holder[key] = str(target / rel) if target is not None else None
        holder["evicted"] = {"at": utc_now(), "action": ev.action, "from": str(ev.work_dir),
                             "to": str(target) if target is not None else None}
        durable.write_json(rec.path, data)


def _copy_to_tier(ev: Eviction) -> Path:
    """A verified copy of the work dir on the tier, under a hidden temporary
    name (the caller gives it its final name); on any failure the partial
    copy is removed and the error raised."""
    tier = ev.tier.remeasured()
    if tier.problem:
        raise OSError(errno.ENOENT, tier.problem)
    if not tier.room_for(ev.bytes):
        raise OSError(errno.ENOSPC, f"{tier.name} no longer has room for {ev.bytes} bytes above its "
                                    f"min_free_gb {tier.min_free_gb:g}", str(tier.path))
    evicted = ev.target.parent
    _mkdir_durable(evicted)
    tmp = evicted / _temp_name(ev.part, EVICTING)
    try:
        digests = _copy_tree(ev.work_dir, tmp)
        _verify(ev.work_dir, tmp, digests)
    except BaseException:
        if os.path.lexists(tmp):
            _remove(tmp)
        raise
    durable.fsync_dir(evicted)
    return tmp


def _mkdir_durable(d: Path) -> None:
    if d.is_symlink():
        raise OSError(errno.ELOOP, "is a symlink; cleanup writes only into a real directory of the tier", str(d))
    if not d.is_dir():
        d.mkdir(exist_ok=True)
        durable.fsync_dir(d.parent)


def _copy_tree(src: Path, dst: Path) -> dict[str, str]:
    """Copy `src` to the new directory `dst`: files with their holes, hard
    links as links, symlinks as symlinks (never followed); everything
    fsynced. Returns the sha256 of each file as read from the source."""
    digests: dict[str, str] = {}
    first: dict[tuple[int, int], str] = {}  # (dev, inode) -> its first copy, for hard links
    os.mkdir(dst, 0o700)
    dirs = [("", os.lstat(src))]
    for rel, st in _walk(src):
        s, d = os.path.join(src, rel), os.path.join(dst, rel)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(d, 0o700)
            dirs.append((rel, st))
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in first:
                os.link(os.path.join(dst, first[key]), d)
                digests[rel] = digests[first[key]]
            else:
                digests[rel] = _copy_file(s, d, st)
                first[key] = rel
        else:
            raise OSError(errno.EOPNOTSUPP, "not a regular file, directory or symlink: cannot be evicted", s)
    for rel, st in reversed(dirs):  # children first: setting a dir's mtime must come after its entries
        d = os.path.join(dst, rel)
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
        durable.fsync_dir(Path(d))
    return digests


def _copy_file(src: str, dst: str, st: os.stat_result) -> str:
    """Copy one file's data runs (its holes stay holes), fsync it, and return
    the sha256 of what was read."""
    h = hashlib.sha256()
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            size, pos = os.fstat(fin).st_size, 0
            for start, end in _data_runs(fin, size):
                _hash_zeros(h, start - pos)
                for off in range(start, end, CHUNK):
                    data = os.pread(fin, min(CHUNK, end - off), off)
                    if not data:
                        raise OSError(errno.EIO, "shrank while being copied", src)
                    h.update(data)
                    _pwrite_all(fout, data, off)
                pos = end
            _hash_zeros(h, size - pos)
            os.ftruncate(fout, size)
            os.fchmod(fout, stat.S_IMODE(st.st_mode))
            os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fout)
            # Drop the cached pages so verification reads what reached the disk.
            os.posix_fadvise(fout, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return h.hexdigest()


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    """pwrite until all of `data` is written: a full disk first gives a short
    write, and only the next call raises ENOSPC."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def _data_runs(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of data in a file, holes skipped
    (SEEK_DATA / SEEK_HOLE); the whole file where the filesystem cannot tell."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                return
            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _hash_zeros(h, n: int) -> None:
    while n > 0:
        k = min(n, CHUNK)
        h.update(_ZEROS[:k])
        n -= k


def _verify(src: Path, dst: Path, digests: dict[str, str]) -> None:
    """The copy has exactly the source's entries, kinds and symlink targets,
    and every file its size and the sha256 read from the source."""
    want, got = dict(_walk(src)), dict(_walk(dst))
    if want.keys() != got.keys():
        odd = sorted(want.keys() ^ got.keys())[0]
        raise OSError(errno.EIO, f"the copy and the source differ in entries ({odd})", str(dst))
    for rel, st in want.items():
        g = got[rel]
        d = os.path.join(dst, rel)
        if stat.S_IFMT(st.st_mode) != stat.S_IFMT(g.st_mode):
            raise OSError(errno.EIO, "the copy is another kind of file than the source", d)
        if stat.S_ISLNK(st.st_mode) and os.readlink(os.path.join(src, rel)) != os.readlink(d):
            raise OSError(errno.EIO, "the copied symlink points elsewhere than the source's", d)
        if stat.S_ISREG(st.st_mode) and (st.st_size != g.st_size or _sha256(d) != digests.get(rel)):
            raise OSError(errno.EIO, "the copy's size or sha256 differs from the source's", d)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while data := os.read(fd, CHUNK):
            h.update(data)
    finally:
        os.close(fd)
    return h.hexdigest()


def _rename_unique(tmp: Path, want: Path) -> Path:
    """Rename `tmp` to `want`, or `want.1`, `want.2`, ...: never over an earlier eviction."""
    dest, n = want, 0
    while True:
        try:
            _rename_noreplace(tmp, dest)
            return dest
        except FileExistsError:
            n += 1
            dest = want.with_name(f"{want.name}.{n}")


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing: a plain
    rename silently replaces an empty directory (renameat2 RENAME_NOREPLACE)."""
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # EINVAL: the filesystem lacks the flag
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    # RACE: without the flag, check then rename. One cleanup per root runs at
    # a time (_one_cleanup); only another root sharing this tier could take
    # the same name in between.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _retire(ev: Eviction, target: Path | None) -> Path:
    """Point the records at the copy and take the source off its name, in
    the order that never leaves a record pointing at nothing: a move follows
    first (the copy exists); a delete hides first and puts the source back
    if its records cannot be rewritten. Caller holds the line lock."""
    if target is not None:
        _follow(ev, target)
        return _hide(ev.work_dir)
    hidden = _hide(ev.work_dir)
    try:
        _follow(ev, None)
    except OSError:
        os.rename(hidden, ev.work_dir)
        raise
    return hidden


def _hide(path: Path) -> Path:
    """Take a tree off its name (one rename in its directory) before deleting it."""
    hidden = path.with_name(_temp_name(path.name, DELETING))
    os.rename(path, hidden)
    durable.fsync_dir(path.parent)
    return hidden


def _remove(path: Path) -> None:
    """Delete a tree, or a file or symlink itself; symlinks are never followed."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _os_text(err: OSError) -> str:
    text = err.strerror or str(err)
    return f"{text} ({err.filename})" if err.filename else text


# ── reporting ────────────────────────────────────────────────────────────────


def report(todo: CleanupPlan, outcomes: list[Outcome] | None) -> dict:
    """The JSON of `factory cleanup --json`; `outcomes` None for a dry run."""
    done = {id(o.item): o for o in outcomes or []}

    def row(item: Eviction | Removal) -> dict:
        o = done.get(id(item))
        return {"done": bool(o and not o.error and not o.skipped), "error": o.error if o else None,
                "skipped": o.skipped if o else None}

    def target(e: Eviction) -> str | None:
        landed = done[id(e)].target if id(e) in done else None
        return str(landed or e.target) if (landed or e.target) else None

    return {
        "dry_run": outcomes is None,
        "evictions": [{"part": e.part, "work_dir": str(e.work_dir), "bytes": e.bytes, "action": e.action,
                       "tier": e.tier.name if e.tier else None,
                       "target": target(e),
                       **row(e)} for e in todo.evictions],
        "removed": [{"path": str(r.path), "kind": r.kind, "part": r.part, **row(r)} for r in todo.removals],
        "kept": [{"part": k.part, "work_dir": str(k.work_dir), "reason": k.reason} for k in todo.kept],
        "problems": list(todo.problems),
    }


def failed(summary: dict) -> bool:
    """A run that left something undone: an unusable tier, or an item that failed."""
    return bool(summary["problems"]) or any(r["error"] for r in summary["evictions"] + summary["removed"])


def text_lines(summary: dict) -> tuple[list[str], list[str]]:
    """What `factory cleanup` prints: (stdout lines, one stderr line per problem or failure)."""
    verb = "would" if summary["dry_run"] else "did"
    out = []
    for r in summary["evictions"]:
        if not r["error"]:
            out.append(f"{'skipped' if r['skipped'] else verb} {r['action']} {r['work_dir']} "
                       f"({r['bytes'] / 2**20:.1f} MiB)" + (f" -> {r['target']}" if r["target"] else "")
                       + (f": {r['skipped']}" if r["skipped"] else ""))
    for r in summary["removed"]:
        if not r["error"]:
            what = "offload folder" if r["kind"] == "offload" else "leftover of a crashed cleanup"
            out.append(f"{'skipped' if r['skipped'] else verb} remove {what} {r['path']}"
                       + (f": {r['skipped']}" if r["skipped"] else ""))
    out += [f"kept {k['work_dir']}: {k['reason']}" for k in summary["kept"]]
    if not (summary["evictions"] or summary["removed"] or summary["kept"]):
        out.append("no orphan work dirs")
    err = [*summary["problems"], *(r["error"] for r in summary["evictions"] + summary["removed"] if r["error"])]
    return out, err
