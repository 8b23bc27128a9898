"""result.json: what a finished part produced, assembled from its checkpoint.

Pure and light (the daemon calls it): it reads the stages' recorded metrics
and the sizes of files on disk, never the weights. The acceptance verdict is
computed here so every part gets one, with or without a package stage.
"""

from __future__ import annotations

from pathlib import Path

from factory import acceptance


def _newest(stages: list[dict], key: str):
    for s in reversed(stages):
        m = s.get("metrics") or {}
        if m.get(key) is not None:
            return m[key]
    return None


def measurements(stages: list[dict]) -> tuple[list[dict], dict]:
    """Every held-out perplexity measured, and the other benchmarks by name
    (a later eval stage wins for a benchmark measured twice)."""
    perplexities = [s["metrics"]["perplexity"] for s in stages if (s.get("metrics") or {}).get("perplexity")]
    benchmarks: dict = {}
    for s in stages:
        if s.get("type") == "eval":
            benchmarks.update({k: v for k, v in (s.get("metrics") or {}).get("benchmarks", {}).items()
                               if k != "perplexity"})
    return perplexities, benchmarks


def summarize(work_dir: Path, stages: list[dict], alloy: dict) -> dict:
    """The forged-model keys of result.json (docs/FACTORY-PROTOCOL.md §9)."""
    out: dict = {}
    model_dir = _newest(stages, "model_dir")
    forged = work_dir / model_dir if model_dir else None
    if forged is not None:
        out["forged_dir"] = str(forged)
    for key in ("modelHash", "fileHashes", "params", "experts_per_layer", "load_plan"):
        value = _newest(stages, key)
        if value is not None:
            out[key] = value
    size = _newest(stages, "size_bytes")
    if size is None and forged is not None and forged.is_dir():
        size = sum(f.stat().st_size for f in forged.glob("*.safetensors"))
    out["size_bytes"] = size
    perplexities, benchmarks = measurements(stages)
    if perplexities:
        out["perplexity"] = perplexities
    if benchmarks:
        out["benchmarks"] = benchmarks
    handed_off = [{"index": s["index"], "type": s["type"], **s["handed_off"]} for s in stages if s.get("handed_off")]
    if handed_off:
        out["handed_off"] = handed_off
    smoke = _newest(stages, "smoke")
    integrity = {"modelHash": out.get("modelHash"), "fileHashes": out.get("fileHashes"),
                 "reload_ok": bool(smoke and smoke.get("ok"))}
    out["acceptance"] = acceptance.evaluate(alloy.get("acceptanceCriteria"), benchmarks=benchmarks,
                                            perplexities=perplexities, forged_bytes=size, integrity=integrity)
    return out
