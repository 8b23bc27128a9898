"""source-config: the front bookend, checked against the real source.

Fields (forge-alloy's SourceConfigStage): contextLength, inputModalities,
tokenizer, targetBatchSize, targetDevices. The plan already refused what the
source's config.json contradicts (`factory.declarations`); this station runs
the same checks again on the model the part actually holds (a hub source is
only on disk by now) and adds the ones that need the real files:

* every declared input modality has its tower's tensors on disk, not just a
  sub-config saying so;
* the source's tokenizer fits its embedding (no id past `vocab_size`), and
  the bos / eos / pad ids config.json names are ids of that tokenizer.

Nothing is applied to the model: a longer context is the job of a later
context-extend stage (whose reach is part of the check), and no field here
changes weights or config. targetBatchSize and targetDevices describe where
the finished model will run; they are recorded, not checked. The station
writes no model, only `source_config.json` with what it checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters import family_for_config
from factory.alloy import ContextExtendStage, SourceConfigStage
from factory.declarations import (
    INPUT_MODALITIES,
    TEXT,
    DeclarationProblem,
    max_context,
    source_config_problems,
    text_vocab_size,
)
from factory.durable import write_json
from factory.errors import CheckpointError, StageFailed, UnknownArchitectureError
from factory.model_files import CheckpointInfo, inspect_checkpoint
from factory.stages import StageContext, StageResult
from stations.base import input_model_dir
from stations.towers import find_towers

REPORT_FILE = "source_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def refuse(ctx: StageContext, model_dir: Path, problems: list[DeclarationProblem]) -> None:
    """Raise StageFailed listing every problem (path, value, why, fix)."""
    if problems:
        lines = "; ".join(f"{p.json_path} = {p.value!r}: {p.problem} (fix: {p.fix})" for p in problems)
        raise StageFailed(f"stage {ctx.index} ({ctx.stage.type}) contradicts the model in {model_dir}: {lines}")


def load_tokenizer(ctx: StageContext, model_dir: Path) -> Any | None:
    """The tokenizer saved beside the model, or None when there is none."""
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=ctx.config.forge.trust_remote_code)
    except (OSError, ValueError) as err:
        raise StageFailed(f"the tokenizer in {model_dir} cannot be loaded ({err}); re-save it with the "
                          "model, or fix its files") from err


def _ids(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def tokenizer_facts(config: dict[str, Any], family: Any, tokenizer: Any, model_dir: Path) -> dict[str, Any]:
    """Check the tokenizer against the config; return what was compared."""
    size, vocab = len(tokenizer), text_vocab_size(config, family)
    if vocab is not None and size > vocab:
        raise StageFailed(f"{model_dir}: the tokenizer has {size} tokens, more than the embedding's vocab_size "
                          f"{vocab}; ids past it would index outside the model. Use the checkpoint's own tokenizer")
    text = family.text_config(config) if family is not None else config
    specials = {}
    for key in _SPECIAL_ID_KEYS:
        value = text.get(key, config.get(key))
        if value is None:
            continue
        for token_id in _ids(value):
            if not isinstance(token_id, int) or not 0 <= token_id < size:
                raise StageFailed(f"{model_dir}/config.json {key} = {value!r} is not an id of its tokenizer "
                                  f"({size} tokens); fix config.json or use the checkpoint's own tokenizer")
        specials[key] = {"ids": _ids(value), "tokens": tokenizer.convert_ids_to_tokens(_ids(value))}
    return {"size": size, "embedding_rows": vocab, "model_max_length": getattr(tokenizer, "model_max_length", None),
            "special_ids": specials}


def _tower_files(stage: SourceConfigStage, where: str, info: CheckpointInfo, family: Any) -> dict[str, Any]:
    """Each declared non-text modality's tower, found among the tensors."""
    towers = find_towers(set(info.tensors), family)
    model_dir = info.model_dir
    checked = {}
    for j, name in enumerate(stage.input_modalities or []):
        modality = INPUT_MODALITIES[name]  # known: source_config_problems refused others
        if modality == TEXT:
            continue
        held = {t: len(f.names) for t, f in towers.items() if f.spec.modality == modality}
        if not held:
            raise StageFailed(f"{where}.inputModalities[{j}] = {name!r}: {model_dir}/config.json configures a "
                              f"{modality} tower, but the weights hold none of its tensors; use a complete "
                              "checkpoint")
        checked[name] = held
    return checked


def run_stage(ctx: StageContext) -> StageResult:
    stage: SourceConfigStage = ctx.stage
    # 1. The model as the part holds it, and the stages still to come.
    model_dir = input_model_dir(ctx)
    try:
        info = inspect_checkpoint(model_dir)
        config, family = info.config, family_for_config(info.config)
    except (CheckpointError, UnknownArchitectureError) as err:
        raise StageFailed(f"stage {ctx.index} (source-config): {err}") from err
    later = [s for s in ctx.recipe.stages[ctx.index + 1:] if isinstance(s, ContextExtendStage)]
    # 2. The plan's checks, on the real config.
    where = f"$.stages[{ctx.index}]"
    refuse(ctx, model_dir, source_config_problems(stage, where=where, config=config, family=family, extends=later,
                                                  base_model=ctx.recipe.source.base_model))
    # 3. What only the files can show.
    towers = _tower_files(stage, where, info, family)
    tokenizer = load_tokenizer(ctx, model_dir)
    if tokenizer is None and stage.tokenizer is not None:
        raise StageFailed(f"{where}.tokenizer = {stage.tokenizer!r}: {model_dir} has no tokenizer to "
                          "check it against; add the source's tokenizer files or drop the field")
    report = {
        "model_dir": str(model_dir),
        "context": {"declared": stage.context_length, "max_position_embeddings": max_context(config, family),
                    "extended_by": [{"targetLength": s.target_length, "method": s.method} for s in later]},
        "input_modalities": {"declared": stage.input_modalities, "towers": towers},
        "tokenizer": {"declared": stage.tokenizer,
                      "source": None if tokenizer is None else tokenizer_facts(config, family, tokenizer, model_dir)},
        "recorded_only": {"targetBatchSize": stage.target_batch_size, "targetDevices": stage.target_devices},
    }
    path = ctx.stage_dir / REPORT_FILE
    write_json(path, report)
    ctx.progress(1, 1, "checks")
    return StageResult(outputs=[path], metrics={"source_config": report})
