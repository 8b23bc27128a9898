"""The "prune" station: removes attention heads and writes a smaller model.

Phases, top to bottom in `run_stage`:

1. **Parameters.** The typed `PruneStage` (factory/alloy.py) holds them,
   ranges and defaults included: `level` is the fraction of query heads to
   remove (0-0.9); `minHeadsPerLayer` / `minKvHeadsPerLayer` are floors.
2. **Counts.** Every attention layer loses the same number of heads, so the
   config stays one `num_attention_heads` / `num_key_value_heads` pair, and
   every kept KV group keeps the same number of query heads, so
   heads / kv_heads stays an integer (transformers maps query head `h` to KV
   head `h // group`). See `plan_counts` for the rule.
3. **Scores.** One number per query head, higher = more worth keeping. Each
   strategy of forge-alloy's enum has one defined behaviour (`STRATEGIES`):

   * `magnitude` (data-free; also what a calibration strategy runs when the
     alloy names no corpus): ||W_q[h]||_F x ||W_o[:, h]||_F, both ends of the
     head's path. A head whose query or output slice is near zero contributes
     little whatever its attention pattern.
   * `random` (data-free negative baseline): scores drawn from a seeded
     generator, so a run is reproducible.
   * `activation-magnitude` / `entropy` (calibration): the mean, over
     `analysisSteps` blocks of corpus tokens, of ||W_o[:, h] a_h||_2, the norm
     of what head `h` adds to the residual stream, which is what removing it
     takes away (gradient-free, one forward per block). Attention-entropy
     scores need eager attention with `output_attentions` (slow, and not the
     thing pruning removes), so `entropy` is served by the same measure;
     metrics record the `method` that ran.
   * `gradient` (calibration): the mean over blocks of |dL/dm_h|, the
     next-token loss's sensitivity to a gate m_h = 1 on head h's output
     (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"); one
     forward and backward per block, model weights frozen.
   * `calibration-aware-activation-count` and
     `per-layer-normalized-router-importance` rank routed experts by how a
     router uses them; attention heads are not routed, so head pruning
     refuses them (`HEAD_PRUNE_REFUSED`, which the plan also reports).

4. **Selection.** KV groups are ranked by the summed score of their query
   heads; inside each kept group the best query heads are kept. Kept indices
   stay in their original order, so the heads' relative layout is unchanged.
   Every layer keeps the same count, so per-layer normalisation of scores
   (`perLayerNormalized`) cannot change a selection.
5. **Write.** Tensors are sliced straight from the safetensors files, one
   shard at a time (bit-exact, in the checkpoint's own dtype, whatever load
   plan step 3 used): q/k/v rows and biases, o_proj columns; for DeepSeek's
   latent attention the per-head rows of q_proj (or q_b_proj) and kv_b_proj
   and the o_proj columns, while the shared latent projections are copied.
   Per-head-dim tensors (Qwen3's q_norm/k_norm, shape [head_dim]) are shared
   by all heads and copied untouched, and so is every tensor of a non-text
   tower (vision, audio, speech): only the family's text attention templates
   are ever cut. `head_dim` is written explicitly in the config, since
   transformers would otherwise derive hidden_size / num_heads, which changes
   with the head count. `head_prune.json` records the kept indices per layer.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters import family_for_config
from adapters.schema import Family, render, template_regex
from factory.alloy import PruneStage
from factory.errors import StageFailed
from factory.model_files import CheckpointInfo, inspect_checkpoint
from factory.stages import StageContext, StageResult
from stations import corpus as corpus_mod
from factory.support import HEAD_PRUNE_REFUSED, HEAD_PRUNE_REFUSED_FIX
from stations.base import copy_side_files, input_model_dir, model_result, output_model_dir, rewrite_shards

FALLBACK_STRATEGY = "magnitude"
"""What a calibration strategy runs when the alloy names no corpus."""
CONTRIBUTION, MASK_GRADIENT = "output-contribution-norm", "head-mask-gradient"
# Each strategy that runs -> (the measure, whether it reads a corpus). See the module docstring.
STRATEGIES: dict[str, tuple[str, bool]] = {
    "magnitude": ("weight-norm", False),
    "random": ("seeded-random", False),
    "activation-magnitude": (CONTRIBUTION, True),
    "entropy": (CONTRIBUTION, True),
    "gradient": (MASK_GRADIENT, True),
}
CALIBRATION_BLOCK_TOKENS = 256
SIDECAR = "head_prune.json"
INDEX_FILE = "model.safetensors.index.json"
CORPUS_FILE_KEYS = ("calibrationCorpusFile",)
CORPUS_ID_KEYS = ("calibrationCorpus",)


# ── geometry and counts ─────────────────────────────────────────────────────


@dataclass(frozen=True)
class Geometry:
    """Attention geometry shared by every attention layer."""

    heads: int
    kv_heads: int
    head_dim: int  # one head's columns of o_proj (MLA: v_head_dim)
    q_rows_per_head: int  # head_dim x q_rows_per_head_factor (gated q_proj); MLA: nope + rope dims
    layers: tuple[int, ...]  # decoder layers carrying the projections
    kv_rows_per_head: int = 0  # rows per KV head of k/v (GQA: head_dim) or of kv_b_proj (MLA: nope + v)
    q_template: str = ""  # the query projection this checkpoint has (Family.q_proj)
    hidden: int | None = None  # a size the kept head count must divide (AttentionSpec.heads_divide_hidden)

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
    att = family.attention
    heads = family.read(config, "num_attention_heads")
    layers = tuple(family.attention_layers(config))
    if att.kind == "mla":
        return _mla_geometry(family, config, heads, layers)
    if not (att.k_proj and att.v_proj):
        raise StageFailed(f"family {family.name!r} names no k_proj/v_proj, which head pruning needs to slice "
                          "grouped-query attention; remove the prune stage for this model")
    kv_heads = family.read(config, "num_key_value_heads") or heads
    head_dim = family.head_dim(config)
    if not heads or not head_dim or heads % kv_heads:
        raise StageFailed(f"config.json: num_attention_heads={heads}, num_key_value_heads={kv_heads}, "
                          f"head_dim={head_dim} do not describe grouped-query attention; fix the config")
    return Geometry(heads, kv_heads, head_dim, head_dim * att.q_rows_per_head_factor, layers,
                    kv_rows_per_head=head_dim, q_template=family.q_proj(config),
                    hidden=family.read(config, "hidden_size") if att.heads_divide_hidden else None)


def _mla_geometry(family: Family, config: dict[str, Any], heads: int | None, layers: tuple[int, ...]) -> Geometry:
    """DeepSeek latent attention: every head decompresses its own key and
    value from the shared latent (kv_b_proj), so KV heads = heads."""
    nope, rope, v = (family.read(config, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    if not heads or nope is None or not rope or not v or not family.attention.kv_b_proj:
        raise StageFailed(f"config.json: num_attention_heads={heads}, qk_nope_head_dim={nope}, "
                          f"qk_rope_head_dim={rope}, v_head_dim={v} do not describe latent attention (or the "
                          f"{family.name} family names no kv_b_proj); fix the config")
    return Geometry(heads, heads, v, nope + rope, layers, kv_rows_per_head=nope + v,
                    q_template=family.q_proj(config))


def plan_counts(geo: Geometry, *, level: float, min_heads: int, min_kv_heads: int) -> HeadPlan:
    """Heads kept per layer for `level`, honouring the floors.

    Rule: the target is heads - round(level x heads). With groups of more than
    one query head, every KV group is kept and each loses the same number of
    query heads (the KV cache stays intact); only when one query head per group
    is still more than the target are whole KV groups dropped, down to
    `min_kv_heads`. Plain multi-head attention (group of 1) prunes whole groups.
    A target under `min_heads` is **clamped** up to it (not refused): the
    floors are the alloy's own limits, and `clamped_by` records which one won.
    Where the config must have heads dividing hidden_size (`geo.hidden`), the
    count grows to the next one that does (`clamped_by` "hiddenSize").
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
    def too_few() -> bool:
        return kv_keep * per_group < min_heads or bool(geo.hidden and geo.hidden % (kv_keep * per_group))

    if geo.hidden and geo.hidden % (kv_keep * per_group) and clamped is None:
        clamped = "hiddenSize"
    while too_few():  # under a floor or not dividing hidden: grow queries, then groups (all heads always fit)
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
    q, o = render(geo.q_template, layer=layer), render(att.o_proj, layer=layer)
    kv_rows = [render(t, layer=layer) for t in (att.k_proj, att.v_proj, att.kv_b_proj) if t]
    for name in (q, o, *kv_rows):
        if name not in present:
            raise StageFailed(f"tensor {name!r} (family {family.name!r}, layer {layer}) is not in the checkpoint; "
                              "the model does not match its family spec")
    out = {q: Slice(0, tuple(heads), geo.q_rows_per_head), o: Slice(1, tuple(heads), geo.head_dim)}
    out.update({name: Slice(0, tuple(kv), geo.kv_rows_per_head) for name in kv_rows})
    for name, cut in list(out.items()):
        if cut.dim == 0 and _bias(name) in present:  # qwen2's q/k/v biases follow their rows
            out[_bias(name)] = Slice(0, cut.blocks, cut.width)
    shared = {render(t, layer=layer) for t in att.head_independent}
    _refuse_unknown_head_tensors(layer, geo, present, handled={*out, _bias(o), *shared}, prefix=_common_prefix(q, o))
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
    widths = {geo.heads, geo.heads * geo.head_dim, geo.heads * geo.q_rows_per_head,
              geo.kv_heads * geo.kv_rows_per_head}
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


