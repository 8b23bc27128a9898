"""package: the final model directory, with its card, its executed alloy and
proof that it loads.

The directory holds the weights, config, tokenizer and generation config,
a README model card written from the alloy, and `forge-alloy.json`, the
executed alloy: the input alloy as written, each stage with the values it
actually ran with (the `resolved` values a station reports, e.g. training
steps and learning rate filled from the family defaults), the stages not
run here (publish, deliver, deploy, or any after this one) as they were,
and `results` for this run (a re-run never inherits an earlier run's
results). `results` is written so forge-alloy's reference SDK reads it
(`ForgeAlloy.model_validate`): its own fields where it has them
(baselinePerplexity, finalPerplexity, finalSizeGb, forgedParamsB, a
`benchmarks` list, `integrity` with modelHash and alloyHash), and what only
this factory records under `results.forgeFactory`, a key the reference does
not use. `results.integrity` adds `fileHashes` (what `factory verify DIR`
re-checks) and `calibrationCorpora`: every corpus and dataset a stage read,
with the sha256 it measured. Then a fresh process loads the directory with
stock `from_pretrained` and runs a probe (stations/smoke.py); a directory
that does not reload fails the stage.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

from adapters import family_for_config
from factory.alloy import PackageStage
from factory.durable import write_bytes, write_json
from factory.errors import StageFailed
from factory import catalog
from factory.integrity import HASH_PREFIX, hash_model_dir, model_files, model_hash
from factory.model_files import inspect_checkpoint
from factory.results import ARTIFACT, RESOLVED, SOURCE, artifact_unit, corpus_records, measurements
from factory.stages import StageContext, StageResult
from stations.base import input_model_dir, model_result, output_model_dir
from stations.loader import plan_for

EXECUTED_ALLOY = "forge-alloy.json"
EXTENSION_KEY = "forgeFactory"  # results.<this>: what only forge-factory records
# Formats this station writes from the newest safetensors model: a Hugging
# Face safetensors directory. The catalog's quant formats with a runtime of
# their own (gguf, mlx) are packaged from a quant stage's artifact.
FORMATS = ("safetensors", "safetensors-defragged", "hf", "transformers")
ARTIFACT_FORMATS = catalog.artifact_formats()
GiB = 2**30
def _place(src: Path, dst: Path) -> None:
    """Hard-link when possible (weights are never modified in place), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_model(src: Path, dst: Path) -> list[str]:
    placed = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix not in (".bin", ".pt", ".pth"):
            _place(f, dst / f.name)
            placed.append(f.name)
    return placed


def _ensure_generation_config(model_dir: Path) -> None:
    if (model_dir / "generation_config.json").exists():
        return
    from transformers import AutoConfig, GenerationConfig

    GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(model_dir)


def reference_benchmarks(benchmarks: dict) -> list[dict]:
    """The eval stations' {name: {"forged": {...}, "source": {...}}} as
    forge-alloy BenchmarkResult entries: score and baseScore (each runner's
    normalised 0..1 `score`), delta (a fraction, not acceptance's points),
    samples and their hashes, and the forged model's scalar metrics."""
    out = []
    for name, roles in benchmarks.items():
        forged, source = roles.get("forged") or {}, roles.get("source") or {}
        score, base = forged.get("score"), source.get("score")
        entry: dict = {"name": name, "score": score, "baseScore": base,
                       "delta": None if score is None or base is None else score - base,
                       "samplesPath": forged.get("samples_path"), "baseSamplesPath": source.get("samples_path"),
                       "resultHash": _prefixed(forged.get("samples_sha256")),
                       "baseResultHash": _prefixed(source.get("samples_sha256")),
                       "metrics": {k: v for k, v in forged.items() if isinstance(v, (int, float, str, bool))}}
        out.append({k: v for k, v in entry.items() if v is not None})
    return out


def _prefixed(digest: str | None) -> str | None:
    return None if digest is None else HASH_PREFIX + digest


