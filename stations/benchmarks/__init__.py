"""Benchmark runners. Which names exist, what each needs, where its data is
and how it is probed is data in `factory.benchmarks` (the planner reads it
without importing this package); a runner here is `run(job: BenchJob) -> dict`
whose result holds `score` (0..1, higher better) beside its raw metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic.alias_generators import to_camel

from factory.benchmarks import BenchmarkData, resolve_data
from factory.errors import BadInput, StageFailed


@dataclass
class BenchJob:
    """One benchmark on one loaded model."""

    ctx: Any  # factory.stages.StageContext; ctx.stage is a factory.alloy.EvalStage
    spec: Any  # factory.alloy.BenchmarkSpec: the alloy's entry ({"name", "subset", options})
    loaded: Any  # stations.loader.Loaded
    role: str  # "source" or "forged"
    out_dir: Path  # under the stage dir: samples and per-problem results go here
    shared: dict = field(default_factory=dict)  # survives from the source role to the forged one

    def option(self, name: str, default: Any = None) -> Any:
        """Runner option `name` (snake_case) from the benchmark entry, else the
        eval stage, else `default`. A declared schema field is read as typed;
        a key the schema does not declare (yet) is read from the entry's
        extras under its camelCase spelling."""
        for where in (self.spec, self.ctx.stage):
            value = getattr(where, name, None)
            if value is None:
                value = (where.model_extra or {}).get(to_camel(name))
            if value is not None:
                return value
        return default

    def data(self) -> BenchmarkData:
        """Where this benchmark's data is on the node (the plan checked it
        too; a file removed since fails here, with the fix)."""
        try:
            return resolve_data(self.spec.name, spec=self.spec, root=self.ctx.layout.root, config=self.ctx.config)
        except BadInput as err:
            raise StageFailed(str(err)) from err
