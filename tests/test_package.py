"""package + the live-model check, and the loader's refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from factory.errors import StageFailed
from factory.integrity import hash_model_dir, model_hash, verify_path
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
    with pytest.raises(StageFailed, match="only pickle weights.*allow_pickle_weights"):
        plan_for(ctx, pickled)
    huge = pkg_root / "models/huge"
    shutil.copytree(pkg_root / "models/moe", huge)
    cfg = json.loads((huge / "config.json").read_text())
    cfg["hidden_size"] = 10**7
    (huge / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StageFailed, match="not a plausible model"):
        plan_for(ctx, huge)
    reports = Reports()
    ctx = make_ctx(pkg_root, alloy(), 0, base="loader", reports=reports)
    loaded = load(ctx, pkg_root / "models/moe", purpose="test")
    event = reports.events("model/load")[0]
    assert event["plan"]["strategy"] == "cpu" and event["peak_rss_mb"] > 0 and event["purpose"] == "test"
    assert loaded.model.config.num_experts == 4 or loaded.model.config.num_local_experts == 4