def apply_slice(t, cut: Slice, *, pad: bool):
    """Keep `cut`'s blocks of `t`: removed (shape shrinks), or with `pad` the
    other blocks zeroed in place of removal (shape kept)."""
    import torch

    if not pad:
        return t.index_select(cut.dim, _index(cut)).contiguous()
    keep = torch.zeros(t.shape[cut.dim], dtype=torch.bool)
    keep[_index(cut)] = True
    shape = [1] * t.dim()
    shape[cut.dim] = -1
    return torch.where(keep.reshape(shape), t, torch.zeros((), dtype=t.dtype)).contiguous()


# ── scores ──────────────────────────────────────────────────────────────────


def magnitude_scores(info: CheckpointInfo, family: Family, geo: Geometry) -> dict[int, list[float]]:
    """Per layer, ||W_q[h]||_F x ||W_o[:, h]||_F for each query head (headers + 2 tensors a layer)."""
    from safetensors import safe_open

    scores: dict[int, list[float]] = {}
    for layer in geo.layers:
        q_name, o_name = render(geo.q_template, layer=layer), render(family.attention.o_proj, layer=layer)
        with safe_open(info.model_dir / info.tensors[q_name].file, "pt") as f:
            q = f.get_tensor(q_name).float().reshape(geo.heads, geo.q_rows_per_head, -1)
        with safe_open(info.model_dir / info.tensors[o_name].file, "pt") as f:
            o = f.get_tensor(o_name).float().reshape(-1, geo.heads, geo.head_dim)
        scores[layer] = (q.norm(dim=(1, 2)) * o.norm(dim=(0, 2))).tolist()
    return scores


