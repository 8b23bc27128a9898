"""The "compact" station: plasticity compaction of attention heads and MLP channels.

What each threshold means here, and why, is docs/COMPACT.md; in short:

1. **Parameters.** Five thresholds, fractions of a layer's peak importance,
   must be non-decreasing (dead <= dormant <= low <= medium <= high).
2. **Importance**, measured on calibration text in one forward pass per
   block: for query head h, the mean over tokens of ||W_o[:, h] a_h||_2 (what
   the head adds to the residual stream: head_prune's ContributionMeter);
   for MLP channel j of a dense layer, the mean of |a_j| x ||W_down[:, j]||_2
   (a_j the down_proj input, so the product is the norm of what the channel
   adds). Each layer's scores are divided by that layer's peak, heads and
   channels separately, so every threshold is a fraction of the peak.
3. **Tiers** by that fraction r: dead r < dead, dormant < dormant, low < low,
   medium < medium, high < high, peak >= high.
4. **Removal.** Configs hold one head count and one intermediate size for
   every layer, so removal is uniform: the largest (KV groups, queries per
   group) shape that removes only dead heads in every attention layer, and
   the smallest dead-channel count over the dense layers. Dead units the
   shape cannot take stay, at the dormant precision.
5. **Precision** (enableQuantization): dormant 4-bit and low 8-bit
   round-to-nearest, quantised and dequantised back into the checkpoint's
   dtype (TIER_BITS); medium, high and peak stay bit-exact. The file does not
   shrink from this: the tier's precision loss is applied so later stages
   measure it; bytes shrink by the removal here and by a quant stage later.
6. **Write**, one shard at a time: quantise unit blocks, then slice. Only
   text-decoder attention and dense-MLP tensors named by the family spec are
   touched; vision and audio towers, embeddings and experts are copied
   verbatim. `compact.json` in the stage dir records every score and tier.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.schema import Family, render, template_regex
from factory.catalog import kind_of
from factory.datasets import TRAINING_TYPES, ResolvedDataset, training_dataset
from factory.durable import write_json
from factory.errors import StageFailed
from factory.model_files import CheckpointInfo
from factory.stages import StageContext, StageResult
from stations import corpus as corpus_mod
from stations.base import copy_side_files, input_model_dir, model_result, output_model_dir, rewrite_shards
from stations.head_prune import (
    CALIBRATION_BLOCK_TOKENS,
    ContributionMeter,
    Geometry,
    HeadPlan,
    Slice,
    apply_slice,
    layer_slices,
    pruned_config,
    read_checkpoint,
)

SIDECAR = "compact.json"
TIERS = ("dead", "dormant", "low", "medium", "high", "peak")
# The alloy key of each tier's upper bound ("peak" has none: r >= highThreshold).
THRESHOLD_KEYS = ("deadThreshold", "dormantThreshold", "lowThreshold", "mediumThreshold", "highThreshold")
# Bits a kept unit of each tier is rounded to; None keeps it bit-exact.
# "dead" only applies to dead units the uniform shape could not remove.
# 4 and 8 bits are the precisions quant formats store (Q4/NF4, Q8/int8);
# medium and above carry most of a layer's output and are left alone.
TIER_BITS: dict[str, int | None] = {"dead": 4, "dormant": 4, "low": 8, "medium": None, "high": None, "peak": None}
# Weights per scale: the block size of GGUF's Q4_0/Q8_0 and a common GPTQ group.
QUANT_GROUP = 32
CORPUS_FILE_KEYS = ("calibrationCorpusFile",)
CORPUS_ID_KEYS = ("calibrationCorpus",)
# Dense MLP projections, relative to a decoder layer's prefix (every family
# the adapters know names its dense MLP this way; experts are not here).
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LAYER_MARKER_SUFFIX = "input_layernorm.weight"
BYTES_PER_GB = 10**9  # sizes in GB as alloys write them (targetSizeGb, finalSizeGb)
# Calibration blocks of CALIBRATION_BLOCK_TOKENS tokens when the stage says
# none: 200, forge-alloy's analysisSteps default for head pruning (51k
# tokens, a stable mean per head and channel; minutes on a GPU for 7B).


# ── thresholds and tiers ────────────────────────────────────────────────────


@dataclass(frozen=True)
class Thresholds:
    """Upper bounds of the tiers below "peak", as fractions of a layer's peak."""

    dead: float
    dormant: float
    low: float
    medium: float
    high: float

    def bounds(self) -> tuple[float, ...]:
        return (self.dead, self.dormant, self.low, self.medium, self.high)

    def tier(self, fraction: float) -> str:
        """The tier of a unit whose importance is `fraction` of its layer's peak."""
        for name, bound in zip(TIERS, self.bounds()):
            if fraction < bound:
                return name
        return TIERS[-1]


