"""The training stations: `train`, `lora` and `compensation-lora`, one LoRA path.

* `lora`: recovery fine-tuning on a dataset with causal-LM cross-entropy.
  A `lora` stage that names a `teacher` distils, like compensation-lora.
* `compensation-lora`: distillation of the (pruned) student towards a
  teacher, by default the alloy's unpruned source model (`teacher: "source"`).
  `lossType`: "kl_logits" (default; KL on the output distributions),
  "kl+ce" (KL plus next-token cross-entropy), "mse_hidden" (mean squared
  error between the last hidden states) or "both" (KL plus that MSE).
* `train`: the same LoRA recovery path, merged. Full fine-tuning is not
  offered: it needs optimiser state for every weight (3-4x the model in
  memory), which hive nodes sized for inference do not have; a merged LoRA
  gives the next stage the same thing, a full model directory.

Phases, top to bottom in `run_training`:

1. Parameters: the typed stage (defaults from the schema). `steps` and
   `learningRate`, when the stage omits them, come from the model's size
   (`factory.datasets.size_defaults`: `source.totalParamsB`, else the
   parameters the input checkpoint holds); `epochs` without `steps` runs
   that many passes over the examples. Every value the stage omitted is
   reported under metrics["resolved"] (camelCase key -> value) for the
   executed alloy.
2. Text: the data `factory.datasets.training_dataset` resolves (the same
   answer `factory plan` gave), streamed by `stations.training_data`, which
   also formats instruction records; a distillation stage with a pinned
   calibration corpus reads that instead.
3. Examples: each text + EOS, cut into `sequenceLength` chunks, read only
   until the steps have what they consume (steps x batch x accumulation
   examples); batches are right-padded, pad labels are -100 and their
   attention mask 0, so pads never count in the loss (right padding + causal
   attention also leaves the real tokens' logits untouched).
4. Load the student as the load plan says: NF4 (QLoRA) when the stage asks
   (`quantizeBits: 4`, or `quantize: true`) or when the plan chose a 4-bit
   strategy, on the GPU or the CPU alike (bitsandbytes quantizes on both);
   otherwise full precision (fp32 on a CPU). `quantizeBits: 8` is refused
   at run time: the load plans (factory.load_plan) size and load NF4 only,
   and an 8-bit base would be loaded unsized.
   the teacher for distillation, attach LoRA to the target modules inside
   the text decoder's layers only (the family's layer prefix: a vision or
   audio tower never gets an adapter; matches elsewhere are dropped and
   counted), train: fixed seed, progress per step, a stop point between
   steps.
5. Save the adapter (`adapter/adapter_model.safetensors`), then write the
   merged model: every shard of the input checkpoint copied with
   W + (alpha / r) B A added to the targeted weights in the checkpoint's own
   dtype, one shard at a time, so merging never needs the full-precision
   model in memory and works whatever the load plan was. The merged directory
   loads in stock transformers without peft and is handed to the next stage
   whether or not the alloy says `mergeAfter`, because later stages need a
   model directory; the adapter is kept as an output too.
6. `training.json`: loss per step, probe loss before/after, trainable
   parameters, targets, rank/alpha, the resolved configuration.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from adapters import family_for_config
from adapters.schema import Family
from factory.alloy import Stage, learning_rate_value
from factory.datasets import DatasetProblem, ResolvedDataset, size_defaults, training_dataset
from factory.durable import write_json
from factory.errors import StageFailed
from factory.load_plan import FOUR_BIT_STRATEGIES
from factory.integrity import sha256_file
from factory.model_files import inspect_checkpoint
from factory.results import RESOLVED
from factory.stages import StageContext, StageResult
from stations import corpus as corpus_mod
from stations.base import copy_side_files, input_model_dir, model_result, output_model_dir, source_model_dir
from stations.training_data import training_texts

# A train stage's adapter when the alloy gives none (train stages rarely do):
# r=16 recovers most of what r=64 does at a quarter of the adapter.
PROBE_EXAMPLES = 16  # examples scored before and after training (in-sample probe)
IGNORE_INDEX = -100  # the label torch's cross-entropy skips
ADAPTER_DIR = "adapter"
SIDECAR = "training.json"
SCRATCH_DIR = "datasets-scratch"  # the datasets library's lock files while it streams
INDEX_FILE = "model.safetensors.index.json"
CORPUS_FILE_KEYS = ("calibrationCorpusFile",)
CORPUS_ID_KEYS = ("calibrationCorpus",)
GRADIENT_CHECKPOINTING = ("gradient_checkpointing", "gradient-checkpointing", "gradientCheckpointing")
KL_LOSSES = ("kl_logits", "kl+ce", "both")
HIDDEN_LOSSES = ("mse_hidden", "both")
DROPPED_KEY = "lora_targets_dropped"  # metrics: target matches outside the text decoder's layers


# ── parameters ──────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class TrainParams:
    mode: str  # "lora" (cross-entropy) or "compensation" (distillation)
    stage_type: str
    steps: int | None  # None: from `epochs` once the examples are counted
    learning_rate: float
    batch_size: int
    gradient_accumulation: int
    sequence_length: int
    scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_gradient_norm: float
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...] | None  # None: the family's lora_targets
    epochs: int | None
    seed: int
    merge_requested: bool | None
    gradient_checkpointing: bool
    teacher: str | None
    loss_type: str | None  # distillation only
    kd_temperature: float | None  # distillation only
    params_b: float  # the model size the step/rate defaults were read for
    size_source: str  # "source.totalParamsB" or "checkpoint"

    @property
    def examples_needed(self) -> int | None:
        """Examples the steps consume (None: all, for `epochs`)."""
        return None if self.steps is None else self.steps * self.batch_size * self.gradient_accumulation


def _where(ctx: StageContext, key: str) -> str:
    return f"$.stages[{ctx.index}].{key}"


def base_bits(ctx: StageContext) -> int | None:
    """The bits the stage asks its frozen base in (4: QLoRA), or None for
    the load plan's choice. `quantize: true` alone means 4 (QLoRA is NF4);
    `train` stages carry these keys as extras."""
    stage = ctx.stage
    bits, quantize = stage.field_value("quantizeBits"), stage.field_value("quantize")
    if quantize is False and bits is not None:
        raise StageFailed(f"{_where(ctx, 'quantizeBits')} = {bits} but {_where(ctx, 'quantize')} is false; "
                          "remove one of them")
    bits = 4 if bits is None and quantize else bits
    if bits not in (None, 4):
        raise StageFailed(f"{_where(ctx, 'quantizeBits')} = {bits!r}: only a 4-bit (NF4, QLoRA) base is "
                          "offered: this factory's load plans size and load NF4 only; set quantizeBits to 4, or "
                          "remove it to train against the full-precision base")
    return bits


def _adapter(stage: Stage) -> tuple[int, float, float, tuple[str, ...] | None, bool | None]:
    """(rank, alpha, dropout, targets, merge requested) of the stage, as the
    schema resolves them (aliases and per-type defaults in factory.alloy)."""
    targets = tuple(stage.target_modules) if stage.target_modules else None
    return stage.effective_rank, stage.effective_alpha, stage.dropout, targets, stage.merges


def _model_size(ctx: StageContext, model_dir: Path) -> tuple[float, str]:
    """Billions of parameters for the size defaults: the alloy's
    source.totalParamsB, else what the input checkpoint holds."""
    declared = ctx.recipe.source.total_params_b
    if declared is not None:
        return declared, "source.totalParamsB"
    return inspect_checkpoint(model_dir).param_count / 1e9, "checkpoint"


def read_params(ctx: StageContext, mode: str, model_dir: Path) -> TrainParams:
    """The typed stage's values; steps and learning rate by model size when omitted."""
    stage = ctx.stage
    rank, alpha, dropout, targets, merge = _adapter(stage)
    teacher = getattr(stage, "teacher", None) or ("source" if mode == "compensation" else None)
    params_b, size_source = _model_size(ctx, model_dir)
    by_size = size_defaults(params_b)
    epochs = stage.epochs if stage.steps is None else None
    lr = learning_rate_value(stage.learning_rate) if stage.learning_rate is not None else by_size.learning_rate
    return TrainParams(
        mode="compensation" if teacher else "lora", stage_type=stage.type,
        steps=stage.steps or (None if epochs else by_size.steps), learning_rate=lr,
        batch_size=stage.batch_size, gradient_accumulation=stage.gradient_accumulation,
        sequence_length=stage.sequence_length, scheduler=stage.scheduler, warmup_ratio=stage.warmup_ratio,
        weight_decay=stage.weight_decay, max_gradient_norm=stage.max_gradient_norm,
        rank=rank, alpha=alpha, dropout=dropout, targets=targets, epochs=epochs, seed=stage.seed,
        merge_requested=merge,
        gradient_checkpointing=any(o in GRADIENT_CHECKPOINTING for o in stage.optimizations or []),
        teacher=teacher, loss_type=getattr(stage, "loss_type", None) if teacher else None,
        kd_temperature=getattr(stage, "kd_temperature", None) if teacher else None,
        params_b=params_b, size_source=size_source,
    )


