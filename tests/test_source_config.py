"""source-config: a declaration the checkpoint contradicts is a plan-time
problem (factory.declarations) and a run-time failure (the station), and a
consistent one is recorded with what it was checked against."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters import get_family
from factory.alloy import Alloy
from factory.declarations import declaration_problems
from factory.errors import StageFailed
from stations import source_config
from tests.linekit import make_root
from tests.stationkit import make_ctx
from tests.test_modality import EXTRA_ROWS, build_tower_model
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

CONTEXT = 256  # the tiny models' max_position_embeddings


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = make_root(tmp_path_factory.mktemp("source-config") / "root")
    add_tokenizer(build_tiny_model("llama", root / "models" / "llama", vocab_size=TOKENIZER_VOCAB,
                                   max_position_embeddings=CONTEXT))
    build_tower_model("qwen3_vl", root / "models" / "qwen3_vl")
    # A tokenizer with more ids than the model has embedding rows.
    add_tokenizer(build_tiny_model("llama", root / "models" / "small-vocab", vocab_size=128))
    return root


def alloy(model: str, family: str, *stages: dict) -> dict:
    return {"name": "s", "version": "1.0.0", "source": {"baseModel": f"models/{model}", "architecture": family},
            "stages": list(stages)}


def problems(root: Path, model: str, family: str, *stages: dict) -> list:
    recipe = Alloy.model_validate(alloy(model, family, *stages))
    config = json.loads((root / "models" / model / "config.json").read_text())
    return declaration_problems(recipe.stages, config=config, family=get_family(family),
                                base_model=recipe.source.base_model)


def run(root: Path, model: str, family: str, *stages: dict, base: str):
    ctx = make_ctx(root, alloy(model, family, *stages), 0, base=base)
    return ctx, source_config.run_stage(ctx)


def extend(target: int) -> dict:
    return {"type": "context-extend", "targetLength": target, "method": "yarn"}


CONTRADICTIONS = [
    # (stage fields, later stages, json path, problem)
    ({"contextLength": 1024}, [], "$.stages[0].contextLength",
     f"is longer than the source's context (max_position_embeddings {CONTEXT}) and no context-extend stage "
     "lengthens it"),
    ({"contextLength": 4096}, [extend(2048)], "$.stages[0].contextLength",
     "and the longest context-extend targetLength is 2048"),
    ({"inputModalities": ["text", "vision"]}, [], "$.stages[0].inputModalities[1]",
     "needs a vision tower, but llama has none (it is text-only)"),
    ({"inputModalities": ["text", "smell"]}, [], "$.stages[0].inputModalities[1]",
     "is not an input modality this factory knows"),
    ({"tokenizer": "Qwen/Qwen2.5-7B"}, [], "$.stages[0].tokenizer",
     "names a tokenizer other than the source's (models/llama)"),
]


@pytest.mark.parametrize("fields, later, path, problem", CONTRADICTIONS)
def test_a_contradiction_is_refused_at_plan_and_run_time(root, fields, later, path, problem):
    stage = {"type": "source-config", **fields}
    found = problems(root, "llama", "llama", stage, *later)
    assert [p.json_path for p in found] == [path]
    assert problem in found[0].problem and found[0].fix
    with pytest.raises(StageFailed, match=r"stage 0 \(source-config\) contradicts .*" + re.escape(f"{path} = ")
                       + ".*" + re.escape(problem)):
        run(root, "llama", "llama", stage, *later, base=f"refused-{path[-8:]}-{len(later)}")


def test_a_later_context_extend_that_reaches_it_satisfies_the_plan(root):
    assert problems(root, "llama", "llama", {"type": "source-config", "contextLength": 1024}, extend(1024)) == []


def test_consistent_declarations_are_recorded_with_what_they_were_checked_against(root):
    stage = {"type": "source-config", "contextLength": 1024, "inputModalities": ["text", "vision"],
             "tokenizer": "models/qwen3_vl", "targetBatchSize": 8, "targetDevices": ["RTX 5090"]}
    assert problems(root, "qwen3_vl", "qwen3_vl", stage, extend(1024)) == []
    ctx, result = run(root, "qwen3_vl", "qwen3_vl", stage, extend(1024), base="ok")
    report = json.loads((ctx.stage_dir / source_config.REPORT_FILE).read_text())
    assert result.metrics == {"source_config": report} and result.outputs == [ctx.stage_dir / "source_config.json"]
    assert report["context"] == {"declared": 1024, "max_position_embeddings": 128,
                                 "extended_by": [{"targetLength": 1024, "method": "yarn"}]}
    with safe_open(str(root / "models" / "qwen3_vl" / "model.safetensors"), "np") as f:
        vision_tensors = len([n for n in f.keys() if n.startswith("model.visual.")])
    assert report["input_modalities"]["towers"] == {"vision": {"vision": vision_tensors}}
    assert report["tokenizer"]["source"]["size"] == TOKENIZER_VOCAB + 4  # 4 vision tokens added
    assert report["tokenizer"]["source"]["embedding_rows"] == TOKENIZER_VOCAB + EXTRA_ROWS
    assert report["recorded_only"] == {"targetBatchSize": 8, "targetDevices": ["RTX 5090"]}
    assert not list(ctx.stage_dir.glob("model"))  # a bookend: no model written


def test_a_tokenizer_larger_than_the_embedding_fails_at_run_time(root):
    with pytest.raises(StageFailed, match=r"the tokenizer has 320 tokens, more than the embedding's vocab_size 128"):
        run(root, "small-vocab", "llama", {"type": "source-config", "inputModalities": ["text"]}, base="vocab")


def test_a_vision_config_without_tower_weights_fails_at_run_time(root):
    """The plan sees vision_config; only the station sees the weights lack it."""
    model = root / "models" / "no-tower"
    shutil.copytree(root / "models" / "qwen3_vl", model)
    tensors = load_file(str(model / "model.safetensors"))
    save_file({n: t for n, t in tensors.items() if not n.startswith("model.visual.")},
              str(model / "model.safetensors"), metadata={"format": "pt"})
    stage = {"type": "source-config", "inputModalities": ["vision"]}
    assert problems(root, "no-tower", "qwen3_vl", stage) == []
    with pytest.raises(StageFailed, match=r"inputModalities\[0\] = 'vision': .* the weights hold none"):
        run(root, "no-tower", "qwen3_vl", stage, base="no-tower")
