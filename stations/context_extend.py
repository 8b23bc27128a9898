"""context-extend: RoPE scaling to a longer context, written into the config.

Fields (typed and range-checked by the schema, `ContextExtendStage`):
targetLength (tokens), method (yarn | linear | ntk | dynamic-ntk; both ntk
spellings are transformers' "dynamic"), optional trainingDataset/trainingSteps.

transformers 5 reads RoPE settings from `rope_parameters` ({"rope_type",
"factor", "original_max_position_embeddings", "rope_theta", ...}); 4.x and
llama.cpp's converter read `rope_scaling` and a top-level `rope_theta`. Both
are written so the output loads anywhere. factor = targetLength / the
ORIGINAL context (an earlier extension's original_max_position_embeddings
when there is one, so extending twice does not compound), and
max_position_embeddings becomes targetLength. Multimodal configs carry this
in their text config (the family JSON says where).

A model whose context already reaches targetLength passes through
unchanged (recorded as `extended: false`; a native 256k model asked for
32k is not an error). Without `trainingSteps` the weights are not touched: every file but
config.json is hard-linked (copied across filesystems), so their hashes
equal the input's. With `trainingSteps`, that extended model (in
`extended/`) is then trained for that many steps by the LoRA station
(`stations.lora.run_training`, merged) on sequences of `sequenceLength`
tokens (default: targetLength) of `trainingDataset`, or of the [domains]
table's `general` dataset when the stage names none; the merged model is
the stage's output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from adapters import family_for_config
from factory.alloy import ContextExtendStage, TrainStage
from factory.durable import write_json
from factory.errors import StageFailed
from factory.stages import StageContext, StageResult
from factory.results import MODEL_DIR
from stations.base import input_model_dir, model_result, output_model_dir

# alloy method (the schema's enum) -> transformers rope_type
METHODS: dict[str, str] = {"yarn": "yarn", "linear": "linear", "ntk": "dynamic", "dynamic-ntk": "dynamic"}
EXTENDED_DIR = "extended"  # the rope-extended model a training run starts from
DEFAULT_ROPE_THETA = 10000.0  # transformers' default when a config names none
# Keys that describe the old scaling and must not survive into the new one.
_SCALING_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "attention_factor",
                 "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor", "long_factor", "short_factor"}


def _check_fields(ctx: StageContext) -> tuple[int, str]:
    """(targetLength, rope_type) of the stage; the schema has already
    checked types, ranges and the method enum (METHODS has a row for each)."""
    stage = ctx.stage
    assert isinstance(stage, ContextExtendStage)
    if stage.training_dataset and not stage.training_steps:
        raise StageFailed(f"$.stages[{ctx.index}].trainingDataset is set but trainingSteps is not: set "
                          "trainingSteps to train on it after the extension, or remove trainingDataset")
    return stage.target_length, METHODS[stage.method]


def _training_stage(stage: ContextExtendStage) -> TrainStage:
    """The train stage the long-context training runs as."""
    data = {"type": "train", "steps": stage.training_steps,
            "sequenceLength": stage.sequence_length or stage.target_length}
    if stage.training_dataset:
        data["dataset"] = stage.training_dataset
    else:
        data["domain"] = stage.training_domain
    return TrainStage.model_validate(data)


def rope_extension(text: dict, *, target: int, rope_type: str, where: str) -> dict:
    """The new rope parameters for a text config (not applied)."""
    old = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in old.values()):
        raise StageFailed(f"{where}: per-layer-type rope_parameters are not supported by context-extend yet")
    original = old.get("original_max_position_embeddings") or text.get("max_position_embeddings")
    if not isinstance(original, int) or original <= 0:
        raise StageFailed(f"{where}: no max_position_embeddings to extend from; the config must state it")
    if target <= original:
        raise StageFailed(f"{where}: targetLength {target} is not longer than the original context {original}")
    kept = {k: v for k, v in old.items() if k not in _SCALING_KEYS}
    kept.setdefault("rope_theta", text.get("rope_theta", DEFAULT_ROPE_THETA))
    return {**kept, "rope_type": rope_type, "factor": target / original,
            "original_max_position_embeddings": original}


def extend_config(config: dict, *, target: int, rope_type: str, where: str) -> dict:
    """Apply the extension to a parsed config.json in place; returns the new rope parameters."""
    text = family_for_config(config).text_config(config)
    params = rope_extension(text, target=target, rope_type=rope_type, where=where)
    text["rope_parameters"] = params
    text["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}  # 4.x / llama.cpp readers
    text["rope_theta"] = params["rope_theta"]
    text["max_position_embeddings"] = target
    return params


def link_or_copy(src_dir: Path, dst_dir: Path, *, skip: set[str]) -> int:
    """Hard-link every file under src_dir into dst_dir (copy across
    filesystems); returns how many were linked."""
    linked = 0
    for src in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        rel = src.relative_to(src_dir)
        if str(rel) in skip:
            continue
        dst = dst_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
            linked += 1
        except OSError:  # another filesystem, or links not allowed: same bytes either way
            shutil.copy2(src, dst)
    return linked


def run_stage(ctx: StageContext) -> StageResult:
    # 1. Fields, refused before anything is written.
    target, rope_type = _check_fields(ctx)
    src = input_model_dir(ctx)
    config_path = src / "config.json"
    config = json.loads(config_path.read_text())
    training = bool(ctx.stage.training_steps)
    report = ctx.stage_dir / "context_extend.json"
    current = family_for_config(config).text_config(config).get("max_position_embeddings")
    if isinstance(current, int) and current >= target:
        # 2'. Already that long: nothing to scale. The model passes through
        # unchanged (no copy), or is trained as it is when trainingSteps asks.
        metrics = {"target_length": target, "method": ctx.stage.method, "extended": False,
                   "reason": f"the model's context is already {current} tokens (max_position_embeddings)"}
        write_json(report, {"source": str(src), **metrics})
        if not training:
            ctx.progress(1, 1, "models")
            return StageResult(outputs=[report], metrics={"context_extend": metrics})
        return _train(ctx, src, metrics, report)
    # 2. The new config.
    params = extend_config(config, target=target, rope_type=rope_type, where=str(config_path))
    out = ctx.stage_dir / EXTENDED_DIR if training else output_model_dir(ctx)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    # 3. Weights and tokenizer unchanged.
    linked = link_or_copy(src, out, skip={"config.json"})
    metrics = {"target_length": target, "method": ctx.stage.method, "extended": True, "rope_parameters": params,
               "original_max_position_embeddings": params["original_max_position_embeddings"],
               "factor": params["factor"], "files_linked": linked}
    write_json(report, {"source": str(src), **metrics})
    if not training:
        ctx.progress(1, 1, "models")
        return model_result(ctx, out, {"context_extend": metrics}, report)
    return _train(ctx, out, metrics, report)


def _train(ctx: StageContext, model_dir: Path, metrics: dict, report: Path) -> StageResult:
    """4. Long-context training of `model_dir`, merged into the stage's output."""
    from stations.lora import run_training

    trained = run_training(dataclasses.replace(ctx, stage=_training_stage(ctx.stage)), "lora", model_dir=model_dir)
    metrics["training"] = {k: v for k, v in trained.metrics.items() if k != MODEL_DIR}
    return StageResult(outputs=[*trained.outputs, report],
                       metrics={MODEL_DIR: trained.metrics[MODEL_DIR], "context_extend": metrics})
