"""What a checkpoint directory holds, read without allocating the model.

The daemon must size, route and sanity-check a model before any process
loads it: a wrong or hostile ``config.json`` (``hidden_size: 10**9``) should be
refused from the config alone, and memory planning needs the *measured*
bytes, not a guess from the repo name. So this module reads only
``config.json``, ``model.safetensors.index.json`` and each safetensors
header (an 8-byte little-endian length, then that many bytes of JSON) and
never touches tensor data, torch or transformers.
"""

from __future__ import annotations

import json
import math
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.schema import Family, template_regex
from factory.errors import CheckpointError  # noqa: F401 - re-exported

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
"""Weights that torch.load would unpickle (arbitrary code): stations refuse them."""

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors format's own cap on header size; larger means corrupt."""

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


# -- reading --------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Tensor metadata of one safetensors file; reads only its header.

    Every tensor's byte range is checked against the file size and against
    shape x dtype, so a truncated download fails here, not mid-load.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, "shorter than a safetensors header", "re-download the file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(path, f"header length {header_len} is impossible for a {size}-byte file",
                                  "the file is corrupt or not safetensors; re-download it")
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as err:
            raise CheckpointError(path, f"header is not JSON ({err})", "re-download the file") from err
    data_bytes = size - 8 - header_len
    return {name: _tensor_meta(path, name, entry, data_bytes)
            for name, entry in header.items() if name != "__metadata__"}


def _tensor_meta(path: Path, name: str, entry: dict[str, Any], data_bytes: int) -> TensorMeta:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(path, f"header entry {name!r} is malformed ({entry!r})",
                              "re-download the file") from err
    if not 0 <= begin <= end <= data_bytes:
        raise CheckpointError(path, f"tensor {name!r} spans bytes {begin}..{end} of a {data_bytes}-byte data section",
                              "the file is truncated; re-download it")
    expected = DTYPE_BYTES.get(dtype)
    if expected is not None and math.ceil(math.prod(shape) * expected) != end - begin:
        raise CheckpointError(path, f"tensor {name!r} {dtype}{list(shape)} should take "
                              f"{math.ceil(math.prod(shape) * expected)} bytes, header says {end - begin}",
                              "the file is corrupt; re-download it")
    return TensorMeta(dtype=dtype, shape=shape, nbytes=end - begin, file=path.name)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(path, "missing", "a Hugging Face checkpoint needs its config.json") from err
    except ValueError as err:
        raise CheckpointError(path, f"not valid JSON ({err})", "fix or re-download config.json") from err
    if not isinstance(config, dict):
        raise CheckpointError(path, "is not a JSON object", "fix or re-download config.json")
    return config


def _read_index(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / INDEX_FILE
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise CheckpointError(path, "has no valid weight_map", "fix or re-download the index") from err
    return index


def inspect_checkpoint(model_dir: Path) -> CheckpointInfo:
    """Config, tensor names, dtypes, shapes and measured bytes of a
    checkpoint, from headers only.

    With an index, exactly the shards it names are read (a directory may
    hold stale shards) and every indexed tensor must be in its shard.
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
        if not path.exists():
            raise CheckpointError(path, f"listed in {INDEX_FILE} but missing", "finish the download")
        tensors.update(read_safetensors_header(path))
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
            raise CheckpointError(model_dir / INDEX_FILE, f"maps {name!r} to {file}, which does not hold it",
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
    """Whether lm_head shares the embedding. The top-level key wins: VL
    configs may say ``true`` in text_config yet save a separate lm_head."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return bool(family.read(config, "tie_word_embeddings"))


def _attention_params(config: dict[str, Any], family: Family, layer_type: str | None) -> int:
    hidden = _int(family, config, "hidden_size") or 0
    heads = _int(family, config, "num_attention_heads") or 0
    text = family.text_config(config)
    if layer_type in family.attention.skip_layer_types and text.get("linear_num_value_heads"):
        # Gated DeltaNet: qkv + z + out projections, per-head a/b gates.
        k = text.get("linear_num_key_heads", 0) * text.get("linear_key_head_dim", 0)
        v = text["linear_num_value_heads"] * text.get("linear_value_head_dim", 0)
        return hidden * (2 * k + v) + 2 * hidden * v + 2 * hidden * text["linear_num_value_heads"]
    if family.attention.kind == "mla":
        qk = (text.get("qk_nope_head_dim") or 0) + (text.get("qk_rope_head_dim") or 0)
        q_rank, kv_rank = text.get("q_lora_rank"), text.get("kv_lora_rank") or 0
        q = hidden * q_rank + q_rank * heads * qk if q_rank else hidden * heads * qk
        kv = hidden * (kv_rank + (text.get("qk_rope_head_dim") or 0))
        kv += kv_rank * heads * ((text.get("qk_nope_head_dim") or 0) + (text.get("v_head_dim") or 0))
        return q + kv + heads * (text.get("v_head_dim") or 0) * hidden
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
    expect = {spec.q_proj: (q_rows, None), spec.o_proj: (hidden, o_cols)}
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
