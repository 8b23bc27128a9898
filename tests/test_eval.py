"""The eval station: perplexity (source vs forged on the same tokens),
the benchmark registry, and HumanEval generation on a tiny real model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from factory.errors import StageFailed
from factory.integrity import sha256_file
from stations import eval as eval_station
from factory.benchmarks import benchmark_problem, known_benchmarks, lm_eval_task
from tests.linekit import make_root
from tests.stationkit import Reports, make_ctx
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

HELD_OUT = [f"def square_{i}(x):\n    return x * x + {i}\n" for i in range(12)] + \
           ["The quick brown fox jumps over the lazy dog."] * 3


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A root with a source model, a 'forged' model (other weights, same
    tokenizer) and a held-out corpus."""
    root = make_root(tmp_path_factory.mktemp("eval") / "root")
    add_tokenizer(build_tiny_model("llama", root / "models" / "src", vocab_size=TOKENIZER_VOCAB, seed=0))
    (root / "calibration").mkdir(exist_ok=True)
    (root / "calibration" / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD_OUT))
    return root


def _forged(root: Path) -> dict:
    """An earlier stage's checkpoint entry that hands on a different model."""
    out = root / "work" / "part" / "stages" / "0-prune" / "model"
    if not out.exists():
        add_tokenizer(build_tiny_model("llama", out, vocab_size=TOKENIZER_VOCAB, seed=1))
    return {"index": 0, "type": "prune", "outputs": [], "metrics": {"model_dir": "stages/0-prune/model"}}


def _alloy(**stage) -> dict:
    return {"name": "eval-test", "version": "1.0.0", "source": {"baseModel": "models/src", "architecture": "llama"},
            "calibrationCorpora": [{"id": "held", "path": "calibration/held.jsonl",
                                    "sha256": None}],
            "stages": [{"type": "prune", "strategy": "magnitude", "level": 0.1}, {"type": "eval", **stage}]}


def _run(root: Path, reports: Reports | None = None, **stage):
    ctx = make_ctx(root, _alloy(**stage), 1, previous=[_forged(root)], reports=reports)
    return eval_station.run_stage(ctx)


