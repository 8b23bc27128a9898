"""quant: refusal on a node without what a format needs.

The GPU path (bitsandbytes NF4 quantise, save_pretrained, reload, finite
logits) cannot run here: this test node has no CUDA GPU, and bitsandbytes
4-bit quantization needs one. Nothing is faked for it; it is exercised only
on a GPU node. gguf needs llama.cpp's tools, also absent here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from factory.errors import StageFailed
from stations import quant
from tests.linekit import make_root
from tests.stationkit import Reports, make_ctx
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(quant.cuda_present(), reason="these check a node WITHOUT a CUDA GPU")


def test_supported_here_refuses_bnb_without_cuda_and_names_the_need():
    for fmt in ("safetensors", "bnb-nf4"):
        reason = quant.supported_here({"type": "quant", "format": fmt, "quantTypes": ["nf4"]})
        assert "CUDA GPU" in reason and "bitsandbytes" in reason


def test_supported_here_refuses_gguf_without_llama_cpp(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no llama.cpp tools
    reason = quant.supported_here({"type": "quant", "format": "gguf", "quantTypes": ["Q4_K_M"]})
    assert "convert_hf_to_gguf.py" in reason and "llama-quantize" in reason


def test_supported_here_refuses_unknown_formats():
    assert "'mlx' is not supported" in quant.supported_here({"format": "mlx"})


def test_gguf_is_offered_where_the_tools_are_on_path(monkeypatch, tmp_path):
    for tool in ("convert_hf_to_gguf.py", "llama-quantize"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert quant.supported_here({"format": "gguf", "quantTypes": ["Q8_0"]}) is None


def test_supported_here_does_not_import_torch():
    code = ("import sys, stations.quant as q; q.supported_here({'format': 'bnb-nf4'}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_run_stage_fails_with_unsupported_here_before_loading(tmp_path):
    root = make_root(tmp_path / "root")
    build_tiny_model("llama", root / "models" / "m")
    alloy = {"name": "q", "version": "1.0.0", "source": {"baseModel": "models/m", "architecture": "llama"},
             "stages": [{"type": "quant", "format": "bnb-nf4", "quantTypes": ["nf4"]}]}
    reports = Reports()
    ctx = make_ctx(root, alloy, 0, reports=reports)
    with pytest.raises(StageFailed, match="unsupported here: .*CUDA GPU"):
        quant.run_stage(ctx)
    assert reports.events("model/load") == []
    assert list(ctx.stage_dir.iterdir()) == []
