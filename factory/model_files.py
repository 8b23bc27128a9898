"""What a checkpoint directory holds, read without allocating the model.

The daemon must size, route and sanity-check a model before any process
loads it: a wrong or hostile ``config.json`` (``hidden_size: 10**9``) should be
refused from the config alone, and memory planning needs the *measured*
bytes, not a guess from the repo name. So this module reads only
``config.json``, ``model.safetensors.index.json`` and each safetensors
header (an 8-byte little-endian length, then that many bytes of JSON) and
never touches tensor data, torch or transformers.

A checkpoint directory is other people's input, so every file read here is
checked first (``checked_file``): a FIFO would block ``open`` forever, a
device could be endless, a symlink could lead anywhere on the node. And
``check_model_dir`` is the one verdict on a model directory that both
``factory plan`` and the stations' loader act on, so a model the plan would
refuse is never loaded (with randomly initialised layers) by a part.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from adapters.registry import family_for_config
from adapters.schema import Family, template_regex
from factory.durable import file_kind
from factory.errors import CheckpointError, UnknownArchitectureError, excerpt  # noqa: F401 - re-exported

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
"""Weights that torch.load would unpickle (arbitrary code): stations refuse them."""

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors format's own cap on header size; larger means corrupt."""

MAX_JSON_BYTES = 64 * 1024 * 1024
"""Cap on config.json and the index: real ones are KBs (a 1T-parameter
model's index is a few MB); a bigger file is not a checkpoint's, and is not
read into memory."""


DTYPE_BYTES: dict[str, float] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
    "F4": 0.5,
}

# Absurdity limits: a config past these is refused before anything is built.
MAX_PARAMS = 2 * 10**12  # 2T parameters: several times the largest open MoE
MAX_HIDDEN_SIZE = 10**6  # largest real models sit near 2e4
MAX_LAYERS = 10_000
MAX_VOCAB = 10**7  # real vocabularies stay under ~1e6
MAX_EXPERTS = 100_000


@dataclass(frozen=True)
class TensorMeta:
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    nbytes: int  # measured from the header's data offsets
    file: str  # file name inside the checkpoint directory

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class CheckpointInfo:
    model_dir: Path
    config: dict[str, Any]
    model_type: str | None
    tensors: dict[str, TensorMeta]
    total_bytes: int  # sum of measured tensor bytes (headers excluded)
    files: tuple[str, ...]  # safetensors files read, in order
    has_pickle_weights: bool
    index: dict[str, Any] | None = None  # parsed model.safetensors.index.json
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def bytes_at_16bit(self) -> int:
        """Weight bytes once loaded in bf16/fp16: what memory planning needs
        whatever dtype the files hold (fp32 checkpoints halve)."""
        return 2 * self.param_count


# -- safe opening ----------------------------------------------------------
def _allowed_dirs(model_dir: Path) -> tuple[Path, ...]:
    """Where a checkpoint's files may really live: the model directory and,
    for a Hugging Face cache snapshot (<repo>/snapshots/<commit>/), the
    repo's blobs/ its files link into."""
    real = Path(os.path.realpath(model_dir))
    if real.parent.name == "snapshots":
        return real, real.parent.parent / "blobs"
    return (real,)


def _real_inside(path: Path, model_dir: Path) -> Path:
    """The real path behind `path`, refused if a symlink leads out of the
    model directory (and its HF blobs)."""
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(d) for d in _allowed_dirs(model_dir)):
        raise CheckpointError(path, f"is a symlink to {real}, outside the model directory {model_dir}",
                              "copy the file into the model directory: a checkpoint must not point elsewhere "
                              "on the node")
    return real


def checked_file(path: Path, *, model_dir: Path) -> Path:
    """The real path of checkpoint file `path`, refused (CheckpointError,
    naming the file, what it is and the fix) unless it is a regular file
    inside `model_dir`. lstat first: nothing is opened to find out what it
    is. FileNotFoundError when there is no such file."""
    mode = os.lstat(path).st_mode
    real = path
    if stat.S_ISLNK(mode):
        real = _real_inside(path, model_dir)
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError as err:
            raise CheckpointError(path, f"is a dangling symlink (to {real})", "finish the download") from err
    kind = file_kind(mode)
    if kind is not None:
        raise CheckpointError(path, f"is {kind}, not a regular file",
                              "replace it with the real file (re-download or re-save the checkpoint)")
    return real


