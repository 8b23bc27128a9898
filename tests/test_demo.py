"""`factory demo`: the shipped tiny MoE forged end to end by the real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from factory.integrity import hash_model_dir, model_hash, verify_path
from tests.linekit import factory, where


def test_demo_forges_the_tiny_moe(tmp_path):
    root = tmp_path / "demo"
    r = factory("demo", "--root", str(root), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert where(root) == {"tiny-moe-code-forged": [("finished", 0)]}
    result = json.loads((root / "line/finished/tiny-moe-code-forged.result.json").read_text())
    forged = Path(result["forged_dir"])
    assert result["acceptance"]["passed"] and result["experts_per_layer"] == 8
    assert result["modelHash"] == model_hash(hash_model_dir(forged)) and verify_path(forged).ok
    corpora = {p["corpus"]: p for p in result["perplexity"]}
    assert set(corpora) == {"code-eval", "prose-eval"}
    assert all(p["forged"] > 1 and p["source"] > 1 and p["tokens"] > 0 for p in corpora.values())
    # the table reports the same numbers the result records
    out = r.stdout
    code = corpora["code-eval"]
    assert "held-out code perplexity" in out and f"{code['source']:.2f}" in out and f"{code['forged']:.2f}" in out
    assert result["modelHash"] in out.replace("\n", "") and "acceptance: passed" in out
    # the forged model reloads in a fresh process with stock transformers
    probe = ("import sys, torch; from transformers import AutoModelForCausalLM as M, AutoTokenizer as T;"
             "m = M.from_pretrained(sys.argv[1]); t = T.from_pretrained(sys.argv[1]);"
             "print(m.config.num_local_experts, bool(torch.isfinite(m(**t('def f():', return_tensors='pt')).logits).all()))")
    out = subprocess.run([sys.executable, "-c", probe, str(forged)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["8", "True"]


def test_every_example_alloy_validates_and_the_dense_recipe_runs(tmp_path):
    from factory.demo import EXAMPLES, prepare

    root = tmp_path / "examples"
    prepare(root)
    alloys = sorted(EXAMPLES.glob("*.alloy.json"))
    assert {a.name for a in alloys} >= {"demo.alloy.json", "dense.alloy.json", "baseline-router-l2.alloy.json",
                                        "baseline-prose-calibration.alloy.json"}
    for alloy in alloys:
        r = factory("plan", str(alloy), "--json", root=root)
        assert r.returncode == 0, (alloy.name, r.stdout[-2000:])
    assert factory("enqueue", str(EXAMPLES / "dense.alloy.json"), root=root).returncode == 0
    assert factory("run", "--until-empty", root=root, timeout=900).returncode == 0
    result = json.loads((root / "line/finished/dense.result.json").read_text())
    assert result["acceptance"]["passed"]
    types = [s["type"] for s in result["stages"]]
    assert types[:2] == ["prune", "lora"] and types[-1] == "package"
    assert all(p["forged"] < 2 * p["source"] for p in result["perplexity"])
