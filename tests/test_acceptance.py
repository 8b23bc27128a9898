"""acceptanceCriteria verdicts (factory/acceptance.py), table-driven."""

from __future__ import annotations

import pytest

from factory.acceptance import evaluate, summary

BENCH = {"humaneval": {"forged": {"pass@1": 0.36}, "source": {"pass@1": 0.40}}}
PPL = [{"corpus": "code-eval", "source": 10.0, "forged": 12.0}, {"corpus": "prose-eval", "source": 20.0, "forged": 50.0}]
INTEGRITY = {"modelHash": "sha256:ab", "fileHashes": [{"filename": "m.safetensors"}], "reload_ok": True}


@pytest.mark.parametrize("criteria, passed, failing", [
    (None, True, []),
    ({"benchmarks": {"humaneval": {"min": 0.30}}}, True, []),
    ({"benchmarks": {"humaneval": {"min": 0.40}}}, False, ["benchmarks.humaneval.min"]),
    ({"benchmarks": {"humaneval": {"anchorDelta": -0.05}}}, True, []),
    ({"benchmarks": {"humaneval": {"anchorDelta": -0.01}}}, False, ["benchmarks.humaneval.anchorDelta"]),
    ({"benchmarks": {"mbpp": {"min": 0.1}}}, False, ["benchmarks.mbpp.min"]),  # never measured: fails
    ({"benchmarks": {"perplexity": {"maxRatio": 1.5}}}, False, ["benchmarks.perplexity[prose-eval].maxRatio"]),
    ({"benchmarks": {"perplexity": {"maxRatio": 3.0, "max": 60}}}, True, []),
    ({"hardware": {"maxVramGb": 1}}, True, []),
    ({"hardware": {"maxVramGb": 0.5}}, False, ["hardware.maxVramGb"]),
    ({"integrity": {"requireModelHash": True, "requireReload": True}}, True, []),
])
def test_verdicts(criteria, passed, failing):
    verdict = evaluate(criteria, benchmarks=BENCH, perplexities=PPL, forged_bytes=600 * 2**20, integrity=INTEGRITY)
    assert verdict["passed"] is passed
    assert [c["check"] for c in verdict["checks"] if not c["passed"]] == failing
    if failing:
        assert failing[0] in summary(verdict)


def test_missing_reload_fails_integrity_gate():
    verdict = evaluate({"integrity": {"requireReload": True}}, benchmarks={}, perplexities=[],
                       forged_bytes=None, integrity={"reload_ok": False})
    assert not verdict["passed"] and verdict["checks"][0]["actual"] is False
