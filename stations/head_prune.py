"""The "prune" station: removes attention heads and writes a smaller model.

Phases, top to bottom in `run_stage`:

1. **Parameters.** `level` is the fraction of query heads to remove (0-0.9);
   `minHeadsPerLayer` / `minKvHeadsPerLayer` are floors.
2. **Counts.** Every attention layer loses the same number of heads, so the
   config stays one `num_attention_heads` / `num_key_value_heads` pair, and
   every kept KV group keeps the same number of query heads, so
   heads / kv_heads stays an integer (transformers maps query head `h` to KV
   head `h // group`). See `plan_counts` for the rule.
3. **Scores.** One number per query head, higher = more worth keeping:

   * `magnitude` (data-free; also what runs when the alloy names no corpus):
     ||W_q[h]||_F x ||W_o[:, h]||_F, both ends of the head's path. A head
     whose query slice or output slice is near zero contributes little
     whatever its attention pattern.
   * `activation` / `importance` / `entropy` (calibration): the mean, over
     `analysisSteps` blocks of corpus tokens, of ||W_o[:, h] a_h||_2, the norm
     of what head `h` actually adds to the residual stream. This is the
     quantity removing the head takes away (gradient-free, one forward per
     block). Attention-entropy scores need eager attention with
     `output_attentions` (slow, and not the thing pruning removes), so
     `entropy` is served by the same contribution measure; metrics record the
     `method` that ran.

4. **Selection.** KV groups are ranked by the summed score of their query
   heads; inside each kept group the best query heads are kept. Kept indices
   stay in their original order, so the heads' relative layout is unchanged.
5. **Write.** Tensors are sliced straight from the safetensors files, one
   shard at a time (bit-exact, in the checkpoint's own dtype, whatever load
   plan step 3 used): q/k/v rows and biases, o_proj columns. Per-head-dim
   tensors (Qwen3's q_norm/k_norm, shape [head_dim]) are shared by all heads
   and copied untouched. `head_dim` is written explicitly in the config, since
   transformers would otherwise derive hidden_size / num_heads, which changes
   with the head count. `head_prune.json` records the kept indices per layer.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters import family_for_config
from adapters.schema import Family, render, template_regex
from factory.errors import StageFailed
from factory.model_files import CheckpointInfo, inspect_checkpoint
from factory.stages import StageContext, StageResult
from stations import corpus as corpus_mod
from stations.base import copy_side_files, input_model_dir, model_result, output_model_dir, stage_field

DATA_FREE_STRATEGY = "magnitude"
# Calibration strategies and the measure each one runs (see module docstring).
CALIBRATION_STRATEGIES: dict[str, str] = {
    "activation": "output-contribution-norm",
    "importance": "output-contribution-norm",
    "entropy": "output-contribution-norm",
}
STRATEGIES = (DATA_FREE_STRATEGY, *CALIBRATION_STRATEGIES)
# 8 blocks of 256 tokens: enough for a stable per-head mean on small models,
# a few seconds on a GPU for 7B; alloys raise analysisSteps for more.
DEFAULT_ANALYSIS_STEPS = 8
CALIBRATION_BLOCK_TOKENS = 256
SIDECAR = "head_prune.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CORPUS_FILE_KEYS = ("calibrationCorpusFile",)
CORPUS_ID_KEYS = ("calibrationCorpus",)


# ── geometry and counts ─────────────────────────────────────────────────────


@dataclass(frozen=True)
class Geometry:
    """Attention geometry shared by every attention layer."""

    heads: int
    kv_heads: int
    head_dim: int
    q_rows_per_head: int  # head_dim x the family's q_rows_per_head_factor (gated q_proj)
    layers: tuple[int, ...]  # decoder layers carrying the projections

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class HeadPlan:
    """How many heads every layer keeps."""

    kv_keep: int
    q_per_group_keep: int
    clamped_by: str | None  # the floor that overrode `level`, if any

    @property
    def heads_keep(self) -> int:
        return self.kv_keep * self.q_per_group_keep


def read_geometry(family: Family, config: dict[str, Any]) -> Geometry:
    """Head counts from the config, refusing layouts this station cannot slice."""
    if family.attention.kind != "gqa" or not (family.attention.k_proj and family.attention.v_proj):
        raise StageFailed(f"family {family.name!r} uses {family.attention.kind} attention, which head pruning "
                          "cannot slice (only standard multi-head / grouped-query attention); "
                          "remove the prune stage for this model")
    heads = family.read(config, "num_attention_heads")
    kv_heads = family.read(config, "num_key_value_heads") or heads
    head_dim = family.head_dim(config)
    if not heads or not head_dim or heads % kv_heads:
        raise StageFailed(f"config.json: num_attention_heads={heads}, num_key_value_heads={kv_heads}, "
                          f"head_dim={head_dim} do not describe grouped-query attention; fix the config")
    return Geometry(heads, kv_heads, head_dim, head_dim * family.attention.q_rows_per_head_factor,
                    tuple(family.attention_layers(config)))


def plan_counts(geo: Geometry, *, level: float, min_heads: int, min_kv_heads: int) -> HeadPlan:
    """Heads kept per layer for `level`, honouring the floors.

    Rule: the target is heads - round(level x heads). With groups of more than
    one query head, every KV group is kept and each loses the same number of
    query heads (the KV cache stays intact); only when one query head per group
    is still more than the target are whole KV groups dropped, down to
    `min_kv_heads`. Plain multi-head attention (group of 1) prunes whole groups.
    A target under `min_heads` is **clamped** up to it (not refused): the
    floors are the alloy's own limits, and `clamped_by` records which one won.
    """
    if min_heads > geo.heads or min_kv_heads > geo.kv_heads:
        raise StageFailed(f"minHeadsPerLayer={min_heads} / minKvHeadsPerLayer={min_kv_heads} exceed the model's "
                          f"{geo.heads} heads / {geo.kv_heads} KV heads per layer; lower them")
    target = geo.heads - round(level * geo.heads)
    clamped = "minHeadsPerLayer" if target < min_heads else None
    target = max(target, min_heads)
    per_group = min(max(round(target / geo.kv_heads), 1), geo.group)
    kv_keep = geo.kv_heads if per_group > 1 else min(max(target, min_kv_heads), geo.kv_heads)
    if per_group == 1 and target < min_kv_heads and clamped is None:
        clamped = "minKvHeadsPerLayer"
    while kv_keep * per_group < min_heads:  # rounding went under the floor: grow queries, then groups
        if per_group < geo.group:
            per_group += 1
        else:
            kv_keep += 1
    return HeadPlan(kv_keep, per_group, clamped)


# ── tensor names ────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Slice:
    """One tensor to cut: keep `width`-sized blocks `blocks` along `dim`."""

    dim: int
    blocks: tuple[int, ...]
    width: int


def _bias(name: str) -> str:
    return name[: -len(".weight")] + ".bias" if name.endswith(".weight") else name + ".bias"


def layer_slices(family: Family, layer: int, geo: Geometry, heads: list[int], kv: list[int],
                 present: dict[str, Any]) -> dict[str, Slice]:
    """Every on-disk tensor of `layer` that loses rows/columns, and how."""
    att = family.attention
    q, k, v, o = (render(t, layer=layer) for t in (att.q_proj, att.k_proj, att.v_proj, att.o_proj))
    for name in (q, k, v, o):
        if name not in present:
            raise StageFailed(f"tensor {name!r} (family {family.name!r}, layer {layer}) is not in the checkpoint; "
                              "the model does not match its family spec")
    out = {q: Slice(0, tuple(heads), geo.q_rows_per_head), k: Slice(0, tuple(kv), geo.head_dim),
           v: Slice(0, tuple(kv), geo.head_dim), o: Slice(1, tuple(heads), geo.head_dim)}
    for name, cut in list(out.items()):
        if cut.dim == 0 and _bias(name) in present:  # qwen2's q/k/v biases follow their rows
            out[_bias(name)] = Slice(0, cut.blocks, cut.width)
    _refuse_unknown_head_tensors(layer, geo, present, handled={*out, _bias(o)}, prefix=_common_prefix(q, o))
    return out


def _common_prefix(a: str, b: str) -> str:
    """The attention module's name prefix ("model.layers.3.self_attn.")."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[: a[:n].rfind(".") + 1]


