"""modality: check the model's own encoder tower, and fingerprint every tower.

Fields (forge-alloy's ModalityStage): modality (vision | audio | multimodal),
encoderModel, projectionArch, freezeBase, freezeEncoder, trainingDataset,
trainingSteps, projectionDim.

This line never grafts an encoder (see `factory.declarations`): the plan
refused a modality the source has no tower for, and a `freezeEncoder: false`.
What the stage does, on the model the part holds:

1. The declared modality's tower has tensors on disk (`vision`, `audio`; for
   `multimodal`, at least one non-text tower).
2. The special token ids config.json gives that modality (image_token_id,
   vision_start_token_id, audio_token_index, ...) are ids of the saved
   tokenizer, each an added (special) token whose text names the same
   modality: `image_token_id` must be a token like `<|image_pad|>`, not a
   word piece. A config and tokenizer from different saves fail here.
3. Every tensor of every non-text tower (not only the declared one) is
   hashed over its raw bytes into `towers.json`; the metrics key `towers`
   points at it with its sha256, and `stations.towers.prove_towers` proves
   the towers unchanged after each later stage that writes weights.

The graft fields (encoderModel when it names another encoder,
projectionArch, projectionDim, trainingSteps, trainingDataset, freezeBase)
describe training a new projector; the model's own tower and projector are
kept instead, and the fields the alloy set are listed under `not_run` with
that reason, so result.json shows them. The stage writes no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters import family_for_config
from factory.alloy import ModalityStage
from factory.declarations import TokenId, modality_problems, modality_token_ids
from factory.durable import write_json
from factory.errors import CheckpointError, StageFailed, UnknownArchitectureError
from factory.integrity import sha256_file
from factory.model_files import inspect_checkpoint
from factory.stages import StageContext, StageResult
from stations.base import input_model_dir
from stations.source_config import load_tokenizer, refuse
from stations.towers import RECORD_FILE, TOWERS, find_towers, record_towers

NON_TEXT = ("vision", "audio")
_GRAFT_FIELDS = ("encoderModel", "projectionArch", "projectionDim", "trainingSteps", "trainingDataset", "freezeBase")
_NOT_GRAFTED = ("the model's own tower and projector are kept (this line never grafts an encoder); "
                "nothing was trained in this stage")


def _declared_towers(stage: ModalityStage, where: str, towers: dict[str, Any], model_dir: Path) -> list[str]:
    """The towers the declared modality names, refused when none is on disk."""
    wanted = NON_TEXT if stage.modality == "multimodal" else (stage.modality,)
    names = [name for name, t in towers.items() if t.spec.modality in wanted]
    if not names:
        held = ", ".join(f"{n} ({t.spec.modality})" for n, t in towers.items()) or "none"
        raise StageFailed(f"{where}.modality = {stage.modality!r}: {model_dir} holds no {'/'.join(wanted)} tower "
                          f"tensors (towers on disk: {held}); use a complete checkpoint of a model with that tower")
    return names


def _check_token(token: TokenId, tokenizer: Any, where: str, model_dir: Path) -> dict[str, Any]:
    """One config token id against the tokenizer; returns what it maps to."""
    said = f"{where}: {model_dir}/config.json {token.key} = {token.token_id!r}"
    if not isinstance(token.token_id, int) or not 0 <= token.token_id < len(tokenizer):
        raise StageFailed(f"{said} is not an id of the model's tokenizer ({len(tokenizer)} tokens); the config and "
                          "tokenizer come from different saves: use the checkpoint's own pair")
    text = tokenizer.convert_ids_to_tokens(token.token_id)
    if token.token_id not in tokenizer.added_tokens_decoder or token.word not in str(text).casefold():
        raise StageFailed(f"{said} is the tokenizer's {text!r}, not a special {token.word} token; the config and "
                          "tokenizer disagree: use the checkpoint's own pair")
    return {"id": token.token_id, "token": text}


def check_token_ids(config: dict[str, Any], tokenizer: Any, modalities: set[str], where: str,
                    model_dir: Path) -> dict[str, Any]:
    """config key -> {"id", "token"} for every token id of `modalities`."""
    return {t.key: _check_token(t, tokenizer, where, model_dir)
            for t in modality_token_ids(config) if t.modality in modalities}


def _record(ctx: StageContext, model_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Write towers.json; return it and the per-tower summary for metrics."""
    towers = record_towers(model_dir)
    path = ctx.stage_dir / RECORD_FILE
    write_json(path, {"model_dir": str(model_dir), TOWERS: towers})
    summary = {name: {"modality": t["modality"], "prefix": t["prefix"], "tensors": len(t["tensors"])}
               for name, t in towers.items()}
    return path, {"file": str(path.relative_to(ctx.work_dir)), "sha256": sha256_file(path), TOWERS: summary}


def _not_run(stage: ModalityStage) -> dict[str, Any]:
    dumped = stage.model_dump(by_alias=True, exclude_unset=True)
    fields = {k: dumped[k] for k in _GRAFT_FIELDS if k in dumped}
    return {"fields": fields, "reason": _NOT_GRAFTED} if fields else {}


def run_stage(ctx: StageContext) -> StageResult:
    stage: ModalityStage = ctx.stage
    where = f"$.stages[{ctx.index}]"
    # 1. The model as the part holds it; the plan's checks again.
    model_dir = input_model_dir(ctx)
    try:
        info = inspect_checkpoint(model_dir)
        family = family_for_config(info.config)
    except (CheckpointError, UnknownArchitectureError) as err:
        raise StageFailed(f"stage {ctx.index} (modality): {err}") from err
    refuse(ctx, model_dir, modality_problems(stage, where=where, config=info.config, family=family))
    # 2. The declared tower on disk, its token ids in the tokenizer.
    towers = find_towers(set(info.tensors), family)
    declared = _declared_towers(stage, where, towers, model_dir)
    tokenizer = load_tokenizer(ctx, model_dir)
    if tokenizer is None:
        raise StageFailed(f"{where}: {model_dir} has no tokenizer, so its {stage.modality} token ids cannot be "
                          "checked; add the checkpoint's tokenizer files")
    tokens = check_token_ids(info.config, tokenizer, {towers[n].spec.modality for n in declared}, where, model_dir)
    # 3. Every tower fingerprinted, for the stages after this one.
    record_path, record = _record(ctx, model_dir)
    ctx.progress(1, 1, "towers")
    checked = {"declared": stage.modality, "encoder_model": stage.encoder_model,
               "encoder_used": {n: towers[n].prefix for n in declared}, "token_ids": tokens,
               "not_run": _not_run(stage)}
    return StageResult(outputs=[record_path], metrics={"modality": checked, TOWERS: record})
