"""`factory rehearse`: every published recipe proved on a CPU stand-in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory.alloy import Alloy
from factory.rehearse import CAPS, Rehearsal, _Data, _stdlib_texts, rehearsal_alloy, rehearse
from tests.shared_corpus import ALLOYS

PUBLISHED = sorted(ALLOYS.glob("*.json"))
def _load(name: str) -> tuple[dict, Alloy]:
    data = json.loads((ALLOYS / name).read_text())
    return data, Alloy.model_validate(data)


def test_rehearsal_copy_swaps_model_data_and_budgets(tmp_path: Path) -> None:
    data, recipe = _load("forge-alloy-examples__qwen3.5-27b-code-128k-forged.alloy.json")
    store, notes = _Data(tmp_path, *_stdlib_texts()), []
    out = rehearsal_alloy(data, recipe, "models/standin", store, notes)
    assert out["source"]["baseModel"] == "models/standin" and out["source"]["architecture"] == "qwen3_5"
    for stage in out["stages"]:
        for key, cap in CAPS.get(stage["type"], {}).items():
            if key in stage:
                assert stage[key] <= cap, (stage["type"], key)
    trains = [s for s in out["stages"] if s["type"] in ("train", "lora")]
    assert trains and all(s["steps"] == 2 for s in trains)
    # Every dataset and benchmark it names has a stand-in file the node config maps.
    for rel in [*store.datasets.values(), *store.benchmarks.values()]:
        files = [tmp_path / rel] if (tmp_path / rel).is_file() else list((tmp_path / rel).iterdir())  # a group: its dir
        assert files and all(f.is_file() and f.stat().st_size > 0 for f in files), rel
    assert "humaneval_plus" in store.benchmarks and "mmlu_pro" in store.benchmarks
    assert any("stand-in" in n for n in notes)
    assert json.loads((ALLOYS / "forge-alloy-examples__qwen3.5-27b-code-128k-forged.alloy.json").read_text()) == data


def _violations(r: Rehearsal, recipe: Alloy) -> list[str]:
    """What is wrong with one rehearsal: a stage that neither ran nor was
    handed off, or a model or quantized artifact that does not reload."""
    bad = []
    for s, stage in zip(r.stages, recipe.stages):
        if s.status in ("ran", "handed-off"):
            if s.reloaded is False:
                bad.append(f"stage {s.index} {s.type}: its model does not reload")
            if s.type == "quant" and getattr(stage, "format", None) in ("gguf", "mlx") and s.reloaded is not True:
                bad.append(f"stage {s.index} {s.type}: its {stage.format} artifact was not reloaded")
            continue
        bad.append(f"stage {s.index} {s.type}: {s.status}: {s.reason}")
    if len(r.stages) != len(recipe.stages):
        bad.append(f"{len(r.stages)} stage reports for {len(recipe.stages)} stages ({r.message})")
    return bad


@pytest.mark.slow
def test_every_published_alloy_rehearses(tmp_path: Path) -> None:
    """All 29 published recipes through the real gate, daemon and stations
    on stand-ins: every stage runs or is handed off, every model and every
    GGUF/MLX artifact reloads in a fresh process, and every part finishes."""
    assert len(PUBLISHED) == 29
    results = rehearse(PUBLISHED, keep=tmp_path / "root")
    problems = {}
    for file, r in zip(PUBLISHED, results):
        bad = _violations(r, Alloy.model_validate(json.loads(file.read_text())))
        if bad:
            problems[file.name] = bad
    assert not problems, json.dumps(problems, indent=1)
    assert all(r.ok and r.station == "finished" for r in results), [r.part for r in results if not r.ok]


def test_cli_json_report(tmp_path: Path) -> None:
    alloy = ALLOYS / "continuum-ai_qwen2.5-0.5b-general-forged__qwen2.5-0.5b-general-forged.alloy.json"
    proc = subprocess.run([sys.executable, "-m", "factory.cli", "rehearse", str(alloy), "--json",
                           "--keep", str(tmp_path / "root")], capture_output=True, text=True, timeout=900)
    report = json.loads(proc.stdout)
    assert proc.returncode == (0 if report[0]["ok"] else 1), proc.stderr[-2000:]
    assert [(s["index"], s["type"], s["status"]) for s in report[0]["stages"]] == [
        (0, "prune", "ran"), (1, "train", "ran")], report
    assert report[0]["alloy"] == str(alloy) and report[0]["ok"] is True
    assert all(isinstance(s["seconds"], float) and s["reason"] is None for s in report[0]["stages"])
    # The scratch root is kept: the forged model is there.
    assert (tmp_path / "root" / "line" / "finished").is_dir()