def resolved_fields(ctx: StageContext, params: TrainParams, *, steps: int, targets: tuple[str, ...],
                    data: "TextData") -> dict[str, Any]:
    """camelCase field -> the value used, for every field the alloy's stage
    left out: what the executed alloy records as this stage's settings."""
    used: dict[str, Any] = {
        "steps": steps, "learningRate": format(params.learning_rate, "g"), "batchSize": params.batch_size,
        "gradientAccumulation": params.gradient_accumulation, "sequenceLength": params.sequence_length,
        "scheduler": params.scheduler, "warmupRatio": params.warmup_ratio, "weightDecay": params.weight_decay,
        "maxGradientNorm": params.max_gradient_norm, "rank": params.rank,
        "alpha": int(params.alpha) if float(params.alpha).is_integer() else params.alpha,
        "dropout": params.dropout, "targetModules": list(targets), "dataset": data.ref,
    }
    if params.mode == "compensation":
        used |= {"teacher": params.teacher, "lossType": params.loss_type, "kdTemperature": params.kd_temperature}
    given = set(ctx.stage.model_dump(by_alias=True, exclude_unset=True))
    for pair in (("rank", "loraRank"), ("alpha", "loraAlpha")):
        if given & set(pair):
            given |= set(pair)
    if params.epochs is not None:
        given.add("steps")  # derived from the alloy's epochs, not a default
    if data.kind == "corpus":
        given.add("dataset")  # distils on the alloy's pinned corpus
    return {k: v for k, v in used.items() if k not in given}


