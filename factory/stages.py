"""The contract every station implements: what it is handed, what it returns.

Which station runs a stage type is `factory.catalog`'s business; the part's
child process builds a `StageContext` per stage, with the stage already
parsed into its typed model, and calls the station.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from factory.alloy import Alloy, Stage
from factory.errors import StopRequested
from factory.nodeconfig import NodeConfig
from factory.protocol import Layout


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
    alloy: dict  # the claimed alloy as JSON data (for writing the executed alloy)
    recipe: Alloy  # the same alloy, validated and typed
    stage: Stage  # this stage's typed model, defaults from the schema
    index: int
    work_dir: Path  # work/<base>/: survives retries, keyed by the base name
    stage_dir: Path  # work/<base>/stages/<index>-<type>/
    previous: list[dict]  # checkpoint entries of the stages before this one
    report: Callable[[dict], None]
    stop_requested: Callable[[], bool]
    alloy_hash: str = ""  # "sha256:<hex>" of the alloy file's raw bytes
    # Metrics the shared helpers record for this stage beside the station's
    # own (stations.base records the GGUF source a stage read): the child
    # merges them into the checkpoint entry under the station's metrics.
    recorded: dict[str, Any] = field(default_factory=dict)

    def progress(self, done: float, total: float | None, unit: str) -> None:
        """Report progress as done/total in `unit`; the daemon rate-limits events."""
        self.report({"t": "progress", "index": self.index, "done": done, "total": total, "unit": unit})

    def stop_point(self) -> None:
        """Call at safe points: raises StopRequested after SIGTERM so the part
        can go back to intake and resume from its last checkpoint."""
        if self.stop_requested():
            raise StopRequested(f"stop requested during stage {self.index} ({self.stage.type})")

    def emit(self, kind: str, **payload: Any) -> None:
        """Ask the daemon to write an event (e.g. model/load) for this part."""
        self.report({"t": "event", "kind": kind, "payload": payload})


def write_report_line(fd: int, msg: dict) -> None:
    data = (json.dumps(msg, default=str) + "\n").encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]
