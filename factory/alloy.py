"""The forge-alloy schema: what a recipe file may say, as pydantic v2 models.

Three promises shape every model here:

* **Nothing is lost.** Published alloys carry provenance fields no schema
  foresaw (`priorMetricBaselines`, `_note`, `tiers`, ...). Every model keeps
  unknown keys (`extra="allow"`) and an unknown stage `type` parses into
  `GenericStage`, so `model_dump(by_alias=True, exclude_unset=True)` gives back
  what `json.load` read. Dates stay the strings they were written as, for the
  same reason.
* **One spelling.** Keys are camelCase on disk (the forge-alloy convention)
  and snake_case in Python. Only the camelCase key is read: a snake_case
  key (`timeout_seconds`) is kept as an unknown extra, and
  `factory.validation` reports it, since the daemon and the stations read
  the camelCase key from the file and would ignore it.
* **Types, ranges and presence live here; relations between fields do not.**
  A prune `level` of 1.5 fails here; a `prunePct` that contradicts
  `keepExpertsPerLayer` is a rule in `factory.validation`, which also turns
  the errors of these models into findings with JSON paths.

Hashes are never computed from a model: re-serialising changes bytes. See
`factory.integrity`.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

# ── shared config and value types ───────────────────────────────────────────


class AlloyModel(BaseModel):
    """Base of every alloy model: camelCase aliases, extras kept, strict types.

    Strict, because an alloy is a contract: `"steps": "5"` or `"isMoE": 1`
    is a typo to report, not something to coerce silently.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=False,  # one spelling per field: the file's camelCase key
        validate_by_alias=True,
        extra="allow",
        strict=True,
        frozen=True,
        protected_namespaces=(),
    )


# ISO 8601 as published alloys write it: a date, optionally a time with
# fraction, optionally `Z`, `+00:00` or `-0500` (no colon). Checked with a
# pattern rather than `datetime.fromisoformat`, which reads `Z` and `-0500`
# only from Python 3.11 on.
_TIMESTAMP = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d{1,9})?)?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):?[0-5]\d)?)?$"
)


def _check_timestamp(value: str) -> str:
    """Accept the ISO 8601 shapes the corpus uses and keep the string as written."""
    match = _TIMESTAMP.match(value)
    try:
        if match is None:
            raise ValueError(value)
        date.fromisoformat(match["date"])  # a real calendar day
    except ValueError:
        raise PydanticCustomError(
            "timestamp",
            "is not an ISO 8601 date or date-time",
            {"fix": 'write it like "2026-04-08T16:36:55+00:00" or "2026-04-08"'},
        ) from None
    return value


Timestamp = Annotated[str, AfterValidator(_check_timestamp)]
"""An ISO 8601 date or date-time, kept as written so the file round-trips."""

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _check_sha256_hex(value: str) -> str:
    """A bare lowercase sha256 hex digest, as `fileHashes[].sha256` stores it."""
    if not _SHA256_HEX.match(value):
        raise PydanticCustomError(
            "sha256_hex",
            "is not a sha256 digest (64 lowercase hex characters, no prefix)",
            {"fix": "store the output of `sha256sum FILE` (just the hex)"},
        )
    return value


def _check_sha256_ref(value: str) -> str:
    """A sha256 digest with or without the `sha256:` prefix alloys use."""
    _check_sha256_hex(value.removeprefix("sha256:"))
    return value


Sha256Hex = Annotated[str, AfterValidator(_check_sha256_hex)]
Sha256Ref = Annotated[str, AfterValidator(_check_sha256_ref)]