# ── text ────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class TextData:
    ref: str  # what the alloy (or the domain table) named
    kind: str  # "corpus" or a ResolvedDataset kind
    path: str | None  # the file, cache or snapshot read (None: streamed from the Hub)
    sha256: str | None  # of a file
    texts: Iterable[str]  # read lazily
    detail: dict[str, Any]  # id, config, domain, note

    def provenance(self) -> dict[str, Any]:
        return {"ref": self.ref, "kind": self.kind, "path": self.path, "sha256": self.sha256, **self.detail}


def load_texts(ctx: StageContext, params: TrainParams, tokenizer, *, max_chars: int) -> TextData:
    """Distillation prefers a pinned calibration corpus; else the resolved dataset."""
    found = training_dataset(ctx.stage, ctx.index, root=ctx.layout.root, config=ctx.config)
    if found is None:
        c = corpus_mod.resolve(ctx, file_keys=CORPUS_FILE_KEYS, id_keys=CORPUS_ID_KEYS)
        return TextData(c.ref, "corpus", str(c.path), c.sha256, corpus_mod.read_texts(c, max_chars=max_chars), {})
    if isinstance(found, DatasetProblem):
        raise StageFailed(str(found))
    return _dataset_texts(found, tokenizer, max_chars=max_chars, scratch_dir=ctx.stage_dir / SCRATCH_DIR)


def _dataset_texts(found: ResolvedDataset, tokenizer, *, max_chars: int, scratch_dir: Path) -> TextData:
    digest = sha256_file(found.path) if found.kind == "file" else None
    detail = {"id": found.id, "config": found.config, "domain": found.domain, "note": found.note}
    return TextData(found.ref, found.kind, str(found.path) if found.path else None, digest,
                    training_texts(found, tokenizer, max_chars=max_chars, scratch_dir=scratch_dir), detail)


# ── examples and batches ────────────────────────────────────────────────────


