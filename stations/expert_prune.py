"""expert-prune: keep the top-K routed experts of every MoE layer, streaming.

The checkpoint is rewritten shard by shard as raw bytes; no tensor is ever
materialised and torch is never imported, so peak memory is one copy buffer
(``COPY_CHUNK``) plus headers, whatever the model's size. This works because
every cut an expert prune makes is on a tensor's *first* axis, which is the
outermost one in row-major storage:

* per-expert tensors (Mixtral/PhiMoE ``w1/w2/w3``, Qwen/OLMoE/DeepSeek
  ``gate/up/down_proj``) are kept whole or dropped, and kept ones renamed;
* fused ``[E, ...]`` tensors (Granite ``input_linear``/``output_linear``,
  Qwen3-VL ``gate_up_proj``) keep the byte ranges of the kept experts' rows;
* router tensors (``gate.weight`` [E, H], DeepSeek-V3's
  ``e_score_correction_bias`` [E]) keep the kept rows;
* everything else (attention, embeddings, shared experts and their gate,
  DeepSeek's dense first layers) is copied byte for byte.

Which tensors play which role comes only from the family data
(adapters/families/*.json); a new layout is a new JSON file. Kept experts
are renumbered 0..K-1 in ascending original order, so a kept expert's
weights and its router row stay paired. Each output shard is hashed while
it is written (integrity.HashingWriter); the hashes, kept indices and the
metric go to ``prune.json`` beside the model.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

from adapters import family_for_config
from adapters.schema import Family, render, template_regex
from factory.alloy import ExpertPruneStage
from factory.durable import fsync_dir, tmp_path_for, write_json
from factory.errors import StageFailed
from factory.integrity import HashingWriter
from factory.model_files import INDEX_FILE, inspect_checkpoint
from factory.stages import StageContext, StageResult
from stations.base import copy_side_files, input_model_dir, latest, model_result, output_model_dir

FORMAT = "forge-factory/expert-prune"
VERSION = 1
IMPORTANCE_FORMAT = "forge-factory/expert-importance"
# 8 MiB: one read/write buffer is the station's whole working set; large
# enough that syscalls vanish next to disk time, small next to any node's RAM.
COPY_CHUNK = 8 << 20
CONFIG_FILE = "config.json"
# Files never copied beside the new weights: weights we rewrite, and pickle
# weights (never read, and stale once experts are gone).
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
METRICS = ("reap", "activation_count", "frequency", "gate_weight", "router_l2")
DEFAULT_METRIC = "reap"
# A forge-alloy `strategy` names the metric when the stage gives no `metric`
# (published alloys give both, and agree). Per-layer normalisation never
# changes a per-layer top-K, so the normalised strategies rank as their metric.
STRATEGY_METRICS = {
    "calibration-aware-activation-count": "activation_count",
    "activation-magnitude": "reap",
    "per-layer-normalized-router-importance": "router_l2",
    "magnitude": "router_l2",
}
# DeepSeek-V3 scores a group by the sum of its two best experts, so a group
# must keep at least two; applied to every grouped family to stay data-free.
MIN_EXPERTS_PER_GROUP = 2


# ── safetensors headers with byte offsets ──────────────────────────────────


@dataclass(frozen=True)
class SourceTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in its file
    nbytes: int


@dataclass(frozen=True)
class ShardHeader:
    file: str
    metadata: dict[str, str] | None
    tensors: list[SourceTensor]  # in data-offset order


def read_shard_header(path: Path) -> ShardHeader:
    """Names, dtypes, shapes and absolute byte ranges of one shard (header only;
    model_files.inspect_checkpoint has already checked the ranges)."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    data_start = 8 + length
    metadata = header.pop("__metadata__", None)
    tensors = [SourceTensor(name, e["dtype"], tuple(e["shape"]), data_start + e["data_offsets"][0],
                            e["data_offsets"][1] - e["data_offsets"][0]) for name, e in header.items()]
    return ShardHeader(path.name, metadata, sorted(tensors, key=lambda t: t.start))