def open_checked(path: Path, *, model_dir: Path) -> BinaryIO:
    """`path` opened for reading after `checked_file` accepted it."""
    real = checked_file(path, model_dir=model_dir)
    # RACE: the file can be swapped between the check and the open. O_NONBLOCK
    # keeps a FIFO put there meanwhile from blocking the open, O_NOFOLLOW
    # refuses a symlink, and fstat checks what was actually opened.
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise CheckpointError(path, f"is {kind}, not a regular file", "replace it with the real file")
    return os.fdopen(fd, "rb")


def _read_json(path: Path, *, model_dir: Path) -> Any:
    """A checkpoint JSON file, read only if it is a regular file of at most
    MAX_JSON_BYTES. ValueError if it is not JSON."""
    with open_checked(path, model_dir=model_dir) as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(path, f"is over {MAX_JSON_BYTES // 2**20} MiB, far more than any real checkpoint's",
                              "replace it with the checkpoint's own file")
    try:
        return json.loads(raw)
    except RecursionError as err:  # `[[[[...` a hundred thousand deep
        raise ValueError("nested too deeply to be a checkpoint file") from err


# -- reading --------------------------------------------------------------
def read_safetensors_header(path: Path, *, model_dir: Path | None = None) -> dict[str, TensorMeta]:
    """Tensor metadata of one safetensors file; reads only its header.

    The file must be regular and inside `model_dir` (default: its own
    directory), and its header at most MAX_HEADER_BYTES. Every tensor's byte
    range is checked against the file size and against shape x dtype, so a
    truncated download fails here, not mid-load.
    """
    with open_checked(path, model_dir=model_dir or path.parent) as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, "shorter than a safetensors header", "re-download the file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(path, f"header length {header_len} is over the safetensors limit of "
                                        f"{MAX_HEADER_BYTES} bytes", "the file is corrupt or not safetensors; "
                                                                      "re-download it")
        if header_len > size - 8:
            raise CheckpointError(path, f"header length {header_len} is impossible for a {size}-byte file",
                                  "the file is corrupt or not safetensors; re-download it")
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, RecursionError) as err:
            raise CheckpointError(path, f"header is not JSON ({type(err).__name__})", "re-download the file") from err
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object", "re-download the file")
    data_bytes = size - 8 - header_len
    return {name: _tensor_meta(path, name, entry, data_bytes)
            for name, entry in header.items() if name != "__metadata__"}