@dataclass
class Batch:
    input_ids: Any  # (B, T) long
    attention_mask: Any  # (B, T): 1 real, 0 pad
    labels: Any  # (B, T): input ids, IGNORE_INDEX at pads

    def to(self, device: str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def make_examples(tokenizer, texts: Iterable[str], *, sequence_length: int,
                  limit: int | None = None) -> list[list[int]]:
    """Each text + EOS, cut into chunks of at most `sequence_length` tokens,
    each chunk after the tokenizer's BOS where it uses one
    (`corpus.bos_prefix`: what the model saw in pretraining; chunks with
    nothing to predict are dropped); no text is pulled from `texts` once
    `limit` examples are made."""
    eos = tokenizer.eos_token_id
    prefix = corpus_mod.bos_prefix(tokenizer)
    width = sequence_length - len(prefix)
    out: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        chunks = (prefix + ids[i:i + width] for i in range(0, len(ids), width))
        out += [c for c in chunks if len(c) >= 2]
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def collate(examples: list[list[int]], *, pad_id: int) -> Batch:
    """Right-pad to the longest example; pads get mask 0 and label -100."""
    import torch

    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return Batch(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX))


def batches(examples: list[list[int]], *, batch_size: int, pad_id: int, seed: int) -> Iterator[Batch]:
    """Endless batches over seeded permutations (epoch after epoch)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            yield collate([examples[j] for j in order[i:i + batch_size]], pad_id=pad_id)


# ── losses ──────────────────────────────────────────────────────────────────


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy over positions whose label is not -100."""
    import torch.nn.functional as F

    shifted = logits[:, :-1].float()  # (B, T-1, V): position t predicts t+1
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def distillation_loss(student_logits, teacher_logits, attention_mask, *, temperature: float):
    """KL(teacher || student) at `temperature`, x T^2 (Hinton et al., so the
    gradient scale does not shrink with T), averaged over real tokens."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)  # (B, T)
    mask = attention_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1) * temperature**2


def hidden_mse_loss(student_hidden, teacher_hidden, attention_mask):
    """Mean squared error between the last hidden states, averaged over the
    hidden width and the real tokens (pads excluded)."""
    per_token = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)  # (B, T)
    mask = attention_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


# ── models ──────────────────────────────────────────────────────────────────


def teacher_dir(ctx: StageContext, teacher: str) -> Path:
    """"source" or the alloy's own baseModel: the source; else resolved like a source."""
    from factory.errors import BadInput
    from factory.sources import resolve_source

    try:
        if teacher in ("source", ctx.recipe.source.base_model):
            return source_model_dir(ctx)
        resolved = resolve_source({"baseModel": teacher, "architecture": ctx.recipe.source.architecture},
                                  root=ctx.layout.root, config=ctx.config, allow_download=True)
    except BadInput as err:
        raise StageFailed(f"{_where(ctx, 'teacher')}: {err}") from err
    if resolved.path is None:
        raise StageFailed(f"{_where(ctx, 'teacher')} = {teacher!r} names no model with weights")
    return resolved.path


_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")


def lora_modules(model, targets: tuple[str, ...], family: Family) -> tuple[list[str], int]:
    """Full names of the modules `targets` select (peft's rule: the name, or
    a name ending in "." + target) inside decoder layers outside every
    non-text tower the family declares (its prefixes name both the saved and
    the loaded layout, e.g. Qwen2.5-VL's `visual.` and `model.visual.`), and
    how many matches were dropped (a vision or audio tower's blocks, a
    projector)."""
    keep, dropped = [], 0
    for name, _ in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if family.tower_of(name) is None and _DECODER_LAYER.search(name):
            keep.append(name)
        else:
            dropped += 1
    return keep, dropped


def wrap_with_lora(model, params: TrainParams, modules: list[str], *, quantized: bool):
    import peft
    import torch

    if quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(params.seed)  # LoRA A init
    config = peft.LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                             target_modules=modules, bias="none")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise StageFailed(f"LoRA cannot attach to {modules[:3]}... ({err}); set targetModules to linear "
                          "layers of the text decoder (e.g. q_proj, v_proj)") from err


