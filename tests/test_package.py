"""package + the live-model check (reloaded as the load plan says), and the
loader's refusals, made before anything is allocated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from factory.errors import StageFailed
from factory.integrity import hash_model_dir, model_hash, verify_path
from factory.nodeconfig import NodeConfig
from factory.integrity import sha256_file
from factory.results import corpus_records
from stations.package import executed_stages, reference_benchmarks
from tests.linekit import make_root
from tests.stationkit import Reports, make_ctx, run_stages
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

CALIB, HELD, TRAIN = "calibration/calib.jsonl", "calibration/held.jsonl", "data/train.jsonl"
# Stages the factory hands to the ship role: carried into the executed alloy as written.
HANDED_OFF = [{"type": "publish", "org": "acme", "tags": ["tiny"], "private": True},
              {"type": "deploy", "target": "node-a", "healthCheck": False}]


@pytest.fixture(scope="module")
def pkg_root(tmp_path_factory):
    root = make_root(tmp_path_factory.mktemp("pkg") / "root")
    add_tokenizer(build_tiny_model("qwen3_moe", root / "models/moe", vocab_size=TOKENIZER_VOCAB))
    for rel, start in ((CALIB, 0), (HELD, 100), (TRAIN, 200)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n"
                                        for i in range(start, start + 40)))
    return root


def forged_alloy(root: Path) -> dict:
    """profile (a calibration corpus) -> lora (a dataset file) -> eval
    (a held-out corpus) -> package, then stages handed to the ship role."""
    return alloy(
        calibrationCorpora=[{"id": "calib", "path": CALIB, "sha256": sha256_file(root / CALIB)},
                            {"id": "held", "path": HELD, "sha256": sha256_file(root / HELD)}],
        stages=[{"type": "expert-activation-profile", "calibrationCorpus": "calib", "calibrationTokens": 256,
                 "sequenceLength": 64},
                {"type": "lora", "dataset": TRAIN, "steps": 2, "learningRate": "1e-3", "rank": 4,
                 "sequenceLength": 64, "mergeAfter": True},
                {"type": "eval", "benchmarks": [{"name": "perplexity", "subset": "held"}], "evalTokens": 256,
                 "evalBlockSize": 64},
                {"type": "package", "format": "safetensors"}, *HANDED_OFF])


@pytest.fixture(scope="module")
def forged(pkg_root):
    """The stations run in order up to the package stage; (alloy, entries, executed alloy)."""
    a = forged_alloy(pkg_root)
    entries, _ = run_stages(pkg_root, a, base="forged", upto=4)
    out = pkg_root / "work/forged" / entries[3]["metrics"]["forged_dir"]
    return a, entries, json.loads((out / "forge-alloy.json").read_text())


def test_the_executed_alloy_lists_every_corpus_and_dataset_a_stage_read(pkg_root, forged):
    _, entries, executed = forged
    got = {(c["stage"], c["type"], c["ref"], c["sha256"]) for c in executed["results"]["integrity"]["calibrationCorpora"]}
    assert got == {(0, "expert-activation-profile", "calib", sha256_file(pkg_root / CALIB)),
                   (1, "lora", TRAIN, sha256_file(pkg_root / TRAIN)),
                   (2, "eval", "held", sha256_file(pkg_root / HELD))}
    held = executed["results"]["forgeFactory"]["perplexity"][0]
    assert executed["results"]["finalPerplexity"] == held["forged"] and held["corpus"] == "held"
    assert executed["results"]["baselinePerplexity"] == held["source"] > 1


def test_the_executed_alloy_carries_what_ran_and_the_stages_handed_off_as_written(forged):
    a, entries, executed = forged
    assert executed["stages"][4:] == HANDED_OFF
    resolved = entries[1]["metrics"]["resolved"]  # the lora station's values for what the alloy left out
    assert resolved and not set(resolved) & set(a["stages"][1])
    assert executed["stages"][1] == {**a["stages"][1], **resolved}
    assert [executed["stages"][i] for i in (0, 2, 3)] == [a["stages"][i] for i in (0, 2, 3)]
    assert {k: executed[k] for k in a if k not in ("stages", "results")} == {k: a[k] for k in a if k != "stages"}


def _entry(index: int, type_: str, **metrics) -> dict:
    return {"index": index, "type": type_, "metrics": metrics}


def test_resolved_values_are_merged_into_their_stage(pkg_root):
    """A station reports the values it filled in under metrics["resolved"]
    (camelCase keys); the executed alloy's stage says them."""
    a = forged_alloy(pkg_root)
    del a["stages"][1]["steps"], a["stages"][1]["learningRate"]
    previous = [_entry(0, "expert-activation-profile"),
                _entry(1, "lora", resolved={"steps": 120, "learningRate": "0.0002", "batchSize": 4})]
    ctx = make_ctx(pkg_root, a, 3, base="resolved", previous=previous)
    stages = executed_stages(ctx)
    assert stages[1] == {**a["stages"][1], "steps": 120, "learningRate": "0.0002", "batchSize": 4}
    assert stages[0] == a["stages"][0] and stages[2:] == a["stages"][2:]


