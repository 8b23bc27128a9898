"""The stage catalog: every stage type an alloy may name, once.

A row says what the factory does with a stage type: its typed schema (the
pydantic model in `factory.alloy`), its role (`forge`: a station here runs
it; `ship`: handed to the shipping side, listed in result.json, never run
here; `refused`: not an llm-forge stage, refused at intake with the row's
reason), the station that runs it ("module:callable", imported only in the
part's child process), how much model it writes (for the disk estimate),
which of its keys name corpora, datasets and benchmarks (for the plan-time
data checks), and its support probe (can this node run it at all?).

Plan, validation, the intake gate, the child and the disk estimate all read
this table. It imports nothing heavy and nothing from `stations`: probes are
"module:function" strings into `factory` modules that inspect the node
(files, package metadata), so the daemon can ask them at intake.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from factory.alloy import STAGE_TYPES, GenericStage, QuantStage, Stage
from factory.errors import StageFailed

Role = Literal["forge", "ship", "refused"]
FORGE, SHIP, REFUSED = "forge", "ship", "refused"


@dataclass(frozen=True)
class Unsupported:
    """Why this node cannot run (part of) a stage: `key` is the JSON path
    below the stage (".format", ".benchmarks[0].name", "" for the stage)."""

    key: str
    value: Any
    problem: str
    fix: str


@dataclass(frozen=True)
class ProbeEnv:
    """What a probe may look at: the root and its node config, and how the
    Hugging Face caches are reached (None: huggingface_hub's defaults)."""

    root: Path
    config: Any  # factory.nodeconfig.NodeConfig
    offline: bool | None = None
    hf_cache_dir: Path | None = None


Probe = Callable[[Stage, ProbeEnv], Iterator[Unsupported]]


def _never(stage: Stage) -> float:
    return 0.0


def _one(stage: Stage) -> float:
    return 1.0


# A quantized type is at most ~8.5 bits a weight (Q8_0): about 0.55 of the
# 16-bit model. GGUF also writes the f16 conversion it quantizes from.
_QUANT_TYPE_FRACTION = 0.55


def _quant_copies(stage: Stage) -> float:
    assert isinstance(stage, QuantStage)
    f16 = 1.0 if stage.format == "gguf" else 0.0
    return f16 + _QUANT_TYPE_FRACTION * len(stage.quant_types)


@dataclass(frozen=True)
class StageKind:
    """One row of the catalog (see the module docstring)."""

    type: str
    role: Role
    station: str | None = None  # "module:callable" for forge rows
    copies: Callable[[Stage], float] = _never  # model copies written, in units of the model at 16 bit
    corpus_keys: tuple[str, ...] = ()  # camelCase stage keys naming a calibration corpus (id or file)
    dataset_keys: tuple[str, ...] = ()  # camelCase stage keys naming a dataset id
    benchmark_keys: tuple[str, ...] = ()  # camelCase stage keys listing benchmarks
    probe: str | None = None  # "module:function" (stage, ProbeEnv) -> Iterator[Unsupported]
    needs_moe: bool = False
    reason: str = ""  # for refused rows: why, shown at intake

    @property
    def writes(self) -> str:
        """What it writes, in words (the protocol's catalog table)."""
        if self.copies is _never:
            return "no"
        return "yes, 0.55 per quant type (+1 f16 for gguf)" if self.copies is _quant_copies else "yes, 1 copy"

    @property
    def schema(self) -> type[Stage]:
        """The typed model an alloy's stage of this type parses into."""
        return STAGE_TYPES.get(self.type, GenericStage)


_CORPUS = ("calibrationCorpus", "calibrationCorpusFile")
_TRAINING = ("dataset",)
_NOT_LLM_FORGE = ("is a forge-alloy stage of another domain (Many-Worlds ensembles, computer vision), "
                  "not an llm-forge stage; this factory forges one language model per alloy")

_ROWS = (
    StageKind("source-config", FORGE, "stations.source_config:run_stage"),
    StageKind("modality", FORGE, "stations.modality:run_stage"),
    StageKind("expert-activation-profile", FORGE, "stations.profile:run_stage", corpus_keys=_CORPUS,
              needs_moe=True),
    StageKind("expert-prune", FORGE, "stations.expert_prune:run_stage", _one, corpus_keys=("calibrationCorpus",),
              dataset_keys=("profileDataset",), needs_moe=True),
    StageKind("prune", FORGE, "stations.head_prune:run_stage", _one, corpus_keys=_CORPUS,
              probe="factory.support:prune_problems"),
    StageKind("train", FORGE, "stations.lora:run_train", _one, dataset_keys=_TRAINING),
    # An adapter stage saves a whole model either way: merged, or the base
    # beside its adapter.
    StageKind("lora", FORGE, "stations.lora:run_lora", _one, dataset_keys=_TRAINING),
    StageKind("compensation-lora", FORGE, "stations.lora:run_compensation", _one, corpus_keys=_CORPUS,
              dataset_keys=("dataset", "calibrationDataset")),
    StageKind("compact", FORGE, "stations.compact:run_stage", _one, corpus_keys=_CORPUS),
    StageKind("context-extend", FORGE, "stations.context_extend:run_stage", _one,
              dataset_keys=("trainingDataset",)),
    StageKind("quant", FORGE, "stations.quant:run_stage", _quant_copies, probe="factory.support:quant_problems"),
    StageKind("eval", FORGE, "stations.eval:run_stage",
              corpus_keys=("evalCorpus", "heldOutCorpus", "evalCorpusFile", "heldOutCorpusFile"), benchmark_keys=("benchmarks",),
              probe="factory.support:benchmark_problems"),
    StageKind("package", FORGE, "stations.package:run_stage", _one),
    StageKind("selftest", FORGE, "factory.selftest:run_stage"),
    # forge-alloy's llm-forge domain maps `deliver` to publish.
    StageKind("publish", SHIP),
    StageKind("deliver", SHIP),
    StageKind("deploy", SHIP),
    *(StageKind(t, REFUSED, reason=_NOT_LLM_FORGE) for t in (
        "many-worlds-substrate", "many-worlds-adapter", "many-worlds-ensemble", "team-search", "gate-profile",
        "population-prune", "cv-ingest", "cv-eval")),
)
CATALOG: dict[str, StageKind] = {row.type: row for row in _ROWS}

_schema_only = set(STAGE_TYPES) - {t for t, k in CATALOG.items() if k.role != REFUSED}
assert not _schema_only, f"stage types with a schema but no catalog row: {sorted(_schema_only)}"

_UNKNOWN_REASON = "is not a stage type forge-alloy's llm-forge domain or this factory knows"


def kind_of(stage_type: str) -> StageKind:
    """The row for `stage_type`; an unknown type gets a refused row."""
    return CATALOG.get(stage_type) or StageKind(stage_type, REFUSED, reason=_UNKNOWN_REASON)


def forge_types() -> list[str]:
    """Stage types a station here runs, for messages."""
    return sorted(t for t, k in CATALOG.items() if k.role == FORGE)


def resolve(spec: str) -> Callable:
    """The callable a "module:function" string names (imports the module)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def load_station(stage_type: str) -> Callable:
    """The station callable for a forge stage type (imports its module: only
    the part's child process calls this)."""
    kind = kind_of(stage_type)
    if kind.role != FORGE or kind.station is None:
        what = "is handed to the ship role" if kind.role == SHIP else kind.reason
        raise StageFailed(f"stage type {stage_type!r} {what}; no station runs it here "
                          f"(stations: {', '.join(forge_types())})")
    return resolve(kind.station)


def unsupported(stage: Stage, env: ProbeEnv) -> list[Unsupported]:
    """What the stage's support probe says this node lacks (empty: it can run)."""
    kind = kind_of(stage.type)
    return list(resolve(kind.probe)(stage, env)) if kind.probe else []


def copies_written(stages: list[Stage]) -> float:
    """Model copies the stages write into the work dir, in units of the model at 16 bit."""
    return sum(kind_of(s.type).copies(s) for s in stages)


# Quantized output formats: format -> (its support probe, a no-argument
# function in factory.quant_support returning why this node cannot write it
# or None; the station function that makes it). The quant station and the
# plan both read this; a new format is a row here.
@dataclass(frozen=True)
class QuantFormat:
    probe: str  # "module:function" () -> reason | None, no torch
    maker: str | None  # "module:function" (ctx, src, out) -> metrics; None: cannot be made here yet
    # "module:function" (path) -> stations.runtime.Runtime: the format's own
    # runtime, for a format transformers does not load (None: eval loads the
    # quant stage's output dir with transformers, as any model dir).
    reader: str | None = None
    # "module:function" (config.json dict) -> reason | None, no torch: a
    # model this format's converter cannot take (its architecture), asked at
    # plan time with the source's config (or its family's names).
    model_probe: str | None = None


QUANT_FORMATS: dict[str, QuantFormat] = {
    "safetensors": QuantFormat("factory.quant_support:bnb_problem", "stations.quant_bnb:make_bnb4"),
    "bnb-nf4": QuantFormat("factory.quant_support:bnb_problem", "stations.quant_bnb:make_bnb4"),
    "bnb-4bit": QuantFormat("factory.quant_support:bnb_problem", "stations.quant_bnb:make_bnb4"),
    "gguf": QuantFormat("factory.quant_support:gguf_problem", "stations.quant_gguf:make_gguf",
                        "stations.llama_cpp_runtime:open_gguf", "factory.quant_support:gguf_model_problem"),
    "mlx": QuantFormat("factory.quant_support:mlx_problem", "stations.quant_mlx:make_mlx",
                       "stations.mlx_runtime:open_mlx", "factory.quant_support:mlx_model_problem"),
    "onnx": QuantFormat("factory.quant_support:onnx_problem", None),
}


def quant_maker(fmt: str) -> Callable:
    """The station function that writes `fmt` (child process only)."""
    row = QUANT_FORMATS.get(fmt)
    if row is None or row.maker is None:
        raise StageFailed(f"quant format {fmt!r} cannot be made on this node: "
                          f"{format_problem(fmt) or 'no maker is registered'}")
    return resolve(row.maker)


def artifact_formats() -> tuple[str, ...]:
    """Quant formats written as artifacts that a runtime of their own reads
    (gguf, mlx): eval measures them, package ships them."""
    return tuple(f for f, row in QUANT_FORMATS.items() if row.reader is not None)


def model_problem(fmt: str, config: dict) -> str | None:
    """Why quant format `fmt`'s converter cannot take a model with this
    config.json (None when it can, or the format has no such limit)."""
    row = QUANT_FORMATS.get(fmt)
    return resolve(row.model_probe)(config) if row is not None and row.model_probe else None


def format_problem(fmt: str) -> str | None:
    """Why this node cannot write quant format `fmt` (None when it can)."""
    row = QUANT_FORMATS.get(fmt)
    if row is None:
        return f"quant format {fmt!r} is unknown; known: {', '.join(sorted(QUANT_FORMATS))}"
    reason = resolve(row.probe)()
    if reason is None and row.maker is None:
        reason = f"this factory has no writer for quant format {fmt!r} yet, though this node has its tooling"
    return reason