def _collect_results(ctx: StageContext, info, family, plan, out: Path, artifact: dict | None) -> dict:
    """This run's `results`, from the checkpoint: forge-alloy's fields, and
    ours under EXTENSION_KEY. `info` is the safetensors model (for an
    artifact, the one it was quantized from: its parameters)."""
    size = sum(f.stat().st_size for f in model_files(out))
    ours: dict = {
        "forgedParams": info.param_count,
        "forgedSizeBytes": size,
        "stageDurations": [{"index": e["index"], "type": e["type"], "elapsedSeconds": e.get("elapsed_s")}
                           for e in ctx.previous],
    }
    if plan is not None:
        ours["loadPlan"] = asdict(plan)
    if artifact is not None:
        ours["artifact"] = {k: artifact[k] for k in ("format", "stage", "quant_type", "files", "tiers")}
    if family.is_moe:
        ours["expertsPerLayer"] = family.expert_count(info.config)
        ours["topK"] = family.top_k(info.config)
    results: dict = {"finalSizeGb": round(size / GiB, 6), "forgedParamsB": round(info.param_count / 1e9, 6)}
    ppls, benchmarks = measurements(ctx.previous)
    if ppls:
        ours["perplexity"] = ppls
        # forge-alloy's own fields hold the first held-out corpus
        results["baselinePerplexity"] = ppls[0].get("source")
        results["finalPerplexity"] = ppls[0].get("forged")
    if benchmarks:
        ours["benchmarks"] = benchmarks
        results["benchmarks"] = reference_benchmarks(benchmarks)
    return {**results, EXTENSION_KEY: ours}


def executed_source(ctx: StageContext) -> dict:
    """The alloy's source, with `sourceHash` when it was a GGUF: the bytes
    the part started from, which a rerun of the executed alloy must match."""
    source = dict(ctx.alloy["source"])
    gguf = next(((e.get("metrics") or {})[SOURCE] for e in ctx.previous if (e.get("metrics") or {}).get(SOURCE)),
                ctx.recorded.get(SOURCE))
    if gguf is not None:
        source["sourceHash"] = f"sha256:{gguf['sha256']}"
    return source


def executed_stages(ctx: StageContext) -> list[dict]:
    """The alloy's stages as written, each merged with the values its
    station reports it resolved and ran with (in the form the alloy would
    write them, e.g. learningRate as a string); stages without a checkpoint
    entry (handed off, or after this one) as they were."""
    resolved = {e["index"]: (e.get("metrics") or {}).get(RESOLVED) or {} for e in ctx.previous}
    return [{**stage, **resolved.get(i, {})} for i, stage in enumerate(ctx.alloy["stages"])]