def _ints(values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def _tensor_meta(path: Path, name: str, entry: dict[str, Any], data_bytes: int) -> TensorMeta:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if not isinstance(dtype, str) or not _ints(shape) or not _ints((begin, end)):
            raise TypeError("dtype must be a string, shape and data_offsets non-negative integers")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(path, f"header entry {excerpt(name)} is malformed ({excerpt(entry)})",
                              "re-download the file") from err
    name = excerpt(name)
    if not 0 <= begin <= end <= data_bytes:
        raise CheckpointError(path, f"tensor {name} spans bytes {begin}..{end} of a {data_bytes}-byte data section",
                              "the file is truncated; re-download it")
    expected = DTYPE_BYTES.get(dtype)
    if expected is not None and math.ceil(math.prod(shape) * expected) != end - begin:
        raise CheckpointError(path, f"tensor {name} {excerpt(dtype)}{list(shape)[:8]} should take "
                              f"{math.ceil(math.prod(shape) * expected)} bytes, header says {end - begin}",
                              "the file is corrupt; re-download it")
    return TensorMeta(dtype=dtype, shape=shape, nbytes=end - begin, file=path.name)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = _read_json(path, model_dir=Path(model_dir))
    except CheckpointError:  # a ValueError too, and already says what is wrong
        raise
    except FileNotFoundError as err:
        raise CheckpointError(path, "missing", "a Hugging Face checkpoint needs its config.json") from err
    except ValueError as err:
        raise CheckpointError(path, f"not valid JSON ({err})", "fix or re-download config.json") from err
    if not isinstance(config, dict):
        raise CheckpointError(path, "is not a JSON object", "fix or re-download config.json")
    return config


def _read_index(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / INDEX_FILE
    if not os.path.lexists(path):
        return None
    try:
        index = _read_json(path, model_dir=model_dir)
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise CheckpointError(path, "has no valid weight_map", "fix or re-download the index") from err
    for name, file in weight_map.items():
        if not (isinstance(file, str) and file.endswith(".safetensors") and Path(file).name == file
                and not file.startswith(".")):
            raise CheckpointError(path, f"weight_map[{excerpt(name)}] = {excerpt(file)} is not a shard file name in the model "
                                        "directory", "fix or re-download the index (shards are "
                                                     "'model-00001-of-0000N.safetensors' beside it)")
    return index


def inspect_checkpoint(model_dir: Path) -> CheckpointInfo:
    """Config, tensor names, dtypes, shapes and measured bytes of a
    checkpoint, from headers only.

    With an index, exactly the shards it names are read (a directory may
    hold stale shards) and every indexed tensor must be in its shard. A
    shard that is not a regular file inside the directory is refused before
    it is opened (`checked_file`).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    index = _read_index(model_dir)
    if index is not None:
        files = tuple(sorted(set(index["weight_map"].values())))
    else:
        files = tuple(sorted(p.name for p in model_dir.glob("*.safetensors")))
    tensors: dict[str, TensorMeta] = {}
    for name in files:
        path = model_dir / name
        if not os.path.lexists(path):
            raise CheckpointError(path, f"listed in {INDEX_FILE} but missing", "finish the download")
        tensors.update(read_safetensors_header(path, model_dir=model_dir))
    if index is not None:
        _check_index_matches(model_dir, index, tensors)
    by_dtype: dict[str, int] = defaultdict(int)
    for meta in tensors.values():
        by_dtype[meta.dtype] += meta.nbytes
    return CheckpointInfo(
        model_dir=model_dir,
        config=config,
        model_type=config.get("model_type"),
        tensors=tensors,
        total_bytes=sum(by_dtype.values()),
        files=files,
        has_pickle_weights=any(p.suffix in PICKLE_SUFFIXES for p in model_dir.iterdir()),
        index=index,
        bytes_by_dtype=dict(by_dtype),
    )


def _check_index_matches(model_dir: Path, index: dict[str, Any], tensors: dict[str, TensorMeta]) -> None:
    for name, file in index["weight_map"].items():
        if name not in tensors or tensors[name].file != file:
            raise CheckpointError(model_dir / INDEX_FILE, f"maps {excerpt(name)} to {excerpt(file)}, which does not hold it",
                                  "the index and shards are from different saves; re-download")


# -- config sanity (no tensors needed) --------------------------------------
def _int(family: Family, config: dict[str, Any], field_name: str) -> int | None:
    value = family.read(config, field_name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def estimate_params_from_config(config: dict[str, Any], family: Family) -> int:
    """Parameter count implied by the config alone, counting every expert.

    Embeddings, attention, (gated) MLPs, routers, shared experts and norms;
    ignores biases and vision towers. Within a few percent for the
    families in the registry (e.g. Qwen3-30B-A3B -> 30.5e9, OLMoE -> 6.9e9).
    """
    hidden = _int(family, config, "hidden_size") or 0
    layers = _int(family, config, "num_hidden_layers") or 0
    vocab = _int(family, config, "vocab_size") or 0
    tied = _tied(config, family)
    moe_layers = set(family.moe_layers(config))
    types = family.layer_types(config) or []
    total = vocab * hidden * (1 if tied else 2) + hidden
    for layer in range(layers):
        layer_type = types[layer] if layer < len(types) else None
        total += _attention_params(config, family, layer_type) + 2 * hidden
        total += _moe_params(config, family) if layer in moe_layers else 3 * hidden * (_int(family, config, "intermediate_size") or 0)
    return total


def _tied(config: dict[str, Any], family: Family) -> bool:
    """Whether lm_head shares the embedding. The outermost config that says
    wins: VL configs may say ``true`` in text_config yet save a separate
    lm_head, and Omni's thinker_config says ``false`` above its text_config."""
    node = config
    for part in [""] + (family.config.text_config or "").split(".")[:-1]:
        node = node.get(part, {}) if part else node
        if isinstance(node, dict) and node.get("tie_word_embeddings") is not None:
            return bool(node["tie_word_embeddings"])
    return bool(family.read(config, "tie_word_embeddings"))


def _attention_params(config: dict[str, Any], family: Family, layer_type: str | None) -> int:
    hidden = _int(family, config, "hidden_size") or 0
    heads = _int(family, config, "num_attention_heads") or 0
    raw = family.text_config(config)

    def text(key: str) -> int:  # a hostile config's "x" or 1e300 counts as absent, never multiplied
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40 else 0

    if layer_type in family.attention.skip_layer_types and text("linear_num_value_heads"):
        # Gated DeltaNet: qkv + z + out projections, per-head a/b gates.
        k = text("linear_num_key_heads") * text("linear_key_head_dim")
        v = text("linear_num_value_heads") * text("linear_value_head_dim")
        return hidden * (2 * k + v) + 2 * hidden * v + 2 * hidden * text("linear_num_value_heads")
    if family.attention.kind == "mla":
        qk = text("qk_nope_head_dim") + text("qk_rope_head_dim")
        q_rank, kv_rank = text("q_lora_rank"), text("kv_lora_rank")
        q = hidden * q_rank + q_rank * heads * qk if q_rank else hidden * heads * qk
        kv = hidden * (kv_rank + text("qk_rope_head_dim"))
        kv += kv_rank * heads * (text("qk_nope_head_dim") + text("v_head_dim"))
        return q + kv + heads * text("v_head_dim") * hidden
    head_dim = family.head_dim(config) or 0
    kv_heads = _int(family, config, "num_key_value_heads") or heads
    q = hidden * heads * head_dim * family.attention.q_rows_per_head_factor
    return q + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden


def expert_width(config: dict[str, Any], family: Family) -> int:
    """FFN width of one routed expert (I in [E, 2I, H])."""
    return _int(family, config, "moe_intermediate_size") or _int(family, config, "intermediate_size") or 0


def _moe_params(config: dict[str, Any], family: Family) -> int:
    hidden = _int(family, config, "hidden_size") or 0
    experts = _int(family, config, "expert_count") or 0
    width = expert_width(config, family)
    total = experts * 3 * hidden * width + experts * hidden  # experts + router
    shared_width = _int(family, config, "shared_expert_intermediate_size")
    if shared_width:
        total += 3 * hidden * shared_width + hidden  # + its sigmoid gate
    else:
        total += (_int(family, config, "shared_expert_count") or 0) * 3 * hidden * width
    return total


def check_config_sanity(config: dict[str, Any], family: Family) -> list[str]:
    """Problems visible in the config alone: missing, non-positive,
    inconsistent or absurd geometry. Empty list means plausible."""
    problems: list[str] = []
    dims = {name: family.read(config, name) for name in
            ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}
    for name in ("num_key_value_heads", "head_dim", "intermediate_size"):
        if family.read(config, name) is not None:
            dims[name] = family.read(config, name)
    if family.is_moe:
        dims["expert_count"] = family.read(config, "expert_count")
        dims["top_k"] = family.read(config, "top_k")
    for name, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"config {_key(family, name)} must be a positive integer, got {value!r}")
    if problems:
        return problems  # the checks below need valid numbers
    limits = {"hidden_size": MAX_HIDDEN_SIZE, "num_hidden_layers": MAX_LAYERS, "vocab_size": MAX_VOCAB,
              "expert_count": MAX_EXPERTS}
    for name, limit in limits.items():
        if name in dims and dims[name] > limit:
            problems.append(f"config {_key(family, name)}={dims[name]:,} is absurd (limit {limit:,})")
    problems += _consistency_problems(dims, config, family)
    params = estimate_params_from_config(config, family)
    if params > MAX_PARAMS:
        problems.append(f"config implies {params / 1e9:,.1f}B parameters, over the {MAX_PARAMS / 1e9:,.0f}B "
                        f"limit; refusing before allocating anything")
    return problems


def _consistency_problems(dims: dict[str, int], config: dict[str, Any], family: Family) -> list[str]:
    problems = []
    heads, kv = dims["num_attention_heads"], dims.get("num_key_value_heads")
    if kv and heads % kv:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if "head_dim" not in dims and family.attention.kind == "gqa" and dims["hidden_size"] % heads:
        problems.append(f"hidden_size={dims['hidden_size']} is not divisible by num_attention_heads={heads} "
                        f"and no head_dim is given")
    if family.is_moe and dims["top_k"] > dims["expert_count"]:
        problems.append(f"top-k {dims['top_k']} exceeds the expert count {dims['expert_count']}")
    groups, topk_group = _int(family, config, "n_group"), _int(family, config, "topk_group")
    if groups and dims["expert_count"] % groups:
        problems.append(f"expert count {dims['expert_count']} is not divisible by n_group={groups}")
    if groups and topk_group and topk_group > groups:
        problems.append(f"topk_group={topk_group} exceeds n_group={groups}")
    return problems


def _key(family: Family, field_name: str) -> str:
    """The config key a field is read from, for messages ("num_experts")."""
    candidates = getattr(family.config, field_name, ()) or (field_name,)
    return "/".join(candidates)


# -- geometry: config against tensors --------------------------------------
class _Problems:
    """Collects one message per kind of problem, counting repeats, so a bad
    head count reports once, not once per layer."""

    def __init__(self) -> None:
        self._first: dict[str, str] = {}
        self._count: dict[str, int] = defaultdict(int)

    def add(self, kind: str, message: str) -> None:
        self._first.setdefault(kind, message)
        self._count[kind] += 1

    def messages(self) -> list[str]:
        return [msg if self._count[k] == 1 else f"{msg} (and {self._count[k] - 1} more like it)"
                for k, msg in self._first.items()]


def check_geometry(info: CheckpointInfo, family: Family) -> list[str]:
    """Problems where the config and the tensors on disk disagree.

    Config sanity first (an absurd config makes the rest meaningless), then
    embeddings, layer count, attention shapes and, for MoE families, that
    every configured expert and router is on disk and no extra expert is.
    """
    sanity = check_config_sanity(info.config, family)
    if sanity:
        return sanity
    problems = _Problems()
    if info.config.get("quantization_config"):
        # Pre-quantised weights (bitsandbytes, GPTQ, ...) are packed into
        # shapes the config does not describe; only the layers can be counted.
        _check_layers(info, family, problems)
        return problems.messages()
    _check_embeddings(info, family, problems)
    _check_layers(info, family, problems)
    _check_attention(info, family, problems)
    if family.moe is not None:
        _check_experts(info, family, problems)
        _check_routers(info, family, problems)
    return problems.messages()


def _check_embeddings(info: CheckpointInfo, family: Family, problems: _Problems) -> None:
    cfg = info.config
    vocab, hidden = family.read(cfg, "vocab_size"), family.read(cfg, "hidden_size")
    embed = info.tensors.get(family.tensors.embed)
    if embed is None:
        problems.add("embed", f"embedding {family.tensors.embed} is missing")
    elif embed.shape != (vocab, hidden):
        problems.add("embed", f"embedding {family.tensors.embed} is {list(embed.shape)}, "
                              f"config says vocab_size x hidden_size = [{vocab}, {hidden}]")
    head = info.tensors.get(family.tensors.lm_head)
    if head is None and not _tied(cfg, family):
        problems.add("lm_head", f"{family.tensors.lm_head} is missing and tie_word_embeddings is false")
    elif head is not None and head.shape[0] != vocab:
        problems.add("lm_head", f"{family.tensors.lm_head} has {head.shape[0]} rows, config vocab_size={vocab}")


def _check_layers(info: CheckpointInfo, family: Family, problems: _Problems) -> None:
    count = family.read(info.config, "num_hidden_layers")
    marker = template_regex(family.tensors.layer_marker)
    on_disk = {int(m["layer"]) for name in info.tensors if (m := marker.match(name))}
    missing = sorted(set(range(count)) - on_disk)
    if missing:
        problems.add("layers", f"config num_hidden_layers={count} but layers {missing[:8]} are not on disk")
    allowed = count + (_int(family, info.config, "extra_layers") or 0)
    extra = sorted(i for i in on_disk if i >= allowed)
    if extra:
        problems.add("layers", f"config num_hidden_layers={count} but layers {extra[:8]} are on disk")


def _check_attention(info: CheckpointInfo, family: Family, problems: _Problems) -> None:
    cfg, spec = info.config, family.attention
    hidden, heads = family.read(cfg, "hidden_size"), family.read(cfg, "num_attention_heads")
    if spec.kind == "mla":
        text = family.text_config(cfg)
        q_rows = heads * ((text.get("qk_nope_head_dim") or 0) + (text.get("qk_rope_head_dim") or 0))
        o_cols = heads * (text.get("v_head_dim") or 0)
        kv_rows = None
    else:
        head_dim = family.head_dim(cfg)
        q_rows = heads * head_dim * spec.q_rows_per_head_factor
        o_cols = heads * head_dim
        kv_rows = (family.read(cfg, "num_key_value_heads") or heads) * head_dim
    expect = {family.q_proj(cfg): (q_rows, None), spec.o_proj: (hidden, o_cols)}
    for template in (spec.k_proj, spec.v_proj):
        if template:
            expect[template] = (kv_rows, hidden)
    for layer in family.attention_layers(cfg):
        for template, (rows, cols) in expect.items():
            _expect_2d(info, template.replace("${layer}", str(layer)), rows, cols, template, problems)


def _expect_2d(info: CheckpointInfo, name: str, rows: int | None, cols: int | None,
               kind: str, problems: _Problems) -> None:
    meta = info.tensors.get(name)
    if meta is None:
        problems.add(kind + ":missing", f"{name} is missing")
    elif len(meta.shape) != 2 or (rows is not None and meta.shape[0] != rows) or (
            cols is not None and meta.shape[1] != cols):
        want = f"[{rows if rows is not None else '*'}, {cols if cols is not None else '*'}]"
        problems.add(kind + ":shape", f"{name} is {list(meta.shape)}, config geometry implies {want}")


def _check_experts(info: CheckpointInfo, family: Family, problems: _Problems) -> None:
    cfg = info.config
    experts = family.expert_count(cfg)
    moe_layers = family.moe_layers(cfg)
    widths = {expert_width(cfg, family), 2 * expert_width(cfg, family)}
    hidden = family.read(cfg, "hidden_size")
    layout = family.moe.experts
    for template in layout.tensors:
        regex = template_regex(template)
        found: dict[int, set[int]] = defaultdict(set)
        for name, meta in info.tensors.items():
            if m := regex.match(name):
                layer = int(m["layer"])
                found[layer].add(int(m["expert"]) if layout.kind == "per_expert" else meta.shape[0])
                if not (hidden in meta.shape[-2:] and widths & set(meta.shape[-2:])):
                    problems.add("expert:shape", f"{name} is {list(meta.shape)}, expected hidden_size={hidden} "
                                                 f"and expert width {min(widths)} (or 2x) in its last two dims")
        for layer in moe_layers:
            on_disk = found.get(layer, set())
            got = len(on_disk) if layout.kind == "per_expert" else next(iter(on_disk), 0)
            if layout.kind == "per_expert" and on_disk and on_disk != set(range(len(on_disk))):
                problems.add("expert:gap", f"layer {layer} experts on disk are not 0..N-1: {sorted(on_disk)[:8]}")
            elif got != experts:
                problems.add("expert:count", f"layer {layer} has {got} experts on disk for "
                                             f"{template.rsplit('.', 2)[-2]}, config {_key(family, 'expert_count')}={experts}")
        for layer in sorted(set(found) - set(moe_layers)):
            problems.add("expert:dense", f"layer {layer} has expert tensors on disk but the config makes it dense")


def _check_routers(info: CheckpointInfo, family: Family, problems: _Problems) -> None:
    experts = family.expert_count(info.config)
    for layer in family.moe_layers(info.config):
        for name in family.router_tensor_names(layer):
            meta = info.tensors.get(name)
            if meta is None:
                problems.add("router:missing", f"router tensor {name} is missing")
            elif meta.shape[0] != experts:
                problems.add("router:shape", f"router tensor {name} has {meta.shape[0]} rows, "
                                             f"config {_key(family, 'expert_count')}={experts}")


# -- the verdict the plan and the loader both act on --------------------------
Step = Literal["config", "family", "sanity", "files", "weights", "checkpoint", "geometry"]
SANITY_FIX = "fix config.json or re-download the checkpoint; a hostile config must not size allocations"
GEOMETRY_FIX = ("the config and the weights come from different models; re-download or re-save them together "
                "(transformers would fill what is missing with random weights)")


@dataclass(frozen=True)
class ModelProblem:
    """One reason a model directory is refused, phrased to follow the
    directory's name (the plan puts it after $.source.baseModel, the loader
    after the path)."""

    step: Step  # the check that found it (see check_model_dir)
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.problem}; fix: {self.fix}"