def learning_rate_value(value: str | float | int) -> float:
    """The float a learning rate denotes; alloys write it as `"2e-4"` or `0.0002`.

    Raises ValueError when it is not a number.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _check_learning_rate(value: object) -> str | float | int:
    """Accept a positive number or numeric string; keep what was written.

    The corpus writes learning rates as strings ("2e-4") because JSON floats
    print badly; a numeric JSON value is accepted too.
    """
    fix = {"fix": 'use a positive number such as "2e-4" (a string) or 0.0002'}
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise PydanticCustomError("learning_rate", "must be a number or a numeric string", fix)
    try:
        number = learning_rate_value(value)
    except ValueError:
        raise PydanticCustomError("learning_rate", "is not a number", fix) from None
    if not number > 0 or number == float("inf"):
        raise PydanticCustomError("learning_rate", "must be a positive finite number", fix)
    return value


LearningRate = Annotated[Union[str, float, int], PlainValidator(_check_learning_rate)]

PositiveInt = Annotated[int, Field(ge=1)]

SafeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
"""A name other programs use as a path segment or an id (an adapter's name,
a corpus id, a hub organisation, a grid node): letters, digits, `.`, `_`,
`-`, starting with a letter or digit, at most 128 characters."""

# ── stages ──────────────────────────────────────────────────────────────────


class Stage(AlloyModel):
    """Fields every stage has. `timeoutSeconds` is our extension: it overrides
    the node's `forge.stage_timeout_seconds` for this one stage."""

    type: str
    timeout_seconds: float | None = Field(default=None, gt=0)

    def field_value(self, key: str) -> Any:
        """The value of the on-disk (camelCase) `key`: a declared field, its
        schema default when unset, or an extra key the alloy carries."""
        for name, info in type(self).model_fields.items():
            if info.alias == key:
                return getattr(self, name)
        return (self.model_extra or {}).get(key)


class GenericStage(Stage):
    """A stage whose `type` this factory does not know; kept verbatim so a
    newer recipe survives a round trip. Whether it can run is a plan question."""


class ExpertActivationProfileStage(Stage):
    """Routes a calibration corpus through an MoE and counts expert use (§4.1.3.4)."""

    type: Literal["expert-activation-profile"] = "expert-activation-profile"
    # An id into calibrationCorpora (file and hash there), or a file path;
    # one of the two is required (checked in validation).
    calibration_corpus: str | None = None
    calibration_corpus_file: str | None = None
    metric: Literal["activation_count", "router_l2", "activation_magnitude"] = "activation_count"
    # Tokens per calibration sequence; forge-alloy spells it maxLength.
    # 256 when neither is set: real attention context, while the (tokens x
    # top-k) expert rows REAP keeps stay small next to the model.
    sequence_length: PositiveInt | None = None
    max_length: int | None = Field(default=None, ge=128)
    # Below 8 routed tokens an expert's mean REAP is noise: flagged, not fatal.
    min_tokens_per_expert: int = Field(default=8, ge=0)
    calibration_examples: PositiveInt | None = None
    # 50k tokens: every expert of a 64-expert top-8 model sees thousands of
    # tokens on average, and a profile takes minutes on one GPU.
    calibration_tokens: PositiveInt = 50_000
    # A torch device string ("cuda:0", "cpu"); never a GPU's display name.
    device: str | None = Field(default=None, pattern=r"^(cpu|cuda(:\d+)?|auto)$")
    importance_output: str | None = None
    metric_version: str | None = None
    implementation: str | None = None
    notes: str | None = None

    @property
    def block_length(self) -> int:
        """Tokens per calibration block: sequenceLength, else maxLength, else 256."""
        for value in (self.sequence_length, self.max_length):
            if value is not None:
                return value
        return 256


class ExpertPruneStage(Stage):
    """Keeps the top-K experts per MoE layer.

    Either `keepExpertsPerLayer` (published alloys) or `keepExperts` (the
    older forge-alloy spelling) is required; that, and agreement with
    `prunePct` / `originalExpertsPerLayer`, is checked in validation.
    `expertsDropped`/`expertsRenamed` count tensors (3 per expert: gate, up,
    down), not experts.
    """

    type: Literal["expert-prune"] = "expert-prune"
    keep_experts_per_layer: PositiveInt | None = None
    keep_experts: PositiveInt | None = None
    original_experts_per_layer: PositiveInt | None = None
    prune_pct: float | None = Field(default=None, ge=0, lt=100)
    top_k: PositiveInt | None = None
    strategy: str | None = None
    selection_strategy: str | None = None
    # None: the strategy picks it (stations.expert_prune).
    metric: Literal["reap", "activation_count", "frequency", "gate_weight", "router_l2", "explicit"] | None = None
    metric_source: str | None = None
    profile_dataset: str | None = None
    profile_steps: PositiveInt | None = None
    importance_json: str | None = None
    expert_tensor_layout: Literal["auto", "mlp-experts-unfused", "block_sparse_moe-unfused", "granite-moe-fused",
                                  "deepseek-routed-shared"] = "auto"
    calibration_corpus: str | None = None
    experts_dropped: int | None = Field(default=None, ge=0)
    experts_renamed: int | None = Field(default=None, ge=0)
    router_sliced_layers: int | None = Field(default=None, ge=0)
    per_layer_normalized: bool | None = None
    # Explicit experts to keep, {"<layer>": [indices]} (metric "explicit").
    keep_expert_indices: dict[str, list[int]] | None = None
    # DeepSeek group-limited routing: keep whole groups, refuse, or collapse to one group.
    group_routing: Literal["auto", "preserve", "collapse"] | None = None
    implementation: str | None = None
    rationale: str | None = None
    notes: str | None = None


