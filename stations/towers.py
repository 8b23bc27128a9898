"""Non-text towers (vision, audio, speech): found, fingerprinted, proven unchanged.

A multimodal checkpoint is a text decoder plus towers that read (or speak)
other modalities. The compression stations rewrite the decoder; a stage that
touched a tower by accident (a LoRA target that also matches the vision
MLP's `gate_proj`, a quantizer that rounds every Linear) would ship a model
that still loads but no longer sees. So the `modality` stage records every
tower tensor's sha256 over its raw bytes, and `prove_towers`, run on each
model a later stage writes, re-hashes them and fails the stage naming the
first tensor that moved.

Where a tower lives: the family spec's `towers` when it lists them (the
adapters are the one home for tensor names); otherwise `FALLBACK_TOWERS`.
Tensors are matched by their name
*inside* the tower, so a stage that re-saves a checkpoint under the newer
layout (`visual.` becomes `model.visual.` on a transformers 5 save) is still
proven against the same bytes.

Everything is read from safetensors headers and byte ranges, streaming: no
torch, no tensor held in memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import family_for_config
from adapters.schema import Family, Tower
from factory.errors import CheckpointError, StageFailed, UnknownArchitectureError
from factory.integrity import sha256_file
from factory.model_files import CheckpointInfo, inspect_checkpoint, open_checked
from factory.stages import StageContext
from stations.base import latest

TOWERS = "towers"
"""The metrics key a stage records towers under (and prove_towers looks for)."""

RECORD_FILE = "towers.json"
_CHUNK = 16 * 2**20  # bytes read at a time while hashing a tensor


# Used only when the family spec lists no towers: the layouts transformers
# writes for the Qwen-VL, Qwen-Omni and LLaVA-style families, old and new.
FALLBACK_TOWERS: tuple[Tower, ...] = (
    Tower(name="vision", modality="vision", prefixes=("thinker.visual.", "model.visual.", "visual.",
                                                      "model.vision_tower.", "vision_tower.", "model.vision_model.",
                                                      "vision_model.")),
    Tower(name="vision_projector", modality="vision",
          prefixes=("model.multi_modal_projector.", "multi_modal_projector.")),
    Tower(name="audio", modality="audio", prefixes=("thinker.audio_tower.", "model.audio_tower.", "audio_tower.")),
    Tower(name="talker", modality="speech", prefixes=("talker.",)),
    Tower(name="token2wav", modality="speech", prefixes=("token2wav.",)),
)


def tower_specs(family: Family | None) -> tuple[Tower, ...]:
    """The towers to look for: the family's own list, else the fallback.
    A text-only family (no towers) still gets the fallback: a checkpoint
    with a tower its spec does not know is exactly what must be caught."""
    return family.towers if family is not None and family.towers else FALLBACK_TOWERS


@dataclass(frozen=True)
class FoundTower:
    spec: Tower
    prefix: str  # the spelling this checkpoint uses
    names: tuple[str, ...]  # full tensor names, sorted


def find_towers(names: list[str] | set[str], family: Family | None) -> dict[str, FoundTower]:
    """tower name -> what of it a checkpoint holds (towers it lacks are absent)."""
    found = {}
    for spec in tower_specs(family):
        for prefix in spec.prefixes:
            held = sorted(n for n in names if n.startswith(prefix))
            if held:
                found[spec.name] = FoundTower(spec, prefix, tuple(held))
                break
    return found


# ── hashing tensors by byte range ───────────────────────────────────────────


def _data_ranges(path: Path, model_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (first byte, end byte) in the file, for one safetensors file.

    The header was already checked by `inspect_checkpoint` (sizes, bounds),
    so only the offsets are read here: they are absolute after the 8-byte
    length and the header itself.
    """
    with open_checked(path, model_dir=model_dir) as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    return {name: (base + entry["data_offsets"][0], base + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


def _sha256_range(path: Path, model_dir: Path, begin: int, end: int) -> str:
    digest = hashlib.sha256()
    with open_checked(path, model_dir=model_dir) as fh:
        fh.seek(begin)
        left = end - begin
        while left:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                raise CheckpointError(path, f"ends before byte {end}", "the file is truncated; re-save it")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def tensor_records(info: CheckpointInfo, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """name -> {"sha256", "dtype", "shape"} of the raw bytes of each tensor."""
    ranges: dict[str, dict[str, tuple[int, int]]] = {}
    records = {}
    for name in names:
        meta = info.tensors[name]
        if meta.file not in ranges:
            ranges[meta.file] = _data_ranges(info.model_dir / meta.file, info.model_dir)
        begin, end = ranges[meta.file][name]
        records[name] = {"sha256": _sha256_range(info.model_dir / meta.file, info.model_dir, begin, end),
                         "dtype": meta.dtype, "shape": list(meta.shape)}
    return records


def _inspect(model_dir: Path, what: str) -> tuple[CheckpointInfo, Family | None]:
    try:
        info = inspect_checkpoint(model_dir)
    except CheckpointError as err:
        raise StageFailed(f"{what}: {err}") from err
    try:
        family = family_for_config(info.config)
    except UnknownArchitectureError:
        family = None  # the fallback prefixes still find the towers
    return info, family


def record_towers(model_dir: Path) -> dict[str, dict[str, Any]]:
    """Every non-text tower of the checkpoint in `model_dir`, fingerprinted:
    tower -> {"modality", "prefix", "tensors": {name inside the tower: record}}."""
    info, family = _inspect(model_dir, f"cannot read the towers of {model_dir}")
    out = {}
    for name, tower in find_towers(set(info.tensors), family).items():
        records = tensor_records(info, tower.names)
        out[name] = {"modality": tower.spec.modality, "prefix": tower.prefix,
                     "tensors": {full[len(tower.prefix):]: rec for full, rec in records.items()}}
    return out


# ── proving ─────────────────────────────────────────────────────────────────


def _recorded(ctx: StageContext) -> tuple[dict, dict[str, dict[str, Any]]] | None:
    """(checkpoint entry, tower record) of the newest stage that recorded
    towers; the record file must still hash to what that stage wrote."""
    found = latest(ctx, TOWERS)
    if found is None:
        return None
    entry, summary = found
    path = ctx.work_dir / summary["file"]
    where = f"stage {entry.get('index')} ({entry.get('type')})"
    try:
        actual = sha256_file(path)
    except OSError as err:
        raise StageFailed(f"the tower record {path} that {where} wrote cannot be read ({err}); "
                          f"re-run the part from {where}") from err
    if actual != summary["sha256"]:
        raise StageFailed(f"the tower record {path} that {where} wrote has changed (sha256 {actual} != "
                          f"{summary['sha256']}); re-run the part from {where}")
    return entry, json.loads(path.read_text())[TOWERS]


def _tower_prefix(tower: str, recorded_prefix: str, names: set[str], family: Family | None) -> str | None:
    """The prefix `tower` lives under in the new checkpoint: the recorded one
    when it is still used, else another spelling of the same tower."""
    if any(n.startswith(recorded_prefix) for n in names):
        return recorded_prefix
    found = find_towers(names, family).get(tower)
    return found.prefix if found else None


def _differences(record: dict[str, Any], now: dict[str, Any]) -> str | None:
    for field in ("dtype", "shape", "sha256"):
        if record[field] != now[field]:
            return f"{field} {now[field]} != recorded {record[field]}"
    return None


def prove_towers(ctx: StageContext, model_dir: Path) -> dict[str, Any] | None:
    """Prove every tower tensor an earlier stage recorded is in `model_dir`
    bit for bit; raise StageFailed naming the tensors that moved or went
    missing. None when no earlier stage recorded towers."""
    found = _recorded(ctx)
    if found is None:
        return None
    entry, towers = found
    here = f"stage {ctx.index} ({ctx.stage.type})"
    recorder = f"stage {entry.get('index')} ({entry.get('type')})"
    info, family = _inspect(model_dir, f"{here} wrote a model whose towers cannot be checked")
    names = set(info.tensors)
    problems: list[str] = []
    checked = nbytes = 0
    for tower, rec in towers.items():
        prefix = _tower_prefix(tower, rec["prefix"], names, family)
        if prefix is None:
            problems.append(f"the whole {tower} tower ({len(rec['tensors'])} tensors under {rec['prefix']!r}) "
                            "is missing")
            continue
        problems += [f"{prefix + rel} is missing" for rel in rec["tensors"] if prefix + rel not in names]
        present = tuple(prefix + rel for rel in rec["tensors"] if prefix + rel in names)
        for name, now in tensor_records(info, present).items():
            diff = _differences(rec["tensors"][name[len(prefix):]], now)
            if diff:
                problems.append(f"{name} changed ({diff})")
        checked += len(present)
        nbytes += sum(info.tensors[name].nbytes for name in present)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise StageFailed(f"{here} changed the non-text towers {recorder} recorded, in {model_dir}: {shown}; "
                          f"a stage must leave every tower bit-exact: keep tower tensors out of its targets")
    return {"recorded_by": entry.get("index"), "towers": sorted(towers), "tensors": checked, "bytes": nbytes}