def random_scores(geo: Geometry, seed: int) -> dict[int, list[float]]:
    """Per layer, one uniform draw per head from a generator seeded once."""
    rng = random.Random(seed)
    return {layer: [rng.random() for _ in range(geo.heads)] for layer in geo.layers}


def _o_proj_modules(model, family: Family, layers: tuple[int, ...]) -> dict[int, Any]:
    """The loaded o_proj module of each text attention layer, matched by the
    family's on-disk name (any wrapper prefix before `layers.` tolerated,
    since transformers renames on load) and never inside a tower (Omni's
    talker has decoder layers of its own)."""
    template = family.attention.o_proj.removesuffix(".weight")
    pattern = template_regex(template[template.find("layers."):] if "layers." in template else template)
    found = {}
    for name, module in model.named_modules():
        m = pattern.search(name)
        if m and (name == m.group(0) or name.endswith("." + m.group(0))) and family.tower_of(name) is None:
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


class HeadGate:
    """Forward pre-hook on o_proj: multiplies head h's output by a gate m_h = 1
    that requires grad, so a backward pass leaves dL/dm_h in `gate.grad`;
    `collect` accumulates |dL/dm_h| per block and clears it."""

    def __init__(self, heads: int, head_dim: int) -> None:
        import torch

        self.head_dim = head_dim
        self.gate = torch.ones(heads, requires_grad=True)
        self.sums = [0.0] * heads
        self.blocks = 0

    def __call__(self, module, args):
        x = args[0]  # (B, T, H*D)
        gate = self.gate.to(device=x.device, dtype=x.dtype).repeat_interleave(self.head_dim)
        return (x * gate, *args[1:])

    def collect(self) -> None:
        if self.gate.grad is not None:
            self.sums = [s + abs(float(g)) for s, g in zip(self.sums, self.gate.grad)]
            self.gate.grad = None
        self.blocks += 1

    def means(self) -> list[float]:
        return [s / max(self.blocks, 1) for s in self.sums]