def read_thresholds(stage: Any, index: int) -> Thresholds:
    """The stage's thresholds, refused unless non-decreasing (each in [0, 1]
    is the schema's check)."""
    t = Thresholds(stage.dead_threshold, stage.dormant_threshold, stage.low_threshold,
                   stage.medium_threshold, stage.high_threshold)
    values = t.bounds()
    for i in range(len(values) - 1):
        if values[i] > values[i + 1]:
            raise StageFailed(
                f"$.stages[{index}].{THRESHOLD_KEYS[i]} = {values[i]} is above "
                f"$.stages[{index}].{THRESHOLD_KEYS[i + 1]} = {values[i + 1]}; the compact thresholds bound "
                f"tiers from the bottom up and must not decrease ({' <= '.join(THRESHOLD_KEYS)}): "
                "swap or fix them")
    return t


def fractions_of_peak(scores: list[float]) -> list[float]:
    """Each score over the layer's largest; a layer whose units all score 0 is all 0."""
    peak = max(scores)
    return [s / peak if peak > 0 else 0.0 for s in scores]


def tier_counts(tiers: dict[int, list[str]]) -> dict[str, int]:
    counts = dict.fromkeys(TIERS, 0)
    for layer in tiers.values():
        for t in layer:
            counts[t] += 1
    return counts


# ── which tensors: attention from the family spec, dense MLP by convention ──


def mlp_templates(family: Family) -> dict[str, str]:
    """gate/up/down weight templates, under the decoder-layer prefix the
    family's layer marker gives."""
    marker = family.tensors.layer_marker
    if not marker.endswith(LAYER_MARKER_SUFFIX):
        raise StageFailed(f"family {family.name!r}: layer marker {marker!r} does not end in "
                          f"{LAYER_MARKER_SUFFIX!r}, so compact cannot find its MLP tensors; extend the family spec")
    prefix = marker.removesuffix(LAYER_MARKER_SUFFIX)
    return {p: f"{prefix}mlp.{p}.weight" for p in MLP_PROJECTIONS}


def mlp_tensor_names(family: Family, layer: int) -> dict[str, str]:
    return {p: render(t, layer=layer) for p, t in mlp_templates(family).items()}


def dense_mlp_layers(family: Family, config: dict, info: CheckpointInfo) -> tuple[tuple[int, ...], int]:
    """(decoder layers with a dense MLP, its intermediate size). MoE layers
    are left to expert-prune; a dense layer without the tensors, or with
    other shapes than the config's intermediate_size, is refused."""
    moe = set(family.moe_layers(config))
    width = family.read(config, "intermediate_size")
    hidden = family.read(config, "hidden_size")
    layers = []
    for layer in range(family.read(config, "num_hidden_layers") or 0):
        if layer in moe:
            continue
        names = mlp_tensor_names(family, layer)
        want = {"gate_proj": (width, hidden), "up_proj": (width, hidden), "down_proj": (hidden, width)}
        for proj, name in names.items():
            meta = info.tensors.get(name)
            if meta is None or tuple(meta.shape) != want[proj]:
                got = "missing" if meta is None else list(meta.shape)
                raise StageFailed(f"layer {layer}: dense MLP tensor {name!r} is {got}, expected "
                                  f"{list(want[proj])} (intermediate_size={width}); the checkpoint does not "
                                  f"match family {family.name!r}")
        layers.append(layer)
    return tuple(layers), width


