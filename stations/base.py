"""What every station shares: its input model, its output dir, earlier results.

Stages hand models to each other through the checkpoint: a stage that writes
a model returns `metrics["model_dir"]` (relative to the work dir), and the
next stage's input is the newest such dir, or the source model for the first.
Relative paths keep a work dir valid after `factory cleanup` moves it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable


from factory.errors import StageFailed
from factory.results import ARTIFACT, MODEL_DIR, SOURCE, TOWERS_PROVED
from factory.durable import write_json
from factory.model_files import CONFIG_FILE, INDEX_FILE, PICKLE_SUFFIXES, CheckpointInfo
from factory.stages import StageContext, StageResult



def latest(ctx: StageContext, key: str) -> tuple[dict, Any] | None:
    """(checkpoint entry, value) of the newest earlier stage whose metrics hold `key`."""
    for entry in reversed(ctx.previous):
        metrics = entry.get("metrics") or {}
        if key in metrics:
            return entry, metrics[key]
    return None


def source_model_dir(ctx: StageContext) -> Path:
    """The alloy's source model, resolved (downloaded when the node allows)."""
    from factory.sources import resolve_source

    resolved = resolve_source(ctx.recipe.source, root=ctx.layout.root, config=ctx.config,
                              allow_download=True)
    if resolved.gguf is not None:
        return _gguf_checkpoint(ctx, resolved)
    if resolved.path is None:
        raise StageFailed(f"source {ctx.recipe.source.base_model!r} names no model; "
                          "this stage needs real weights")
    return resolved.path


def _gguf_checkpoint(ctx: StageContext, resolved) -> Path:
    """The dequantized checkpoint of a GGUF source (made now if no part
    made it yet), recorded in this stage's metrics as the part's source."""
    gguf, path = resolved.gguf, resolved.path
    if path is None:
        from stations.gguf_source import materialize

        started = time.monotonic()
        path, made = materialize(gguf, ctx.layout)
        ctx.emit("source/gguf", file=str(gguf.path), sha256=gguf.sha256, checkpoint=str(path), made=made,
                 seconds=round(time.monotonic() - started, 1))
    ctx.recorded[SOURCE] = {"kind": "gguf", "file": str(gguf.path), "sha256": gguf.sha256,
                            "architecture": gguf.architecture, "origin": gguf.origin, "checkpoint": str(path)}
    return path


def input_model_dir(ctx: StageContext) -> Path:
    """The model this stage works on: the newest earlier model output, else the source."""
    found = latest(ctx, MODEL_DIR)
    if found is not None:
        return ctx.work_dir / found[1]
    return source_model_dir(ctx)


def latest_artifact(ctx: StageContext) -> dict | None:
    """The quantized artifact (gguf, mlx) an earlier stage wrote after the
    newest model dir, or None: what eval measures and package ships when the
    alloy quantizes to a format transformers does not run."""
    for entry in reversed(ctx.previous):
        metrics = entry.get("metrics") or {}
        if ARTIFACT in metrics:
            return metrics[ARTIFACT]
        if MODEL_DIR in metrics:
            return None
    return None


def output_model_dir(ctx: StageContext) -> Path:
    out = ctx.stage_dir / "model"
    out.mkdir(parents=True, exist_ok=True)
    return out


def model_result(ctx: StageContext, model_dir: Path, metrics: dict, *extra: Path) -> StageResult:
    """A StageResult that hands `model_dir` on to the next stage. Every
    stage that writes weights returns through here, so this is where the
    non-text towers a modality stage recorded are proved unchanged, bit for
    bit (stations.towers): a stage that touched them fails loudly."""
    from stations.towers import prove_towers

    proof = prove_towers(ctx, model_dir)
    if proof is not None:
        metrics = {**metrics, TOWERS_PROVED: proof}
    return StageResult(outputs=[model_dir, *extra],
                       metrics={MODEL_DIR: str(model_dir.relative_to(ctx.work_dir)), **metrics})


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, generation config and the like, verbatim: every plain
    top-level file except weights, the index and config.json (stations that
    rewrite weights write those themselves)."""
    copied = []
    for p in sorted(src.iterdir()):
        if (p.is_file() and p.suffix not in (".safetensors", *PICKLE_SUFFIXES)
                and p.name not in (INDEX_FILE, CONFIG_FILE)):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def rewrite_shards(ctx: StageContext, info: CheckpointInfo, out_dir: Path,
                   transform: Callable[[str, Any], Any]) -> tuple[int, int]:
    """Copy every shard of `info`'s checkpoint to `out_dir` with
    `transform(name, tensor)` applied, one shard in memory at a time, and an
    index whose total_size is what was written; returns (parameters, bytes)."""
    import copy

    from safetensors import safe_open
    from safetensors.torch import save_file

    params, size = 0, 0
    for i, file in enumerate(info.files):
        ctx.stop_point()
        tensors = {}
        with safe_open(info.model_dir / file, "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():
                t = transform(name, f.get_tensor(name))
                tensors[name] = t
                params += t.numel()
                size += t.numel() * t.element_size()
        save_file(tensors, out_dir / file, metadata=metadata)
        ctx.progress(i + 1, len(info.files), "files")
    if info.index is not None:
        index = copy.deepcopy(info.index)
        index.setdefault("metadata", {})["total_size"] = size
        write_json(out_dir / INDEX_FILE, index)
    return params, size
