"""quant: a quantised copy of the stage's input model.

Formats are catalog data (`factory.catalog.QUANT_FORMATS`): each names its
support probe (in `factory.quant_support`: what the node needs, checked
without torch, so the planner refuses an alloy before it is queued), the
function that writes it, and, for a format transformers does not run, the
runtime that reads it back (stations.runtime).

  safetensors | bnb-nf4 | bnb-4bit   (stations.quant_bnb)
      bitsandbytes NF4, saved with its quantization_config: a model
      directory transformers loads, handed on as the next stage's model.
  gguf   (stations.quant_gguf)
      llama.cpp's converter and quantizer, one file per quant type.
  mlx    (stations.quant_mlx)
      mlx-lm's converter, one directory per quant type.
  onnx
      Refused with what provides it (no writer here yet).

A gguf or mlx output is an ARTIFACT (factory.results), not a model
directory: eval measures it through its own runtime, a later stage that
edits weights keeps working on the last safetensors model, and its files are
hashed here (fileHashes, modelHash) as the package stage hashes a model.

`run_stage` asks the probe again in the part's child process before it
touches the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from factory import catalog
from factory.alloy import QuantStage
from factory.durable import write_json
from factory.errors import StageFailed
from factory.integrity import MODEL_FILE_GLOBS, model_hash, sha256_file
from factory.results import ARTIFACT
from factory.stages import StageContext, StageResult
from stations.base import input_model_dir, model_result, output_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer and generation config, verbatim, beside a quantized copy."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def run_stage(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    assert isinstance(stage, QuantStage)
    # 1. Refuse what this node cannot make, before touching the model.
    problem = catalog.format_problem(stage.format)
    if problem:
        raise StageFailed(f"$.stages[{ctx.index}].format {stage.format!r}: unsupported here: {problem}")
    make = catalog.quant_maker(stage.format)
    # 2. Quantise the input model into this stage's model dir.
    src, out = input_model_dir(ctx), output_model_dir(ctx)
    metrics = make(ctx, src, out)
    # 3. Record the resolved settings beside the output.
    report = ctx.stage_dir / "quant.json"
    write_json(report, {"format": stage.format, "quantTypes": stage.quant_types, "source": str(src), **metrics})
    if stage.format not in catalog.artifact_formats():
        return model_result(ctx, out, {"quant": metrics}, report)
    return artifact_result(ctx, out, metrics, report)


GiB = 2**30


def tier(stage: QuantStage, quant_type: str, size: int) -> dict:
    """One quant type's file size against what the alloy says its tier fits
    (`tiers.<type>.fitsVramGb`, and the `sizeGb` it expected)."""
    declared = (stage.tiers or {}).get(quant_type)
    declared = declared if isinstance(declared, dict) else {}
    row: dict = {"bytes": size, "size_gb": round(size / GiB, 3)}
    fits, claimed = declared.get("fitsVramGb"), declared.get("sizeGb")
    if isinstance(fits, (int, float)):
        row.update(fits_vram_gb=fits, fits=size / GiB <= fits)
    if isinstance(claimed, (int, float)):
        row["declared_size_gb"] = claimed
    return row


def _weight_files(out: Path, entry: dict) -> list[Path]:
    """The files an artifact entry names: the file, or a directory's weights."""
    path = out / entry["file"]
    if path.is_dir():
        return sorted(p for glob in MODEL_FILE_GLOBS for p in path.rglob(glob))
    return [path]


def artifact_result(ctx: StageContext, out: Path, metrics: dict, report: Path) -> StageResult:
    """A gguf/mlx output: recorded as an ARTIFACT for eval and package, with
    the hashes of its weight files (fileHashes, modelHash, as the package
    stage records them); no model_dir, so the next stage's input model is
    still the last safetensors one."""
    files = metrics["files"]
    hashed = [{"filename": str(p.relative_to(out)), "sha256": sha256_file(p), "size": p.stat().st_size}
              for f in files for p in _weight_files(out, f)]
    headline = next(f for f in files if f["file"] == metrics["eval_file"])
    artifact = {"format": metrics["format"], "stage": ctx.index, "dir": str(out.relative_to(ctx.work_dir)),
                "eval_file": metrics["eval_file"], "quant_type": headline["quant_type"],
                "files": [{k: f[k] for k in ("quant_type", "file", "bytes")} for f in files],
                "tiers": {f["quant_type"]: tier(ctx.stage, f["quant_type"], f["bytes"]) for f in files}}
    return StageResult(outputs=[out, report], metrics={
        ARTIFACT: artifact, "quant": metrics, "size_bytes": headline["bytes"], "fileHashes": hashed,
        "modelHash": model_hash(hashed)})
