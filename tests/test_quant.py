"""quant: the catalog's formats, their no-torch support probes, and refusal
on a node without what a format needs.

The GPU path (bitsandbytes NF4 quantise, save_pretrained, reload, finite
logits) cannot run here: this test node has no CUDA GPU, and bitsandbytes
4-bit quantization needs one. Nothing is faked for it; it is exercised only
on a GPU node. gguf needs llama.cpp's tools, mlx Apple silicon, onnx
optimum-onnx: all absent here, so these tests check that each is refused
with what provides it.
"""

from __future__ import annotations

import importlib
import platform
import subprocess
import sys

import pytest

from factory import catalog, quant_support
from factory.errors import StageFailed
from stations import quant
from tests.linekit import make_root
from tests.stationkit import Reports, make_ctx
from tests.tiny_models import build_tiny_model

# forge-alloy's QuantStage.format enum (python/forge_alloy/types.py).
REFERENCE_FORMATS = {"gguf", "mlx", "safetensors", "onnx"}
no_cuda = pytest.mark.skipif(quant_support.cuda_present(), reason="checks a node WITHOUT a CUDA GPU")
not_apple = pytest.mark.skipif(sys.platform == "darwin" and platform.machine() == "arm64",
                               reason="checks a node that is not Apple silicon")


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def test_every_reference_format_has_a_catalog_row_with_a_factory_probe():
    assert REFERENCE_FORMATS <= set(catalog.QUANT_FORMATS)
    for fmt, row in catalog.QUANT_FORMATS.items():
        assert row.probe.startswith("factory.quant_support:"), fmt
        assert callable(_resolve(row.probe)), fmt
        if row.maker is not None:
            assert row.maker.startswith("stations.quant:") and callable(_resolve(row.maker)), fmt


@no_cuda
def test_bnb_formats_are_refused_without_cuda_and_name_the_need():
    for fmt in ("safetensors", "bnb-nf4", "bnb-4bit"):
        reason = catalog.format_problem(fmt)
        assert "CUDA GPU" in reason and "bitsandbytes" in reason, fmt


def test_gguf_is_refused_without_llama_cpp(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no llama.cpp tools
    reason = quant_support.gguf_problem()
    assert "convert_hf_to_gguf.py and llama-quantize on PATH" in reason and "build llama.cpp" in reason


def test_gguf_is_refused_when_only_one_tool_is_there(monkeypatch, tmp_path):
    (tmp_path / "llama-quantize").write_text("#!/bin/sh\n")
    (tmp_path / "llama-quantize").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert quant_support.gguf_problem().startswith("gguf needs llama.cpp's convert_hf_to_gguf.py on PATH")


def test_gguf_is_offered_where_the_tools_are_on_path(monkeypatch, tmp_path):
    for tool in ("convert_hf_to_gguf.py", "llama-quantize"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert catalog.format_problem("gguf") is None


@not_apple
def test_mlx_is_refused_off_apple_silicon_with_what_provides_it():
    reason = catalog.format_problem("mlx")
    assert reason.startswith("mlx needs Apple silicon (macOS on arm64) and this node is ")
    assert sys.platform in reason and "pip install mlx-lm" in reason


@pytest.mark.skipif(all(quant_support.installed(p) for p in quant_support.ONNX_PACKAGES),
                    reason="checks a node without the ONNX exporter")
def test_onnx_is_refused_without_its_packages_and_names_them():
    missing = [p for p in quant_support.ONNX_PACKAGES if not quant_support.installed(p)]
    reason = catalog.format_problem("onnx")
    assert reason.startswith("onnx needs the ") and f"pip install {' '.join(missing)}" in reason


def test_installed_reads_package_metadata():
    assert quant_support.installed("pydantic")
    assert not quant_support.installed("no-such-distribution-forge-factory")


def test_the_probes_import_neither_torch_nor_stations():
    code = ("import sys; from factory import catalog\n"
            "for fmt in catalog.QUANT_FORMATS: catalog.format_problem(fmt)\n"
            "print(sorted(m for m in ('torch', 'stations') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _quant_ctx(tmp_path, fmt: str, reports: Reports):
    root = make_root(tmp_path / "root")
    build_tiny_model("llama", root / "models" / "m")
    alloy = {"name": "q", "version": "1.0.0", "source": {"baseModel": "models/m", "architecture": "llama"},
             "stages": [{"type": "quant", "format": fmt, "quantTypes": ["4bit"]}]}
    return make_ctx(root, alloy, 0, reports=reports)


@no_cuda
def test_run_stage_refuses_bnb_before_loading(tmp_path):
    reports = Reports()
    ctx = _quant_ctx(tmp_path, "bnb-nf4", reports)
    with pytest.raises(StageFailed, match=r"\$\.stages\[0\]\.format 'bnb-nf4': unsupported here: .*CUDA GPU"):
        quant.run_stage(ctx)
    assert reports.events("model/load") == []
    assert list(ctx.stage_dir.iterdir()) == []


@not_apple
def test_run_stage_refuses_mlx_before_loading(tmp_path):
    reports = Reports()
    ctx = _quant_ctx(tmp_path, "mlx", reports)
    with pytest.raises(StageFailed, match=r"format 'mlx': unsupported here: mlx needs Apple silicon"):
        quant.run_stage(ctx)
    assert reports.events("model/load") == [] and list(ctx.stage_dir.iterdir()) == []
