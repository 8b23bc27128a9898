"""eval: measure the forged model (and, where asked, the source) on benchmarks.

Stage fields (`factory.alloy.EvalStage`; camelCase as alloys write them):

  benchmarks        [{"name": ..., "subset": ..., options}]: names from the
                    registry in `factory.benchmarks` (`known_benchmarks()`);
                    one that is unknown, not installed or whose data is not on
                    the node is refused before any model loads.
  evalCorpusFile    held-out text for perplexity: a path inside the factory
   | heldOutCorpusFile  root; or evalCorpus | heldOutCorpus: an id into
   | evalCorpus     $.calibrationCorpora (sha256 checked). Naming one runs
   | heldOutCorpus  perplexity even without a "perplexity" entry;
                    `{"name": "perplexity", "subset": "<id or path>"}` names
                    the corpus in the entry instead.
  compareToBase     also run the forged-only benchmarks on the source model
                    (the schema's default: true), so anchorDelta can gate.
  options           limit, nSamples, temperature, seed, maxNewTokens, timeout,
                    workers, batchSize, evalBlockSize, evalTokens,
                    evalBatchSize (`factory.alloy.BenchmarkOptions`): on the
                    stage for every benchmark, or in one entry, which wins.

Perplexity always measures both models on the same token blocks; the forged
model is this stage's input (the newest earlier model output), the source is
the alloy's source. After a quant stage in gguf or mlx, the forged model is
that quantized artifact itself, run by its own runtime (llama.cpp, mlx-lm:
stations.runtime) on token ids from the source's tokenizer. Models are
loaded one at a time (source first), so eval
needs the memory of one model, not two.

Metrics: {"perplexity": {"source", "forged", "ratio", "score", "tokens",
"corpus_sha256", ...}, "benchmarks": {name: {"forged": {"score", ...},
"source": {...}}}}; the same, with the resolved entries, is written to
<stage_dir>/eval.json. Every result's `score` is 0..1, higher better;
perplexity's is source/forged perplexity capped at 1 (1: no worse than the
source); acceptanceCriteria gate perplexity on the raw `max` / `maxRatio`.
"""

from __future__ import annotations

import gc
from pathlib import Path

from factory.durable import write_json
from factory.errors import StageFailed
from factory.stages import StageContext, StageResult
from factory.alloy import BenchmarkSpec
from factory.benchmarks import benchmark_for, benchmark_problem, load_runner
from stations import loader, runtime
from stations.base import input_model_dir, latest_artifact, source_model_dir
from stations.benchmarks import BenchJob
from stations.benchmarks.lm_eval import OVERRIDES_DIR
from stations.benchmarks.perplexity import FILE_KEYS, ID_KEYS

ROLES = ("source", "forged")


def benchmark_specs(ctx: StageContext) -> list[BenchmarkSpec]:
    """The stage's benchmark entries, plus an implied perplexity entry when
    a held-out corpus is named; each checked to be runnable here, its data
    included."""
    specs = list(ctx.stage.benchmarks)
    corpus_named = any(ctx.stage.field_value(k) for k in FILE_KEYS + ID_KEYS)
    if corpus_named and not any(s.name == "perplexity" for s in specs):
        specs.append(BenchmarkSpec.model_validate({"name": "perplexity"}))
    for i, spec in enumerate(specs):
        problem = benchmark_problem(spec.name, check_installed=True, spec=spec, root=ctx.layout.root,
                                    config=ctx.config)
        if problem:
            raise StageFailed(f"$.stages[{ctx.index}].benchmarks[{i}]: {problem}")
    return specs


def roles_for(spec: BenchmarkSpec, compare_to_base: bool) -> tuple[str, ...]:
    bench = benchmark_for(spec.name)
    return ROLES if bench.always_compare or compare_to_base else bench.roles