PruneStrategy = Literal["entropy", "magnitude", "gradient", "random", "activation-magnitude",
                        "calibration-aware-activation-count", "per-layer-normalized-router-importance"]


class PruneStage(Stage):
    """Attention-head pruning. Above 0.9 a model no longer recovers, and
    forge-alloy's own schema caps `level` there. Strategies and defaults are
    forge-alloy's."""

    type: Literal["prune"] = "prune"
    strategy: PruneStrategy
    level: float = Field(ge=0.0, le=0.9)
    min_heads_per_layer: PositiveInt = 4
    min_kv_heads_per_layer: PositiveInt = 2
    analysis_steps: PositiveInt = 200
    calibration_corpus: str | None = None
    calibration_corpus_file: str | None = None
    per_layer_normalized: bool | None = None
    # None removes pruned heads; "pad" zeroes them in place, keeping
    # heads x head_dim = hidden_size for runtimes that need it.
    defrag_mode: Literal["pad"] | None = None
    seed: int = Field(default=0, ge=0)  # the `random` strategy's seed
    notes: str | None = None


DOMAINS = ("code", "reasoning", "general", "chat", "science")
"""Training domains: keys the node config's [domains] table maps to a
dataset. A domain is never itself a dataset name."""

Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "polynomial"]
Precision = Literal["bf16", "fp16", "fp32"]


class _TrainingFields(Stage):
    """Optimiser fields shared by train and the LoRA stages, with forge-alloy's
    ranges and defaults. `steps` and `learningRate` have none here: they come
    from the family and the model's size at run time (factory.datasets), and
    the resolved values are written into the executed alloy."""

    domain: str | None = None  # one of DOMAINS when it selects the data (checked in validation)
    dataset: str | None = None
    steps: PositiveInt | None = None
    epochs: int | None = Field(default=None, ge=1, le=20)
    learning_rate: LearningRate | None = None
    batch_size: int = Field(default=4, ge=1, le=64)
    gradient_accumulation: int = Field(default=1, ge=1, le=16)
    scheduler: Scheduler = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    max_gradient_norm: float = Field(default=1.0, gt=0.0, le=10.0)
    precision: Precision = "bf16"
    sequence_length: int = Field(default=2048, ge=16, le=131072)
    optimizations: list[str] | None = None
    seed: int = Field(default=0, ge=0)
    notes: str | None = None
    # The adapter a train or LoRA stage trains (published alloys write
    # rank/alpha or loraRank/loraAlpha; both are accepted and must agree).
    rank: int | None = Field(default=None, ge=1, le=256)
    lora_rank: int | None = Field(default=None, ge=1, le=256)
    alpha: float | None = Field(default=None, gt=0, le=512)
    lora_alpha: float | None = Field(default=None, gt=0, le=512)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None

    @property
    def effective_rank(self) -> int:
        """The adapter rank, whichever key the alloy used (else the stage
        type's default: forge-alloy's 32 for a plain LoRA)."""
        for value in (self.rank, self.lora_rank):
            if value is not None:
                return value
        return self.default_rank

    @property
    def effective_alpha(self) -> float:
        """LoRA alpha, whichever key the alloy used; twice the rank if unset."""
        for value in (self.alpha, self.lora_alpha):
            if value is not None:
                return value
        return 2.0 * self.effective_rank

    @property
    def merges(self) -> bool:
        """Whether the adapter is merged into the saved weights."""
        return self.merges_by_default

    default_rank: ClassVar[int] = 16
    merges_by_default: ClassVar[bool] = True  # a train stage's adapter is merged into the weights