def read_rows(path: Path, tensor: SourceTensor) -> bytes:
    """The raw bytes of a small tensor (a router), for norms and tests."""
    with path.open("rb") as fh:
        fh.seek(tensor.start)
        return fh.read(tensor.nbytes)


# ── which tensor plays which role (from the family data) ──────────────────


@dataclass(frozen=True)
class Role:
    kind: str  # "expert" (per-expert tensor), "fused" ([E, ...]), "router" (rows = experts)
    layer: int
    expert: int | None = None
    template: str | None = None


def tensor_roles(family: Family, moe_layers: list[int], experts: int) -> dict[str, Role]:
    """Every on-disk name an expert prune touches, mapped to its role."""
    moe = family.moe
    roles: dict[str, Role] = {}
    for layer in moe_layers:
        for t in moe.router:
            roles[render(t, layer=layer)] = Role("router", layer)
        for t in moe.experts.tensors:
            if moe.experts.kind == "fused":
                roles[render(t, layer=layer)] = Role("fused", layer)
                continue
            for e in range(experts):
                roles[render(t, layer=layer, expert=e)] = Role("expert", layer, e, t)
    return roles


def check_layout(family: Family, roles: dict[str, Role], shapes: dict[str, tuple[int, ...]],
                 experts: int, model_dir: Path) -> None:
    """Every tensor the family data promises must be on disk with E rows where
    rows are cut; otherwise the checkpoint is not the layout the data describes."""
    for name, role in roles.items():
        if name not in shapes:
            raise StageFailed(f"{model_dir}: tensor {name!r} ({role.kind}, layer {role.layer}) is missing, but the "
                              f"{family.name} family data (adapters/families/{family.name}.json) says it exists; "
                              "the checkpoint has another layout: add a family spec for it")
        if role.kind in ("fused", "router") and (not shapes[name] or shapes[name][0] != experts):
            raise StageFailed(f"{model_dir}: tensor {name!r} has shape {list(shapes[name])}, expected {experts} "
                              "rows (one per expert) on axis 0; the config's expert count and the weights disagree")


def stray_expert_layers(family: Family, names: list[str], moe_layers: list[int]) -> list[int]:
    """Layers holding expert tensors that the config does not call MoE layers
    (DeepSeek-V3's multi-token-prediction layer): copied unpruned, reported."""
    found = set()
    for t in family.moe.experts.tensors:
        rx = template_regex(t)
        for name in names:
            m = rx.match(name)
            if m and int(m.group("layer")) not in moe_layers:
                found.add(int(m.group("layer")))
    return sorted(found)


# ── choosing the experts ────────────────────────────────────────────────────


def metric_name(stage: ExpertPruneStage, index: int) -> str:
    """The ranking metric: `metric`, else the one `strategy` names, else DEFAULT_METRIC."""
    if stage.metric is None and stage.strategy is not None:
        if stage.strategy not in STRATEGY_METRICS:
            raise StageFailed(f"$.stages[{index}].strategy {stage.strategy!r} names no expert ranking; set "
                              f"\"metric\" to one of {', '.join(METRICS)}, or use a strategy of "
                              f"{', '.join(STRATEGY_METRICS)}, or list the experts in keepExpertIndices")
        return STRATEGY_METRICS[stage.strategy]
    name = stage.metric or DEFAULT_METRIC
    if name not in METRICS:
        raise StageFailed(f"expert-prune metric {name!r} is unknown; use one of {', '.join(METRICS)} "
                          "or list the experts in keepExpertIndices")
    return name


def router_l2_from_disk(model_dir: Path, family: Family, layer: int, info_files: dict[str, str]) -> list[float]:
    """L2 norm of each router row, read from the checkpoint (data-free, exact
    whatever dtype or quantisation the model would be loaded with)."""
    import numpy as np  # a transformers/torch dependency; cheap to import

    name = family.router_tensor_names(layer)[0]
    path = model_dir / info_files[name]
    tensor = next(t for t in read_shard_header(path).tensors if t.name == name)
    rows = _as_float64(read_rows(path, tensor), tensor.dtype, np).reshape(tensor.shape[0], -1)
    return [float(x) for x in np.sqrt((rows * rows).sum(axis=1))]


