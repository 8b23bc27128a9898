"""result.json: what a finished part produced, assembled from its checkpoint.

Pure and light (the daemon calls it): it reads the stages' recorded metrics
and the sizes of files on disk, never the weights. The acceptance verdict is
computed here so every part gets one, with or without a package stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factory import acceptance
from factory.integrity import model_files

# ── what stations record: the keys of a checkpoint entry's metrics that the
# line reads (here, for result.json) and the package station reads (for the
# executed alloy). One vocabulary, one reader.
MODEL_DIR = "model_dir"  # the model dir a stage wrote, relative to the work dir
# A quantized artifact a runtime other than transformers reads (gguf, mlx):
# {"format", "stage", "dir" (relative to the work dir), "eval_file" (what eval
# measures, the first quant type), "quant_type", "files": [{"quant_type",
# "file", "bytes"}], "tiers": {quant_type: size vs fitsVramGb}}.
ARTIFACT = "artifact"
# The GGUF a stage's source was dequantized from (stations.base):
# {"kind": "gguf", "file", "sha256", "architecture", "origin", "checkpoint"}.
SOURCE = "source"
RESOLVED = "resolved"  # {camelCaseField: value}: what a station ran with for fields the alloy left out
TOWERS_PROVED = "towers_proved"  # stations.towers' proof that non-text towers are unchanged
# Where stations record a corpus or dataset they read: (key path to its
# name, key path to its bare sha256 hex).
CORPUS_RECORDS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("corpus",), ("corpus_sha256",)),  # expert-activation-profile, prune
    (("calibration", "ref"), ("calibration", "sha256")),  # compact
    (("perplexity", "corpus"), ("perplexity", "corpus_sha256")),  # eval's perplexity benchmark
    (("dataset", "ref"), ("dataset", "sha256")),  # train, lora, compensation-lora
)


def artifact_unit(work_dir: Path, artifact: dict) -> Path:
    """The directory an artifact ships and reloads as one model: the
    artifact dir (GGUF files beside config and tokenizer), or its first
    quant type's model dir (MLX: one directory per quant type)."""
    where = work_dir / artifact["dir"]
    return where / artifact["eval_file"] if (where / artifact["eval_file"]).is_dir() else where


def _at(metrics: dict, path: tuple[str, ...]) -> Any:
    value: Any = metrics
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def corpus_records(stages: list[dict]) -> list[dict]:
    """Every corpus and dataset a stage read, with the sha256 it measured:
    [{"stage", "type", "ref", "sha256"}]."""
    seen = []
    for entry in stages:
        metrics = entry.get("metrics") or {}
        for name_path, hash_path in CORPUS_RECORDS:
            digest = _at(metrics, hash_path)
            if digest:
                seen.append({"stage": entry["index"], "type": entry["type"], "ref": _at(metrics, name_path),
                             "sha256": digest})
    return seen


def _newest(stages: list[dict], key: str):
    for s in reversed(stages):
        m = s.get("metrics") or {}
        if m.get(key) is not None:
            return m[key]
    return None


def _shipped(work_dir: Path, stages: list[dict]) -> Path | None:
    """What the part produced last: a package stage's directory, a quant
    stage's gguf/mlx artifact, or a stage's model dir, whichever is newest."""
    for s in reversed(stages):
        m = s.get("metrics") or {}
        for key in ("forged_dir", MODEL_DIR):
            if m.get(key):
                return work_dir / m[key]
        if m.get(ARTIFACT):
            return work_dir / m[ARTIFACT]["dir"]
    return None


def _what_was_measured(stage: dict) -> dict:
    """{"model": "gguf Q4_K_M"} for an eval of a quantized artifact; {} for
    the forged checkpoint itself."""
    measured = (stage.get("metrics") or {}).get("measured")
    if not isinstance(measured, dict) or not measured.get("format"):
        return {}
    return {"model": " ".join(str(measured[k]) for k in ("format", "quant_type") if measured.get(k))}


def measurements(stages: list[dict]) -> tuple[list[dict], dict]:
    """Every held-out perplexity measured, and the other benchmarks by name
    (a later eval stage wins for a benchmark measured twice)."""
    perplexities = [{**s["metrics"]["perplexity"], "stage": s.get("index"), **_what_was_measured(s)}
                    for s in stages if (s.get("metrics") or {}).get("perplexity")]
    benchmarks: dict = {}
    for s in stages:
        if s.get("type") == "eval":
            benchmarks.update({k: v for k, v in (s.get("metrics") or {}).get("benchmarks", {}).items()
                               if k != "perplexity"})
    return perplexities, benchmarks


def summarize(work_dir: Path, stages: list[dict], alloy: dict) -> dict:
    """The forged-model keys of result.json (docs/FACTORY-PROTOCOL.md §9)."""
    out: dict = {}
    forged = _shipped(work_dir, stages)
    if forged is not None:
        out["forged_dir"] = str(forged)
    artifacts = [{**s["metrics"][ARTIFACT], "dir": str(work_dir / s["metrics"][ARTIFACT]["dir"])}
                 for s in stages if (s.get("metrics") or {}).get(ARTIFACT)]
    if artifacts:
        out["artifacts"] = artifacts
    source = next((s["metrics"][SOURCE] for s in stages if (s.get("metrics") or {}).get(SOURCE)), None)
    if source is not None:
        out["source"] = source
    for key in ("modelHash", "fileHashes", "params", "experts_per_layer", "load_plan"):
        value = _newest(stages, key)
        if value is not None:
            out[key] = value
    size = _newest(stages, "size_bytes")
    if size is None and forged is not None and forged.is_dir():
        size = sum(f.stat().st_size for f in model_files(forged))
    out["size_bytes"] = size
    perplexities, benchmarks = measurements(stages)
    if perplexities:
        out["perplexity"] = perplexities
    if benchmarks:
        out["benchmarks"] = benchmarks
    corpora = corpus_records(stages)
    if corpora:
        out["corpora"] = corpora
    handed_off = [{"index": s["index"], "type": s["type"], **s["handed_off"]} for s in stages if s.get("handed_off")]
    if handed_off:
        out["handed_off"] = handed_off
    smoke = _newest(stages, "smoke")
    integrity = {"modelHash": out.get("modelHash"), "fileHashes": out.get("fileHashes"),
                 "reload_ok": bool(smoke and smoke.get("ok"))}
    out["acceptance"] = acceptance.evaluate(alloy.get("acceptanceCriteria"), benchmarks=benchmarks,
                                            perplexities=perplexities, forged_bytes=size, integrity=integrity)
    return out
