"""context-extend: rope scaling in the config, weights untouched, the result
loads in transformers and gives finite logits beyond the original context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch
import transformers
from pydantic import ValidationError

from factory.alloy import ContextExtendStage
from factory.errors import StageFailed
from factory.integrity import sha256_file
from stations import context_extend
from tests.linekit import make_root
from tests.stationkit import make_ctx
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

# forge-alloy's schema wants targetLength >= 1024: a 256-token model extended 4x.
ORIGINAL, TARGET = 256, 1024


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = make_root(tmp_path_factory.mktemp("ctx") / "root")
    build_tiny_model("llama", root / "models" / "m", max_position_embeddings=ORIGINAL)
    return root


def _run(root: Path, base: str, **stage):
    alloy = {"name": "c", "version": "1.0.0", "source": {"baseModel": "models/m", "architecture": "llama"},
             "stages": [{"type": "context-extend", **stage}]}
    ctx = make_ctx(root, alloy, 0, base=base)
    return ctx, context_extend.run_stage(ctx)


def test_every_schema_method_has_a_rope_type():
    assert set(context_extend.METHODS) == set(get_args(ContextExtendStage.model_fields["method"].annotation))


@pytest.mark.parametrize("method, rope_type", [("yarn", "yarn"), ("linear", "linear"), ("ntk", "dynamic"),
                                               ("dynamic-ntk", "dynamic")])
def test_extends_4x_and_runs_past_the_original_context(root, method, rope_type):
    ctx, result = _run(root, f"p-{method}", targetLength=TARGET, method=method)
    out = ctx.work_dir / result.metrics["model_dir"]
    raw = json.loads((out / "config.json").read_text())
    assert raw["max_position_embeddings"] == TARGET
    assert raw["rope_parameters"]["rope_type"] == rope_type
    assert raw["rope_parameters"]["factor"] == 4.0
    assert raw["rope_parameters"]["original_max_position_embeddings"] == ORIGINAL
    assert raw["rope_scaling"]["factor"] == 4.0  # for 4.x and llama.cpp readers
    assert result.metrics["context_extend"]["original_max_position_embeddings"] == ORIGINAL
    assert result.metrics["context_extend"]["method"] == method
    # Weights are the same bytes (hard links where possible).
    src = root / "models" / "m"
    assert sha256_file(out / "model.safetensors") == sha256_file(src / "model.safetensors")
    assert (out / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino
    # transformers reads the new rope config and runs 300 tokens (> 256).
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.rope_parameters["rope_type"] == rope_type
    assert model.config.rope_parameters["factor"] == 4.0
    with torch.no_grad():
        logits = model(input_ids=torch.arange(300).unsqueeze(0) % 128).logits
    assert logits.shape == (1, 300, 128) and torch.isfinite(logits).all()


def test_extending_again_does_not_compound(root):
    ctx, first = _run(root, "twice", targetLength=TARGET, method="yarn")
    out = ctx.work_dir / first.metrics["model_dir"]
    config = json.loads((out / "config.json").read_text())
    params = context_extend.extend_config(config, target=2 * TARGET, rope_type="yarn", where="x")
    assert params["original_max_position_embeddings"] == ORIGINAL and params["factor"] == 8.0


def test_a_dataset_without_steps_is_refused(root):
    with pytest.raises(StageFailed, match=r"\$\.stages\[0\]\.trainingDataset is set but trainingSteps is not"):
        _run(root, "bad", targetLength=TARGET, method="yarn", trainingDataset="data/long.jsonl")


def test_training_steps_train_the_extended_model_on_long_sequences(tmp_path):
    """trainingSteps: the rope-extended model is trained (LoRA, merged) on
    sequences longer than the original context; the output keeps the new
    rope config, its weights changed, and it reloads."""
    root = make_root(tmp_path / "root")
    add_tokenizer(build_tiny_model("llama", root / "models" / "m", max_position_embeddings=ORIGINAL,
                                   vocab_size=TOKENIZER_VOCAB))
    text = " ".join(f"word{i % 50} and more text {i}" for i in range(400))
    (root / "data").mkdir()
    (root / "data" / "long.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(4)))
    with (root / "factory_node.toml").open("a") as f:
        f.write('\n[datasets]\n"acme/long-docs" = "data/long.jsonl"\n')
    ctx, result = _run(root, "trained", targetLength=TARGET, method="yarn", trainingSteps=2,
                       trainingDataset="acme/long-docs", sequenceLength=300)
    out = ctx.work_dir / result.metrics["model_dir"]
    training = result.metrics["context_extend"]["training"]
    assert training["steps"] == 2 and training["dataset"]["ref"] == "acme/long-docs"
    raw = json.loads((out / "config.json").read_text())
    assert raw["max_position_embeddings"] == TARGET and raw["rope_parameters"]["factor"] == 4.0
    src = root / "models" / "m"
    assert sha256_file(out / "model.safetensors") != sha256_file(src / "model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(300).unsqueeze(0) % 128).logits
    assert torch.isfinite(logits).all()


def test_a_model_already_that_long_passes_through_unchanged(tmp_path):
    root = make_root(tmp_path / "root")
    build_tiny_model("llama", root / "models" / "m", max_position_embeddings=2048)
    ctx, result = _run(root, "short", targetLength=1024, method="yarn")
    assert "model_dir" not in result.metrics  # the next stage takes the input model as it is
    assert result.metrics["context_extend"]["extended"] is False
    assert "already 2048 tokens" in result.metrics["context_extend"]["reason"]


@pytest.mark.parametrize("stage, loc", [({"targetLength": 512, "method": "yarn"}, ("stages", 0, "context-extend",
                                                                                   "targetLength")),
                                        ({"targetLength": TARGET, "method": "longrope-ish"},
                                         ("stages", 0, "context-extend", "method"))])
def test_the_schema_refuses_bad_values_before_the_station(root, stage, loc):
    with pytest.raises(ValidationError) as err:
        _run(root, "schema", **stage)
    assert [e["loc"] for e in err.value.errors()] == [loc]