def loaded_modules(model: Any, weight_template: str, layers: tuple[int, ...]) -> dict[int, Any]:
    """The loaded module of each layer whose weight is `weight_template` on
    disk. The name is matched from `layers.` on (wrappers may prefix it);
    two matches for one layer (a tower with the same naming) are refused,
    since hooking the wrong one would score the wrong weights."""
    template = weight_template.removesuffix(".weight")
    pattern = template_regex(template[template.find("layers."):] if "layers." in template else template)
    found: dict[int, list[str]] = {}
    modules = {}
    for name, module in model.named_modules():
        m = pattern.search(name)
        if m and (name == m.group(0) or name.endswith("." + m.group(0))):
            layer = int(m.group("layer"))
            found.setdefault(layer, []).append(name)
            modules[layer] = module
    missing = [layer for layer in layers if layer not in found]
    twice = {layer: names for layer, names in found.items() if layer in layers and len(names) > 1}
    if missing or twice:
        raise StageFailed(f"loaded modules for {template!r}: missing in layers {missing}, ambiguous in {twice}; "
                          "the family spec does not describe this model's module names")
    return {layer: modules[layer] for layer in layers}


# ── importance ──────────────────────────────────────────────────────────────


class ChannelMeter:
    """Forward pre-hook on down_proj: the sum over tokens of |a_j| per channel
    (a = act(gate(x)) * up(x), the down projection's input)."""

    def __init__(self) -> None:
        self.sums: Any = None  # torch tensor [I], on the layer's device
        self.tokens = 0

    def __call__(self, module: Any, args: tuple) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])  # (N, I)
        s = x.float().abs().sum(0)
        self.sums = s if self.sums is None else self.sums + s
        self.tokens += x.shape[0]

    def means(self) -> list[float]:
        return (self.sums.cpu() / max(self.tokens, 1)).tolist()


@dataclass
class Importance:
    heads: dict[int, list[float]]  # attention layer -> mean contribution norm per query head
    channels: dict[int, list[float]]  # dense-MLP layer -> mean contribution norm per channel
    tokens: int


def down_column_norms(info: CheckpointInfo, family: Family, layers: tuple[int, ...]) -> dict[int, list[float]]:
    """||W_down[:, j]||_2 per channel, from the checkpoint (exact even when
    the model was loaded 4-bit)."""
    from safetensors import safe_open

    norms = {}
    for layer in layers:
        name = mlp_tensor_names(family, layer)["down_proj"]
        with safe_open(info.model_dir / info.tensors[name].file, "pt") as f:
            norms[layer] = f.get_tensor(name).float().norm(dim=0).tolist()
    return norms


def measure_importance(ctx: StageContext, info: CheckpointInfo, family: Family, geo: Geometry,
                       mlp_layers: tuple[int, ...], text: CalibrationText, steps: int) -> Importance:
    """Head and channel importance over `steps` calibration blocks, one
    forward pass each, every hook on at once."""
    import torch

    from stations.loader import load

    loaded = load(ctx, info.model_dir, with_tokenizer=True, purpose="compact importance")
    heads = {layer: ContributionMeter(geo.heads, geo.head_dim) for layer in geo.layers}
    channels = {layer: ChannelMeter() for layer in mlp_layers}
    down_template = mlp_templates(family)["down_proj"]
    hooked = [(m, heads[l]) for l, m in loaded_modules(loaded.model, family.attention.o_proj, geo.layers).items()]
    hooked += [(m, channels[l]) for l, m in loaded_modules(loaded.model, down_template, mlp_layers).items()]
    blocks = text.blocks(loaded.tokenizer, budget=steps * CALIBRATION_BLOCK_TOKENS)
    if not blocks:
        raise StageFailed(f"the calibration text ({text.where} = {text.ref!r}) yields no tokens; give it text")
    handles = [module.register_forward_pre_hook(meter) for module, meter in hooked]
    try:
        with torch.no_grad():
            for i, ids in enumerate(blocks):
                ctx.stop_point()
                loaded.model(input_ids=torch.tensor([ids], device=loaded.device))
                ctx.progress(i + 1, len(blocks), "blocks")
    finally:
        for h in handles:
            h.remove()
    del loaded
    norms = down_column_norms(info, family, mlp_layers)
    return Importance(
        heads={layer: m.means() for layer, m in heads.items()},
        channels={layer: [a * n for a, n in zip(m.means(), norms[layer])] for layer, m in channels.items()},
        tokens=sum(len(b) for b in blocks))


# ── removal: one shape for every layer ──────────────────────────────────────