def _reference_ppl(model_dir: Path, blocks: list[list[int]]) -> float:
    """Each block alone, no padding: the number batching must reproduce."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            ids = torch.tensor([b])
            total += float(F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += len(b) - 1
    return math.exp(total / count)


# ── registry ────────────────────────────────────────────────────────────────


def test_registry_names_and_reasons():
    assert {"perplexity", "humaneval", "humaneval_plus", "humaneval+", "gsm8k"} <= known_benchmarks()
    assert benchmark_problem("perplexity") is None
    assert benchmark_problem("lm-eval:hellaswag") is None  # known; installed or not is a node question
    reason = benchmark_problem("mbpp_plus")
    assert "unknown benchmark 'mbpp_plus'" in reason and "lm-eval:<task>" in reason
    assert lm_eval_task({"name": "mmlu", "subset": "mmlu-pro"}) == "mmlu_pro"
    assert lm_eval_task({"name": "lm-eval:arc_easy"}) == "arc_easy"


def test_registry_import_is_cheap():
    code = ("import sys, factory.benchmarks as b, stations.benchmarks.humaneval, stations.eval; "
            "b.known_benchmarks(); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name, match", [("bogus", "unknown benchmark 'bogus'"),
                                         ("gsm8k", "openai/gsm8k, not in this node's datasets cache")])
def test_unrunnable_benchmark_fails_before_loading(root, name, match, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty Hugging Face cache
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    reports = Reports()
    with pytest.raises(StageFailed, match=match):
        _run(root, reports, benchmarks=[{"name": name}])
    assert reports.events("model/load") == []


def test_perplexity_without_a_corpus_says_where_to_name_one(root):
    with pytest.raises(StageFailed, match="evalCorpusFile"):
        _run(root, benchmarks=[{"name": "perplexity"}])


# ── perplexity ──────────────────────────────────────────────────────────────


def test_perplexity_source_and_forged_on_the_same_tokens(root):
    reports = Reports()
    result = _run(root, reports, benchmarks=[{"name": "perplexity"}], evalCorpusFile="calibration/held.jsonl",
                  evalBlockSize=24, evalBatchSize=3)
    ppl = result.metrics["perplexity"]
    # The blocks both models scored, rebuilt independently from the corpus.
    tok = transformers.AutoTokenizer.from_pretrained(root / "models" / "src")
    ids: list[int] = []
    for text in HELD_OUT:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = [ids[i:i + 24] for i in range(0, len(ids), 24)]
    assert len(blocks[-1]) < 24  # a short, padded last block is part of the test
    assert ppl["tokens"] == sum(len(b) - 1 for b in blocks)
    assert ppl["corpus_sha256"] == sha256_file(root / "calibration" / "held.jsonl")
    assert ppl["source"] == pytest.approx(_reference_ppl(root / "models" / "src", blocks), rel=1e-4)
    forged_dir = root / "work" / "part" / "stages" / "0-prune" / "model"
    assert ppl["forged"] == pytest.approx(_reference_ppl(forged_dir, blocks), rel=1e-4)
    assert ppl["source"] != ppl["forged"]
    # Both models were loaded, one after the other, source first.
    assert [e["purpose"] for e in reports.events("model/load")] == ["eval source", "eval forged"]
    report = json.loads((root / "work" / "part" / "stages" / "1-eval" / "eval.json").read_text())
    assert report["metrics"]["perplexity"] == ppl


def test_perplexity_subset_names_a_pinned_corpus_and_batching_does_not_change_it(root):
    one = _run(root, benchmarks=[{"name": "perplexity", "subset": "held"}], evalBatchSize=1, evalBlockSize=16)
    four = _run(root, benchmarks=[{"name": "perplexity", "subset": "held"}], evalBatchSize=4, evalBlockSize=16)
    a, b = one.metrics["perplexity"], four.metrics["perplexity"]
    assert a["tokens"] == b["tokens"] and a["corpus"] == "held"
    assert a["forged"] == pytest.approx(b["forged"], rel=1e-5)
    assert a["source"] == pytest.approx(b["source"], rel=1e-5)


def test_a_changed_corpus_is_refused(root):
    alloy = _alloy(benchmarks=[{"name": "perplexity", "subset": "held"}])
    alloy["calibrationCorpora"][0]["sha256"] = "0" * 64
    ctx = make_ctx(root, alloy, 1, previous=[_forged(root)])
    with pytest.raises(StageFailed, match="sha256"):
        eval_station.run_stage(ctx)


# ── humaneval ───────────────────────────────────────────────────────────────


def test_humaneval_generates_executes_and_scores_three_problems(root):
    result = _run(root, benchmarks=[{"name": "humaneval", "limit": 3, "maxNewTokens": 12}], compareToBase=False)
    he = result.metrics["benchmarks"]["humaneval"]["forged"]
    assert he["total"] == 3 and he["problems"] == 3
    assert set(he["per_task"]) == {"HumanEval/0", "HumanEval/1", "HumanEval/2"}
    assert he["passed"] == 0 and he["pass@1"] == he["score"] == 0.0  # random weights write no working code
    samples_path = root / "work" / "part" / he["samples_path"]
    lines = [json.loads(line) for line in samples_path.read_text().splitlines()]
    assert [s["task_id"] for s in lines] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(isinstance(s["completion"], str) for s in lines)
    assert he["samples_sha256"] == sha256_file(samples_path)
    assert "source" not in result.metrics["benchmarks"]["humaneval"]  # no compareToBase


def test_humaneval_greedy_with_many_samples_is_refused(root):
    with pytest.raises(StageFailed, match="temperature"):
        _run(root, benchmarks=[{"name": "humaneval", "limit": 1, "nSamples": 3}])
