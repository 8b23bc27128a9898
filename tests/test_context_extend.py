"""context-extend: rope scaling in the config, weights untouched, the result
loads in transformers and gives finite logits beyond the original context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from factory.errors import StageFailed
from factory.integrity import sha256_file
from stations import context_extend
from tests.linekit import make_root
from tests.stationkit import make_ctx
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = make_root(tmp_path_factory.mktemp("ctx") / "root")
    build_tiny_model("llama", root / "models" / "m", max_position_embeddings=64)
    return root


def _run(root: Path, base: str, **stage):
    alloy = {"name": "c", "version": "1.0.0", "source": {"baseModel": "models/m", "architecture": "llama"},
             "stages": [{"type": "context-extend", **stage}]}
    ctx = make_ctx(root, alloy, 0, base=base)
    return ctx, context_extend.run_stage(ctx)


@pytest.mark.parametrize("method, rope_type", [("yarn", "yarn"), ("linear", "linear"), ("ntk", "dynamic")])
def test_extends_64_to_256_and_runs_past_the_original_context(root, method, rope_type):
    ctx, result = _run(root, f"p-{method}", targetLength=256, method=method)
    out = ctx.work_dir / result.metrics["model_dir"]
    raw = json.loads((out / "config.json").read_text())
    assert raw["max_position_embeddings"] == 256
    assert raw["rope_parameters"]["rope_type"] == rope_type
    assert raw["rope_parameters"]["factor"] == 4.0
    assert raw["rope_parameters"]["original_max_position_embeddings"] == 64
    assert raw["rope_scaling"]["factor"] == 4.0  # for 4.x and llama.cpp readers
    assert result.metrics["context_extend"]["original_max_position_embeddings"] == 64
    # Weights are the same bytes (hard links where possible).
    src = root / "models" / "m"
    assert sha256_file(out / "model.safetensors") == sha256_file(src / "model.safetensors")
    assert (out / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino
    # transformers reads the new rope config and runs 200 tokens (> 64).
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.rope_parameters["rope_type"] == rope_type
    assert model.config.rope_parameters["factor"] == 4.0
    with torch.no_grad():
        logits = model(input_ids=torch.arange(200).unsqueeze(0) % 128).logits
    assert logits.shape == (1, 200, 128) and torch.isfinite(logits).all()


def test_extending_again_does_not_compound(root):
    ctx, first = _run(root, "twice", targetLength=128, method="yarn")
    out = ctx.work_dir / first.metrics["model_dir"]
    config = json.loads((out / "config.json").read_text())
    params = context_extend.extend_config(config, target=256, rope_type="yarn", where="x")
    assert params["original_max_position_embeddings"] == 64 and params["factor"] == 4.0


@pytest.mark.parametrize("stage, match", [
    ({"targetLength": 256, "method": "yarn", "trainingSteps": 500}, "training is not implemented"),
    ({"targetLength": 32, "method": "yarn"}, "not longer than the original context 64"),
    ({"targetLength": 256, "method": "longrope-ish"}, "method 'longrope-ish' is unknown"),
])
def test_refusals_name_the_field(root, stage, match):
    with pytest.raises(StageFailed, match=match):
        _run(root, "bad", **stage)
