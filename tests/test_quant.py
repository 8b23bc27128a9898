"""quant: the catalog's formats, their no-torch support probes, and refusal
on a node without what a format needs (package metadata faked where this
node has the package: the refusal is what is checked). The formats
themselves run in tests/test_quant_bnb.py, test_quant_gguf.py and
test_quant_mlx.py; onnx has no writer here and is refused.
"""

from __future__ import annotations

import importlib
import importlib.metadata
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


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def test_every_reference_format_has_a_catalog_row_with_a_factory_probe():
    assert REFERENCE_FORMATS <= set(catalog.QUANT_FORMATS)
    for fmt, row in catalog.QUANT_FORMATS.items():
        assert row.probe.startswith("factory.quant_support:"), fmt
        assert callable(_resolve(row.probe)), fmt
        if row.maker is not None:
            assert row.maker.startswith("stations.quant") and callable(_resolve(row.maker)), fmt
        for spec in (row.reader, row.model_probe):
            if spec is not None:
                assert callable(_resolve(spec)), fmt
    assert set(catalog.artifact_formats()) == {"gguf", "mlx"}


def test_bnb_formats_are_offered_on_any_node_with_a_cpu_capable_bitsandbytes():
    """bitsandbytes >= 0.46 quantizes NF4 on the CPU: no GPU needed."""
    assert quant_support.installed("bitsandbytes")
    for fmt in ("safetensors", "bnb-nf4", "bnb-4bit"):
        assert catalog.format_problem(fmt) is None, fmt


def _bnb_metadata(monkeypatch, version: str | None) -> None:
    """Make package metadata report bitsandbytes at `version` (None: not
    installed): this node has 0.50.2 and cannot also hold an old or no copy."""
    real = importlib.metadata.version

    def fake(name: str) -> str:
        if name != "bitsandbytes":
            return real(name)
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", fake)


@pytest.mark.parametrize(("version", "needle"), [
    (None, "needs the bitsandbytes package, not installed here"),
    ("0.45.5", "bitsandbytes 0.45.5 is installed, older than 0.46.1"),
    ("banana", "reports version 'banana', which is not a version number"),
])
def test_bnb_problem_names_a_missing_or_old_package_and_the_fix(monkeypatch, version, needle):
    _bnb_metadata(monkeypatch, version)
    reason = quant_support.bnb_problem()
    assert needle in reason and reason.endswith("pip install 'bitsandbytes>=0.46.1'")


def _without(monkeypatch, *missing: str) -> None:
    """Package metadata as on a node without `missing`."""
    real = quant_support.installed
    monkeypatch.setattr(quant_support, "installed", lambda name: name not in missing and real(name))


@pytest.mark.parametrize("missing", [("llama-cpp-python",), ("llama-cpp-scripts",),
                                     ("llama-cpp-scripts", "llama-cpp-python")])
def test_gguf_is_refused_without_llama_cpp_naming_what_and_the_install(monkeypatch, missing):
    _without(monkeypatch, *missing)
    reason = quant_support.gguf_problem()
    assert reason.startswith(f"gguf needs {' and '.join(missing)}, not installed")
    assert "bootstrap/format-tools.sh" in reason


def test_gguf_architectures_come_from_the_converter_source():
    if quant_support.gguf_problem() is not None:
        pytest.skip("llama.cpp's converter is not installed")
    names = quant_support.gguf_architectures()
    assert {"LlamaForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"} <= names
    assert quant_support.gguf_architecture_problem(["LlamaForCausalLM"]) is None
    why = quant_support.gguf_architecture_problem(["PhimoeForCausalLM"])
    assert "'PhimoeForCausalLM'" in why and "spelled differently" in why


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


def test_run_stage_refuses_bnb_before_loading_when_bitsandbytes_is_too_old(tmp_path, monkeypatch):
    reports = Reports()
    ctx = _quant_ctx(tmp_path, "bnb-nf4", reports)
    _bnb_metadata(monkeypatch, "0.43.3")
    with pytest.raises(StageFailed, match=r"\$\.stages\[0\]\.format 'bnb-nf4': unsupported here: "
                                          r"bitsandbytes 0\.43\.3 is installed, older than 0\.46\.1"):
        quant.run_stage(ctx)
    assert reports.events("model/load") == []
    assert list(ctx.stage_dir.iterdir()) == []
