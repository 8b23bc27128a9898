"""Training data at plan time: is the dataset a stage trains on on this node?

A training stage names its data three ways, and this module turns each into
one `ResolvedDataset` (or a `DatasetProblem` naming the fix) without reading
the data and without importing `datasets` or pyarrow, so the planner and the
daemon's intake gate can ask it cheaply:

* `dataset`: a file inside the root (`data/train.jsonl`), or a dataset id
  (`m-a-p/CodeFeedback-Filtered-Instruction`). An id is looked for, in order,
  in the node config's `[datasets]` table (id -> a file inside the root), in
  the `datasets` library's cache (HF_DATASETS_CACHE: what `load_dataset(id)`
  prepared on this node or a copied one), and in the Hugging Face hub cache
  (HF_HUB_CACHE: `huggingface-cli download --repo-type dataset ID`). Not
  found: with HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set that is a problem;
  online it is a note (the `datasets` library streams it when the part runs).
* `domain` (code, reasoning, general, chat, science; `factory.alloy.DOMAINS`)
  when the stage names no dataset: `[domains]` maps it to a dataset id. A
  domain is never itself read as a dataset name.
* nothing, on a stage that distils from a teacher: the `general` domain
  (DISTILL_DOMAIN), since KL distillation matches the teacher's whole output
  distribution and needs broad text rather than one task's.

Known aliases (ALIASES): `wikitext-2`, `wikitext` and `Salesforce/wikitext`
all mean Salesforce/wikitext with config `wikitext-2-raw-v1`, the WikiText-2
raw text sentinel-ai's general-domain recipes trained on.

The same answer drives the station (`stations.training_data` loads what was
resolved here), so the plan and the run cannot disagree about which data a
stage trains on. The size-scaled training defaults (`size_defaults`) live
here too, beside the other run-time resolution of what a stage omits.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from factory.alloy import DOMAINS, ContextExtendStage, Stage
from factory.errors import PathEscapeError
from factory.nodeconfig import DATASET_FILE_SUFFIXES, DATASET_ID, NodeConfig
from factory.validation import is_local_path_like, resolve_inside

# as written -> (Hugging Face id, config)
ALIASES: dict[str, tuple[str, str | None]] = {
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "Salesforce/wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
}
DISTILL_DOMAIN = "general"
TRAINING_TYPES = ("train", "lora", "compensation-lora")
TRAIN_SPLIT = "train"  # the split every station trains on
# The `datasets` library's truthy spellings of its environment switches.
_TRUE = {"1", "ON", "YES", "TRUE"}
# Files a hub-cache snapshot holds data in (what `load_dataset(dir)` reads).
_SNAPSHOT_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".csv", ".txt")

Kind = Literal["file", "hf-cache", "hub-snapshot", "hub"]


@dataclass(frozen=True)
class ResolvedDataset:
    """Where a stage's training data is. `path`: the file (kind "file"), the
    datasets cache root ("hf-cache"), the hub-cache snapshot directory
    ("hub-snapshot"), or None ("hub": streamed from the Hub at run time)."""

    ref: str  # what the alloy (or the [domains] table) named
    kind: Kind
    id: str | None = None  # the Hugging Face id, aliases applied
    config: str | None = None  # the dataset configuration (e.g. wikitext-2-raw-v1)
    path: Path | None = None
    data_dir: str | None = None  # a snapshot's subdirectory that holds `config`
    domain: str | None = None  # the domain that chose it, if one did
    json_path: str = ""
    note: str = ""

    @property
    def suffix(self) -> str:
        """The data file's format by suffix (".jsonl", ".parquet", ...); "" unless a file."""
        return self.path.suffix.lower() if self.kind == "file" and self.path is not None else ""


@dataclass(frozen=True)
class DatasetProblem:
    """Why a stage's data is not usable on this node, and what provides it."""

    json_path: str
    value: object
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.json_path} = {self.value!r}: {self.problem}; {self.fix}"


Resolution = ResolvedDataset | DatasetProblem


# ── one dataset ─────────────────────────────────────────────────────────────


def resolve_dataset(
    dataset: str | None,
    domain: str | None,
    *,
    root: Path,
    config: NodeConfig,
    offline: bool | None = None,
    cache_dir: Path | None = None,
    hub_cache_dir: Path | None = None,
    json_path: str = "$.dataset",
) -> Resolution:
    """Where `dataset` (else the dataset `domain` maps to) is on this node.

    `offline` defaults to HF_DATASETS_OFFLINE or HF_HUB_OFFLINE, `cache_dir`
    to HF_DATASETS_CACHE and `hub_cache_dir` to HF_HUB_CACHE. Reads only
    directory entries and small metadata files.
    """
    env = _Env(Path(root), config, _offline(offline), _datasets_cache(cache_dir), _hub_cache(hub_cache_dir))
    if dataset:
        return env.dataset(dataset, json_path=json_path)
    if domain is None:
        return DatasetProblem(json_path, None, "names no training data",
                              f"set {json_path} to a dataset id or a file inside the root, or a domain "
                              f"({', '.join(DOMAINS)})")
    return env.domain(domain, json_path=json_path)


