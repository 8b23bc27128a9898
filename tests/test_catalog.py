"""The stage catalog is the one home of what a stage type is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory.alloy import STAGE_TYPES, Alloy
from factory.catalog import CATALOG, FORGE, REFUSED, SHIP, copies_written, kind_of, load_station
from tests.shared_corpus import ALLOYS as CORPUS

REPO = Path(__file__).resolve().parent.parent


def test_every_schema_type_has_a_row_and_every_forge_row_a_station() -> None:
    assert set(STAGE_TYPES) <= set(CATALOG)
    for t, kind in CATALOG.items():
        assert kind.schema is STAGE_TYPES.get(t, kind.schema)
        assert (kind.station is not None) == (kind.role == FORGE), t
        assert bool(kind.reason) == (kind.role == REFUSED), t
    assert kind_of("x-frobnicate").role == REFUSED


@pytest.mark.parametrize("stage_type", sorted(t for t, k in CATALOG.items() if k.role == FORGE))
def test_every_station_entry_point_resolves(stage_type: str) -> None:
    assert callable(load_station(stage_type))


def test_protocol_doc_table_is_the_catalog() -> None:
    text = (REPO / "docs" / "FACTORY-PROTOCOL.md").read_text()
    block = text.split("<!-- catalog:begin")[1].split("<!-- catalog:end -->")[0]
    rows = [[c.strip().strip("`") for c in line.strip("|").split("|")]
            for line in block.splitlines() if line.startswith("| `")]
    assert rows == [[k.type, k.role, k.station or "", k.writes] for k in CATALOG.values()]


def test_disk_estimate_counts_every_model_a_stage_writes() -> None:
    """A lora without mergeAfter still saves a model (the drift the issue found)."""
    alloy = Alloy.model_validate({"name": "x", "version": "1", "source": {"baseModel": "m", "architecture": "llama"},
                                  "stages": [{"type": "lora"}, {"type": "eval", "benchmarks": [{"name": "perplexity"}]},
                                             {"type": "quant", "format": "gguf", "quantTypes": ["Q4_K_M", "Q8_0"]},
                                             {"type": "deliver"}]})
    assert copies_written(alloy.stages) == pytest.approx(1 + 1 + 2 * 0.55)


def test_gate_call_does_not_import_stations_or_torch(tmp_path: Path) -> None:
    """The daemon's intake gate (factory.intake -> plan.quick_findings -> the
    catalog's probes) runs in the daemon process: it must not import
    `stations` (or torch), for any published alloy."""
    files = sorted(CORPUS.glob("*.json")) if CORPUS.is_dir() else []
    examples = sorted((REPO / "examples").glob("*.alloy.json"))
    code = f"""
import json, sys
from pathlib import Path
from factory.nodeconfig import NodeConfig
from factory.plan import quick_findings
from factory.validation import check_file
root = Path({str(tmp_path)!r})
for f in {[str(f) for f in files + examples]!r}:
    report = check_file(Path(f), root=root)
    if report.alloy is not None:
        quick_findings(report.alloy, root=root, config=NodeConfig())
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('stations', 'torch', 'transformers'))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout) == []


def test_ship_rows_are_the_hand_offs() -> None:
    assert sorted(t for t, k in CATALOG.items() if k.role == SHIP) == ["deliver", "deploy", "publish"]


def _gate(tmp_path: Path, *stages: dict, config: dict | None = None) -> list:
    from factory.nodeconfig import NodeConfig
    from factory.plan import quick_findings

    alloy = Alloy.model_validate({"name": "g", "version": "1", "stages": list(stages),
                                  "source": {"baseModel": "acme/model", "architecture": "llama"}})
    return quick_findings(alloy, root=tmp_path, config=NodeConfig.model_validate(config or {}))


def test_gate_refuses_a_dataset_not_on_the_node_and_accepts_a_mapped_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))
    found = _gate(tmp_path, {"type": "train", "dataset": "acme/missing"})
    assert [f.path for f in found] == ["$.stages[0].dataset"] and "acme/missing" in f"{found[0].fix}{found[0]}"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.jsonl").write_text('{"text": "x"}\n')
    assert _gate(tmp_path, {"type": "train", "dataset": "acme/missing"},
                 config={"datasets": {"acme/missing": "data/m.jsonl"}}) == []
    # A domain goes through [domains]: refused while its dataset is nowhere.
    found = _gate(tmp_path, {"type": "train", "domain": "general"})
    assert [f.path for f in found] == ["$.stages[0].domain"]


def test_gate_refuses_router_strategies_for_head_pruning(tmp_path: Path) -> None:
    found = _gate(tmp_path, {"type": "prune", "strategy": "calibration-aware-activation-count", "level": 0.2})
    assert [f.path for f in found] == ["$.stages[0].strategy"] and "expert-prune" in found[0].fix


def test_gate_refuses_a_benchmark_without_data(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("HUMANEVAL_OVERRIDE_PATH", raising=False)
    found = _gate(tmp_path, {"type": "eval", "benchmarks": [{"name": "humaneval+"}]})
    assert [f.path for f in found] == ["$.stages[0].benchmarks[0].name"]
    assert "humaneval_plus" in found[0].message


def test_the_gate_reads_a_gguf_source_without_importing_transformers(tmp_path: Path) -> None:
    """A [models] GGUF source is checked at the gate (its header, and which
    architectures transformers reads, asked of a child interpreter) with
    nothing of transformers, torch or the stations in the daemon."""
    gguf = pytest.importorskip("gguf")
    models = tmp_path / "models"
    models.mkdir()
    writer = gguf.GGUFWriter(str(models / "m.gguf"), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code = f"""
import json, sys
from pathlib import Path
from factory.alloy import Alloy
from factory.nodeconfig import NodeConfig
from factory.plan import quick_findings
root = Path({str(tmp_path)!r})
config = NodeConfig.model_validate({{"models": {{"acme/m": "models/m.gguf"}}}})
alloy = Alloy.model_validate({{"name": "g", "version": "1", "source": {{"baseModel": "acme/m", "architecture": "llama"}},
                               "stages": [{{"type": "eval", "benchmarks": [{{"name": "perplexity"}}]}}]}})
findings = quick_findings(alloy, root=root, config=config)
print(json.dumps([len(findings), sorted(m for m in sys.modules if m.split('.')[0] in ('stations', 'torch', 'transformers'))]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout) == [0, []]