def calibration_scores(ctx: StageContext, model_dir: Path, family: Family, geo: Geometry,
                       corpus: corpus_mod.Corpus, steps: int, method: str) -> tuple[dict[int, list[float]], int]:
    """Per layer, the `method` score per head over `steps` blocks of the
    corpus (output contribution: forward only; mask gradient: forward and
    backward, weights frozen); also the tokens seen."""
    import torch

    from stations.loader import load

    loaded = load(ctx, model_dir, with_tokenizer=True, purpose="head importance")
    meter = HeadGate if method == MASK_GRADIENT else ContributionMeter
    meters = {layer: meter(geo.heads, geo.head_dim) for layer in geo.layers}
    handles = [m.register_forward_pre_hook(meters[layer])
               for layer, m in _o_proj_modules(loaded.model, family, geo.layers).items()]
    blocks = corpus_mod.read_blocks(loaded.tokenizer, corpus, block=CALIBRATION_BLOCK_TOKENS,
                                    budget=steps * CALIBRATION_BLOCK_TOKENS)
    if not blocks:
        raise StageFailed(f"corpus {corpus.path} yields no tokens; give it text")
    try:
        for i, ids in enumerate(blocks):
            ctx.stop_point()
            batch = torch.tensor([ids], device=loaded.device)  # (1, T)
            if method == MASK_GRADIENT:
                _gate_gradients(loaded.model, batch, meters.values())
            else:
                with torch.no_grad():
                    loaded.model(input_ids=batch)
            ctx.progress(i + 1, len(blocks), "blocks")
    finally:
        for h in handles:
            h.remove()
    del loaded
    return {layer: meter.means() for layer, meter in meters.items()}, sum(len(b) for b in blocks)