def test_corpus_records_read_what_the_stations_write():
    digest = "ab" * 32
    previous = [_entry(0, "expert-activation-profile", corpus="calib", corpus_sha256=digest),
                _entry(1, "train", dataset={"ref": "data/x.jsonl", "path": "/r/data/x.jsonl", "sha256": digest}),
                _entry(2, "eval", perplexity={"corpus": "held", "corpus_sha256": digest}),
                _entry(3, "expert-prune", kept=8)]
    assert [(c["stage"], c["ref"]) for c in corpus_records(previous)] == [(0, "calib"), (1, "data/x.jsonl"),
                                                                        (2, "held")]


def test_benchmarks_become_forge_alloy_benchmark_results():
    raw = {"humaneval": {"forged": {"score": 0.25, "pass@1": 0.25, "passed": 1, "total": 4,
                                    "samples_path": "stages/3-eval/humaneval_forged_samples.jsonl",
                                    "samples_sha256": "cd" * 32, "per_task": {"HumanEval/0": True}},
                         "source": {"score": 0.5, "pass@1": 0.5, "samples_sha256": "ef" * 32}}}
    (entry,) = reference_benchmarks(raw)
    assert entry == {"name": "humaneval", "score": 0.25, "baseScore": 0.5, "delta": -0.25,
                     "samplesPath": "stages/3-eval/humaneval_forged_samples.jsonl",
                     "resultHash": "sha256:" + "cd" * 32, "baseResultHash": "sha256:" + "ef" * 32,
                     "metrics": {"score": 0.25, "pass@1": 0.25, "passed": 1, "total": 4,
                                 "samples_path": "stages/3-eval/humaneval_forged_samples.jsonl",
                                 "samples_sha256": "cd" * 32}}


def alloy(**extra):
    return {"name": "pkg-test", "version": "1.0.0", "license": "apache-2.0", "tags": ["test"],
            "source": {"baseModel": "models/moe", "architecture": "qwen3_moe"},
            "stages": [{"type": "package", "format": "safetensors"}], **extra}


def test_package_writes_a_verifiable_reloadable_model(pkg_root):
    entries, reports = run_stages(pkg_root, alloy(), base="ok")
    m = entries[0]["metrics"]
    out = pkg_root / "work/ok" / m["forged_dir"]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "forge-alloy.json"} <= names
    executed = json.loads((out / "forge-alloy.json").read_text())
    integ = executed["results"]["integrity"]
    assert integ["modelHash"] == m["modelHash"] == model_hash(hash_model_dir(out))
    assert integ["alloyHash"].startswith("sha256:")
    ours = executed["results"]["forgeFactory"]
    assert ours["expertsPerLayer"] == 4 and ours["forgedParams"] == m["params"] == m["params"]
    assert executed["results"]["forgedParamsB"] == round(m["params"] / 1e9, 6)
    assert executed["results"]["finalSizeGb"] == round(m["size_bytes"] / 2**30, 6)
    assert executed["stages"] == alloy()["stages"] and integ["calibrationCorpora"] == []
    assert verify_path(out).ok
    assert m["smoke"]["ok"] and m["smoke"]["finite"] and m["smoke"]["max_logprob"] > -20
    assert "license: apache-2.0" in (out / "README.md").read_text()
    from stations.loader import decide

    plan = decide(out, config=NodeConfig())  # the smoke process is given no root: the defaults
    assert m["smoke"]["load"]["strategy"] == plan.plan.strategy == m["load_plan"]
    assert m["smoke"]["load"]["dtype"] == plan.dtype


def test_a_model_that_does_not_reload_fails_the_stage(pkg_root, tmp_path):
    broken = pkg_root / "models/broken"
    shutil.copytree(pkg_root / "models/moe", broken)
    weights = load_file(broken / "model.safetensors")
    weights["lm_head.weight"] = torch.zeros_like(weights["lm_head.weight"])  # a uniform distribution
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    a = alloy()
    a["source"]["baseModel"] = "models/broken"
    with pytest.raises(StageFailed, match="saved model does not reload: .*uniform"):
        run_stages(pkg_root, a, base="broken")


