"""HumanEval scoring: the sandbox, and the published pass@1 of every shared
samples file reproduced by executing the code.

The expected counts are the PUBLISHED figures, not numbers this scorer
computed. Source: /work/shared/corpus/samples/SOURCES.md (table column
"published pass@1 HumanEval", n = round(score x 164 / 100)), which cites the
alloys in /work/shared/corpus/alloys/ (results.benchmarks[name=humaneval]
.score / .baseScore and priorMetricBaselines[0].evaluation.results.humaneval).
Scoring all 7 files x 164 problems takes about 40 s on 2 cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from factory.errors import BadInput
from stations.benchmarks.humaneval import (check_program, load_problems, run_program, score_samples,
                                           truncate_at_stop)

from tests.shared_corpus import SAMPLES
OLMOE = "continuum-ai_olmoe-1b-7b-compacted-5b__eval_humaneval_"
Q3C30 = "continuum-ai_qwen3-coder-30b-a3b-compacted-19b-256k__eval_humaneval_"
PUBLISHED = [
    # (file, published pass@1 %, count out of 164), from SOURCES.md rows 1-7
    (OLMOE + "base_samples.jsonl", 40.9, 67),  # OLMoE alloy results.benchmarks[0].baseScore
    (OLMOE + "student_samples.jsonl", 36.0, 59),  # OLMoE alloy results.benchmarks[0].score
    # priorMetricBaselines[0]; its /95 passes only with evalplus's JSON inputs (test below)
    (OLMOE + "student_samples_broad_calibration.jsonl", 28.0, 46),
    ("continuum-ai_qwen2.5-coder-7b-compacted__eval_humaneval_humaneval_samples.jsonl", 61.0, 100),
    (Q3C30 + "base_samples.jsonl", 92.1, 151),  # Q3C30 alloy results.benchmarks[0].baseScore
    (Q3C30 + "student_samples.jsonl", 88.4, 145),  # Q3C30 alloy results.benchmarks[0].score
    (Q3C30 + "student_samples_router_l2_baseline.jsonl", 78.7, 129),  # priorMetricBaselines[0]
]


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return load_problems()


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="the shared samples corpus is not on this machine")
@pytest.mark.parametrize("name, percent, count", PUBLISHED)
def test_reproduces_the_published_pass_at_1(name, percent, count):
    result = score_samples(SAMPLES / name, timeout=3.0, workers=2)
    assert result.total == 164
    assert round(count * 100 / 164, 1) == percent  # the count is the one the percentage implies
    assert result.passed == count
    assert round(result.pass_at_1 * 100, 1) == percent


def _canonical(problem: dict) -> dict:
    return {"task_id": problem["task_id"], "completion": problem["canonical_solution"]}


def test_canonical_solutions_pass_and_a_wrong_one_fails(problems):
    p = problems["HumanEval/0"]
    assert run_program(check_program(p, _canonical(p))) == "passed"
    wrong = {"task_id": p["task_id"], "completion": "    return False\n"}
    assert run_program(check_program(p, wrong)).startswith("failed: AssertionError")


def test_solution_style_gets_the_prompts_helpers(problems):
    # /38's test calls encode_cyclic, defined only in the prompt.
    p = problems["HumanEval/38"]
    solution = ("def decode_cyclic(s: str):\n    groups = [s[(3 * i):min((3 * i + 3), len(s))] "
                "for i in range((len(s) + 2) // 3)]\n"
                "    groups = [(group[-1] + group[:-1]) if len(group) == 3 else group for group in groups]\n"
                "    return ''.join(groups)\n")
    assert run_program(check_program(p, {"task_id": p["task_id"], "solution": solution})) == "passed"
    renamed = {"task_id": p["task_id"], "solution": solution.replace("def decode_cyclic", "def decode_cyc")}
    assert run_program(check_program(p, renamed)) != "passed"  # the prompt's stub returns None


def test_arguments_arrive_as_evalplus_json_inputs(problems):
    # evalplus keeps HumanEval's base inputs as JSON: /95's dict key 5 is "5"
    # there, so a solution calling str methods on every key passes (the
    # published olmoe broad-calibration count includes a solution like this).
    p = problems["HumanEval/95"]
    solution = ("def check_dict_case(d):\n    if not d:\n        return False\n"
                "    return all(k.islower() for k in d) or all(k.isupper() for k in d)\n")
    assert run_program(check_program(p, {"task_id": p["task_id"], "solution": solution})) == "passed"
    # and a tuple arrives as a list (/127's intervals)
    p = problems["HumanEval/127"]
    needs_list = p["canonical_solution"].replace("    l = max(", "    assert type(interval1) is list\n    l = max(")
    assert "type(interval1) is list" in needs_list
    assert run_program(check_program(p, {"task_id": p["task_id"], "completion": needs_list})) == "passed"


def test_sandbox_times_out_and_cannot_forge_its_result(problems):
    p = problems["HumanEval/0"]
    loop = {"task_id": p["task_id"], "completion": "    while True:\n        pass\n"}
    assert run_program(check_program(p, loop), timeout=0.5) == "timed out"
    forge = {"task_id": p["task_id"],
             "completion": "    import os\n    os.write(1, b'{\"result\": \"passed\"}\\n')\n    return 1/0\n"}
    assert run_program(check_program(p, forge)).startswith("failed: ZeroDivisionError")


def test_sandbox_blocks_destructive_calls(problems, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    p = problems["HumanEval/0"]
    rm = {"task_id": p["task_id"], "completion": f"    import os\n    os.remove({str(victim)!r})\n"}
    assert run_program(check_program(p, rm)).startswith("failed: TypeError")  # os.remove is None
    assert victim.exists()


def test_score_samples_completion_style_subset_and_pass_at_1(problems, tmp_path):
    path = tmp_path / "s.jsonl"
    rows = [_canonical(problems["HumanEval/0"]), _canonical(problems["HumanEval/1"]),
            {"task_id": "HumanEval/1", "completion": "    return []\n"},
            {"task_id": "HumanEval/2", "completion": "    return 0.0\n"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = score_samples(path)
    assert (result.passed, result.total) == (2, 4)
    assert result.per_task["HumanEval/1"].n == 2 and result.per_task["HumanEval/1"].correct == 1
    assert result.pass_at_1 == pytest.approx((1 + 0.5 + 0) / 3)
    only = score_samples(path, task_ids=["HumanEval/0"])
    assert (only.passed, only.total) == (1, 1)


@pytest.mark.parametrize("line, match", [
    ("not json", r"s\.jsonl:2: not JSON"),
    ('{"task_id": "HumanEval/999", "completion": ""}', "s\\.jsonl:2: task_id 'HumanEval/999' is not a HumanEval"),
    ('{"task_id": "HumanEval/0"}', "neither 'solution'"),
    ('{"task_id": ["HumanEval/0"], "completion": ""}', r"s\.jsonl:2: task_id \['HumanEval/0'\] has type list, not str"),
    ('{"task_id": {"a": 1}, "completion": ""}', r"s\.jsonl:2: task_id \{'a': 1\} has type dict, not str"),
    ('{"task_id": 0, "completion": ""}', r"s\.jsonl:2: task_id 0 has type int, not str"),
    ('{"completion": ""}', r"s\.jsonl:2: task_id None has type NoneType, not str"),
    ('["HumanEval/0"]', r"s\.jsonl:2: \['HumanEval/0'\] is not a JSON object"),
    ('{"task_id": "' + "x" * 5000 + '", "completion": ""}', r"task_id 'x+… is not a HumanEval"),
])
def test_bad_samples_files_name_the_line(tmp_path, line, match):
    path = tmp_path / "s.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": "    return True\\n"}\n' + line + "\n")
    with pytest.raises(BadInput, match=match) as caught:
        score_samples(path)
    assert len(str(caught.value)) < 300  # an excerpt of the bad value, not all of it


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1, 0, 600.5, "3s"])
def test_unusable_timeouts_are_refused_before_anything_runs(tmp_path, problems, timeout):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(_canonical(problems["HumanEval/0"])) + "\n")
    with pytest.raises(BadInput, match=rf"timeout {re.escape(repr(timeout))} is not a usable time limit; "
                                       r"give seconds with 0 < timeout <= 600"):
        score_samples(path, timeout=timeout)


def test_the_cli_reports_a_bad_timeout_in_one_line(tmp_path, problems):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(_canonical(problems["HumanEval/0"])) + "\n")
    proc = subprocess.run([sys.executable, "-m", "factory.cli", "score", "humaneval", str(path), "--timeout", "inf"],
                          capture_output=True, text=True)
    assert proc.returncode == BadInput.exit_code
    assert proc.stderr == ("factory score: timeout inf is not a usable time limit; "
                           "give seconds with 0 < timeout <= 600\n")


def test_truncate_at_the_first_stop_sequence():
    assert truncate_at_stop("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_at_stop("    return 1\nprint(f(2))") == "    return 1"
    assert truncate_at_stop("    return 1\n") == "    return 1\n"