@dataclass(frozen=True)
class _Env:
    root: Path
    config: NodeConfig
    offline: bool
    cache_dir: Path
    hub_cache_dir: Path

    def domain(self, domain: str, *, json_path: str) -> Resolution:
        if domain not in DOMAINS:
            return DatasetProblem(json_path, domain, f"is not a training domain ({', '.join(DOMAINS)}), and a "
                                                     "domain is never read as a dataset name",
                                  "use one of those domains, or name the data in the stage's `dataset`")
        target = getattr(self.config.domains, domain)
        if target is None:
            return DatasetProblem(json_path, domain, f"has no dataset on this node: [domains] {domain} is unset "
                                                     "in factory_node.toml",
                                  f'set [domains] {domain} = "<dataset id>" in factory_node.toml, or name the '
                                  "data in the stage's `dataset`")
        found = self.dataset(target, json_path=json_path)
        if isinstance(found, DatasetProblem):
            return DatasetProblem(json_path, domain, f"maps to {target!r} ([domains] {domain}), and that "
                                                     f"dataset {found.problem}", found.fix)
        return replace(found, domain=domain)

    def dataset(self, ref: str, *, json_path: str) -> Resolution:
        hub_id, hub_config = ALIASES.get(ref, (ref, None))
        mapped = self.config.datasets.get(ref) or self.config.datasets.get(hub_id)
        if mapped is not None:
            key = ref if ref in self.config.datasets else hub_id
            return self.file(mapped, ref=ref, json_path=json_path, table_key=key)
        if is_local_path_like(ref, root=self.root):
            return self.file(ref, ref=ref, json_path=json_path)
        if not DATASET_ID.match(hub_id) or "--" in hub_id or ".." in hub_id:
            return DatasetProblem(json_path, ref, "is neither a file inside the root nor a dataset id",
                                  'name a file inside the root (e.g. "data/train.jsonl") or a Hugging Face '
                                  'dataset id ("org/name")')
        return self.hub(ref, hub_id, hub_config, json_path=json_path)

    def file(self, rel: str, *, ref: str, json_path: str, table_key: str | None = None) -> Resolution:
        where = f'[datasets] "{table_key}" in factory_node.toml' if table_key else json_path
        value = rel if table_key is None else ref
        try:
            path = resolve_inside(self.root, rel, json_path=json_path)
        except PathEscapeError as err:
            return DatasetProblem(json_path, value, f"{where} names {rel!r}, which {err.reason} and leaves the "
                                                    f"root {str(self.root)!r}",
                                  "put the file under the root (e.g. data/) and write its path relative to it")
        if not path.is_file():
            what = "a directory, not a file" if path.is_dir() else "missing"
            return DatasetProblem(json_path, value, f"{where} names {str(path)!r}, which is {what}",
                                  f"put the dataset file at {str(path)!r}, or fix the path")
        if not path.name.lower().endswith(DATASET_FILE_SUFFIXES):
            return DatasetProblem(json_path, value, f"{where} names {str(path)!r}, which is not a dataset file "
                                                    f"({', '.join(DATASET_FILE_SUFFIXES)})",
                                  "export the data as JSONL (one record per line) or parquet")
        return ResolvedDataset(ref=ref, kind="file", path=path, json_path=json_path,
                               note=f"mapped by {where}" if table_key else "")

    def hub(self, ref: str, hub_id: str, hub_config: str | None, *, json_path: str) -> Resolution:
        prepared = self.prepared(hub_id, hub_config)
        if isinstance(prepared, str):
            return DatasetProblem(json_path, ref, prepared, self.fix(hub_id))
        if prepared:
            return ResolvedDataset(ref=ref, kind="hf-cache", id=hub_id, config=hub_config, path=self.cache_dir,
                                   json_path=json_path, note=f"in the datasets cache {str(self.cache_dir)!r}")
        snapshot = self.snapshot(hub_id)
        if snapshot is not None:
            data_dir, problem = _snapshot_config(snapshot, hub_config)
            if problem is not None:
                return DatasetProblem(json_path, ref, problem, self.fix(hub_id))
            return ResolvedDataset(ref=ref, kind="hub-snapshot", id=hub_id, config=hub_config, path=snapshot,
                                   data_dir=data_dir, json_path=json_path,
                                   note=f"in the hub cache {str(snapshot)!r}")
        if self.offline:
            return DatasetProblem(
                json_path, ref,
                f"is not on this node (no [datasets] entry in factory_node.toml, not in the datasets cache "
                f"{str(self.cache_dir)!r} nor the hub cache {str(self.hub_cache_dir)!r}), and "
                "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE forbid downloading it", self.fix(hub_id))
        return ResolvedDataset(ref=ref, kind="hub", id=hub_id, config=hub_config, json_path=json_path,
                               note="not on this node; the datasets library streams it from the Hub when the "
                                    "part runs")

    def prepared(self, hub_id: str, hub_config: str | None) -> bool | str:
        """Whether the datasets cache holds `hub_id`'s train split (the layout
        `load_dataset` writes: <ns>___<snake name>/<config>/<version>/<hash>/),
        or why it cannot serve it (several configurations and none chosen,
        no train split)."""
        base = self.cache_dir / "___".join([*hub_id.split("/")[:-1], _snake(hub_id.split("/")[-1])])
        infos = {d.parent.parent.parent.name: d for d in sorted(base.glob("*/*/*/dataset_info.json"))}
        if hub_config is None and len(infos) > 1:
            return (f"is in the datasets cache in several configurations ({', '.join(sorted(infos))}), and the "
                    "stage cannot say which")
        info = infos.get(hub_config) if hub_config is not None else next(iter(infos.values()), None)
        if info is None:
            return False
        splits = _splits(info)
        if TRAIN_SPLIT not in splits:
            return f"is in the datasets cache ({str(info.parent)!r}) without a {TRAIN_SPLIT} split (has {splits})"
        return True

    def snapshot(self, hub_id: str) -> Path | None:
        """The hub cache's snapshot of dataset repo `hub_id` (refs/main, else
        its only snapshot), if it holds a data file."""
        repo = self.hub_cache_dir / ("datasets--" + hub_id.replace("/", "--"))
        ref = repo / "refs" / "main"
        try:
            snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else \
                list((repo / "snapshots").iterdir())
        except OSError:
            return None
        if len(snapshots) != 1 or not snapshots[0].is_dir():
            return None
        has_data = any(p.name.lower().endswith(_SNAPSHOT_DATA_SUFFIXES) for p in snapshots[0].rglob("*"))
        return snapshots[0] if has_data else None

    def fix(self, hub_id: str) -> str:
        return (f"on a connected machine run `huggingface-cli download --repo-type dataset {hub_id}` (newer "
                f"huggingface_hub: `hf download {hub_id} --repo-type dataset`) and copy its "
                f"datasets--{hub_id.replace('/', '--')} directory into {str(self.hub_cache_dir)!r}; or export "
                f'it to JSONL under the root and add "{hub_id}" = "data/<file>.jsonl" under [datasets] in '
                "factory_node.toml")


