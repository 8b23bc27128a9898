"""The training stations: `train`, `lora` and `compensation-lora`, one LoRA path.

* `lora`: recovery fine-tuning on a dataset with causal-LM cross-entropy.
  A `lora` stage that names a `teacher` distils, like compensation-lora.
* `compensation-lora`: KL distillation of the (pruned) student towards a
  teacher, by default the alloy's unpruned source model (`teacher: "source"`).
  `lossType` "kl" (default) or "kl+ce" (KL + cross-entropy, equal weights).
* `train`: the same LoRA recovery path, merged. Full fine-tuning is not
  offered: it needs optimiser state for every weight (3-4x the model in
  memory), which hive nodes sized for inference do not have; a merged LoRA
  gives the next stage the same thing, a full model directory.

Phases, top to bottom in `run_training`:

1. Parameters (alloy values, else the documented defaults below; targets
   default to the family's `lora_targets`).
2. Text: a JSONL/text file inside the factory root, or an HF dataset id
   through `datasets` when that package is installed and the Hub reachable.
3. Examples: each document + EOS, cut into `sequenceLength` chunks; batches
   are right-padded, pad labels are -100 and their attention mask 0, so pads
   never count in the loss (right padding + causal attention also leaves the
   real tokens' logits untouched).
4. Load the student as the load plan says (4-bit QLoRA only when the plan
   chose 4-bit on a GPU; on a CPU the weights are trained against in fp32),
   the teacher for distillation, wrap the student with peft, train: fixed
   seed, progress per step, a stop point between steps.
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

import importlib.util
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from adapters import family_for_config
from factory.alloy import learning_rate_value
from factory.errors import StageFailed
from factory.integrity import sha256_file
from factory.model_files import inspect_checkpoint
from factory.stages import StageContext, StageResult
from factory.validation import is_local_path_like
from stations import corpus as corpus_mod
from stations.base import (
    copy_side_files, input_model_dir, model_result, output_model_dir, source_model_dir, stage_field,
)

# Defaults when the alloy is silent. Alloys usually give steps and lr; these
# are small on purpose: a forgotten field should cost minutes, not hours.
DEFAULT_STEPS = 100
DEFAULT_LEARNING_RATE = 2e-4  # the usual LoRA rate; full fine-tuning would want ~10x less
DEFAULT_RANK = 16  # r=16 recovers most of what r=64 does at a quarter of the adapter
DEFAULT_ALPHA_PER_RANK = 2.0  # alpha = 2r, scale 2: the common choice
DEFAULT_DROPOUT = 0.0  # 0 keeps runs reproducible across devices; alloys may set 0.05
DEFAULT_BATCH_SIZE = 4
DEFAULT_SEQUENCE_LENGTH = 512  # long enough for instruction pairs, short enough for 4-bit 7B on 24 GB
DEFAULT_SCHEDULER = "cosine"
DEFAULT_WARMUP_RATIO = 0.0
DEFAULT_MAX_GRADIENT_NORM = 1.0
DEFAULT_KD_TEMPERATURE = 2.0  # softens both distributions so the teacher's ranking of wrong tokens counts
DEFAULT_SEED = 0
PROBE_EXAMPLES = 16  # examples scored before and after training (in-sample probe)
SCHEDULERS = ("constant", "linear", "cosine")
LOSS_TYPES = ("kl", "kl+ce")
IGNORE_INDEX = -100  # the label torch's cross-entropy skips
ADAPTER_DIR = "adapter"
SIDECAR = "training.json"
INDEX_FILE = "model.safetensors.index.json"
CORPUS_FILE_KEYS = ("calibrationCorpusFile",)
CORPUS_ID_KEYS = ("calibrationCorpus",)
GRADIENT_CHECKPOINTING = ("gradient_checkpointing", "gradient-checkpointing", "gradientCheckpointing")
# Record shapes a dataset line may have, tried in order: the fields joined
# with newlines make the training text. "messages" (chat) is handled apart.
RECORD_FIELDS: tuple[tuple[str, ...], ...] = (
    ("text",),
    ("prompt", "completion"),
    ("instruction", "input", "output"),
    ("query", "answer"),
    ("question", "answer"),
)


# ── parameters ──────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class TrainParams:
    mode: str  # "lora" (cross-entropy) or "compensation" (distillation)
    stage_type: str
    steps: int
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
    loss_type: str
    kd_temperature: float


def _where(ctx: StageContext, key: str) -> str:
    return f"$.stages[{ctx.index}].{key}"


def _choice(ctx: StageContext, key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise StageFailed(f"{_where(ctx, key)} = {value!r} is not supported; use one of {', '.join(allowed)}")
    return value


def read_params(ctx: StageContext, mode: str) -> TrainParams:
    """Alloy values over documented defaults; both spellings of rank/alpha."""
    rank = int(stage_field(ctx, "rank", "loraRank", default=DEFAULT_RANK))
    teacher = stage_field(ctx, "teacher")
    if mode == "compensation" and not teacher:
        teacher = "source"  # the schema requires it; in-process callers may omit it
    loss = str(stage_field(ctx, "lossType", default="kl")).lower().replace("_", "+").replace("-", "+")
    targets = stage_field(ctx, "targetModules", "target_modules")
    optimizations = stage_field(ctx, "optimizations", default=[]) or []
    try:
        lr = learning_rate_value(stage_field(ctx, "learningRate", "lr", default=DEFAULT_LEARNING_RATE))
    except ValueError as err:
        raise StageFailed(f"{_where(ctx, 'learningRate')}: {err}; write a number such as \"2e-4\"") from err
    return TrainParams(
        mode="compensation" if teacher else "lora", stage_type=str(ctx.stage.get("type")),
        steps=int(stage_field(ctx, "steps", default=0)) or 0,  # 0: derived in `total_steps`
        learning_rate=lr,
        batch_size=int(stage_field(ctx, "batchSize", default=DEFAULT_BATCH_SIZE)),
        gradient_accumulation=int(stage_field(ctx, "gradientAccumulation", default=1)),
        sequence_length=int(stage_field(ctx, "sequenceLength", "maxSeqLength", default=DEFAULT_SEQUENCE_LENGTH)),
        scheduler=_choice(ctx, "scheduler", str(stage_field(ctx, "scheduler", default=DEFAULT_SCHEDULER)).lower(),
                          SCHEDULERS),
        warmup_ratio=float(stage_field(ctx, "warmupRatio", default=DEFAULT_WARMUP_RATIO)),
        weight_decay=float(stage_field(ctx, "weightDecay", default=0.0)),
        max_gradient_norm=float(stage_field(ctx, "maxGradientNorm", default=DEFAULT_MAX_GRADIENT_NORM)),
        rank=rank, alpha=float(stage_field(ctx, "alpha", "loraAlpha", default=DEFAULT_ALPHA_PER_RANK * rank)),
        dropout=float(stage_field(ctx, "dropout", default=DEFAULT_DROPOUT)),
        targets=tuple(targets) if targets else None,
        epochs=stage_field(ctx, "epochs"),
        seed=int(stage_field(ctx, "seed", default=DEFAULT_SEED)),
        merge_requested=stage_field(ctx, "mergeAfter", "mergedAtSave"),
        gradient_checkpointing=any(o in GRADIENT_CHECKPOINTING for o in optimizations),
        teacher=teacher, loss_type=_choice(ctx, "lossType", loss, LOSS_TYPES),
        kd_temperature=float(stage_field(ctx, "kdTemperature", default=DEFAULT_KD_TEMPERATURE)),
    )


# ── text ────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class TextData:
    ref: str  # what the alloy named
    path: str | None  # the file read (None for a hub dataset)
    sha256: str | None
    texts: list[str]


def record_text(obj: Any) -> str | None:
    """The training text of one dataset record, or None if no known shape fits."""
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("messages"), list):
        parts = [m.get("content") for m in obj["messages"] if isinstance(m, dict)]
        return "\n".join(p for p in parts if isinstance(p, str)) or None
    for fields in RECORD_FIELDS:
        if isinstance(obj.get(fields[0]), str) and all(isinstance(obj.get(f, ""), str) for f in fields):
            return "\n".join(obj[f] for f in fields if obj.get(f))
    return None


def _bounded_lines(path: Path, where: str):
    """(line number, line) of a UTF-8 file, each line read with a cap: a
    line longer than corpus.MAX_DOC_CHARS is refused before it is whole in
    memory (one 100 MB line must not cost gigabytes when tokenised)."""
    limit = corpus_mod.MAX_DOC_CHARS
    with open(path, encoding="utf-8") as f:
        n = 0
        while line := f.readline(limit + 1):
            n += 1
            if len(line) > limit:
                raise StageFailed(f"{path}:{n} (from {where}): a line over {limit} characters; split the "
                                  "document into several lines (records)")
            yield n, line


def _read_file_texts(path: Path, where: str) -> list[str]:
    try:
        if path.suffix not in (".jsonl", ".ndjson"):
            return [_plain_text(path, where)]
        return _jsonl_texts(path, where)
    except UnicodeDecodeError as err:
        raise StageFailed(f"{path} (from {where}): not UTF-8 ({err.reason} at byte {err.start}); "
                          "re-encode the file as UTF-8") from err


def _plain_text(path: Path, where: str) -> str:
    """A plain-text dataset is one document, refused past MAX_DOC_CHARS."""
    parts, size = [], 0
    for _, line in _bounded_lines(path, where):
        size += len(line)
        if size > corpus_mod.MAX_DOC_CHARS:
            raise StageFailed(f"{path} (from {where}): a plain-text dataset over {corpus_mod.MAX_DOC_CHARS} "
                              "characters; give it as JSONL, one record per line")
        parts.append(line)
    return "".join(parts)


def _jsonl_texts(path: Path, where: str) -> list[str]:
    texts = []
    for n, line in _bounded_lines(path, where):
        if not line.strip():
            continue
        try:
            text = record_text(json.loads(line))
        except ValueError as err:
            raise StageFailed(f"{path}:{n} (from {where}): not JSON ({err}); fix that line") from err
        if text is None:
            shapes = ", ".join("+".join(f) for f in RECORD_FIELDS)
            raise StageFailed(f"{path}:{n} (from {where}): no training text; give each line one of "
                              f"{shapes} or messages[].content")
        texts.append(text)
    return texts


def _hub_texts(ctx: StageContext, ref: str, where: str) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise StageFailed(f"{where} = {ref!r} is not a file inside the factory root, and reading it as a Hugging "
                          "Face dataset needs the `datasets` package, which is not installed on this node; "
                          "export the data to JSONL under the root (e.g. data/train.jsonl) and name that path")
    import datasets

    try:
        rows = datasets.load_dataset(ref, split="train")
    except Exception as err:  # offline, unknown id, gated: all mean "not here"
        raise StageFailed(f"{where} = {ref!r}: the Hugging Face dataset could not be loaded ({err}); "
                          "export it to JSONL under the factory root and name that path") from err
    texts = [t for t in (record_text(r) for r in rows) if t]
    if not texts:
        raise StageFailed(f"{where} = {ref!r}: no record has a known text shape; export it to JSONL with \"text\"")
    return texts


def _dataset(ctx: StageContext, key: str, ref: str) -> TextData:
    where = _where(ctx, key)
    if not is_local_path_like(ref, root=ctx.layout.root):
        return TextData(ref, None, None, _hub_texts(ctx, ref, where))
    path = corpus_mod.local_file(ctx, ref, where=where, what="dataset")
    return TextData(ref, str(path), sha256_file(path), _read_file_texts(path, where))


def load_texts(ctx: StageContext, params: TrainParams) -> TextData:
    """Distillation prefers a pinned calibration corpus; else the dataset."""
    if params.mode == "compensation" and any(ctx.stage.get(k) for k in CORPUS_FILE_KEYS + CORPUS_ID_KEYS):
        c = corpus_mod.resolve(ctx, file_keys=CORPUS_FILE_KEYS, id_keys=CORPUS_ID_KEYS)
        return TextData(c.ref, str(c.path), c.sha256, list(corpus_mod.read_texts(c)))
    for key in ("dataset", "trainingDataset", "calibrationDataset"):
        if ctx.stage.get(key):
            return _dataset(ctx, key, str(ctx.stage[key]))
    raise StageFailed(f"stage {ctx.index} ({ctx.stage.get('type')}) names no training text; set "
                      f"{_where(ctx, 'dataset')} to a JSONL file inside the factory root")


# ── examples and batches ────────────────────────────────────────────────────


@dataclass
class Batch:
    input_ids: Any  # (B, T) long
    attention_mask: Any  # (B, T): 1 real, 0 pad
    labels: Any  # (B, T): input ids, IGNORE_INDEX at pads

    def to(self, device: str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def make_examples(tokenizer, texts: list[str], *, sequence_length: int) -> list[list[int]]:
    """Each document + EOS, cut into chunks of at most `sequence_length`
    tokens; chunks under 2 tokens have nothing to predict and are dropped."""
    eos = tokenizer.eos_token_id
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        out += [ids[i:i + sequence_length] for i in range(0, len(ids), sequence_length)]
    return [e for e in out if len(e) >= 2]


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


# ── models ──────────────────────────────────────────────────────────────────


def teacher_dir(ctx: StageContext, teacher: str) -> Path:
    """"source" or the alloy's own baseModel: the source; else resolved like a source."""
    from factory.errors import BadInput
    from factory.sources import resolve_source

    try:
        if teacher in ("source", ctx.alloy["source"].get("baseModel")):
            return source_model_dir(ctx)
        resolved = resolve_source({"baseModel": teacher, "architecture": ctx.alloy["source"]["architecture"]},
                                  root=ctx.layout.root, config=ctx.config, allow_download=True)
    except BadInput as err:
        raise StageFailed(f"{_where(ctx, 'teacher')}: {err}") from err
    if resolved.path is None:
        raise StageFailed(f"{_where(ctx, 'teacher')} = {teacher!r} names no model with weights")
    return resolved.path