def _attach_targets(ctx: StageContext, model, targets: tuple[str, ...], family: Family) -> tuple[list[str], int]:
    modules, dropped = lora_modules(model, targets, family)
    if not modules:
        where = "only outside the text decoder's layers" if dropped else "nowhere in this model"
        raise StageFailed(f"LoRA targets {list(targets)} do not fit this model: they match {where}; set "
                          f"{_where(ctx, 'targetModules')} to module names of its text layers (e.g. q_proj, v_proj)")
    return modules, dropped


def trainable_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ── training ────────────────────────────────────────────────────────────────


def total_steps(params: TrainParams, n_examples: int) -> int:
    """`steps` (the alloy's or the size default), else `epochs` passes over the examples."""
    if params.steps is not None:
        return params.steps
    return params.epochs * math.ceil(n_examples / (params.batch_size * params.gradient_accumulation))


def warmup_steps(params: TrainParams, steps: int) -> int:
    """Linear warm-up steps; "constant" has none (transformers' meaning:
    "constant_with_warmup" is the one that warms up)."""
    return 0 if params.scheduler == "constant" else math.ceil(params.warmup_ratio * steps)


def lr_factor(step: int, *, total: int, warmup: int, scheduler: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based),
    for the schema's schedulers: after warm-up, constant(_with_warmup) holds
    1; linear and polynomial (transformers' default power 1) fall linearly to
    0; cosine follows half a cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if scheduler in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    return 1.0 - progress if scheduler in ("linear", "polynomial") else 0.5 * (1.0 + math.cos(math.pi * progress))


class Objective:
    """The loss of one batch: cross-entropy, or distillation from a teacher
    (see the module docstring for the loss types)."""

    def __init__(self, params: TrainParams, teacher=None) -> None:
        self.params, self.teacher = params, teacher
        self.hidden = teacher is not None and params.loss_type in HIDDEN_LOSSES

    def __call__(self, model, batch: Batch):
        import torch

        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=self.hidden)
        if self.teacher is None:
            return causal_lm_loss(out.logits, batch.labels)
        with torch.no_grad():
            t_out = self.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 output_hidden_states=self.hidden)
        loss = 0.0
        if self.params.loss_type in KL_LOSSES:
            if t_out.logits.shape[-1] != out.logits.shape[-1]:
                raise StageFailed(f"teacher vocabulary ({t_out.logits.shape[-1]}) differs from the student's "
                                  f"({out.logits.shape[-1]}); distil from the same tokenizer's model")
            loss = distillation_loss(out.logits, t_out.logits.to(out.logits.device), batch.attention_mask,
                                     temperature=self.params.kd_temperature)
        if self.hidden:
            s_h, t_h = out.hidden_states[-1], t_out.hidden_states[-1]
            if s_h.shape != t_h.shape:
                raise StageFailed(f"lossType {self.params.loss_type!r} compares hidden states, but the teacher's "
                                  f"are {tuple(t_h.shape)} and the student's {tuple(s_h.shape)}; use kl_logits")
            loss = loss + hidden_mse_loss(s_h, t_h.to(s_h.device), batch.attention_mask)
        if self.params.loss_type == "kl+ce":
            loss = loss + causal_lm_loss(out.logits, batch.labels)
        return loss


def probe_loss(model, objective: Objective, examples: list[list[int]], *, pad_id: int, device: str) -> float:
    """The objective on a fixed set of examples, without gradients."""
    import torch

    probe = examples[:PROBE_EXAMPLES]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [float(objective(model, collate([e], pad_id=pad_id).to(device))) for e in probe]
    model.train(was_training)
    return sum(losses) / len(losses)