_USAGE = {
    None: ("transformers", "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                           "model = AutoModelForCausalLM.from_pretrained(\".\")\n"
                           "tokenizer = AutoTokenizer.from_pretrained(\".\")\n```\n"),
    "gguf": ("llama.cpp", "```bash\nllama-cli -m {file} -p \"def fibonacci(n):\"\n```\n"),
    "mlx": ("mlx", "```bash\nmlx_lm.generate --model . --prompt \"def fibonacci(n):\"\n```\n"),
}


def _model_card(alloy: dict, results: dict, integrity: dict, artifact: dict | None = None) -> str:
    ours = results[EXTENSION_KEY]
    library, usage = _USAGE[artifact["format"] if artifact else None]
    src = alloy.get("source", {})
    tags = "".join(f"- {t}\n" for t in alloy.get("tags") or [])
    stages = "".join(f"| {i} | {s.get('type')} |\n" for i, s in enumerate(alloy.get("stages", [])))
    ppl_line = "".join(
        f"Held-out perplexity on `{p.get('corpus')}`: source {p['source']:.3f}, forged {p['forged']:.3f} "
        f"over {p.get('tokens')} tokens.\n\n" for p in ours.get("perplexity") or [])
    return (
        "---\n"
        f"license: {alloy.get('license') or 'other'}\n"
        f"base_model: {src.get('baseModel')}\n"
        f"library_name: {library}\n"
        f"tags:\n- forge-alloy\n{tags}"
        "---\n\n"
        f"# {alloy.get('name')}\n\n{alloy.get('description') or ''}\n\n"
        f"Forged by forge-factory from `{src.get('baseModel')}` ({src.get('architecture')}).\n\n"
        "| stage | type |\n|---|---|\n" + stages + "\n" + ppl_line +
        f"Parameters: {ours['forgedParams']:,}; weights on disk: {ours['forgedSizeBytes']:,} bytes.\n\n"
        f"modelHash: `{integrity['modelHash']}`  \nalloy: `{integrity['alloyHash']}`\n\n"
        "The executed recipe, with results and file hashes, is `forge-alloy.json`; "
        "re-check it with `factory verify .`.\n\n"
        + usage.format(file=artifact["eval_file"] if artifact else "")
    )


def _smoke(ctx: StageContext, model_dir: Path, artifact: dict | None) -> dict:
    """Reload in a fresh process through this node's load plan (its config
    and cold tier), never in fp32 regardless of size; an artifact through
    its format's runtime."""
    from stations.smoke import run_fresh

    return run_fresh(model_dir, root=ctx.layout.root, base=ctx.work_dir.name,
                     fmt=artifact["format"] if artifact else None)


def newest_artifact(ctx: StageContext, fmt: str) -> dict:
    """The newest artifact of quant format `fmt` an earlier stage wrote."""
    for entry in reversed(ctx.previous):
        artifact = (entry.get("metrics") or {}).get(ARTIFACT)
        if artifact and artifact["format"] == fmt:
            return artifact
    raise StageFailed(f"$.stages[{ctx.index}].format {fmt!r}: no earlier quant stage wrote {fmt}; add a quant "
                      f"stage with format {fmt!r} before this package stage, or package safetensors")


def run_stage(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    assert isinstance(stage, PackageStage)
    if stage.format not in FORMATS + ARTIFACT_FORMATS:
        raise StageFailed(f"$.stages[{ctx.index}].format {stage.format!r}: this station packages "
                          f"{', '.join(FORMATS + ARTIFACT_FORMATS)}")
    artifact = newest_artifact(ctx, stage.format) if stage.format in ARTIFACT_FORMATS else None
    src = input_model_dir(ctx)  # with an artifact: the safetensors model it was quantized from
    out = output_model_dir(ctx)
    # 1. weights, config, tokenizer, generation config
    _copy_model(artifact_unit(ctx.work_dir, artifact) if artifact else src, out)
    if not any(out.glob("tokenizer*")) and stage.include_tokenizer:
        raise StageFailed(f"{src} has no tokenizer files; a packaged model must ship its tokenizer")
    if artifact is None:
        _ensure_generation_config(out)
    ctx.progress(1, 4, "step")
    # 2. hashes and results
    info = inspect_checkpoint(src if artifact else out)
    family = family_for_config(info.config)
    plan = None if artifact else plan_for(ctx, out)[0]
    hashes = hash_model_dir(out)
    integrity = {
        "trustLevel": "self-attested",
        "fileHashes": [{"filename": n, "sha256": h, "size": (out / n).stat().st_size} for n, h in sorted(hashes.items())],
        "modelHash": model_hash(hashes),
        "alloyHash": ctx.alloy_hash,
        "calibrationCorpora": corpus_records(ctx.previous),
    }
    results = _collect_results(ctx, info, family, plan, out, artifact)
    ctx.progress(2, 4, "step")
    # 3. card and executed alloy
    executed = {**ctx.alloy, "source": executed_source(ctx), "stages": executed_stages(ctx),
                "results": {**results, "integrity": integrity}}
    write_json(out / EXECUTED_ALLOY, executed)
    write_bytes(out / "README.md", _model_card(ctx.alloy, results, integrity, artifact).encode())
    ctx.progress(3, 4, "step")
    # 4. the live-model check, in a fresh process
    ctx.stop_point()
    smoke = _smoke(ctx, out, artifact)
    ctx.progress(4, 4, "step")
    if not smoke.get("ok"):
        raise StageFailed(f"saved model does not reload: {'; '.join(smoke.get('problems', []))} ({out})")
    ours = results[EXTENSION_KEY]
    metrics = {"forged_dir": str(out.relative_to(ctx.work_dir)), "modelHash": integrity["modelHash"],
               "fileHashes": integrity["fileHashes"], "size_bytes": ours["forgedSizeBytes"],
               "params": ours["forgedParams"], "smoke": smoke,
               "load_plan": plan.strategy if plan else f"{artifact['format']} runtime"}
    if family.is_moe:
        metrics["experts_per_layer"] = ours["expertsPerLayer"]
    if artifact is not None:  # a GGUF/MLX package is shipped, not a model a later stage edits
        return StageResult(outputs=[out], metrics=metrics)
    return model_result(ctx, out, metrics)
