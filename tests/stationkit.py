"""Run one station in-process on a real root, without the daemon.

End-to-end station tests go through the daemon (tests/linekit.py); these
helpers are for checking one station's outputs closely: they build the same
StageContext the child process builds and collect what the station reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from factory.integrity import alloy_hash
from factory.nodeconfig import load_node_config
from factory.protocol import Layout
from factory.alloy import Alloy
from factory.catalog import load_station
from factory.stages import StageContext, StageResult


@dataclass
class Reports:
    messages: list[dict] = field(default_factory=list)

    def __call__(self, msg: dict) -> None:
        self.messages.append(msg)

    def events(self, kind: str) -> list[dict]:
        return [m["payload"] for m in self.messages if m.get("t") == "event" and m.get("kind") == kind]

    def progress(self) -> list[dict]:
        return [m for m in self.messages if m.get("t") == "progress"]


def make_ctx(root: Path, alloy: dict, index: int, *, base: str = "part",
             previous: list[dict] | None = None, reports: Reports | None = None) -> StageContext:
    layout = Layout(root)
    recipe = Alloy.model_validate(alloy)  # as the child does: a schema error fails here, loudly
    stage = recipe.stages[index]
    work = layout.work_dir(base)
    stage_dir = work / "stages" / f"{index}-{stage.type}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(layout=layout, config=load_node_config(layout.node_config), alloy=alloy, recipe=recipe,
                        stage=stage,
                        index=index, work_dir=work, stage_dir=stage_dir, previous=previous or [],
                        report=reports if reports is not None else Reports(), stop_requested=lambda: False,
                        alloy_hash=alloy_hash(json.dumps(alloy).encode()))


def run_stages(root: Path, alloy: dict, *, base: str = "part", upto: int | None = None) -> tuple[list[dict], Reports]:
    """Run an alloy's stages in order in this process (registry lookups
    included); returns checkpoint-like entries and the reports."""
    from factory.checkpoint import hash_outputs

    reports = Reports()
    entries: list[dict] = []
    for i, stage in enumerate(alloy["stages"][:upto]):
        ctx = make_ctx(root, alloy, i, base=base, previous=list(entries), reports=reports)
        result: StageResult = load_station(stage["type"])(ctx)
        entries.append({"index": i, "type": stage["type"], "metrics": {**ctx.recorded, **result.metrics},
                        "outputs": hash_outputs(ctx.work_dir, result.outputs)})
    return entries, reports