class TrainStage(_TrainingFields):
    """Fine-tuning on a dataset, through a LoRA adapter merged into the
    weights (rank 16 unless the stage says)."""

    type: Literal["train"] = "train"


class LoraStage(_TrainingFields):
    """A LoRA adapter: plain fine-tuning, or compensation distillation when it
    names a `teacher` (published alloys write `rank`/`alpha` or
    `loraRank`/`loraAlpha`; both are accepted and must agree)."""

    type: Literal["lora"] = "lora"
    quantize: bool | None = None
    quantize_bits: Literal[4, 8] | None = None
    merge_after: bool | None = None
    merged_at_save: bool | None = None
    name: SafeName | None = None
    teacher: str | None = None
    teacher_precision: str | None = None
    student_precision: str | None = None
    # forge-alloy's kl_logits | mse_hidden | both; "kl+ce" is ours (KL plus
    # next-token cross-entropy on the calibration text).
    loss_type: Literal["kl_logits", "mse_hidden", "both", "kl+ce"] = "kl_logits"
    kd_temperature: float = Field(default=2.0, gt=0)
    calibration_dataset: str | None = None
    calibration_source: str | None = None
    trainable_params_pct: float | None = Field(default=None, ge=0, le=100)

    default_rank: ClassVar[int] = 32
    merges_by_default: ClassVar[bool] = False

    @property
    def merges(self) -> bool:
        """mergeAfter or mergedAtSave when given, else the type's default."""
        for value in (self.merge_after, self.merged_at_save):
            if value is not None:
                return value
        return self.merges_by_default



class CompensationLoraStage(LoraStage):
    """KL distillation of a pruned student against its teacher (§4.1.3.3)."""

    type: Literal["compensation-lora"] = "compensation-lora"  # type: ignore[assignment]
    teacher: str
    calibration_corpus: str | None = None
    calibration_corpus_file: str | None = None
    teacher_quant: Literal["8bit", "4bit", "fp16"] | None = None
    student_quant: Literal["fp16", "4bit", "8bit"] | None = None

    default_rank: ClassVar[int] = 16
    merges_by_default: ClassVar[bool] = True


class CompactStage(Stage):
    """Activity-threshold compaction; thresholds are fractions of each
    layer's peak importance (docs/COMPACT.md), defaults forge-alloy's."""

    type: Literal["compact"] = "compact"
    dead_threshold: float = Field(default=0.1, ge=0.0, le=1.0)
    dormant_threshold: float = Field(default=0.2, ge=0.0, le=1.0)
    low_threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    medium_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    high_threshold: float = Field(default=0.7, ge=0.0, le=1.0)
    target_size_gb: float | None = Field(default=None, gt=0)
    enable_quantization: bool = True
    # Ours (forge-alloy has none for compact): calibration blocks measured.
    analysis_steps: PositiveInt = 200
    calibration_corpus: str | None = None
    calibration_corpus_file: str | None = None


class QuantStage(Stage):
    """Quantised export (gguf, mlx, ...). `tiers` is free-form per quant type."""

    type: Literal["quant"] = "quant"
    format: Literal["gguf", "mlx", "safetensors", "onnx", "bnb-nf4", "bnb-4bit"]
    quant_types: list[str] = Field(min_length=1)
    device_targets: list[str] | None = None
    tool: str | None = None
    tiers: dict[str, Any] | None = None
    notes: str | None = None