def _refuse_unknown_head_tensors(layer: int, geo: Geometry, present: dict[str, Any], *, handled: set[str],
                                 prefix: str) -> None:
    """Refuse attention tensors sized by the head count that the family spec
    does not say how to slice: OLMoE's q_norm/k_norm span the whole projection
    (RMS over all heads, so dropping heads changes every kept head's scale),
    gpt-oss has per-head sinks. Slicing them blindly would load but be wrong.
    Per-head-dim tensors of shape [head_dim] (Qwen3's q_norm) are shared and safe."""
    widths = {geo.heads, geo.heads * geo.head_dim, geo.heads * geo.q_rows_per_head, geo.kv_heads * geo.head_dim}
    for name, meta in present.items():
        if not name.startswith(prefix) or name in handled or tuple(meta.shape) == (geo.head_dim,):
            continue
        if any(d in widths for d in meta.shape):
            raise StageFailed(f"layer {layer}: tensor {name!r} {list(meta.shape)} is sized by the head count, and "
                              "the family spec does not say how to slice it (a norm over the whole projection or "
                              "per-head parameters); head pruning refuses rather than change its meaning. "
                              "Remove the prune stage, or extend the family's attention spec and this station")


def _index(cut: Slice):
    import torch

    return torch.cat([torch.arange(b * cut.width, (b + 1) * cut.width) for b in cut.blocks])