def _as_float64(raw: bytes, dtype: str, np: Any) -> Any:
    """Raw safetensors bytes as float64 (bf16 widened by hand: numpy has none)."""
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    simple = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
    if dtype not in simple:
        raise StageFailed(f"router weights are {dtype}; metric router_l2 reads F32/F16/BF16/F64 routers only: "
                          "profile the model and use metric reap or activation_count")
    return np.frombuffer(raw, dtype=simple[dtype]).astype(np.float64)


def top_experts(scores: list[float], keep: int, groups: int = 1) -> list[int]:
    """Ascending indices of the `keep` best experts; ties go to the lower index.
    With `groups` > 1 each contiguous group keeps keep/groups, so group-limited
    routing still sees whole groups after renumbering."""
    size, per_group = len(scores) // groups, keep // groups
    kept: list[int] = []
    for g in range(groups):
        members = range(g * size, (g + 1) * size)
        kept += sorted(members, key=lambda e: (-scores[e], e))[:per_group]
    return sorted(kept)


@dataclass
class GroupPlan:
    """What DeepSeek-style group-limited routing becomes after the prune."""

    groups_for_selection: int  # 1 = choose globally
    config_updates: dict[str, int] = field(default_factory=dict)
    warning: str | None = None


def plan_groups(mode: str, *, n_group: int | None, topk_group: int | None, keep: int, top_k: int) -> GroupPlan:
    """Keep whole expert groups when K allows it, else collapse to one group.

    Groups survive when K is a multiple of n_group, each group keeps at least
    MIN_EXPERTS_PER_GROUP, and the topk_group groups a token may use still
    hold top_k experts. "collapse" (or "auto" when groups cannot survive)
    sets n_group = topk_group = 1: plain top-k over the kept experts.
    """
    if not n_group or n_group <= 1:
        return GroupPlan(1)
    per_group = keep // n_group
    why = None
    if keep % n_group:
        why = f"keepExpertsPerLayer {keep} is not a multiple of n_group {n_group}"
    elif per_group < MIN_EXPERTS_PER_GROUP:
        why = f"{keep} experts in {n_group} groups leaves {per_group} per group (needs {MIN_EXPERTS_PER_GROUP})"
    elif (topk_group or n_group) * per_group < top_k:
        why = f"topk_group {topk_group} groups of {per_group} experts cannot supply top-k {top_k}"
    if mode == "preserve" and why:
        raise StageFailed(f"group-limited routing cannot be preserved: {why}; choose keepExpertsPerLayer as a "
                          f"multiple of {MIN_EXPERTS_PER_GROUP * n_group}, or set \"groupRouting\": \"collapse\"")
    if mode == "collapse" or why:
        warning = (f"n_group {n_group} / topk_group {topk_group} set to 1 / 1 (plain top-{top_k} routing over the "
                   f"kept experts): {why or 'groupRouting is collapse'}")
        return GroupPlan(1, {"n_group": 1, "topk_group": 1}, warning)
    return GroupPlan(n_group)