def _snapshot_config(snapshot: Path, hub_config: str | None) -> tuple[str | None, str | None]:
    """(data_dir, problem): how a snapshot serves `hub_config`. data_dir is
    None when the dataset card declares the configuration (it is loaded by
    name) or none is asked for, else the subdirectory that holds it; the
    problem says the snapshot has neither."""
    if hub_config is None:
        return None, None
    readme = snapshot / "README.md"
    try:
        card = readme.read_text(encoding="utf-8", errors="replace")[:1 << 20] if readme.is_file() else ""
    except OSError:
        card = ""
    if re.search(rf"^\s*-?\s*config_name:\s*['\"]?{re.escape(hub_config)}['\"]?\s*$", card, re.M):
        return None, None
    if (snapshot / hub_config).is_dir():
        return hub_config, None
    return None, f"is in the hub cache {str(snapshot)!r}, but without the configuration {hub_config!r}"


def _splits(info_file: Path) -> list[str]:
    """Split names a prepared cache directory's dataset_info.json lists."""
    try:
        return sorted((json.loads(info_file.read_text(encoding="utf-8")).get("splits") or {}).keys())
    except (OSError, ValueError, AttributeError):
        return []


def _snake(name: str) -> str:
    """A dataset name as the datasets library names its cache directory:
    "CodeFeedback-Filtered-Instruction" -> "code_feedback-filtered-instruction"
    (an underscore where an upper-case letter starts a word, then lower case)."""
    name = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return _env_true("HF_DATASETS_OFFLINE") or _env_true("HF_HUB_OFFLINE")


def datasets_cache_dir() -> Path:
    """The datasets library's cache: HF_DATASETS_CACHE, else HF_HOME/datasets."""
    from huggingface_hub import constants

    explicit = os.environ.get("HF_DATASETS_CACHE")
    return Path(explicit).expanduser() if explicit else Path(constants.HF_HOME) / "datasets"


