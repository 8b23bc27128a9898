"""acceptanceCriteria verdicts (factory/acceptance.py), table-driven.

Scores are the runners' normalised `score` (0..1); anchorDelta is in points
(score x 100), as sentinel-ai's acceptance presets write it."""

from __future__ import annotations

import pytest

from factory.acceptance import evaluate, summary

# An lm-eval task as stations/benchmarks/lm_eval.py reports it: the score
# beside the raw metric it was read from.
MMLU = {"forged": {"score": 0.585, "metric": "acc,none", "metrics": {"mmlu": {"acc,none": 0.585}}},
        "source": {"score": 0.61, "metric": "acc,none", "metrics": {"mmlu": {"acc,none": 0.61}}}}
BENCH = {"humaneval": {"forged": {"score": 0.36, "pass@1": 0.36}, "source": {"score": 0.40, "pass@1": 0.40}},
         "mmlu": MMLU}
PPL = [{"corpus": "code-eval", "source": 10.0, "forged": 12.0}, {"corpus": "prose-eval", "source": 20.0, "forged": 50.0}]
INTEGRITY = {"modelHash": "sha256:ab", "fileHashes": [{"filename": "m.safetensors"}], "reload_ok": True}


@pytest.mark.parametrize("criteria, passed, failing", [
    (None, True, []),
    ({"benchmarks": {"humaneval": {"min": 0.30}}}, True, []),
    ({"benchmarks": {"humaneval": {"min": 0.40}}}, False, ["benchmarks.humaneval.min"]),
    # humaneval dropped 4 points (0.40 -> 0.36)
    ({"benchmarks": {"humaneval": {"anchorDelta": -5.0}}}, True, []),
    ({"benchmarks": {"humaneval": {"anchorDelta": -4.0}}}, True, []),  # exactly at the limit
    ({"benchmarks": {"humaneval": {"anchorDelta": -3.0}}}, False, ["benchmarks.humaneval.anchorDelta"]),
    # the lm-eval score dropped 2.5 points (0.61 -> 0.585)
    ({"benchmarks": {"mmlu": {"min": 0.55, "anchorDelta": -3.0}}}, True, []),
    ({"benchmarks": {"mmlu": {"anchorDelta": -2.0}}}, False, ["benchmarks.mmlu.anchorDelta"]),
    ({"benchmarks": {"mmlu": {"min": 0.60}}}, False, ["benchmarks.mmlu.min"]),
    ({"benchmarks": {"mbpp": {"min": 0.1}}}, False, ["benchmarks.mbpp.min"]),  # never measured: fails
    ({"benchmarks": {"perplexity": {"maxRatio": 1.5}}}, False, ["benchmarks.perplexity[prose-eval].maxRatio"]),
    ({"benchmarks": {"perplexity": {"maxRatio": 3.0, "max": 60}}}, True, []),
    ({"hardware": {"maxVramGb": 1}}, True, []),
    ({"hardware": {"maxVramGb": 0.5}}, False, ["hardware.maxVramGb"]),
    ({"integrity": {"requireModelHash": True, "requireReload": True}}, True, []),
    ({"integrity": {"modelHashRequired": True}}, True, []),
    ({"forgeFactory": {"perplexity": {"maxRatio": 1.5}}}, False, ["benchmarks.perplexity[prose-eval].maxRatio"]),
    ({"forgeFactory": {"perplexity": {"maxRatio": 3.0}}}, True, []),
])
def test_verdicts(criteria, passed, failing):
    verdict = evaluate(criteria, benchmarks=BENCH, perplexities=PPL, forged_bytes=600 * 2**20, integrity=INTEGRITY)
    assert verdict["passed"] is passed
    assert [c["check"] for c in verdict["checks"] if not c["passed"]] == failing
    if failing:
        assert failing[0] in summary(verdict)


def test_anchor_delta_records_points():
    verdict = evaluate({"benchmarks": {"mmlu": {"anchorDelta": -2.0}}}, benchmarks=BENCH, perplexities=[],
                       forged_bytes=None, integrity={})
    (check,) = verdict["checks"]
    assert check["actual"] == pytest.approx(-2.5) and check["required"] == -2.0
    assert "required -2.0, got -2.5" in summary(verdict)


def test_a_score_without_its_anchor_fails_anchor_delta():
    """compareToBase off: no source score, so the anchor gate is unmeasured, not passed."""
    forged_only = {"mmlu": {"forged": MMLU["forged"]}}
    verdict = evaluate({"benchmarks": {"mmlu": {"anchorDelta": -3.0}}}, benchmarks=forged_only, perplexities=[],
                       forged_bytes=None, integrity={})
    assert not verdict["passed"] and verdict["checks"][0]["actual"] is None


def test_missing_reload_fails_integrity_gate():
    verdict = evaluate({"integrity": {"requireReload": True}}, benchmarks={}, perplexities=[],
                       forged_bytes=None, integrity={"reload_ok": False})
    assert not verdict["passed"] and verdict["checks"][0]["actual"] is False


def test_samples_path_required_fails_a_generative_benchmark_without_samples():
    with_samples = {"humaneval": {"forged": {"score": 0.3, "samples_path": "s.jsonl"}}}
    without = {"humaneval": {"forged": {"score": 0.3}, "source": {"score": 0.3, "samples_path": "b.jsonl"}}}
    gate = {"integrity": {"samplesPathRequired": True}}
    assert evaluate(gate, benchmarks=with_samples, perplexities=[], forged_bytes=None, integrity={})["passed"]
    assert not evaluate(gate, benchmarks=without, perplexities=[], forged_bytes=None, integrity={})["passed"]