class BenchmarkOptions(AlloyModel):
    """How a benchmark runs; set on the eval stage for all its benchmarks, or
    on one benchmark entry (which wins). Unset: the runner's documented default."""

    limit: PositiveInt | None = None  # problems / documents / token blocks evaluated
    n_samples: PositiveInt | None = None  # humaneval: samples per problem
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0)
    max_new_tokens: PositiveInt | None = None
    timeout: float | None = Field(default=None, gt=0)  # seconds per generated program
    workers: int | None = Field(default=None, ge=1, le=64)  # sandboxed programs at once
    batch_size: int | None = Field(default=None, ge=1, le=1024)
    eval_block_size: int | None = Field(default=None, ge=2)  # perplexity: tokens per block
    eval_tokens: PositiveInt | None = None  # perplexity: token budget
    eval_batch_size: int | None = Field(default=None, ge=1, le=1024)


class BenchmarkSpec(BenchmarkOptions):
    """One benchmark an eval stage runs."""

    name: str
    subset: str | None = None
    n_shot: int | None = Field(default=None, ge=0)
    metric: str | None = None
    calibrated: bool | None = None
    submit_to_leaderboard: bool | None = None
    samples_path: str | None = None
    base_samples_path: str | None = None
    calibration_anchor: dict[str, Any] | None = None
    notes: str | None = None


class EvalStage(Stage, BenchmarkOptions):
    """Benchmarks, optionally anchored against the unmodified base. A
    held-out corpus (an id into calibrationCorpora, or a file inside the
    root) is what perplexity measures."""

    type: Literal["eval"] = "eval"
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    eval_corpus: str | None = None
    held_out_corpus: str | None = None
    eval_corpus_file: str | None = None
    held_out_corpus_file: str | None = None
    passing_threshold: float | None = None
    compare_to_base: bool = True
    calibration_anchor: dict[str, Any] | None = None
    notes: str | None = None


class PackageStage(Stage):
    """Device-specific packaging of the finished weights."""

    type: Literal["package"] = "package"
    format: str
    runtime: str | None = None
    optimization: str = "balanced"
    validate_on: list[str] | None = None
    include_tokenizer: bool = True
    notes: str | None = None


class ContextExtendStage(Stage):
    """RoPE scaling (yarn, ntk, ...) to a longer context, then, with
    `trainingSteps`, a LoRA on long sequences of `trainingDataset` (the
    [domains] table's `general` dataset when it names none)."""

    type: Literal["context-extend"] = "context-extend"
    target_length: int = Field(ge=1024)
    method: Literal["yarn", "ntk", "linear", "dynamic-ntk"]
    training_dataset: str | None = None
    training_steps: PositiveInt | None = None
    # Ours: tokens per training sequence; the target length when unset.
    sequence_length: int | None = Field(default=None, ge=16, le=1048576)

    training_domain: ClassVar[str] = "general"


class SourceConfigStage(Stage):
    """Front bookend: the capabilities the recipe targets."""

    type: Literal["source-config"] = "source-config"
    context_length: PositiveInt | None = None
    input_modalities: list[str] | None = None
    tokenizer: str | None = None
    target_batch_size: PositiveInt | None = None
    target_devices: list[str] | None = None


class ModalityStage(Stage):
    """Declares a non-text modality. The factory does not graft encoders:
    the stage checks the model's own tower of that modality and its token
    ids, and records every non-text tower's tensors so later stages prove
    them unchanged (stations.modality, factory.declarations). A model
    without that tower is refused at plan time."""

    type: Literal["modality"] = "modality"
    modality: Literal["vision", "audio", "multimodal"]
    encoder_model: str
    projection_arch: Literal["mlp", "cross-attention", "linear"] = "mlp"
    freeze_base: bool = True
    freeze_encoder: bool = True
    training_dataset: str | None = None
    training_steps: PositiveInt | None = None
    projection_dim: PositiveInt | None = None


class PublishStage(Stage):
    """Upload to a hub organisation."""

    type: Literal["publish"] = "publish"
    org: SafeName
    repo_name_template: str = "{base}-{domain}-forged"
    include_alloy: bool = True
    card_from_benchmarks: bool = True
    tags: list[str] | None = None
    private: bool = False
    card_hash: str | None = None


class DeliverStage(Stage):
    """End bookend with no fields: hand the result to whoever queued it."""

    type: Literal["deliver"] = "deliver"


class DeployStage(Stage):
    """Deploy to a grid node."""

    type: Literal["deploy"] = "deploy"
    target: SafeName
    health_check: bool = True
    warmup: bool = True
    max_concurrency: PositiveInt | None = None
    auto_scale: bool | None = None