@dataclass(frozen=True)
class ModelCheck:
    """What `check_model_dir` found; `config`, `family` and `info` are filled
    as far as the checks got."""

    model_dir: Path
    config: dict[str, Any] | None
    family: Family | None
    info: CheckpointInfo | None
    problems: tuple[ModelProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def config_sane(self) -> bool:
        """config.json is readable, of a known family and plausible."""
        return self.family is not None and not any(p.step == "sanity" for p in self.problems)


def check_model_dir(model_dir: Path, *, allow_pickle: bool = False) -> ModelCheck:
    """Every check that can refuse a model directory from its files alone, in
    order, stopping at the first step that fails:

    1. ``config``/``family``: config.json is a readable JSON object of a
       registered family;
    2. ``sanity``: its geometry is plausible (an absurd config is refused
       before a single header is read);
    3. ``files``: no FIFO, socket or device among the directory's entries
       (transformers opens them by name and would block) and no symlink
       out of it;
    4. ``weights``: safetensors weights, or pickled ones if `allow_pickle`;
    5. ``checkpoint``: every shard's header is readable and in range;
    6. ``geometry``: config.json and the tensors agree (layer count,
       attention shapes, experts, routers): a config with more layers than
       the files would otherwise load with randomly initialised layers.

    Reads config.json, the index and the headers only; never torch.
    """
    model_dir = Path(model_dir)
    try:
        config = read_config(model_dir)
        family = family_for_config(config)
    except CheckpointError as err:
        return ModelCheck(model_dir, None, None, None, (ModelProblem(
            "config", f"the checkpoint's {CONFIG_FILE} is unusable: {err}", "fix or re-download the checkpoint"),))
    except UnknownArchitectureError as err:
        return ModelCheck(model_dir, config, None, None, (ModelProblem(
            "family", f"its {CONFIG_FILE} says model_type {err.name!r}, for which no family is registered "
                      f"(known: {', '.join(err.known)})",
            "use a checkpoint of a known family, or add a family JSON under adapters/families/"),))
    sanity = [ModelProblem("sanity", f"refused from {CONFIG_FILE} before reading tensors: {p}", SANITY_FIX)
              for p in check_config_sanity(config, family)]
    problems = sanity or _entry_problems(model_dir) or _weight_problems(model_dir, allow_pickle=allow_pickle)
    if problems:
        return ModelCheck(model_dir, config, family, None, tuple(problems))
    try:
        info = inspect_checkpoint(model_dir)
    except CheckpointError as err:
        return ModelCheck(model_dir, config, family, None, (ModelProblem(
            "checkpoint", f"the checkpoint is unreadable: {err}", "re-download or re-save the checkpoint"),))
    geometry = check_geometry(info, family) if info.tensors else []  # pickled weights: no headers to compare
    return ModelCheck(model_dir, config, family, info, tuple(
        ModelProblem("geometry", f"{CONFIG_FILE} and the tensors on disk disagree: {p}", GEOMETRY_FIX)
        for p in geometry))


def _entry_problems(model_dir: Path) -> list[ModelProblem]:
    """Special files and escaping symlinks among the directory's entries."""
    problems = []
    for entry in sorted(model_dir.iterdir()):
        try:
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                mode = os.stat(_real_inside(entry, model_dir)).st_mode
        except CheckpointError as err:
            problems.append(ModelProblem("files", f"{err.path}: {err.problem}", "copy the file into the model "
                                         "directory: a checkpoint must not point elsewhere on the node"))
            continue
        except FileNotFoundError:  # a dangling link; a shard's is reported by its header read
            continue
        kind = None if stat.S_ISDIR(mode) else file_kind(mode)
        if kind is not None:
            problems.append(ModelProblem("files", f"{entry}: is {kind}, not a regular file (opening it would "
                                                  "block or read without end)",
                                         "remove it, or replace it with the real file"))
    return problems


def _weight_problems(model_dir: Path, *, allow_pickle: bool) -> list[ModelProblem]:
    names = [p.name for p in model_dir.iterdir()]
    if INDEX_FILE in names or any(n.endswith(".safetensors") for n in names):
        return []
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles and allow_pickle:
        return []
    if pickles:
        return [ModelProblem("weights", f"holds only pickled weights ({', '.join(pickles[:3])}); loading them "
                                        "runs arbitrary code, so no station reads them",
                             "convert the checkpoint to safetensors on a trusted machine (transformers: "
                             "`model.save_pretrained(dir, safe_serialization=True)`), use a revision that ships "
                             "*.safetensors, or set [forge] allow_pickle_weights = true in factory_node.toml "
                             "if you trust the source")]
    return [ModelProblem("weights", "holds no *.safetensors weights", "finish the download or copy the weight shards")]