def _groups(flags: list[bool], geo: Geometry) -> list[list[bool]]:
    return [flags[k * geo.group:(k + 1) * geo.group] for k in range(geo.kv_heads)]


def _shape_fits(dead: list[bool], geo: Geometry, kv_keep: int, q_keep: int) -> bool:
    """Whether one layer can lose only dead heads at (kv_keep, q_keep): the
    dropped KV groups are all dead, and every other group has at least
    group - q_keep dead query heads (the ones it drops)."""
    groups = _groups(dead, geo)
    whole = sum(all(g) for g in groups)
    return whole >= geo.kv_heads - kv_keep and all(all(g) or sum(g) >= geo.group - q_keep for g in groups)


def head_shape(geo: Geometry, dead: dict[int, list[bool]]) -> HeadPlan:
    """The fewest heads per layer (kv_keep x q_keep, at least 1 x 1) that
    removes only dead heads in every attention layer; among equal counts the
    one keeping more KV heads (the KV cache layout changes least). Where the
    family's config needs heads dividing hidden_size (`geo.hidden`), only
    such counts are candidates, or the compacted model would not load."""
    best = HeadPlan(geo.kv_heads, geo.group, None)
    for kv_keep in range(geo.kv_heads, 0, -1):
        for q_keep in range(geo.group, 0, -1):
            loads = not (geo.hidden and geo.hidden % (kv_keep * q_keep))
            if loads and kv_keep * q_keep < best.heads_keep and all(_shape_fits(d, geo, kv_keep, q_keep)
                                                                    for d in dead.values()):
                best = HeadPlan(kv_keep, q_keep, None)
    return best


def select_heads(scores: list[float], dead: list[bool], geo: Geometry,
                 plan: HeadPlan) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) of one layer, ascending. Dropped
    groups are all-dead ones, least important first; inside a kept group the
    most important heads stay (every live one, since the shape fits). Ties
    keep the lower index."""
    g = geo.group
    whole_dead = [k for k, flags in enumerate(_groups(dead, geo)) if all(flags)]
    dropped = sorted(whole_dead, key=lambda k: (sum(scores[k * g:(k + 1) * g]), k))[:geo.kv_heads - plan.kv_keep]
    kv = [k for k in range(geo.kv_heads) if k not in dropped]
    heads: list[int] = []
    for k in kv:
        best = sorted(range(k * g, (k + 1) * g), key=lambda h: (-scores[h], h))[:plan.q_per_group_keep]
        heads += sorted(best)
    return heads, kv


def select_channels(scores: list[float], keep: int) -> list[int]:
    """The `keep` most important channels, ascending (ties keep the lower index)."""
    return sorted(sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:keep])


# ── per-tier precision ──────────────────────────────────────────────────────


@dataclass(frozen=True)
class QuantBlock:
    """`width` consecutive rows (cut_dim 0) or columns (cut_dim 1) from
    `start` that belong to one unit, rounded to `bits`."""

    cut_dim: int
    start: int
    width: int
    bits: int
    tier: str


@dataclass
class TierError:
    """Squared error and squared norm of one tier's quantised weights."""

    params: int = 0
    sse: float = 0.0
    norm2: float = 0.0

    def relative(self) -> float | None:
        return math.sqrt(self.sse / self.norm2) if self.norm2 > 0 else None


def round_to_nearest(block: Any, bits: int, group_dim: int) -> Any:
    """Symmetric round-to-nearest, quantised and dequantised: one scale
    (absmax / (2^(bits-1) - 1)) per QUANT_GROUP consecutive weights along
    `group_dim`; the result is in `block`'s dtype."""
    import torch

    x = block.float().movedim(group_dim, -1)
    n = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, (-n) % QUANT_GROUP)).reshape(*x.shape[:-1], -1, QUANT_GROUP)
    qmax = 2 ** (bits - 1) - 1
    scale = padded.abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(padded / safe).clamp(-qmax, qmax) * scale
    return q.reshape(*x.shape[:-1], -1)[..., :n].movedim(-1, group_dim).to(block.dtype)