def train_loop(ctx: StageContext, model, objective: Objective, stream: Iterator[Batch], *,
               params: TrainParams, steps: int, device: str) -> list[float]:
    """AdamW on the trainable parameters; returns the loss of every step."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    warmup = warmup_steps(params, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: lr_factor(s, total=steps, warmup=warmup, scheduler=params.scheduler))
    curve = []
    model.train()
    for step in range(steps):
        ctx.stop_point()
        total = 0.0
        for _ in range(params.gradient_accumulation):
            loss = objective(model, next(stream).to(device)) / params.gradient_accumulation
            loss.backward()
            total += float(loss.detach())
        if not math.isfinite(total):
            raise StageFailed(f"training loss became {total} at step {step}; lower {_where(ctx, 'learningRate')} "
                              f"(now {params.learning_rate})")
        torch.nn.utils.clip_grad_norm_(trainable, params.max_gradient_norm)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        curve.append(total)
        ctx.progress(step + 1, steps, "steps")
    model.eval()
    return curve


# ── saving ──────────────────────────────────────────────────────────────────


def adapter_deltas(adapter_dir: Path) -> dict[str, Any]:
    """On-disk weight name -> (alpha / r) B A, from a saved peft adapter."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    deltas = {}
    for name, a in weights.items():
        if not name.endswith(".lora_A.weight"):
            continue
        b = weights[name.replace(".lora_A.", ".lora_B.")]
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        deltas[module + ".weight"] = (b.float() @ a.float()) * scale  # (out, r) @ (r, in)
    return deltas


def on_disk_names(deltas: dict[str, Any], names: set[str], model_dir: Path, *, family: Family) -> dict[str, Any]:
    """The adapter's weights under the checkpoint's own tensor names.

    transformers may load a checkpoint under other module names than it
    saves (Qwen2.5-VL: `model.layers.*` on disk is
    `model.language_model.layers.*` in memory). A name not on disk maps to
    the one disk tensor that ends with its decoder-layer suffix
    ("layers.<i>.<rest>"); no such tensor, or several, is an error. Tower
    tensors are never candidates: LoRA never targets a tower, and a vision
    encoder has `layers.<i>.self_attn.q_proj` of its own (Gemma-3's SigLIP)."""
    by_suffix: dict[str, list[str]] = {}
    for name in names:
        m = _DECODER_LAYER.search(name)
        if m and family.tower_of(name) is None:
            by_suffix.setdefault(name[m.start():].lstrip("."), []).append(name)
    out, unmatched = {}, []
    for name, delta in deltas.items():
        if name in names:
            out[name] = delta
            continue
        m = _DECODER_LAYER.search(name)
        found = by_suffix.get(name[m.start():].lstrip("."), []) if m else []
        if len(found) == 1:
            out[found[0]] = delta
        else:
            unmatched.append(name)
    if unmatched:
        raise StageFailed(f"adapter weights {sorted(unmatched)[:3]} match no single tensor in {model_dir}; the "
                          "model's in-memory and on-disk names differ, so this adapter cannot be merged by name")
    return out


def write_merged(ctx: StageContext, model_dir: Path, adapter_dir: Path, out: Path) -> int:
    """The input checkpoint with the adapter folded in, shard by shard, in
    each tensor's own dtype; returns how many weights changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file


    info = inspect_checkpoint(model_dir)
    deltas = on_disk_names(adapter_deltas(adapter_dir), set(info.tensors), model_dir,
                           family=family_for_config(info.config))
    for i, file in enumerate(info.files):
        ctx.stop_point()
        with safe_open(model_dir / file, "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        for name in set(tensors) & set(deltas):
            tensors[name] = (tensors[name].float() + deltas[name]).to(tensors[name].dtype)
        save_file(tensors, out / file, metadata=metadata)
        ctx.progress(i + 1, len(info.files), "files")
    if info.index is not None:
        shutil.copy2(model_dir / INDEX_FILE, out / INDEX_FILE)  # same tensors, shapes and dtypes
    copy_side_files(model_dir, out)
    shutil.copy2(model_dir / "config.json", out / "config.json")
    return len(deltas)


def _free_memory() -> None:
    """Give the training models' memory back before merging (GPU caches too)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ── the stages ──────────────────────────────────────────────────────────────