SelftestOutcome = Literal["pass", "fail", "crash", "hang", "nospace"]


class SelftestStage(Stage):
    """Our diagnostic stage: sleeps `seconds` over `steps` steps, then does
    what `outcome` says, so the line can be tested without a model."""

    type: Literal["selftest"] = "selftest"
    seconds: float = Field(default=0.1, ge=0)
    steps: PositiveInt = 1
    outcome: SelftestOutcome = "pass"


# The schema of each stage type (the discriminated union below). What the
# factory does with a type (role, station, data keys, probes) is its row in
# factory.catalog, which covers every type here.
STAGE_TYPES: dict[str, type[Stage]] = {
    "expert-activation-profile": ExpertActivationProfileStage,
    "expert-prune": ExpertPruneStage,
    "prune": PruneStage,
    "train": TrainStage,
    "lora": LoraStage,
    "compensation-lora": CompensationLoraStage,
    "eval": EvalStage,
    "quant": QuantStage,
    "package": PackageStage,
    "context-extend": ContextExtendStage,
    "compact": CompactStage,
    "source-config": SourceConfigStage,
    "modality": ModalityStage,
    "publish": PublishStage,
    "deliver": DeliverStage,
    "deploy": DeployStage,
    "selftest": SelftestStage,
}
GENERIC_TAG = "*"  # union tag of GenericStage; never a real stage type