def _datasets_cache(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else datasets_cache_dir()


def _hub_cache(hub_cache_dir: Path | None) -> Path:
    from huggingface_hub import constants

    return Path(hub_cache_dir if hub_cache_dir is not None else constants.HF_HUB_CACHE)


# ── a stage's data ──────────────────────────────────────────────────────────


def _usable_ref(value: str | None, root: Path) -> bool:
    """A `calibrationDataset` names data when it is a path or an id; published
    alloys also use it for a description ("heldout_mix.jsonl (50 examples: ...)")."""
    return bool(value) and (is_local_path_like(value, root=root) or bool(DATASET_ID.match(value)))


def training_dataset(stage: Stage, index: int, *, root: Path, config: NodeConfig, offline: bool | None = None,
                     cache_dir: Path | None = None, hub_cache_dir: Path | None = None) -> Resolution | None:
    """The data a train / lora / compensation-lora stage trains on; None when
    it distils on a pinned calibration corpus instead (the corpus checks
    cover that). Order: `dataset`, a `calibrationDataset` that names data,
    the `domain`'s dataset, and for a stage with a teacher DISTILL_DOMAIN."""
    if getattr(stage, "calibration_corpus", None) or getattr(stage, "calibration_corpus_file", None):
        if getattr(stage, "teacher", None):
            return None
    kw = dict(root=Path(root), config=config, offline=offline, cache_dir=cache_dir, hub_cache_dir=hub_cache_dir)
    at = f"$.stages[{index}]"
    dataset, calibration = getattr(stage, "dataset", None), getattr(stage, "calibration_dataset", None)
    if dataset:
        return resolve_dataset(dataset, None, json_path=f"{at}.dataset", **kw)
    if _usable_ref(calibration, Path(root)):
        return resolve_dataset(calibration, None, json_path=f"{at}.calibrationDataset", **kw)
    domain = getattr(stage, "domain", None)
    if domain in DOMAINS or (domain and not getattr(stage, "teacher", None)):
        return resolve_dataset(None, domain, json_path=f"{at}.domain", **kw)
    if getattr(stage, "teacher", None):
        found = resolve_dataset(None, DISTILL_DOMAIN, json_path=f"{at}.teacher", **kw)
        if isinstance(found, ResolvedDataset):
            return replace(found, note=f"distils on the {DISTILL_DOMAIN} domain's dataset (the stage names "
                                       f"none); {found.note}")
        return found
    return DatasetProblem(f"{at}.dataset", None, f"stage {index} ({stage.type}) names no training data",
                          f"set {at}.dataset to a dataset id or a file inside the root, or {at}.domain to one "
                          f"of {', '.join(DOMAINS)}")


def stage_datasets(stage: Stage, index: int, **kw) -> list[Resolution]:
    """Every dataset a stage names, resolved: a training stage's training
    data, else each of its catalog `dataset_keys` that is set."""
    from factory.catalog import kind_of

    if stage.type in TRAINING_TYPES:
        found = training_dataset(stage, index, **kw)
        return [] if found is None else [found]
    out: list[Resolution] = []
    for key in kind_of(stage.type).dataset_keys:
        value = stage.field_value(key)
        if isinstance(value, str) and value:
            out.append(resolve_dataset(value, None, json_path=f"$.stages[{index}].{key}", **kw))
    if isinstance(stage, ContextExtendStage) and stage.training_steps and not stage.training_dataset:
        out.append(resolve_dataset(None, stage.training_domain, json_path=f"$.stages[{index}].trainingSteps", **kw))
    return out


# ── training defaults by size ───────────────────────────────────────────────


@dataclass(frozen=True)
class SizeDefaults:
    """Steps and learning rate for a model under `below_b` billion parameters."""

    below_b: float
    steps: int
    learning_rate: float


SIZE_DEFAULTS: tuple[SizeDefaults, ...] = (
    # Smaller models lose more to pruning relative to their size and take
    # larger steps safely: more steps, higher rate. Both fall with size
    # (never rise), in the bands sentinel-ai's default_train_params used.
    SizeDefaults(5.0, 300, 1e-4),
    SizeDefaults(15.0, 200, 5e-5),
    SizeDefaults(35.0, 150, 2e-5),
    SizeDefaults(math.inf, 100, 2e-5),
)


def size_defaults(params_b: float) -> SizeDefaults:
    """The SIZE_DEFAULTS row for a model of `params_b` billion parameters."""
    return next(row for row in SIZE_DEFAULTS if params_b < row.below_b)
