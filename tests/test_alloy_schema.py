"""The schema parses every published alloy and gives back exactly what it read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory.alloy import (
    STAGE_TYPES,
    Alloy,
    CompensationLoraStage,
    DeliverStage,
    ExpertPruneStage,
    GenericStage,
    LoraStage,
    SelftestStage,
)

from tests.shared_corpus import CORPUS
CORPUS_FILES = sorted((CORPUS / "alloys").glob("*.json")) + sorted((CORPUS / "alloy_versions").glob("*.json"))

needs_corpus = pytest.mark.skipif(not CORPUS_FILES, reason="shared alloy corpus not present")


def _minimal(**extra: object) -> dict:
    return {
        "name": "t",
        "version": "1.0.0",
        "source": {"baseModel": "selftest", "architecture": "selftest"},
        "stages": [{"type": "selftest"}],
        **extra,
    }


@needs_corpus
def test_corpus_is_complete() -> None:
    assert len(list((CORPUS / "alloys").glob("*.json"))) == 29
    assert len(list((CORPUS / "alloy_versions").glob("*.json"))) == 13


@needs_corpus
@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name[-60:])
def test_corpus_alloy_round_trips(path: Path) -> None:
    data = json.loads(path.read_bytes())
    alloy = Alloy.model_validate(data)
    assert alloy.model_dump(by_alias=True, exclude_unset=True) == data
    assert alloy.dump() == data


@needs_corpus
def test_corpus_exercises_the_awkward_shapes() -> None:
    """The corpus holds each shape the schema must survive; make sure it still does."""
    alloys = [Alloy.model_validate(json.loads(p.read_bytes())) for p in CORPUS_FILES]
    stages = [s for a in alloys for s in a.stages]
    assert any(isinstance(s, DeliverStage) for s in stages)
    assert any(isinstance(s, LoraStage) and s.teacher for s in stages)  # compensation distillation
    assert any(isinstance(s, LoraStage) and s.rank == 64 for s in stages)  # train-style LoRA
    assert any(isinstance(s, ExpertPruneStage) for s in stages)
    assert any(a.receipt is not None and a.receipt.model_fields_set == set() for a in alloys)  # "receipt": {}
    assert not any(isinstance(s, GenericStage) for s in stages)


def test_only_the_camel_case_spelling_is_read() -> None:
    """One spelling per field: the snake_case key is kept as an extra (nothing
    is lost) but never read as the field, as the daemon would not read it."""
    camel = Alloy.model_validate(_minimal(stages=[{"type": "lora", "loraRank": 16, "learningRate": "1e-4"}]))
    snake = Alloy.model_validate(_minimal(stages=[{"type": "lora", "lora_rank": 16, "learning_rate": "1e-4"}]))
    assert camel.stages[0].lora_rank == 16 and camel.stages[0].learning_rate == "1e-4"
    assert snake.stages[0].lora_rank is None and snake.stages[0].learning_rate is None
    assert snake.stages[0].model_extra == {"lora_rank": 16, "learning_rate": "1e-4"}
    with pytest.raises(ValueError, match="baseModel"):
        Alloy.model_validate(_minimal(source={"base_model": "m", "architecture": "a"}))


def test_unknown_stage_type_and_fields_are_kept() -> None:
    data = _minimal(
        stages=[{"type": "many-worlds-ensemble", "specialists": ["a", "b"], "alpha": 0.2}],
        futureField={"nested": [1, None]},
    )
    alloy = Alloy.model_validate(data)
    assert isinstance(alloy.stages[0], GenericStage)
    assert alloy.stages[0].type == "many-worlds-ensemble"
    assert alloy.dump() == data


def test_selftest_defaults() -> None:
    stage = Alloy.model_validate(_minimal()).stages[0]
    assert isinstance(stage, SelftestStage)
    assert (stage.seconds, stage.steps, stage.outcome) == (0.1, 1, "pass")
    assert Alloy.model_validate(_minimal()).dump()["stages"] == [{"type": "selftest"}]


def test_selftest_fields_and_timeout() -> None:
    data = _minimal(stages=[{"type": "selftest", "seconds": 0.2, "steps": 4, "outcome": "hang", "timeoutSeconds": 5}])
    stage = Alloy.model_validate(data).stages[0]
    assert (stage.seconds, stage.steps, stage.outcome, stage.timeout_seconds) == (0.2, 4, "hang", 5)


def test_every_known_stage_type_has_its_model() -> None:
    for kind, model in STAGE_TYPES.items():
        assert model.model_fields["type"].default == kind


def test_compensation_lora_needs_a_teacher() -> None:
    ok = Alloy.model_validate(_minimal(stages=[{"type": "compensation-lora", "teacher": "Qwen/Qwen2.5-Coder-7B"}]))
    assert isinstance(ok.stages[0], CompensationLoraStage)
    with pytest.raises(ValueError, match="teacher"):
        Alloy.model_validate(_minimal(stages=[{"type": "compensation-lora"}]))


def test_priority_and_calibration_corpora() -> None:
    corpus = {"name": "code300", "path": "calibration/code300.jsonl", "sha256": "sha256:" + "a" * 64, "format": "jsonl", "textField": "text"}
    alloy = Alloy.model_validate(_minimal(priority=5, calibrationCorpora=[corpus]))
    assert alloy.effective_priority == 5
    assert alloy.calibration_corpora[0].text_field == "text"
    assert Alloy.model_validate(_minimal()).effective_priority == 0


def test_date_strings_are_kept_verbatim() -> None:
    receipt = {"issuedAt": "2026-03-31T12:35:25-0500", "publications": [{"publishedAt": "2026-04-08"}]}
    alloy = Alloy.model_validate(_minimal(receipt=receipt))
    assert alloy.receipt.issued_at == "2026-03-31T12:35:25-0500"
    assert alloy.dump()["receipt"] == receipt


def test_strict_types_refuse_coercion() -> None:
    with pytest.raises(ValueError, match="steps"):
        Alloy.model_validate(_minimal(stages=[{"type": "train", "steps": "5"}]))


def test_router_top_k_reads_any_spelling() -> None:
    for key in ("numActivatedExperts", "numExpertsPerTok", "topK"):
        source = {"baseModel": "m", "architecture": "a", key: 8}
        assert Alloy.model_validate(_minimal(source=source)).source.router_top_k == 8
