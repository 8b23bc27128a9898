"""A whole MoE forge through the real daemon: profile -> expert-prune -> eval
-> package, with a stop between stages, resume, and the acceptance gate."""

from __future__ import annotations

import json
import signal

import pytest

from adapters import get_family
from factory.integrity import hash_model_dir, model_hash, sha256_file
from tests.linekit import events, factory, make_root, start_daemon, stop, wait_for, where, write_alloy
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

CODE = "def f(x):\n    return [i * x for i in range(10)]\n\nclass A:\n    def g(self):\n        return 1\n"


@pytest.fixture(scope="module")
def moe_root(tmp_path_factory):
    root = make_root(tmp_path_factory.mktemp("pipe") / "root")
    add_tokenizer(build_tiny_model("qwen3_moe", root / "models/moe", vocab_size=TOKENIZER_VOCAB))
    for split in ("calib", "eval"):
        docs = [json.dumps({"text": CODE * (i + 1)}) for i in range(12)]
        (root / f"calibration/code.{split}.jsonl").write_text("\n".join(docs) + "\n")
    return root


def forge_alloy(root, *, criteria):
    corpora = [{"id": f"code-{s}", "path": f"calibration/code.{s}.jsonl",
                "sha256": sha256_file(root / f"calibration/code.{s}.jsonl"), "format": "jsonl", "textField": "text"}
               for s in ("calib", "eval")]
    return {"name": "tiny-forge", "version": "1.0.0",
            "source": {"baseModel": "models/moe", "architecture": "qwen3_moe", "isMoE": True},
            "calibrationCorpora": corpora,
            "stages": [
                {"type": "expert-activation-profile", "calibrationCorpus": "code-calib", "calibrationTokens": 2000},
                {"type": "expert-prune", "keepExpertsPerLayer": 2, "metric": "activation_count"},
                {"type": "eval", "benchmarks": [{"name": "perplexity", "subset": "code-eval"}]},
                {"type": "package", "format": "safetensors"},
            ],
            "acceptanceCriteria": criteria}


def test_forge_stop_resume_finish(moe_root, tmp_path):
    root = moe_root
    a = forge_alloy(root, criteria={"benchmarks": {"perplexity": {"maxRatio": 100.0}},
                                    "integrity": {"requireModelHash": True, "requireReload": True}})
    assert factory("enqueue", str(write_alloy(tmp_path / "forge.alloy.json", a)), root=root).returncode == 0
    d = start_daemon(root)
    wait_for(lambda: events(root, "stage/completed", "forge"), timeout=300, what="profile done")
    assert stop(d, signal.SIGTERM) == 0
    assert where(root)["forge"] == [("intake", 0)]
    done_before = {e["stage"]["index"] for e in events(root, "stage/completed", "forge")}
    after = events(root)[-1]["seq"]

    r = factory("run", "--until-empty", root=root, timeout=600)
    assert r.returncode == 0, r.stdout
    assert where(root)["forge"] == [("finished", 0)]
    rerun = [e for e in events(root) if e["seq"] > after and e["part"] == "forge"]
    assert {e["stage"]["index"] for e in rerun if e["kind"] == "stage/skipped"} == done_before
    assert [e["stage"]["index"] for e in rerun if e["kind"] == "stage/started"] == \
        [i for i in range(4) if i not in done_before]

    result = json.loads((root / "line/finished/forge.result.json").read_text())
    forged = root / "work/forge" / result["forged_dir"].split("/work/forge/")[1]
    assert result["modelHash"] == model_hash(hash_model_dir(forged))
    assert result["experts_per_layer"] == 2
    assert get_family("qwen3_moe").expert_count(json.loads((forged / "config.json").read_text())) == 2
    ppl = result["perplexity"][0]
    assert ppl["corpus"] and ppl["source"] > 1 and ppl["forged"] > 1 and ppl["tokens"] > 0
    assert result["acceptance"]["passed"] is True and len(result["acceptance"]["checks"]) == 3
    assert [s["type"] for s in result["stages"]] == ["expert-activation-profile", "expert-prune", "eval", "package"]
    loads = events(root, "model/load", "forge")
    assert loads and all(e["plan"]["strategy"] == "cpu" for e in loads)


def test_failed_acceptance_routes_to_rework_with_the_result(moe_root, tmp_path):
    root = moe_root
    a = forge_alloy(root, criteria={"benchmarks": {"perplexity": {"maxRatio": 0.5}}})  # impossible: must improve 2x
    assert factory("enqueue", str(write_alloy(tmp_path / "strict.alloy.json", a)), root=root).returncode == 0
    assert factory("run", "--until-empty", root=root, timeout=600).returncode == 0
    assert where(root)["strict"] == [("rework", 0)]
    err = json.loads((root / "line/rework/strict.error.json").read_text())
    assert err["stage"]["type"] == "acceptance" and "maxRatio" in err["message"]
    assert err["result"]["acceptance"]["passed"] is False and err["result"]["modelHash"].startswith("sha256:")
