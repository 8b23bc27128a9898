"""`factory validate` knows every stage field's allowed values and ranges:
a wrong enum, an out-of-range number or an unsafe name is refused before
the part enters the line, with its JSON path, the value and a fix."""

from __future__ import annotations

import json

import pytest

from factory.validation import check_bytes

BASE = {"name": "fields", "version": "1", "source": {"baseModel": "models/m", "architecture": "llama"}}


def findings(*stages: dict) -> list:
    return check_bytes(json.dumps({**BASE, "stages": list(stages)}).encode()).findings


@pytest.mark.parametrize("stage, path, value", [
    ({"type": "prune", "strategy": "activation", "level": 0.2}, "$.stages[0].strategy", "activation"),
    ({"type": "train", "scheduler": "cosine-restarts"}, "$.stages[0].scheduler", "cosine-restarts"),
    ({"type": "train", "precision": "int3"}, "$.stages[0].precision", "int3"),
    ({"type": "train", "batchSize": 65}, "$.stages[0].batchSize", 65),
    ({"type": "train", "gradientAccumulation": 17}, "$.stages[0].gradientAccumulation", 17),
    ({"type": "train", "sequenceLength": 200000}, "$.stages[0].sequenceLength", 200000),
    ({"type": "train", "weightDecay": 1.5}, "$.stages[0].weightDecay", 1.5),
    ({"type": "lora", "epochs": 21}, "$.stages[0].epochs", 21),
    ({"type": "lora", "alpha": 1024}, "$.stages[0].alpha", 1024),
    ({"type": "compensation-lora", "teacher": "source", "lossType": "cosine"}, "$.stages[0].lossType", "cosine"),
    ({"type": "context-extend", "targetLength": 512, "method": "yarn"}, "$.stages[0].targetLength", 512),
    ({"type": "context-extend", "targetLength": 8192, "method": "rope-magic"}, "$.stages[0].method", "rope-magic"),
    ({"type": "quant", "format": "exl2", "quantTypes": ["4.0bpw"]}, "$.stages[0].format", "exl2"),
    ({"type": "modality", "modality": "smell", "encoderModel": "x"}, "$.stages[0].modality", "smell"),
    ({"type": "expert-activation-profile", "calibrationCorpus": "c", "device": "NVIDIA GeForce RTX 5090"},
     "$.stages[0].device", "NVIDIA GeForce RTX 5090"),
    ({"type": "expert-prune", "keepExperts": 4, "expertTensorLayout": "fused"}, "$.stages[0].expertTensorLayout",
     "fused"),
    ({"type": "expert-prune", "keepExperts": 4, "metric": "random"}, "$.stages[0].metric", "random"),
    ({"type": "prune", "strategy": "random", "level": 0.2, "defragMode": "shuffle"}, "$.stages[0].defragMode",
     "shuffle"),
    ({"type": "eval", "benchmarks": [{"name": "humaneval", "temperature": 3}]},
     "$.stages[0].benchmarks[0].temperature", 3),
    ({"type": "publish", "org": "../../etc"}, "$.stages[0].org", "../../etc"),
    ({"type": "deploy", "target": "node 7; rm -rf /"}, "$.stages[0].target", "node 7; rm -rf /"),
    ({"type": "lora", "name": "a/b"}, "$.stages[0].name", "a/b"),
    ({"type": "train", "domain": "wikitext-2"}, "$.stages[0].domain", "wikitext-2"),
])
def test_bad_field_is_refused_with_path_value_and_fix(stage: dict, path: str, value: object) -> None:
    found = findings(stage)
    assert [f.path for f in found] == [path], found
    assert found[0].value == value and found[0].fix
    assert found[0].level == "schema"


def test_domain_of_a_distilling_stage_is_a_description() -> None:
    """A published alloy's compensation LoRA says domain "distillation"."""
    assert findings({"type": "lora", "teacher": "Qwen/Qwen2.5-Coder-7B", "domain": "distillation"}) == []


def test_compact_thresholds_must_rise() -> None:
    found = findings({"type": "compact", "deadThreshold": 0.4, "dormantThreshold": 0.2})
    assert [(f.path, f.value) for f in found] == [("$.stages[0].dormantThreshold", 0.2)]
    assert "at least 0.4" in found[0].fix


def test_reference_defaults_are_declared_once_in_the_schema() -> None:
    from factory.alloy import Alloy

    alloy = Alloy.model_validate({**BASE, "stages": [{"type": "prune", "strategy": "entropy", "level": 0.1},
                                                     {"type": "train"}, {"type": "compact"}, {"type": "lora"}]})
    prune, train, compact, lora = alloy.stages
    assert (prune.min_heads_per_layer, prune.min_kv_heads_per_layer, prune.analysis_steps) == (4, 2, 200)
    assert (train.batch_size, train.scheduler, train.warmup_ratio, train.precision, train.sequence_length) == (
        4, "cosine", 0.03, "bf16", 2048)
    assert (compact.dead_threshold, compact.high_threshold, compact.enable_quantization) == (0.1, 0.7, True)
    assert (lora.effective_rank, lora.effective_alpha, lora.merges) == (32, 64.0, False)
    # Defaults never leak into what the alloy said.
    assert alloy.dump()["stages"][1] == {"type": "train"}
