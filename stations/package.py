"""package: the final model directory, with its card, its executed alloy and
proof that it loads.

The directory holds the weights, config, tokenizer and generation config,
a README model card written from the alloy, and `forge-alloy.json`: the input
alloy plus `results` (perplexities, sizes, parameters, experts kept, per-stage
durations, the load plan for this node) and `results.integrity` (fileHashes,
modelHash, the input alloy's hash, calibration corpus hashes), in the
forge-alloy convention, so `factory verify DIR` re-checks it. Then a fresh
process loads the directory with stock `from_pretrained` and runs a probe
(stations/smoke.py); a directory that does not reload fails the stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from adapters import family_for_config
from factory.errors import StageFailed
from factory.integrity import hash_model_dir, model_hash
from factory.model_files import inspect_checkpoint
from factory.results import measurements
from factory.stages import StageContext, StageResult
from stations.base import input_model_dir, model_result, output_model_dir
from stations.loader import plan_for

EXECUTED_ALLOY = "forge-alloy.json"
# Loading even a large model for one forward pass on CPU stays well inside this.
SMOKE_TIMEOUT_SECONDS = 1800
# Formats this station writes: a Hugging Face safetensors directory. Other
# package formats (gguf, mlx) are produced by quant stages on nodes that have
# the converters.
FORMATS = ("safetensors", "safetensors-defragged", "hf", "transformers")


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


def _collect_results(ctx: StageContext, info, family, plan) -> dict:
    """What the executed alloy's `results` records, from the checkpoint."""
    config = info.config
    results: dict = {
        "forgedParams": info.param_count,
        "forgedSizeBytes": sum(f.stat().st_size for f in (info.model_dir).glob("*.safetensors")),
        "stageDurations": [{"index": e["index"], "type": e["type"], "elapsedSeconds": e.get("elapsed_s")}
                           for e in ctx.previous],
        "loadPlan": asdict(plan),
    }
    if family.is_moe:
        results["expertsPerLayer"] = family.expert_count(config)
        results["topK"] = family.top_k(config)
    ppls, benchmarks = measurements(ctx.previous)
    if ppls:
        results["perplexity"] = ppls
        # forge-alloy's own fields hold the first held-out corpus
        results["baselinePerplexity"] = ppls[0].get("source")
        results["finalPerplexity"] = ppls[0].get("forged")
    if benchmarks:
        results["benchmarks"] = benchmarks
    return results


def _corpus_hashes(ctx: StageContext) -> list[dict]:
    seen = []
    for e in ctx.previous:
        m = e.get("metrics") or {}
        for key in ("corpus_sha256", "calibration_sha256"):
            if m.get(key):
                seen.append({"stage": e["index"], "type": e["type"], "sha256": m[key]})
    return seen


def _model_card(alloy: dict, results: dict, integrity: dict) -> str:
    src = alloy.get("source", {})
    tags = "".join(f"- {t}\n" for t in alloy.get("tags") or [])
    stages = "".join(f"| {i} | {s.get('type')} |\n" for i, s in enumerate(alloy.get("stages", [])))
    ppl_line = "".join(
        f"Held-out perplexity on `{p.get('corpus')}`: source {p['source']:.3f}, forged {p['forged']:.3f} "
        f"over {p.get('tokens')} tokens.\n\n" for p in results.get("perplexity") or [])
    return (
        "---\n"
        f"license: {alloy.get('license') or 'other'}\n"
        f"base_model: {src.get('baseModel')}\n"
        "library_name: transformers\n"
        f"tags:\n- forge-alloy\n{tags}"
        "---\n\n"
        f"# {alloy.get('name')}\n\n{alloy.get('description') or ''}\n\n"
        f"Forged by forge-factory from `{src.get('baseModel')}` ({src.get('architecture')}).\n\n"
        "| stage | type |\n|---|---|\n" + stages + "\n" + ppl_line +
        f"Parameters: {results['forgedParams']:,}; weights on disk: {results['forgedSizeBytes']:,} bytes.\n\n"
        f"modelHash: `{integrity['modelHash']}`  \nalloy: `{integrity['alloyHash']}`\n\n"
        "The executed recipe, with results and file hashes, is `forge-alloy.json`; "
        "re-check it with `factory verify .`.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(\".\")\ntokenizer = AutoTokenizer.from_pretrained(\".\")\n```\n"
    )


def _smoke(ctx: StageContext, model_dir: Path) -> dict:
    """Reload in a fresh process through this node's load plan (its config
    and cold tier), never in fp32 regardless of size."""
    proc = subprocess.run([sys.executable, "-m", "stations.smoke", str(model_dir), "--root", str(ctx.layout.root),
                           "--base", ctx.work_dir.name], capture_output=True,
                          text=True, timeout=SMOKE_TIMEOUT_SECONDS)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"ok": False, "problems": [f"probe process exited {proc.returncode}: {proc.stderr[-500:]}"]}
    return result


def run_stage(ctx: StageContext) -> StageResult:
    fmt = ctx.stage.get("format", "safetensors")
    if fmt not in FORMATS:
        raise StageFailed(f"$.stages[{ctx.index}].format {fmt!r}: this station writes {', '.join(FORMATS)}; "
                          "use a quant stage for gguf/mlx")
    src = input_model_dir(ctx)
    out = output_model_dir(ctx)
    # 1. weights, config, tokenizer, generation config
    _copy_model(src, out)
    if not any(out.glob("tokenizer*")) and ctx.stage.get("includeTokenizer", True):
        raise StageFailed(f"{src} has no tokenizer files; a packaged model must ship its tokenizer")
    _ensure_generation_config(out)
    ctx.progress(1, 4, "step")
    # 2. hashes and results
    info = inspect_checkpoint(out)
    family = family_for_config(info.config)
    plan, _, _ = plan_for(ctx, out)
    hashes = hash_model_dir(out)
    integrity = {
        "trustLevel": "self-attested",
        "fileHashes": [{"filename": n, "sha256": h, "size": (out / n).stat().st_size} for n, h in sorted(hashes.items())],
        "modelHash": model_hash(hashes),
        "alloyHash": ctx.alloy_hash,
        "calibrationCorpora": _corpus_hashes(ctx),
    }
    results = _collect_results(ctx, info, family, plan)
    ctx.progress(2, 4, "step")
    # 3. card and executed alloy
    executed = {**ctx.alloy, "results": {**(ctx.alloy.get("results") or {}), **results, "integrity": integrity}}
    (out / EXECUTED_ALLOY).write_text(json.dumps(executed, indent=2) + "\n")
    (out / "README.md").write_text(_model_card(ctx.alloy, results, integrity))
    ctx.progress(3, 4, "step")
    # 4. the live-model check, in a fresh process
    ctx.stop_point()
    smoke = _smoke(ctx, out)
    ctx.progress(4, 4, "step")
    if not smoke.get("ok"):
        raise StageFailed(f"saved model does not reload: {'; '.join(smoke.get('problems', []))} ({out})")
    metrics = {"forged_dir": str(out.relative_to(ctx.work_dir)), "modelHash": integrity["modelHash"],
               "fileHashes": integrity["fileHashes"], "size_bytes": results["forgedSizeBytes"],
               "params": results["forgedParams"], "smoke": smoke, "load_plan": plan.strategy}
    if family.is_moe:
        metrics["experts_per_layer"] = results["expertsPerLayer"]
    return model_result(ctx, out, metrics)