# ── scores ──────────────────────────────────────────────────────────────────


def magnitude_scores(info: CheckpointInfo, family: Family, geo: Geometry) -> dict[int, list[float]]:
    """Per layer, ||W_q[h]||_F x ||W_o[:, h]||_F for each query head (headers + 2 tensors a layer)."""
    from safetensors import safe_open

    scores: dict[int, list[float]] = {}
    for layer in geo.layers:
        q_name, o_name = render(family.attention.q_proj, layer=layer), render(family.attention.o_proj, layer=layer)
        with safe_open(info.model_dir / info.tensors[q_name].file, "pt") as f:
            q = f.get_tensor(q_name).float().reshape(geo.heads, geo.q_rows_per_head, -1)
        with safe_open(info.model_dir / info.tensors[o_name].file, "pt") as f:
            o = f.get_tensor(o_name).float().reshape(-1, geo.heads, geo.head_dim)
        scores[layer] = (q.norm(dim=(1, 2)) * o.norm(dim=(0, 2))).tolist()
    return scores


def _o_proj_modules(model, family: Family, layers: tuple[int, ...]) -> dict[int, Any]:
    """The loaded o_proj module of each attention layer, matched by the
    family's on-disk name (any wrapper prefix before `layers.` tolerated)."""
    template = family.attention.o_proj.removesuffix(".weight")
    pattern = template_regex(template[template.find("layers."):] if "layers." in template else template)
    found = {}
    for name, module in model.named_modules():
        m = pattern.search(name)
        if m and (name == m.group(0) or name.endswith("." + m.group(0))):
            found[int(m.group("layer"))] = module
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise StageFailed(f"no loaded module matches {template!r} for layers {missing}; the family spec "
                          f"{family.name!r} does not describe this model's attention output projection")
    return {layer: found[layer] for layer in layers}


class ContributionMeter:
    """Forward pre-hook on o_proj: accumulates ||W_o[:, h] a_h||_2 per head.

    The o_proj input is the heads' outputs side by side ([B, T, H*D]). Each
    head's contribution is o_proj applied to that input with every other head
    zeroed, minus o_proj(0) (the bias). `module.forward` is called directly,
    which skips this hook (no recursion) but works for quantised Linear too.
    """

    def __init__(self, heads: int, head_dim: int) -> None:
        self.heads, self.head_dim = heads, head_dim
        self.sums = [0.0] * heads
        self.tokens = 0

    def __call__(self, module, args) -> None:
        import torch

        x = args[0].reshape(-1, self.heads * self.head_dim)  # (N, H*D)
        with torch.no_grad():
            bias = module.forward(torch.zeros_like(x[:1]))
            for h in range(self.heads):
                masked = torch.zeros_like(x)
                cols = slice(h * self.head_dim, (h + 1) * self.head_dim)
                masked[:, cols] = x[:, cols]
                self.sums[h] += float((module.forward(masked) - bias).float().norm(dim=-1).sum())
        self.tokens += x.shape[0]

    def means(self) -> list[float]:
        return [s / max(self.tokens, 1) for s in self.sums]