def run_training(ctx: StageContext, mode: str, *, model_dir: Path | None = None) -> StageResult:
    """Train `ctx.stage` (a typed training stage) on `model_dir`, default
    this stage's input model; the merged model goes to the stage's output."""
    import torch

    from stations.loader import fit_cpu_kernels, four_bit_layout, load

    # 1. parameters
    model_dir = model_dir or input_model_dir(ctx)
    params = read_params(ctx, mode, model_dir)
    # 2-3. models and text, examples
    torch.manual_seed(params.seed)
    student = load(ctx, model_dir, with_tokenizer=True, purpose=f"{ctx.stage.type} student",
                   require_4bit=base_bits(ctx) == 4)
    quantized = student.plan.strategy in FOUR_BIT_STRATEGIES
    model = student.model if student.device != "cpu" or quantized else student.model.float()
    base_4bit = four_bit_layout(model).quantized if quantized else 0  # Linear4bit layers LoRA trains through
    if quantized:
        fit_cpu_kernels(model, training=True)  # before any forward: the probe's eval pass would repack weights
    family = family_for_config(json.loads((model_dir / "config.json").read_text()))
    targets = params.targets or family.lora_targets
    limit = params.examples_needed
    budget = None if limit is None else limit * params.sequence_length
    data = load_texts(ctx, params, student.tokenizer, max_chars=corpus_mod.chars_for_tokens(budget))
    examples = make_examples(student.tokenizer, data.texts, sequence_length=params.sequence_length, limit=limit)
    if not examples:
        raise StageFailed(f"dataset {data.ref!r} yields no example of 2+ tokens; give it text")
    pad_id = student.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (student.tokenizer.eos_token_id or 0)  # masked either way
    teacher = None
    if params.mode == "compensation":
        teacher = load(ctx, teacher_dir(ctx, params.teacher), with_tokenizer=False, purpose="teacher").model
        teacher.requires_grad_(False)
    objective = Objective(params, teacher)
    # 4. adapter on the text layers, training
    modules, dropped = _attach_targets(ctx, model, tuple(targets), family)
    peft_model = wrap_with_lora(model, params, modules, quantized=quantized)
    trainable, total = trainable_counts(peft_model)
    steps = total_steps(params, len(examples))
    before = probe_loss(peft_model, objective, examples, pad_id=pad_id, device=student.device)
    stream = batches(examples, batch_size=params.batch_size, pad_id=pad_id, seed=params.seed)
    curve = train_loop(ctx, peft_model, objective, stream, params=params, steps=steps, device=student.device)
    after = probe_loss(peft_model, objective, examples, pad_id=pad_id, device=student.device)
    # 5. adapter, then the merged model (from the files, not from memory)
    adapter_dir = ctx.stage_dir / ADAPTER_DIR
    peft_model.save_pretrained(adapter_dir)
    student_plan = student.plan.strategy
    del peft_model, model, student, teacher, objective
    _free_memory()
    out = output_model_dir(ctx)
    merged = write_merged(ctx, model_dir, adapter_dir, out)
    # 6. record
    metrics = {"mode": params.mode, "method": "lora", "steps": steps, "initialLoss": curve[0],
               "finalLoss": curve[-1], "probeLossBefore": before, "probeLossAfter": after,
               "trainableParams": trainable, "totalParams": total,
               "trainableParamsPct": round(100 * trainable / total, 4), "targets": list(targets),
               "loraModules": len(modules), DROPPED_KEY: dropped,
               "rank": params.rank, "alpha": params.alpha, "mergedWeights": merged, "merged": True,
               "mergeRequested": params.merge_requested, "quantized": quantized, "examples": len(examples),
               "loadPlan": student_plan, "base4bitModules": base_4bit,
               "learningRate": params.learning_rate, "modelParamsB": round(params.params_b, 6),
               "modelSizeFrom": params.size_source, "dataset": data.provenance(),
               RESOLVED: resolved_fields(ctx, params, steps=steps, targets=tuple(targets), data=data)}
    if params.mode == "compensation":
        metrics |= {"teacher": params.teacher, "lossType": params.loss_type, "kdTemperature": params.kd_temperature}
    sidecar = ctx.stage_dir / SIDECAR
    write_json(sidecar, {**metrics, "lossCurve": curve, "inputModelDir": str(model_dir), "config": asdict(params)})
    return model_result(ctx, out, metrics, adapter_dir, sidecar)


def run_train(ctx: StageContext) -> StageResult:
    """`train`: LoRA recovery, merged (full fine-tuning is not offered; see module docstring)."""
    return run_training(ctx, "lora")


def run_lora(ctx: StageContext) -> StageResult:
    """`lora`: recovery LoRA; distils instead when the stage names a teacher."""
    return run_training(ctx, "lora")


def run_compensation(ctx: StageContext) -> StageResult:
    """`compensation-lora`: KL distillation from the teacher (default: the unpruned source)."""
    return run_training(ctx, "compensation")