def test_loader_refuses_before_allocating(pkg_root):
    from stations.loader import load, plan_for

    pickled = pkg_root / "models/pickled"
    pickled.mkdir()
    shutil.copy(pkg_root / "models/moe/config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle")
    ctx = make_ctx(pkg_root, alloy(), 0, base="loader", reports=Reports())
    with pytest.raises(StageFailed, match="refusing to load .*pickled: holds only pickled weights.*"
                                          "allow_pickle_weights"):
        plan_for(ctx, pickled)
    huge = pkg_root / "models/huge"
    shutil.copytree(pkg_root / "models/moe", huge)
    cfg = json.loads((huge / "config.json").read_text())
    cfg["hidden_size"] = 10**7
    (huge / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StageFailed, match="refused from config.json before reading tensors: "
                                          "config hidden_size=10,000,000 is absurd"):
        plan_for(ctx, huge)
    reports = Reports()
    ctx = make_ctx(pkg_root, alloy(), 0, base="loader", reports=reports)
    loaded = load(ctx, pkg_root / "models/moe", purpose="test")
    event = reports.events("model/load")[0]
    assert event["plan"]["strategy"] == "cpu" and event["peak_rss_mb"] > 0 and event["purpose"] == "test"
    assert loaded.model.config.num_experts == 4 or loaded.model.config.num_local_experts == 4


def _loader_in_fresh_process(root: Path, model: Path) -> dict:
    """`load` in its own interpreter: what it raised, and whether torch was
    ever imported (no torch, no tensor: nothing was allocated)."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from factory.errors import StageFailed\n"
        "from stations.loader import load\n"
        "from tests.stationkit import make_ctx\n"
        "ctx = make_ctx(Path(sys.argv[1]), json.loads(sys.argv[3]), 0, base='fresh')\n"
        "try:\n"
        "    load(ctx, Path(sys.argv[2]))\n"
        "    print(json.dumps({'error': None}))\n"
        "except StageFailed as err:\n"
        "    print(json.dumps({'error': str(err), 'torch': 'torch' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(model), json.dumps(alloy())],
                          capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1], check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loader_refuses_a_config_with_more_layers_than_the_files(pkg_root):
    """config.json says 4 layers, the safetensors hold 2: transformers would
    build layers 2 and 3 from random weights. The loader runs the plan's
    model checks first and refuses, before torch is even imported."""
    bad = pkg_root / "models/four-layers"
    shutil.copytree(pkg_root / "models/moe", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    out = _loader_in_fresh_process(pkg_root, bad)
    assert out["error"].startswith(f"refusing to load {bad}: config.json and the tensors on disk disagree: "
                                   "config num_hidden_layers=4 but layers [2, 3] are not on disk")
    assert "fix: the config and the weights come from different models" in out["error"]
    assert out["torch"] is False


def test_loader_refuses_a_fifo_shard_without_blocking(pkg_root):
    fifo = pkg_root / "models/fifo"
    shutil.copytree(pkg_root / "models/moe", fifo)
    (fifo / "model.safetensors").unlink()
    os.mkfifo(fifo / "model.safetensors")
    signal.alarm(60)  # a blocked open() fails the test instead of hanging the suite
    try:
        ctx = make_ctx(pkg_root, alloy(), 0, base="fifo", reports=Reports())
        with pytest.raises(StageFailed, match=r"model.safetensors: is a FIFO \(named pipe\), not a regular file"):
            from stations.loader import load

            load(ctx, fifo)
    finally:
        signal.alarm(0)


def test_smoke_reports_the_load_plan_it_reloaded_with(pkg_root):
    """The fresh-process check loads as the node's load plan says, and says so."""
    from stations.loader import decide

    model = pkg_root / "models/moe"
    proc = subprocess.run([sys.executable, "-m", "stations.smoke", str(model), "--root", str(pkg_root)],
                          capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["ok"], result
    want = decide(model, config=NodeConfig())
    assert (result["load"]["strategy"], result["load"]["dtype"], result["load"]["device"]) == \
        (want.plan.strategy, want.dtype, want.device) == ("cpu", "float32", "cpu")


def test_smoke_refuses_what_the_plan_refuses(pkg_root):
    proc = subprocess.run([sys.executable, "-m", "stations.smoke", str(pkg_root / "models/huge")],
                          capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and not result["ok"]
    assert result["problems"][0].startswith("StageFailed: refusing to load")