def calibration_scores(ctx: StageContext, model_dir: Path, family: Family, geo: Geometry,
                       corpus: corpus_mod.Corpus, steps: int) -> tuple[dict[int, list[float]], int]:
    """Per layer, mean output-contribution norm per head over `steps` blocks; also the tokens seen."""
    import torch

    from stations.loader import load

    loaded = load(ctx, model_dir, with_tokenizer=True, purpose="head importance")
    meters = {layer: ContributionMeter(geo.heads, geo.head_dim) for layer in geo.layers}
    handles = [m.register_forward_pre_hook(meters[layer])
               for layer, m in _o_proj_modules(loaded.model, family, geo.layers).items()]
    blocks = corpus_mod.read_blocks(loaded.tokenizer, corpus, block=CALIBRATION_BLOCK_TOKENS,
                                    budget=steps * CALIBRATION_BLOCK_TOKENS)
    if not blocks:
        raise StageFailed(f"corpus {corpus.path} yields no tokens; give it text")
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
    return {layer: meter.means() for layer, meter in meters.items()}, sum(len(b) for b in blocks)


# ── selection ───────────────────────────────────────────────────────────────


def select_heads(scores: list[float], geo: Geometry, plan: HeadPlan) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) of one layer, ascending. Ties keep
    the lower index (stable sort), so a selection is reproducible."""
    import torch

    grouped = torch.tensor(scores, dtype=torch.float64).reshape(geo.kv_heads, geo.group)
    by_group = torch.sort(grouped.sum(1), descending=True, stable=True).indices[: plan.kv_keep]
    kv = sorted(int(k) for k in by_group)
    heads = []
    for k in kv:
        best = torch.sort(grouped[k], descending=True, stable=True).indices[: plan.q_per_group_keep]
        heads += sorted(k * geo.group + int(j) for j in best)
    return heads, kv


# ── writing ─────────────────────────────────────────────────────────────────


def write_sliced_checkpoint(ctx: StageContext, info: CheckpointInfo, out_dir: Path,
                            slices: dict[str, Slice]) -> int:
    """Copy every shard with `slices` applied, one shard in memory at a time;
    returns the parameter count written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    params, sizes = 0, 0
    for i, file in enumerate(info.files):
        ctx.stop_point()
        tensors = {}
        with safe_open(info.model_dir / file, "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():
                t = f.get_tensor(name)
                if name in slices:
                    t = t.index_select(slices[name].dim, _index(slices[name])).contiguous()
                tensors[name] = t
                params += t.numel()
                sizes += t.numel() * t.element_size()
        save_file(tensors, out_dir / file, metadata=metadata)
        ctx.progress(i + 1, len(info.files), "files")
    if info.index is not None:
        index = copy.deepcopy(info.index)
        index.setdefault("metadata", {})["total_size"] = sizes
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return params


def _set_key(family: Family, text: dict, field_name: str, value: int) -> None:
    """Write `value` under the key the config already uses for `field_name`."""
    candidates = getattr(family.config, field_name)
    key = next((k for k in candidates if text.get(k) is not None), candidates[0])
    text[key] = value


def pruned_config(family: Family, config: dict, geo: Geometry, plan: HeadPlan) -> dict:
    new = copy.deepcopy(config)
    text = family.text_config(new)
    _set_key(family, text, "num_attention_heads", plan.heads_keep)
    _set_key(family, text, "num_key_value_heads", plan.kv_keep)
    _set_key(family, text, "head_dim", geo.head_dim)  # no longer hidden_size / heads
    return new


# ── the stage ───────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class PruneParams:
    strategy: str  # what ran
    requested: str  # what the alloy asked for
    level: float
    min_heads: int
    min_kv_heads: int
    analysis_steps: int
    corpus: corpus_mod.Corpus | None


def read_params(ctx: StageContext) -> PruneParams:
    requested = str(stage_field(ctx, "strategy", default=DATA_FREE_STRATEGY)).lower()
    if requested not in STRATEGIES:
        raise StageFailed(f"$.stages[{ctx.index}].strategy = {requested!r} is not a head-pruning strategy; "
                          f"use one of {', '.join(STRATEGIES)}")
    level = float(stage_field(ctx, "level", required=True))
    if not 0.0 <= level <= 0.9:
        raise StageFailed(f"$.stages[{ctx.index}].level = {level} is outside 0-0.9 (fraction of heads removed)")
    named = any(ctx.stage.get(k) for k in CORPUS_FILE_KEYS + CORPUS_ID_KEYS)
    corpus = (corpus_mod.resolve(ctx, file_keys=CORPUS_FILE_KEYS, id_keys=CORPUS_ID_KEYS)
              if named and requested != DATA_FREE_STRATEGY else None)
    return PruneParams(strategy=requested if corpus else DATA_FREE_STRATEGY, requested=requested, level=level,
                       min_heads=int(stage_field(ctx, "minHeadsPerLayer", "min_heads_per_layer", default=1)),
                       min_kv_heads=int(stage_field(ctx, "minKvHeadsPerLayer", "min_kv_heads_per_layer", default=1)),
                       analysis_steps=int(stage_field(ctx, "analysisSteps", "analysis_steps",
                                                      default=DEFAULT_ANALYSIS_STEPS)),
                       corpus=corpus)


def run_stage(ctx: StageContext) -> StageResult:
    # 1. parameters and the input checkpoint (headers only)
    params = read_params(ctx)
    model_dir = input_model_dir(ctx)
    info = inspect_checkpoint(model_dir)
    if not info.tensors:
        raise StageFailed(f"{model_dir} has no safetensors weights; head pruning reads safetensors only")
    family = family_for_config(info.config)
    geo = read_geometry(family, info.config)
    # 2. counts
    plan = plan_counts(geo, level=params.level, min_heads=params.min_heads, min_kv_heads=params.min_kv_heads)
    # 3. scores
    tokens = 0
    if params.corpus is not None:
        scores, tokens = calibration_scores(ctx, model_dir, family, geo, params.corpus, params.analysis_steps)
    else:
        scores = magnitude_scores(info, family, geo)
    # 4. selection
    kept: dict[int, dict[str, list[int]]] = {}
    slices: dict[str, Slice] = {}
    for layer in geo.layers:
        heads, kv = select_heads(scores[layer], geo, plan)
        kept[layer] = {"heads": heads, "kvHeads": kv}
        slices.update(layer_slices(family, layer, geo, heads, kv, info.tensors))
    # 5. write
    out = output_model_dir(ctx)
    params_before = sum(math.prod(m.shape) for m in info.tensors.values())
    params_after = write_sliced_checkpoint(ctx, info, out, slices)
    (out / "config.json").write_text(json.dumps(pruned_config(family, info.config, geo, plan), indent=2) + "\n")
    copy_side_files(model_dir, out)
    metrics = _metrics(params, geo, plan, params_before, params_after, tokens)
    metrics["headsPerLayer"] = {str(k): {"before": geo.heads, "after": len(v["heads"])} for k, v in kept.items()}
    sidecar = ctx.stage_dir / SIDECAR
    sidecar.write_text(json.dumps({**metrics, "family": family.name, "sourceModelDir": str(model_dir),
                                   "corpus": _corpus_json(params.corpus),
                                   "keptHeads": {str(k): v for k, v in kept.items()},
                                   "scores": {str(k): v for k, v in scores.items()}}, indent=2) + "\n")
    return model_result(ctx, out, metrics, sidecar)


def _corpus_json(corpus: corpus_mod.Corpus | None) -> dict | None:
    return None if corpus is None else {"path": str(corpus.path), "sha256": corpus.sha256, "ref": corpus.ref}


def _metrics(params: PruneParams, geo: Geometry, plan: HeadPlan, before: int, after: int, tokens: int) -> dict:
    return {
        "strategy": params.strategy,
        "strategyRequested": params.requested,
        "method": CALIBRATION_STRATEGIES.get(params.strategy, "weight-norm"),
        "dataFree": params.corpus is None,
        "level": params.level,
        "levelAchieved": round(1 - plan.heads_keep / geo.heads, 6),
        "clampedBy": plan.clamped_by,
        "headsPerLayerBefore": geo.heads,
        "headsPerLayerAfter": plan.heads_keep,
        "kvHeadsPerLayerBefore": geo.kv_heads,
        "kvHeadsPerLayerAfter": plan.kv_keep,
        "headDim": geo.head_dim,
        "prunedLayers": list(geo.layers),
        "paramsBefore": before,
        "paramsAfter": after,
        "calibrationTokens": tokens,
        "plan": asdict(plan),
    }
