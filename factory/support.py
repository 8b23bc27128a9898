"""Support probes: can this node run a stage at all, decided before a part
is queued. Each is named by a `factory.catalog` row and is cheap: files,
package metadata and the node config, never torch or a model.
"""

from __future__ import annotations

from collections.abc import Iterator

from factory import benchmarks
from factory.alloy import EvalStage, PruneStage, QuantStage, Stage
from factory.catalog import ProbeEnv, Unsupported, format_problem

_ELSEWHERE = "run the part on a node that has it, or drop the stage"

HEAD_PRUNE_REFUSED: dict[str, str] = {
    name: (f"strategy {name!r} ranks routed experts by how the router uses them; attention heads are not "
           "routed, so head pruning has no such score")
    for name in ("calibration-aware-activation-count", "per-layer-normalized-router-importance")
}
"""Strategies of forge-alloy's prune enum that head pruning refuses, with why
(the prune station refuses them again at run time)."""
HEAD_PRUNE_REFUSED_FIX = ("use activation-magnitude (calibrated) or magnitude (data-free) for a prune stage, or put "
                          "this strategy on an expert-prune stage")


def prune_problems(stage: Stage, env: ProbeEnv) -> Iterator[Unsupported]:
    """A head-prune strategy that has no meaning for attention heads."""
    assert isinstance(stage, PruneStage)
    if stage.strategy in HEAD_PRUNE_REFUSED:
        yield Unsupported(".strategy", stage.strategy, HEAD_PRUNE_REFUSED[stage.strategy], HEAD_PRUNE_REFUSED_FIX)


def quant_problems(stage: Stage, env: ProbeEnv) -> Iterator[Unsupported]:
    """The quant format's own probe (converter on PATH, CUDA, ...)."""
    assert isinstance(stage, QuantStage)
    reason = format_problem(stage.format)
    if reason:
        yield Unsupported(".format", stage.format, reason, _ELSEWHERE)


def benchmark_problems(stage: Stage, env: ProbeEnv) -> Iterator[Unsupported]:
    """Every benchmark is known, its runner installed and its data on the
    node (factory.benchmarks: the [benchmarks] table, evalplus's cache, the
    Hugging Face datasets cache)."""
    assert isinstance(stage, EvalStage)
    for j, bench in enumerate(stage.benchmarks):
        problem = benchmarks.benchmark_problem(bench.name, check_installed=True, spec=bench, root=env.root,
                                               config=env.config)
        if problem:
            yield Unsupported(f".benchmarks[{j}].name", bench.name, problem,
                              "use a known benchmark name, install its runner, or provide its data as the "
                              "message says")
