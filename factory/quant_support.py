"""Can this node write a quant format? Answered from the filesystem, PATH
and package metadata only, never by importing torch or a converter, so the
intake gate and `factory plan` can ask before a part is queued.

Each probe returns why the node cannot write its format (naming what
provides it), or None when it can; `factory.catalog.QUANT_FORMATS` names
them per format, next to the station function that writes the format. The
quant station asks again in the part's child process, with torch, as the
second line of defence.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sys
from pathlib import Path

GGUF_CONVERTER = "convert_hf_to_gguf.py"  # llama.cpp's HF -> f16 GGUF converter
GGUF_QUANTIZE = "llama-quantize"  # llama.cpp's f16 GGUF -> Q4_K_M, Q8_0, ... tool
MLX_PACKAGE = "mlx-lm"  # its mlx_lm.convert writes quantized MLX weights
ONNX_PACKAGES = ("optimum-onnx", "onnxruntime")  # the exporter, and the runtime that checks its output


def cuda_present() -> bool:
    """An NVIDIA driver is loaded (read from /proc and /dev, not from torch)."""
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def installed(distribution: str) -> bool:
    """The distribution is installed (its metadata is there; nothing is imported)."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def bnb_problem() -> str | None:
    """bitsandbytes NF4 (formats safetensors, bnb-nf4, bnb-4bit): it
    quantizes on CUDA only."""
    if not cuda_present():
        return ("bitsandbytes 4-bit quantization needs a CUDA GPU and this node has none "
                "(no NVIDIA driver loaded); run this part on a GPU node")
    if not installed("bitsandbytes"):
        return "bitsandbytes 4-bit quantization needs the bitsandbytes package: pip install bitsandbytes"
    return None


def gguf_problem() -> str | None:
    """GGUF: llama.cpp's converter and quantizer, both on PATH."""
    missing = [tool for tool in (GGUF_CONVERTER, GGUF_QUANTIZE) if shutil.which(tool) is None]
    if missing:
        return (f"gguf needs llama.cpp's {' and '.join(missing)} on PATH, not found on this node; "
                f"build llama.cpp (https://github.com/ggml-org/llama.cpp) and put {GGUF_CONVERTER} and "
                f"{GGUF_QUANTIZE} on PATH")
    return None


def mlx_problem() -> str | None:
    """MLX: Apple's array framework runs on Apple silicon under macOS only."""
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return (f"mlx needs Apple silicon (macOS on arm64) and this node is {sys.platform} on "
                f"{platform.machine()}; run this part on a Mac with an M-series chip and {MLX_PACKAGE} "
                f"installed (pip install {MLX_PACKAGE})")
    if not installed(MLX_PACKAGE):
        return f"mlx needs the {MLX_PACKAGE} package (its mlx_lm.convert): pip install {MLX_PACKAGE}"
    return None


def onnx_problem() -> str | None:
    """ONNX: Hugging Face's exporter, and ONNX Runtime to check what it wrote."""
    missing = [name for name in ONNX_PACKAGES if not installed(name)]
    if missing:
        return (f"onnx needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, "
                f"not installed on this node: pip install {' '.join(missing)}")
    return None
