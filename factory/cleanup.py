"""`factory cleanup`: evict work dirs nobody needs any more.

A work dir is an orphan when its part is not waiting or running (not in
intake/, assembly/ or deferred/) and did not finish recently (its result
may still be read). Orphans move to the first cold tier with room for them,
else are deleted. Nothing else is touched.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from factory.line import Line
from factory.tiers import node_tiers

# A finished part's work dir stays this long: shipping may still read it.
KEEP_FINISHED_HOURS = 24.0


@dataclass(frozen=True)
class Eviction:
    work_dir: Path
    bytes: int
    action: str  # "move" | "delete"
    target: Path | None


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _protected(line: Line, keep_hours: float) -> set[str]:
    keep = {p.base for s in ("intake", "assembly", "deferred") for p in line.parts(s)}
    cutoff = time.time() - keep_hours * 3600
    for p in line.parts("finished"):
        if p.path.stat().st_mtime >= cutoff:
            keep.add(p.base)
    return keep


def plan(line: Line, *, keep_hours: float = KEEP_FINISHED_HOURS) -> list[Eviction]:
    protected = _protected(line, keep_hours)
    cold = node_tiers(line.root, line.config)[1:]
    out = []
    for entry in sorted(os.scandir(line.layout.work), key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=False) or entry.name in protected:
            continue
        size = _size(Path(entry.path))
        tier = next((t for t in cold if t.room_for(size)), None)
        target = tier.path / "factory-evicted" / entry.name if tier else None
        out.append(Eviction(Path(entry.path), size, "move" if tier else "delete", target))
    return out


def apply(evictions: list[Eviction]) -> None:
    for ev in evictions:
        if ev.action == "move":
            ev.target.parent.mkdir(parents=True, exist_ok=True)
            dest = ev.target
            n = 1
            while dest.exists():  # never overwrite an earlier eviction
                dest = ev.target.with_name(f"{ev.target.name}.{n}")
                n += 1
            shutil.move(str(ev.work_dir), str(dest))
        else:
            shutil.rmtree(ev.work_dir)