def _free(loaded) -> None:
    """Drop a model before the next loads: eval holds one model at a time."""
    del loaded
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _load(ctx: StageContext, role: str, path: Path, artifact: dict | None):
    if role == "forged" and artifact is not None:
        return runtime.open_artifact(ctx, artifact, purpose=f"eval {role}")
    return loader.load(ctx, path, with_tokenizer=True, purpose=f"eval {role}")


def run_benchmarks(ctx: StageContext, specs: list[BenchmarkSpec], dirs: dict[str, Path], compare: bool,
                   artifact: dict | None = None) -> dict:
    """{name: {role: result}}: each model loaded once, its benchmarks run,
    freed. With `artifact`, the forged model is that quantized artifact."""
    results: dict[str, dict] = {s.name: {} for s in specs}
    shared: dict[str, dict] = {s.name: {} for s in specs}
    same = artifact is None and dirs["source"].resolve() == dirs["forged"].resolve()
    for role in ROLES:
        wanted = [s for s in specs if role in roles_for(s, compare)]
        if not wanted or (same and role == "source"):
            continue
        loaded = _load(ctx, role, dirs[role], artifact)
        for spec in wanted:
            job = BenchJob(ctx=ctx, spec=spec, loaded=loaded, role=role, out_dir=ctx.stage_dir,
                           shared=shared[spec.name])
            results[spec.name][role] = load_runner(benchmark_for(spec.name))(job)
            ctx.stop_point()
        if loaded.runtime is not None:
            loaded.runtime.close()
        _free(loaded)
    if same:  # no earlier stage changed the model: the source IS the forged model
        for spec in specs:
            if "source" in roles_for(spec, compare):
                results[spec.name]["source"] = dict(results[spec.name]["forged"], same_model=True)
    return results


def perplexity_summary(per_role: dict) -> dict:
    """Source vs forged on the same tokens; `score` = min(1, source/forged)."""
    forged, source = per_role["forged"], per_role["source"]
    ratio = forged["perplexity"] / source["perplexity"]
    return {"source": source["perplexity"], "forged": forged["perplexity"], "tokens": forged["tokens"],
            "corpus_sha256": forged["corpus_sha256"], "corpus": forged["corpus"],
            "block_size": forged["block_size"], "blocks": forged["blocks"],
            "ratio": ratio, "score": min(1.0, 1.0 / ratio)}


def run_stage(ctx: StageContext) -> StageResult:
    # 1. What to run, refused before any model is touched.
    specs = benchmark_specs(ctx)
    compare = ctx.stage.compare_to_base
    # 2. Which models: the alloy's source and this stage's input (a
    #    quantized artifact when the newest output is one).
    artifact = latest_artifact(ctx)
    forged = runtime.artifact_target(ctx, artifact) if artifact else input_model_dir(ctx)
    dirs = {"source": source_model_dir(ctx), "forged": forged}
    # 3. Measure, one model at a time.
    results = run_benchmarks(ctx, specs, dirs, compare, artifact)
    metrics: dict = {"benchmarks": results}
    if artifact is not None:
        metrics["measured"] = {"format": artifact["format"], "quant_type": artifact["quant_type"],
                               "file": artifact["eval_file"], "stage": artifact["stage"]}
    if "perplexity" in results:
        metrics["perplexity"] = perplexity_summary(results["perplexity"])
        results["perplexity"]["forged"]["score"] = metrics["perplexity"]["score"]
    # 4. Record what was measured and how.
    report = ctx.stage_dir / "eval.json"
    write_json(report, {"metrics": metrics, "benchmarks": [s.model_dump(by_alias=True, exclude_none=True) for s in specs],
                        "compare_to_base": compare,
                        "models": {r: str(p) for r, p in dirs.items()}})
    outputs = [report, *sorted(ctx.stage_dir.glob("*_samples.jsonl")),
               *sorted(ctx.stage_dir.glob(f"{OVERRIDES_DIR}/*.yaml"))]
    return StageResult(outputs=outputs, metrics=metrics)