def apply_blocks(t: Any, blocks: list[QuantBlock], errors: dict[str, TierError]) -> Any:
    """`t` with each block rounded (groups run along the axis the unit spans
    in full: a row unit along its row, a column unit down its column)."""
    t = t.clone()
    for b in blocks:
        view = t.narrow(b.cut_dim, b.start, b.width)
        rounded = round_to_nearest(view, b.bits, group_dim=1 - b.cut_dim)
        err = errors.setdefault(b.tier, TierError())
        err.params += view.numel()
        err.sse += float((rounded.float() - view.float()).pow(2).sum())
        err.norm2 += float(view.float().pow(2).sum())
        view.copy_(rounded)
    return t


def _finest(bits: list[int | None]) -> int | None:
    """The most precise of several units' bits (None, bit-exact, wins)."""
    return None if any(b is None for b in bits) else max(bits)


def head_blocks(family: Family, layer: int, geo: Geometry, tiers: list[str], heads: list[int],
                kv: list[int]) -> dict[str, list[QuantBlock]]:
    """Blocks of the kept heads of one layer that their tier rounds: a query
    head's q rows and o_proj columns; a KV head's k/v rows (kv_b_proj rows
    under latent attention), at the finest bits of the query heads it serves."""
    att = family.attention
    q, o = render(geo.q_template, layer=layer), render(att.o_proj, layer=layer)
    kv_names = [render(t, layer=layer) for t in (att.k_proj, att.v_proj, att.kv_b_proj) if t]
    out: dict[str, list[QuantBlock]] = {}
    for h in heads:
        bits = TIER_BITS[tiers[h]]
        if bits is not None:
            out.setdefault(q, []).append(QuantBlock(0, h * geo.q_rows_per_head, geo.q_rows_per_head, bits, tiers[h]))
            out.setdefault(o, []).append(QuantBlock(1, h * geo.head_dim, geo.head_dim, bits, tiers[h]))
    for g in kv:
        members = [h for h in heads if h // geo.group == g]
        bits = _finest([TIER_BITS[tiers[h]] for h in members])
        if bits is not None:
            tier = TIERS[max(TIERS.index(tiers[h]) for h in members)]
            for name in kv_names:
                out.setdefault(name, []).append(QuantBlock(0, g * geo.kv_rows_per_head, geo.kv_rows_per_head,
                                                           bits, tier))
    return out


def channel_blocks(family: Family, layer: int, tiers: list[str], kept: list[int]) -> dict[str, list[QuantBlock]]:
    """Blocks of the kept channels of one dense MLP that their tier rounds."""
    names = mlp_tensor_names(family, layer)
    out: dict[str, list[QuantBlock]] = {}
    for j in kept:
        bits = TIER_BITS[tiers[j]]
        if bits is not None:
            for proj, cut in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                out.setdefault(names[proj], []).append(QuantBlock(cut, j, 1, bits, tiers[j]))
    return out


# ── writing ─────────────────────────────────────────────────────────────────


def write_compacted(ctx: StageContext, info: CheckpointInfo, out_dir: Path, slices: dict[str, Slice],
                    quant: dict[str, list[QuantBlock]]) -> tuple[int, int, dict[str, TierError]]:
    """Copy every shard, rounding `quant` blocks and then cutting `slices`,
    one shard in memory at a time; every other tensor is copied as it is.
    Returns (parameters written, bytes of tensor data, error per tier)."""
    errors: dict[str, TierError] = {}

    def transform(name: str, t: Any) -> Any:
        if name in quant:
            t = apply_blocks(t, quant[name], errors)
        return apply_slice(t, slices[name], pad=False) if name in slices else t

    params, size = rewrite_shards(ctx, info, out_dir, transform)
    return params, size, errors


def compacted_config(family: Family, config: dict, geo: Geometry, heads: HeadPlan, channels_kept: int | None) -> dict:
    """config.json with the new head counts (when heads went) and the new
    intermediate size (when channels went), under the keys it already uses."""
    new = pruned_config(family, config, geo, heads) if heads.heads_keep < geo.heads else copy.deepcopy(config)
    if channels_kept is not None:
        text = family.text_config(new)
        candidates = family.config.intermediate_size
        text[next((k for k in candidates if text.get(k) is not None), candidates[0])] = channels_kept
    return new


# ── calibration text ────────────────────────────────────────────────────────


@dataclass(frozen=True)
class CalibrationText:
    """The text importance is measured on: a corpus file (sha256 measured) or
    a training stage's dataset, and the place in the alloy that named it."""

    where: str  # JSON path of what named it, e.g. "$.stages[1].dataset"
    ref: str  # what it said
    corpus: corpus_mod.Corpus | None = None
    dataset: ResolvedDataset | None = None

    def blocks(self, tokenizer: Any, *, budget: int) -> list[list[int]]:
        """Token blocks within `budget`, the text read only as far as needed."""
        if self.corpus is not None:
            return corpus_mod.read_blocks(tokenizer, self.corpus, block=CALIBRATION_BLOCK_TOKENS, budget=budget)
        from stations.training_data import training_texts

        texts = training_texts(self.dataset, tokenizer, max_chars=corpus_mod.chars_for_tokens(budget))
        with closing(texts):
            return list(corpus_mod.token_blocks(tokenizer, texts, block=CALIBRATION_BLOCK_TOKENS, budget=budget))

    def record(self) -> dict[str, Any]:
        if self.corpus is not None:
            return {"from": self.where, "ref": self.ref, "kind": "corpus", "path": str(self.corpus.path),
                    "sha256": self.corpus.sha256}
        d = self.dataset
        return {"from": self.where, "ref": self.ref, "kind": f"dataset ({d.kind})", "id": d.id,
                "config": d.config, "path": None if d.path is None else str(d.path)}


def _named_keys(stage: Any, keys: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(file keys, id keys) among `keys` that `stage` sets; a key naming a
    file ends in "File" (calibrationCorpusFile, evalCorpusFile)."""
    given = tuple(k for k in keys if stage.field_value(k))
    return tuple(k for k in given if k.endswith("File")), tuple(k for k in given if not k.endswith("File"))


def _corpus_of(ctx: StageContext, j: int, keys: tuple[str, ...]) -> CalibrationText | None:
    """The corpus stage `j` names under `keys`, resolved as that stage would
    (its JSON path in messages), or None when it names none."""
    stage = ctx.recipe.stages[j]
    files, ids = _named_keys(stage, keys)
    if not (files or ids):
        return None
    other = dataclasses.replace(ctx, stage=stage, index=j)
    found = corpus_mod.resolve(other, file_keys=files or CORPUS_FILE_KEYS, id_keys=ids or CORPUS_ID_KEYS)
    key = (files or ids)[0]
    return CalibrationText(f"$.stages[{j}].{key}", str(stage.field_value(key)), corpus=found)


def _listed_corpus(ctx: StageContext) -> CalibrationText | None:
    """The first $.calibrationCorpora entry with a path, checked like a stage's."""
    for i, entry in enumerate(ctx.recipe.calibration_corpora or []):
        ref = entry.id or entry.name or entry.path
        if entry.path and ref:
            named = dataclasses.replace(ctx, stage=ctx.stage.model_copy(update={"calibration_corpus": ref}))
            found = corpus_mod.resolve(named, file_keys=CORPUS_FILE_KEYS, id_keys=CORPUS_ID_KEYS)
            return CalibrationText(f"$.calibrationCorpora[{i}]", ref, corpus=found)
    return None


def _training_data_of(ctx: StageContext, j: int) -> CalibrationText | None:
    """The data training stage `j` trains on (its dataset, or its domain's),
    resolved as factory.datasets resolves it for that stage; a dataset this
    node lacks fails here with that module's fix."""
    stage = ctx.recipe.stages[j]
    if stage.type not in TRAINING_TYPES:
        return None
    found = training_dataset(stage, j, root=ctx.layout.root, config=ctx.config)
    if found is None:
        return None
    if not isinstance(found, ResolvedDataset):
        raise StageFailed(f"compact (stage {ctx.index}) calibrates on stage {j}'s training data, which is not "
                          f"usable here: {found}")
    return CalibrationText(found.json_path, found.ref, dataset=found)


def calibration_text(ctx: StageContext) -> CalibrationText:
    """What importance is measured on, first found of: this stage's
    calibrationCorpus(File); the nearest other stage's (earlier first on
    ties); the first $.calibrationCorpora entry with a path; the nearest
    training stage's data; the nearest corpus any other stage names (an eval
    stage's held-out text). None of them: a refusal that says how to give one."""
    own = CORPUS_FILE_KEYS + CORPUS_ID_KEYS
    others = sorted((j for j in range(len(ctx.recipe.stages)) if j != ctx.index),
                    key=lambda j: (abs(j - ctx.index), j))
    candidates = [lambda: _corpus_of(ctx, ctx.index, own)]
    candidates += [lambda j=j: _corpus_of(ctx, j, own) for j in others]
    candidates += [lambda: _listed_corpus(ctx)]
    candidates += [lambda j=j: _training_data_of(ctx, j) for j in others]
    candidates += [lambda j=j: _corpus_of(ctx, j, kind_of(ctx.recipe.stages[j].type).corpus_keys) for j in others]
    for candidate in candidates:
        found = candidate()
        if found is not None:
            return found
    raise StageFailed(f"$.stages[{ctx.index}] (compact) measures importance on calibration text, and neither it, "
                      "another stage (a corpus, or a train/lora stage's dataset or domain), nor "
                      f"$.calibrationCorpora names any; set $.stages[{ctx.index}].calibrationCorpusFile to a JSONL "
                      "or text file inside the factory root")


# ── the stage ───────────────────────────────────────────────────────────────


@dataclass
class Plan:
    """What compaction keeps, per layer, and the tiers it decided from."""

    head_tiers: dict[int, list[str]]
    channel_tiers: dict[int, list[str]]
    head_shape: HeadPlan
    kept_heads: dict[int, tuple[list[int], list[int]]]
    channels_kept: int | None  # per dense layer; None: no dense MLP
    kept_channels: dict[int, list[int]]


def plan_compaction(imp: Importance, geo: Geometry, mlp_width: int, thresholds: Thresholds) -> Plan:
    head_tiers = {l: [thresholds.tier(r) for r in fractions_of_peak(s)] for l, s in imp.heads.items()}
    channel_tiers = {l: [thresholds.tier(r) for r in fractions_of_peak(s)] for l, s in imp.channels.items()}
    dead = {l: [t == "dead" for t in tiers] for l, tiers in head_tiers.items()}
    shape = head_shape(geo, dead)
    kept_heads = {l: select_heads(imp.heads[l], dead[l], geo, shape) for l in geo.layers}
    keep = None
    if channel_tiers:
        removable = min(tiers.count("dead") for tiers in channel_tiers.values())
        keep = max(mlp_width - removable, 1)
    kept_channels = {l: select_channels(imp.channels[l], keep) for l in channel_tiers} if keep is not None else {}
    return Plan(head_tiers, channel_tiers, shape, kept_heads, keep, kept_channels)


def cuts_and_rounding(family: Family, geo: Geometry, mlp_width: int, plan: Plan, info: CheckpointInfo, *,
                      quantize: bool) -> tuple[dict[str, Slice], dict[str, list[QuantBlock]]]:
    """The tensors the plan cuts (removed heads and channels) and, with
    quantization, the unit blocks it rounds; every other tensor is copied."""
    slices: dict[str, Slice] = {}
    quant: dict[str, list[QuantBlock]] = {}
    for layer, (heads, kv) in plan.kept_heads.items():
        if len(heads) < geo.heads:
            slices.update(layer_slices(family, layer, geo, heads, kv, info.tensors))
        if quantize:
            quant.update(head_blocks(family, layer, geo, plan.head_tiers[layer], heads, kv))
    for layer, kept in plan.kept_channels.items():
        names = mlp_tensor_names(family, layer)
        if len(kept) < mlp_width:
            rows, cols = Slice(0, tuple(kept), 1), Slice(1, tuple(kept), 1)
            slices.update({names["gate_proj"]: rows, names["up_proj"]: rows, names["down_proj"]: cols})
        if quantize:
            quant.update(channel_blocks(family, layer, plan.channel_tiers[layer], kept))
    return slices, quant


def run_stage(ctx: StageContext) -> StageResult:
    # 1. parameters and the input checkpoint (headers only)
    thresholds = read_thresholds(ctx.stage, ctx.index)
    quantize = ctx.stage.enable_quantization
    text = calibration_text(ctx)
    model_dir = input_model_dir(ctx)
    info, family, geo = read_checkpoint(model_dir, "compact")
    mlp_layers, mlp_width = dense_mlp_layers(family, info.config, info)
    # 2. importance on calibration text
    imp = measure_importance(ctx, info, family, geo, mlp_layers, text, ctx.stage.analysis_steps)
    # 3.-4. tiers and the uniform removal
    plan = plan_compaction(imp, geo, mlp_width, thresholds)
    slices, quant = cuts_and_rounding(family, geo, mlp_width, plan, info, quantize=quantize)
    # 5.-6. write: round, cut, config, side files, record
    out = output_model_dir(ctx)
    params_before = sum(math.prod(m.shape) for m in info.tensors.values())
    params_after, size, errors = write_compacted(ctx, info, out, slices, quant)
    channels_kept = plan.channels_kept if plan.channels_kept is not None and plan.channels_kept < mlp_width else None
    write_json(out / "config.json", compacted_config(family, info.config, geo, plan.head_shape, channels_kept))
    copy_side_files(model_dir, out)
    metrics = _metrics(ctx, thresholds, quantize, geo, mlp_width, plan, errors, params_before, params_after, size)
    metrics["calibration"] = {**text.record(), "tokens": imp.tokens}
    sidecar = ctx.stage_dir / SIDECAR
    kept_q = {l: h for l, (h, _) in plan.kept_heads.items()}
    kept_kv = {l: kv for l, (_, kv) in plan.kept_heads.items()}
    write_json(sidecar, {**metrics, "family": family.name, "sourceModelDir": str(model_dir),
                         "heads": _layers_json(imp.heads, plan.head_tiers, kept_q, kv=kept_kv),
                         "channels": _layers_json(imp.channels, plan.channel_tiers, plan.kept_channels)})
    return model_result(ctx, out, metrics, sidecar)


def _layers_json(scores: dict[int, list[float]], tiers: dict[int, list[str]], kept: dict[int, list[int]],
                 kv: dict[int, list[int]] | None = None) -> dict[str, dict]:
    out = {}
    for layer, s in scores.items():
        entry = {"importance": s, "fractionOfPeak": fractions_of_peak(s), "tiers": tiers[layer], "kept": kept[layer]}
        if kv is not None:
            entry["keptKvHeads"] = kv[layer]
        out[str(layer)] = entry
    return out


def _unit_summary(tiers: dict[int, list[str]], kept: dict[int, list[int]], before: int | None,
                  after: int | None) -> dict:
    removed = sum(len(t) - len(kept[l]) for l, t in tiers.items())
    dead = tier_counts(tiers)["dead"]
    return {"perTier": tier_counts(tiers), "removed": removed, "deadKept": dead - removed,
            "perLayerBefore": before, "perLayerAfter": after, "layers": sorted(tiers)}


def _metrics(ctx: StageContext, thresholds: Thresholds, quantize: bool, geo: Geometry, mlp_width: int, plan: Plan,
             errors: dict[str, TierError], before: int, after: int, size: int) -> dict:
    target = ctx.stage.target_size_gb
    heads = _unit_summary(plan.head_tiers, {l: h for l, (h, _) in plan.kept_heads.items()}, geo.heads,
                          plan.head_shape.heads_keep)
    heads.update(kvPerLayerBefore=geo.kv_heads, kvPerLayerAfter=plan.head_shape.kv_keep, headDim=geo.head_dim)
    return {
        "thresholds": dict(zip(THRESHOLD_KEYS, thresholds.bounds())),
        "enableQuantization": quantize,
        "tierBits": TIER_BITS if quantize else None,
        "quantGroup": QUANT_GROUP if quantize else None,
        "heads": heads,
        "channels": _unit_summary(plan.channel_tiers, plan.kept_channels,
                                  mlp_width if plan.channel_tiers else None, plan.channels_kept),
        "quantization": ({t: {"bits": TIER_BITS[t], "params": e.params, "relativeError": e.relative()}
                          for t, e in sorted(errors.items(), key=lambda kv: TIERS.index(kv[0]))}
                         if quantize else None),
        "paramsBefore": before,
        "paramsAfter": after,
        "sizeGb": size / BYTES_PER_GB,
        "targetSizeGb": target,
        "targetSizeMet": None if target is None else size / BYTES_PER_GB <= target,
    }