def _stage_tag(value: object) -> str:
    """Pick the stage model by `type`; anything unknown goes to GenericStage."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) and kind in STAGE_TYPES else GENERIC_TAG


AnyStage = Annotated[
    Union[
        tuple(Annotated[model, Tag(tag)] for tag, model in STAGE_TYPES.items())
        + (Annotated[GenericStage, Tag(GENERIC_TAG)],)
    ],
    Discriminator(_stage_tag),
]

# ── top level ───────────────────────────────────────────────────────────────


class Source(AlloyModel):
    """The model a recipe starts from. A selftest alloy says
    `{"baseModel": "selftest", "architecture": "selftest"}`."""

    base_model: str
    architecture: str
    revision: str | None = None
    is_moe: bool | None = Field(default=None, alias="isMoE")
    license: str | None = None
    total_params_b: float | None = Field(default=None, gt=0)
    active_params_b: float | None = Field(default=None, gt=0)
    num_layers: PositiveInt | None = None
    num_experts_per_layer: PositiveInt | None = None
    total_experts: PositiveInt | None = None
    # The router's top-k: published alloys say numActivatedExperts; HF
    # configs say num_experts_per_tok; some tools say topK.
    num_activated_experts: PositiveInt | None = None
    num_experts_per_tok: PositiveInt | None = None
    top_k: PositiveInt | None = None
    context_length: PositiveInt | None = None
    # sha256 of a GGUF source's file (factory.gguf_source): the executed
    # alloy records it; an alloy that carries it runs only on those bytes.
    source_hash: Sha256Ref | None = None

    @property
    def router_top_k(self) -> int | None:
        """Experts each token is routed to, whichever key the alloy used."""
        for value in (self.num_activated_experts, self.num_experts_per_tok, self.top_k):
            if value is not None:
                return value
        return None


class FileHash(AlloyModel):
    """One file of a published model. `sha256` is bare hex (no prefix)."""

    filename: str
    sha256: Sha256Hex
    size: int | None = Field(default=None, ge=0)


class Integrity(AlloyModel):
    """Attestation of what was produced. `modelHash` is `sha256:` + the hash of
    the canonical `fileHashes` list (see `factory.integrity.model_hash`);
    older alloys have a legacy modelHash (the single shard's hash) and no
    fileHashes. Other hashes here may be placeholders in example alloys, so
    only fileHashes entries are format-checked."""

    trust_level: str | None = None
    model_hash: str | None = None
    alloy_hash: str | None = None
    parent_alloy_hash: str | None = None
    file_hashes: list[FileHash] | None = None
    code: dict[str, Any] | None = None
    datasets: list[dict[str, Any]] | None = None
    certifications: list[dict[str, Any]] | None = None
    attested_at: Timestamp | None = None


class BenchmarkResult(AlloyModel):
    """One measured benchmark; metrics vary per benchmark and stay free-form."""

    name: str
    score: float | None = None
    base_score: float | None = None
    samples_path: str | None = None
    base_samples_path: str | None = None


class Results(AlloyModel):
    """What a run produced; absent in a recipe that has not run."""

    completed_at: Timestamp | None = None
    duration_minutes: float | None = Field(default=None, ge=0)
    benchmarks: list[BenchmarkResult] | None = None
    hardware_verified: list[dict[str, Any]] | None = None
    samples: list[dict[str, Any]] | None = None
    integrity: Integrity | None = None


class Publication(AlloyModel):
    target: str | None = None
    url: str | None = None
    published_at: Timestamp | None = None


class Receipt(AlloyModel):
    """Proof of delivery. May be `{}` in an alloy that was never published."""

    publications: list[Publication] | None = None
    issued_at: Timestamp | None = None
    verify_url: str | None = None
    alloy_hash: str | None = None
    card_hash: str | None = None


class CalibrationCorpus(AlloyModel):
    """A hash-pinned calibration corpus (forge-alloy's CalibrationCorpusRef,
    plus `format`/`textField` so a station knows how to read it). Stages refer
    to it by `id` or `name`. No published alloy in our corpus has one yet."""

    id: SafeName | None = None
    name: SafeName | None = None
    path: str | None = None
    sha256: Sha256Ref | None = None
    format: str | None = None  # e.g. "jsonl"
    text_field: str | None = None  # the JSONL key holding the text
    examples: PositiveInt | None = None
    tokens: PositiveInt | None = None
    distribution_summary: str | None = None


class BenchmarkAcceptance(AlloyModel):
    """The gate one benchmark must clear: an absolute floor (0..1) and/or a
    maximum drop against the base anchor."""

    min: float | None = Field(default=None, ge=0.0, le=1.0)
    anchor_delta: float | None = None
    anchor_benchmark: str | None = None
    notes: str | None = None


class AcceptanceCriteria(AlloyModel):
    benchmarks: dict[str, BenchmarkAcceptance] | None = None
    hardware: dict[str, Any] | None = None
    integrity: dict[str, Any] | None = None
    notes: str | None = None


class Alloy(AlloyModel):
    """A whole forge-alloy: recipe, and once run, its results and receipt.

    `priority` is our extension: higher runs first; absent means 0.
    """

    name: str
    version: str
    description: str | None = None
    user_summary: str | None = None
    author: str | None = None
    tags: list[str] | None = None
    license: str | None = None
    source: Source
    target: dict[str, Any] | None = None
    stages: list[AnyStage] = Field(min_length=1)
    cycles: PositiveInt | None = None
    priority: int | None = None
    hardware: dict[str, Any] | None = None
    outputs: dict[str, Any] | None = None
    results: Results | None = None
    integrity: Integrity | None = None
    acceptance_criteria: AcceptanceCriteria | None = None
    calibration_corpora: list[CalibrationCorpus] | None = None
    prior_metric_baselines: list[dict[str, Any]] | None = None
    receipt: Receipt | None = None
    limitations: list[str] | None = None
    methodology_paper_url: str | None = None
    source_alloy_id: str | None = None
    forged_model_ids: list[str] | None = None
    derived_from: dict[str, Any] | None = None

    @property
    def effective_priority(self) -> int:
        """Queue priority; an alloy that does not say runs at 0."""
        return self.priority if self.priority is not None else 0

    def integrity_blocks(self) -> list[tuple[str, Integrity]]:
        """Every integrity record with its JSON path: published alloys keep it
        under `results`, ours may put it at the top level."""
        blocks = []
        if self.integrity is not None:
            blocks.append(("$.integrity", self.integrity))
        if self.results is not None and self.results.integrity is not None:
            blocks.append(("$.results.integrity", self.results.integrity))
        return blocks

    def dump(self) -> dict[str, Any]:
        """The alloy as JSON-ready data, with only the keys the file had.

        For display and for writing new alloys; never for hashing.
        """
        return self.model_dump(by_alias=True, exclude_unset=True)