def _gate_gradients(model, batch, gates) -> None:
    """One forward and backward of the next-token loss on `batch` (1, T)."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    with torch.enable_grad():
        logits = model(input_ids=batch).logits[:, :-1].float()  # (1, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
    for gate in gates:
        gate.collect()


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
                            slices: dict[str, Slice], *, pad: bool = False) -> int:
    """Copy every shard with `slices` applied (removed, or zeroed with `pad`);
    returns the parameter count written."""
    params, _ = rewrite_shards(ctx, info, out_dir, lambda name, t: apply_slice(t, slices[name], pad=pad)
                               if name in slices else t)
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
    if family.attention.kind == "gqa":  # MLA's head_dim is its rope width, which pruning keeps
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
    seed: int
    pad: bool  # defragMode "pad": pruned heads zeroed in place, shapes and config kept

    @property
    def method(self) -> str:
        return STRATEGIES[self.strategy][0]


def read_params(ctx: StageContext) -> PruneParams:
    """The typed stage's fields, the strategy refused or resolved: a
    calibration strategy without a corpus runs FALLBACK_STRATEGY (recorded)."""
    stage: PruneStage = ctx.stage
    requested = stage.strategy
    if requested in HEAD_PRUNE_REFUSED:
        raise StageFailed(f"$.stages[{ctx.index}].strategy: {HEAD_PRUNE_REFUSED[requested]}; "
                          f"{HEAD_PRUNE_REFUSED_FIX}")
    calibrated = STRATEGIES[requested][1]
    named = stage.calibration_corpus_file or stage.calibration_corpus
    corpus = (corpus_mod.resolve(ctx, file_keys=CORPUS_FILE_KEYS, id_keys=CORPUS_ID_KEYS)
              if named and calibrated else None)
    ran = FALLBACK_STRATEGY if calibrated and corpus is None else requested
    return PruneParams(strategy=ran, requested=requested, level=stage.level, min_heads=stage.min_heads_per_layer,
                       min_kv_heads=stage.min_kv_heads_per_layer, analysis_steps=stage.analysis_steps,
                       corpus=corpus, seed=stage.seed,
                       pad=stage.defrag_mode == "pad")


def head_scores(ctx: StageContext, params: PruneParams, info: CheckpointInfo, family: Family,
                geo: Geometry) -> tuple[dict[int, list[float]], int]:
    """Per-layer head scores for the strategy that runs, and calibration tokens read."""
    if params.corpus is not None:
        return calibration_scores(ctx, info.model_dir, family, geo, params.corpus, params.analysis_steps,
                                  params.method)
    if params.strategy == "random":
        return random_scores(geo, params.seed), 0
    return magnitude_scores(info, family, geo), 0


def read_checkpoint(model_dir: Path, who: str) -> tuple[CheckpointInfo, Family, Geometry]:
    """The input checkpoint's headers, its family and attention geometry;
    `who` (the station) is refused a checkpoint without safetensors."""
    info = inspect_checkpoint(model_dir)
    if not info.tensors:
        raise StageFailed(f"{model_dir} has no safetensors weights; {who} reads safetensors only")
    family = family_for_config(info.config)
    return info, family, read_geometry(family, info.config)


def run_stage(ctx: StageContext) -> StageResult:
    # 1. parameters and the input checkpoint (headers only)
    params = read_params(ctx)
    model_dir = input_model_dir(ctx)
    info, family, geo = read_checkpoint(model_dir, "head pruning")
    pad = params.pad or family.attention.fixed_head_count  # fewer heads would not load: zero them
    # 2. counts. The schema's default KV floor (2) is more KV heads than a
    # multi-query model has (Gemma-3-270M: 1); left unset it means "keep
    # them all", and only an alloy that sets it above the count is refused.
    min_kv = params.min_kv_heads
    if "min_kv_heads_per_layer" not in ctx.stage.model_fields_set:
        min_kv = min(min_kv, geo.kv_heads)
    plan = plan_counts(geo, level=params.level, min_heads=params.min_heads, min_kv_heads=min_kv)
    # 3. scores
    scores, tokens = head_scores(ctx, params, info, family, geo)
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
    params_after = write_sliced_checkpoint(ctx, info, out, slices, pad=pad)
    config = info.config if pad else pruned_config(family, info.config, geo, plan)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(model_dir, out)
    metrics = _metrics(params, geo, plan, params_before, params_after, tokens)
    metrics["headsPerLayer"] = {str(k): {"before": geo.heads, "after": len(v["heads"])} for k, v in kept.items()}
    metrics["towerTensorsCopied"] = sum(1 for name in info.tensors if family.tower_of(name))
    metrics["defragMode"] = "pad" if pad else "remove"
    if params.corpus is not None:
        metrics |= {"corpus": params.corpus.ref, "corpus_sha256": params.corpus.sha256}
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
        "method": params.method,
        "dataFree": params.corpus is None,
        "seed": params.seed if params.strategy == "random" else None,
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