def wrap_with_lora(model, params: TrainParams, targets: tuple[str, ...], *, quantized: bool):
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
                             target_modules=list(targets), bias="none")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise StageFailed(f"LoRA targets {list(targets)} do not fit this model ({err}); "
                          "set targetModules to module names the model has (e.g. q_proj, v_proj)") from err


def trainable_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ── training ────────────────────────────────────────────────────────────────


def total_steps(params: TrainParams, n_examples: int) -> int:
    """`steps`, else `epochs` over the examples, else DEFAULT_STEPS."""
    if params.steps:
        return params.steps
    if params.epochs:
        return params.epochs * math.ceil(n_examples / (params.batch_size * params.gradient_accumulation))
    return DEFAULT_STEPS


def lr_factor(step: int, *, total: int, warmup: int, scheduler: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    return 1.0 - progress if scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class Objective:
    """The loss of one batch: cross-entropy, or distillation from a teacher."""

    def __init__(self, params: TrainParams, teacher=None) -> None:
        self.params, self.teacher = params, teacher

    def __call__(self, model, batch: Batch):
        import torch

        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        if self.teacher is None:
            return causal_lm_loss(logits, batch.labels)
        with torch.no_grad():
            t_logits = self.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        if t_logits.shape[-1] != logits.shape[-1]:
            raise StageFailed(f"teacher vocabulary ({t_logits.shape[-1]}) differs from the student's "
                              f"({logits.shape[-1]}); distil from the same tokenizer's model")
        loss = distillation_loss(logits, t_logits.to(logits.device), batch.attention_mask,
                                 temperature=self.params.kd_temperature)
        return loss + causal_lm_loss(logits, batch.labels) if self.params.loss_type == "kl+ce" else loss


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
    warmup = math.ceil(params.warmup_ratio * steps)
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


def write_merged(ctx: StageContext, model_dir: Path, adapter_dir: Path, out: Path) -> int:
    """The input checkpoint with the adapter folded in, shard by shard, in
    each tensor's own dtype; returns how many weights changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file


    info = inspect_checkpoint(model_dir)
    deltas = adapter_deltas(adapter_dir)
    missing = sorted(set(deltas) - set(info.tensors))
    if missing:
        raise StageFailed(f"adapter weights {missing[:3]} have no tensor of that name in {model_dir}; the model's "
                          "in-memory and on-disk names differ, so this adapter cannot be merged by name")
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


def run_training(ctx: StageContext, mode: str) -> StageResult:
    import torch

    from stations.loader import load

    # 1-2. parameters and text
    params = read_params(ctx, mode)
    data = load_texts(ctx, params)
    model_dir = input_model_dir(ctx)
    # 3-4. models, examples, training
    torch.manual_seed(params.seed)
    student = load(ctx, model_dir, with_tokenizer=True, purpose=f"{ctx.stage.get('type')} student")
    quantized = student.plan.strategy.startswith("gpu-4bit")
    model = student.model if student.device != "cpu" or quantized else student.model.float()
    targets = params.targets or family_for_config(json.loads((model_dir / "config.json").read_text())).lora_targets
    examples = make_examples(student.tokenizer, data.texts, sequence_length=params.sequence_length)
    if not examples:
        raise StageFailed(f"dataset {data.ref!r} yields no example of 2+ tokens; give it text")
    pad_id = student.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (student.tokenizer.eos_token_id or 0)  # masked either way
    teacher = None
    if params.mode == "compensation":
        teacher = load(ctx, teacher_dir(ctx, params.teacher), with_tokenizer=False, purpose="teacher").model
        teacher.requires_grad_(False)
    objective = Objective(params, teacher)
    peft_model = wrap_with_lora(model, params, tuple(targets), quantized=quantized)
    trainable, total = trainable_counts(peft_model)
    steps = total_steps(params, len(examples))
    before = probe_loss(peft_model, objective, examples, pad_id=pad_id, device=student.device)
    stream = batches(examples, batch_size=params.batch_size, pad_id=pad_id, seed=params.seed)
    curve = train_loop(ctx, peft_model, objective, stream, params=params, steps=steps, device=student.device)
    after = probe_loss(peft_model, objective, examples, pad_id=pad_id, device=student.device)
    # 5. adapter, then the merged model (from the files, not from memory)
    adapter_dir = ctx.stage_dir / ADAPTER_DIR
    peft_model.save_pretrained(adapter_dir)
    del peft_model, model, student, teacher, objective
    _free_memory()
    out = output_model_dir(ctx)
    merged = write_merged(ctx, model_dir, adapter_dir, out)
    # 6. record
    metrics = {"mode": params.mode, "method": "lora", "steps": steps, "initialLoss": curve[0],
               "finalLoss": curve[-1], "probeLossBefore": before, "probeLossAfter": after,
               "trainableParams": trainable, "totalParams": total,
               "trainableParamsPct": round(100 * trainable / total, 4), "targets": list(targets),
               "rank": params.rank, "alpha": params.alpha, "mergedWeights": merged, "merged": True,
               "mergeRequested": params.merge_requested, "quantized": quantized, "examples": len(examples),
               "dataset": {"ref": data.ref, "path": data.path, "sha256": data.sha256}}
    if params.mode == "compensation":
        metrics |= {"teacher": params.teacher, "lossType": params.loss_type, "kdTemperature": params.kd_temperature}
    sidecar = ctx.stage_dir / SIDECAR
    sidecar.write_text(json.dumps({**metrics, "lossCurve": curve, "inputModelDir": str(model_dir),
                                   "config": asdict(params)}, indent=2) + "\n")
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
