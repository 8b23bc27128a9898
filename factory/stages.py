"""The stage registry and the contract every station implements.

Stage types map to callables through the `forge_factory.stages` entry-point
group (pyproject.toml). Reading the names imports nothing, so the daemon can
tell a known type from an unknown one without importing torch; the part's
child process imports the one module it runs. A type with no entry fails the
part with a clear error: no stage is ever skipped silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from factory.errors import StageFailed, StopRequested
from factory.nodeconfig import NodeConfig
from factory.protocol import Layout

ENTRY_POINT_GROUP = "forge_factory.stages"


def registered_stage_types() -> dict[str, str]:
    """type -> "module:callable", read from package metadata (no imports)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_stage(stage_type: str) -> Callable[["StageContext"], "StageResult"]:
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if stage_type not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise StageFailed(
            f"stage type {stage_type!r} has no station on this node (registered: {known}); "
            "install the station that provides it or remove the stage from the alloy"
        )
    return eps[stage_type].load()


@dataclass
class StageResult:
    """What a station hands back: files it wrote (under the work dir) and numbers."""

    outputs: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a station may use; stations touch nothing outside it."""

    layout: Layout
    config: NodeConfig
    alloy: dict
    stage: dict
    index: int
    work_dir: Path  # work/<base>/: survives retries, keyed by the base name
    stage_dir: Path  # work/<base>/stages/<index>-<type>/
    previous: list[dict]  # checkpoint entries of the stages before this one
    report: Callable[[dict], None]
    stop_requested: Callable[[], bool]
    alloy_hash: str = ""  # "sha256:<hex>" of the alloy file's raw bytes

    def progress(self, done: float, total: float | None, unit: str) -> None:
        """Report progress as done/total in `unit`; the daemon rate-limits events."""
        self.report({"t": "progress", "index": self.index, "done": done, "total": total, "unit": unit})

    def stop_point(self) -> None:
        """Call at safe points: raises StopRequested after SIGTERM so the part
        can go back to intake and resume from its last checkpoint."""
        if self.stop_requested():
            raise StopRequested(f"stop requested during stage {self.index} ({self.stage.get('type')})")

    def emit(self, kind: str, **payload: Any) -> None:
        """Ask the daemon to write an event (e.g. model/load) for this part."""
        self.report({"t": "event", "kind": kind, "payload": payload})


def write_report_line(fd: int, msg: dict) -> None:
    data = (json.dumps(msg, default=str) + "\n").encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]
