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
from tests.linekit import make_root
from tests.stationkit import Reports, make_ctx, run_stages
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model


@pytest.fixture(scope="module")
def pkg_root(tmp_path_factory):
    root = make_root(tmp_path_factory.mktemp("pkg") / "root")
    add_tokenizer(build_tiny_model("qwen3_moe", root / "models/moe", vocab_size=TOKENIZER_VOCAB))
    return root


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
    assert executed["results"]["expertsPerLayer"] == 4 and executed["results"]["forgedParams"] == m["params"]
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