def _respects_groups(kept: dict[int, list[int]], experts: int, groups: int) -> bool:
    """Whether explicit indices take the same number from every expert group."""
    size = experts // groups
    return all(len({sum(1 for e in idx if e // size == g) for g in range(groups)}) == 1 for idx in kept.values())


# ── the output plan: what each output shard holds ──────────────────────────


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]  # (absolute start, length) in the source shard

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.ranges)


def _row_ranges(t: SourceTensor, rows: list[int]) -> tuple[tuple[int, int], ...]:
    """Byte ranges of `rows` on axis 0, adjacent rows merged into one range."""
    row_bytes = t.nbytes // t.shape[0]
    ranges: list[list[int]] = []
    for r in rows:
        start = t.start + r * row_bytes
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1][1] += row_bytes
        else:
            ranges.append([start, row_bytes])
    return tuple((s, n) for s, n in ranges)


def plan_tensor(t: SourceTensor, role: Role | None, kept: dict[int, list[int]]) -> OutTensor | None:
    """The output tensor for one source tensor, or None when it is dropped."""
    if role is None:
        return OutTensor(t.name, t.dtype, t.shape, ((t.start, t.nbytes),))
    keep = kept[role.layer]
    if role.kind == "expert":
        if role.expert not in keep:
            return None
        name = render(role.template, layer=role.layer, expert=keep.index(role.expert))
        return OutTensor(name, t.dtype, t.shape, ((t.start, t.nbytes),))
    return OutTensor(t.name, t.dtype, (len(keep), *t.shape[1:]), _row_ranges(t, keep))


# ── the streaming writer ────────────────────────────────────────────────────


def _header_bytes(tensors: list[OutTensor], metadata: dict[str, str] | None) -> bytes:
    """A safetensors header for tensors laid out back to back, padded with
    spaces to 8 bytes as the safetensors library writes it."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _copy_range(src: BinaryIO, start: int, length: int, dst: HashingWriter, buf: memoryview) -> None:
    src.seek(start)
    while length:
        n = src.readinto(buf[: min(length, len(buf))])
        if not n:
            raise StageFailed(f"{src.name} ended early at byte {src.tell()}; the shard is truncated: re-download it")
        dst.write(buf[:n])
        length -= n


@dataclass(frozen=True)
class WrittenShard:
    file: str
    sha256: str
    size: int
    tensors: int


def write_shard(src_path: Path, out_path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None,
                *, buf: memoryview, on_tensor: Callable[[int], None]) -> WrittenShard:
    """Write one shard: header first (every shape is known), then each tensor's
    bytes in turn, hashed as written; tmp -> fsync -> rename."""
    header = _header_bytes(tensors, metadata)
    tmp = tmp_path_for(out_path)
    with src_path.open("rb", buffering=0) as src, HashingWriter(tmp.open("wb")) as dst:
        dst.write(struct.pack("<Q", len(header)))
        dst.write(header)
        for t in tensors:
            for start, length in t.ranges:
                _copy_range(src, start, length, dst, buf)
            on_tensor(t.nbytes)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, out_path)
    return WrittenShard(out_path.name, dst.hexdigest(), dst.size, len(tensors))


# ── the station ─────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Selection:
    metric: str
    kept: dict[int, list[int]]  # layer -> ascending original indices
    importance: str | None  # path of the importance file used, relative to the work dir


def _keep_count(ctx: StageContext, explicit: dict[int, list[int]] | None) -> int:
    stage: ExpertPruneStage = ctx.stage
    keep = stage.keep_experts_per_layer if stage.keep_experts_per_layer is not None else stage.keep_experts
    if keep is None and explicit:
        keep = len(next(iter(explicit.values())))
    if keep is None:
        raise StageFailed(f"stage {ctx.index} (expert-prune) says neither keepExpertsPerLayer nor "
                          f"keepExpertIndices; add \"keepExpertsPerLayer\": <K> to $.stages[{ctx.index}]")
    return keep


def _explicit_indices(ctx: StageContext, moe_layers: list[int], experts: int) -> dict[int, list[int]] | None:
    raw = ctx.stage.keep_expert_indices  # the schema holds it as {str: [int]}
    if raw is None:
        return None
    where = f"$.stages[{ctx.index}].keepExpertIndices"
    try:
        out = {int(k): v for k, v in raw.items()}
    except ValueError as err:
        raise StageFailed(f"{where} keys must be layer numbers (\"0\", \"1\", ...): {err}") from err
    if sorted(out) != moe_layers:
        raise StageFailed(f"{where} lists layers {sorted(out)}, but the MoE layers are {moe_layers}; list each once")
    for layer, idx in out.items():
        if len(set(idx)) != len(idx) or not all(0 <= i < experts for i in idx):
            raise StageFailed(f"{where}.{layer} = {idx!r}: need distinct expert indices in 0..{experts - 1}")
    if len({len(v) for v in out.values()}) != 1:
        raise StageFailed(f"{where}: every layer must keep the same number of experts (the config holds one count)")
    return {layer: sorted(idx) for layer, idx in out.items()}


def _importance(ctx: StageContext, metric: str, moe_layers: list[int], experts: int) -> tuple[dict, str]:
    found = latest(ctx, "importance")
    if found is None:
        raise StageFailed(f"expert-prune metric {metric!r} needs an expert-activation-profile stage before it; "
                          "add one, or use metric router_l2 or keepExpertIndices (they need no profile)")
    rel = found[1]
    path = ctx.work_dir / rel
    data = json.loads(path.read_text())
    if data.get("format") != IMPORTANCE_FORMAT or data.get("version") != 1:
        raise StageFailed(f"{path} is not a version-1 {IMPORTANCE_FORMAT} file; re-run the profile stage")
    if data.get("num_experts") != experts or sorted(map(int, data.get("layers", {}))) != moe_layers:
        raise StageFailed(f"{path} profiles {data.get('num_experts')} experts on layers "
                          f"{sorted(map(int, data.get('layers', {})))}, but the model to prune has {experts} on "
                          f"{moe_layers}; profile the model this stage prunes (put the profile right before it)")
    return data, rel


def _scores(data: dict, layer: int, metric: str) -> list[float]:
    row = data["layers"][str(layer)]
    if metric == "frequency":
        total = sum(row["activation_count"]) or 1
        return [c / total for c in row["activation_count"]]
    return [float(x) for x in row[metric]]


def select_experts(ctx: StageContext, *, model_dir: Path, family: Family, moe_layers: list[int], experts: int,
                   keep: int, groups: int, explicit: dict[int, list[int]] | None,
                   weight_files: dict[str, str]) -> Selection:
    """Kept experts per layer: explicit indices, else the metric's top-K."""
    if explicit is not None:
        return Selection("explicit", explicit, None)
    metric = metric_name(ctx.stage, ctx.index)
    if metric == "router_l2":  # always from the weights being pruned, profile or not
        scores = {layer: router_l2_from_disk(model_dir, family, layer, weight_files) for layer in moe_layers}
        return Selection(metric, {layer: top_experts(s, keep, groups) for layer, s in scores.items()}, None)
    data, rel = _importance(ctx, metric, moe_layers, experts)
    return Selection(metric, {layer: top_experts(_scores(data, layer, metric), keep, groups)
                              for layer in moe_layers}, rel)


def _updated_config(config: dict, family: Family, keep: int, group_updates: dict[str, int]) -> dict:
    """config.json with every expert-count spelling the family reads set to K."""
    new = json.loads(json.dumps(config))
    text = family.text_config(new)
    keys = [k for k in family.config.expert_count if k in text] or [family.config.expert_count[0]]
    for k in keys:
        text[k] = keep
    for field_name, value in group_updates.items():
        for k in getattr(family.config, field_name):
            if k in text:
                text[k] = value
    return new


def run_stage(ctx: StageContext) -> StageResult:
    # 1. What we prune: headers and config only.
    src = input_model_dir(ctx)
    info = inspect_checkpoint(src)
    family = family_for_config(info.config)
    if not family.is_moe:
        raise StageFailed(f"{src} is a {family.name} model, which has no routed experts; "
                          "remove the expert-prune stage or point the alloy at an MoE model")
    experts, top_k = family.expert_count(info.config), family.top_k(info.config)
    moe_layers = family.moe_layers(info.config)
    weight_files = {name: meta.file for name, meta in info.tensors.items()}
    roles = tensor_roles(family, moe_layers, experts)
    check_layout(family, roles, {n: m.shape for n, m in info.tensors.items()}, experts, src)

    # 2. How many experts, and which.
    explicit = _explicit_indices(ctx, moe_layers, experts)
    keep = _keep_count(ctx, explicit)
    if explicit is not None and len(next(iter(explicit.values()))) != keep:
        raise StageFailed(f"keepExpertIndices keeps {len(next(iter(explicit.values())))} experts per layer but "
                          f"keepExpertsPerLayer says {keep}; make them agree")
    if keep > experts:
        raise StageFailed(f"keepExpertsPerLayer {keep} is more than the {experts} experts each layer has; "
                          f"keep at most {experts}")
    if top_k and top_k > keep:
        raise StageFailed(f"the router picks top-k {top_k} experts per token but keepExpertsPerLayer is {keep}; "
                          f"keep at least {top_k} experts per layer")
    mode = ctx.stage.group_routing or "auto"
    groups = plan_groups(mode, n_group=family.read(info.config, "n_group"),
                         topk_group=family.read(info.config, "topk_group"), keep=keep, top_k=top_k or 1)
    if explicit is not None and not _respects_groups(explicit, experts, groups.groups_for_selection):
        if mode == "preserve":
            raise StageFailed(f"keepExpertIndices does not keep {keep // groups.groups_for_selection} experts from each "
                              f"of the {groups.groups_for_selection} expert groups, so group-limited routing cannot "
                              "be preserved; fix the indices or set \"groupRouting\": \"collapse\"")
        groups = plan_groups("collapse", n_group=family.read(info.config, "n_group"),
                             topk_group=family.read(info.config, "topk_group"), keep=keep, top_k=top_k or 1)
    selection = select_experts(ctx, model_dir=src, family=family, moe_layers=moe_layers, experts=experts, keep=keep,
                               groups=groups.groups_for_selection, explicit=explicit, weight_files=weight_files)

    # 3. Plan every output shard (one per input shard), then stream them.
    out_dir = output_model_dir(ctx)
    shards = [read_shard_header(src / f) for f in info.files]
    plans = {s.file: [o for t in s.tensors if (o := plan_tensor(t, roles.get(t.name), selection.kept))]
             for s in shards}
    total = sum(t.nbytes for p in plans.values() for t in p)
    done = 0
    buf = memoryview(bytearray(COPY_CHUNK))

    def tick(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        ctx.progress(done, total, "bytes")
        ctx.stop_point()

    written: list[WrittenShard] = []
    for shard in shards:
        if plans[shard.file]:  # a shard of only dropped experts leaves no file
            written.append(write_shard(src / shard.file, out_dir / shard.file, plans[shard.file], shard.metadata,
                                       buf=buf, on_tensor=tick))

    # 4. Index, config, side files, the record.
    index_meta = dict((info.index or {}).get("metadata") or {})
    index_meta["total_size"] = total
    weight_map = {t.name: f for f, p in plans.items() for t in p}
    write_json(out_dir / INDEX_FILE, {"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))})
    write_json(out_dir / CONFIG_FILE, _updated_config(info.config, family, keep, groups.config_updates))
    copied = copy_side_files(src, out_dir)
    fsync_dir(out_dir)
    warnings = [w for w in [groups.warning] if w]
    stray = stray_expert_layers(family, list(info.tensors), moe_layers)
    if stray:
        warnings.append(f"layers {stray} hold expert tensors but are not MoE layers in the config (e.g. an MTP "
                        "layer); they were copied unpruned")
    record = {
        "format": FORMAT, "version": VERSION, "family": family.name, "input_model_dir": str(src),
        "metric": selection.metric, "importance": selection.importance,
        "original_experts": experts, "kept_experts": keep, "top_k": top_k,
        "kept": {str(layer): idx for layer, idx in selection.kept.items()},
        "config_updates": groups.config_updates, "copied_files": copied,
        "shards": {w.file: {"sha256": w.sha256, "size": w.size, "tensors": w.tensors} for w in written},
        "bytes_in": info.total_bytes, "bytes_out": total, "warnings": warnings,
    }
    write_json(ctx.stage_dir / "prune.json", record)
    metrics = {"prune": str((ctx.stage_dir / "prune.json").relative_to(ctx.work_dir)), "metric": selection.metric,
               "experts_before": experts, "experts_after": keep, "layers_pruned": len(moe_layers),
               "bytes_in": info.total_bytes, "bytes_out": total, "shards": len(written), "warnings": warnings}
    return model_result(ctx, out_dir, metrics, ctx.stage_dir / "prune.json")
