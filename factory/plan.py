"""The third validation level: can this node run this alloy, and how.

`factory.validation` answers "is the recipe well-formed" (parse, schema).
`make_plan` answers what only the node knows, before a part is queued or
claimed: is the architecture supported, does every stage have a station
here (or a role that takes it elsewhere), is the source model on disk and
sane, are the calibration corpora present with the pinned hashes, does the
model fit in memory and its work dir on the hot tier.

Every problem is a `Finding` at level "plan" naming the JSON path, the value
and the fix; the plan also lists what it resolved (source, family, station
per stage, load plan, sizes in GiB), so `factory plan` doubles as a dry run.

The checks are small functions over one shared `_Context`, run in the order
of `CHECKS`: each reads what the ones above it found (the resolved source,
the model's config, the checkpoint's headers) and adds findings. Nothing
here imports torch or reads tensor data: the daemon and the CLI both plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters import Family, UnknownArchitectureError, get_family
from factory import catalog, gguf_source, quant_support
from factory.alloy import Alloy, CalibrationCorpus, ExpertPruneStage, QuantStage, Stage
from factory.datasets import DatasetProblem, stage_datasets
from factory.declarations import declaration_problems
from factory.catalog import FORGE, REFUSED, SHIP, ProbeEnv, copies_written, forge_types, kind_of, unsupported
from factory.integrity import alloy_hash, sha256_file
from factory.resources import Need, checkpoint_sizes, need_for, node_resources, part_need
from factory.load_plan import GIB, LoadPlan, NodeMemory, decide_load_plan, measure_node_memory, nf4_size
from factory.model_files import CONFIG_FILE, CheckpointInfo, check_model_dir
from factory.nodeconfig import NodeConfig, load_node_config
from factory.protocol import Layout
from factory.sources import SELFTEST, ResolvedSource, SourceError, inside_root_or_cold, looks_local, resolve_source
from factory.tiers import Tier, node_tiers
from factory.validation import Finding, PathEscapeError, check_file, excerpt, resolve_inside

SOURCE_PATH = "$.source.baseModel"
ARCH_PATH = "$.source.architecture"



# ── the plan ────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class StagePlan:
    """Who runs one stage: a station on this node, the shipping side, or
    nobody (a refused type; the plan has a finding for it)."""

    index: int
    type: str
    role: str  # the catalog's: "forge", "ship" or "refused"
    station: str | None  # "module:callable" from factory.catalog
    runs_here: bool
    handed_off: bool  # the ship role runs it after the part finishes: listed, not a problem


@dataclass(frozen=True)
class FamilyPlan:
    """The source's family and geometry: from config.json when the model is on
    disk (`from_config`), else from what the alloy declares."""

    name: str
    is_moe: bool
    expert_count: int | None
    top_k: int | None
    layers: int | None
    from_config: bool


@dataclass(frozen=True)
class Resources:
    """Measured sizes (bytes here, GiB in `to_json`) and the hot tier's room."""

    model_bytes: int  # tensor bytes on disk, from the safetensors headers
    bytes_at_16bit: int  # what loading in bf16 takes, and what each copy writes
    full_copies: float  # model copies the stages write, in units of the 16-bit model (factory.catalog)
    work_dir_bytes: int  # bytes_at_16bit x (1 + full_copies)
    hot: Tier

    @property
    def fits(self) -> bool:
        return self.hot.room_for(self.work_dir_bytes)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_gib": _gib(self.model_bytes), "model_gib_at_16bit": _gib(self.bytes_at_16bit),
            "full_copies": round(self.full_copies, 3), "work_dir_gib": _gib(self.work_dir_bytes),
            "hot_tier": {"path": str(self.hot.path), "free_gib": _gib(self.hot.free_bytes),
                         "min_free_gb": self.hot.min_free_gb},
            "fits": self.fits,
        }


@dataclass
class Plan:
    """What this node would do with one alloy file, and what stops it."""

    file: Path
    findings: list[Finding] = field(default_factory=list)
    alloy_name: str | None = None
    alloy_hash: str | None = None
    source: ResolvedSource | None = None
    family: FamilyPlan | None = None
    stages: list[StagePlan] = field(default_factory=list)
    load_plan: LoadPlan | None = None
    resources: Resources | None = None
    need: Need | None = None  # what a part of it holds while it runs here (factory.resources)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        """Top-level keys as in `Report.to_json` (this extends a validation
        report); nested objects keep their dataclass field names, as the
        load plan already does in `model/load` events. Sizes are GiB."""
        return {
            "file": str(self.file), "ok": self.ok, "alloyName": self.alloy_name, "alloyHash": self.alloy_hash,
            "source": self.source.to_json() if self.source else None,
            "family": asdict(self.family) if self.family else None,
            "stages": [asdict(s) for s in self.stages],
            "loadPlan": asdict(self.load_plan) if self.load_plan else None,
            "resources": self.resources.to_json() if self.resources else None,
            "need": self.need.to_json() if self.need else None,
            "notes": list(self.notes),
            "findings": [asdict(f) for f in self.findings],
        }

    def render_text(self) -> str:
        """A few lines for people: what runs where, the sizes, then findings."""
        lines = [f"plan for {self.alloy_name or '?'} ({self.file}) {self.alloy_hash or ''}".rstrip()]
        if self.source is not None:
            lines.append(f"  source:    {_source_text(self.source)}")
        if self.family is not None:
            lines.append(f"  family:    {_family_text(self.family)}")
        for s in self.stages:
            where = s.station if s.runs_here else ("handed to the ship role (listed in result.json)"
                                                   if s.handed_off else "NOT RUNNABLE HERE")
            lines.append(f"  stage {s.index}:   {s.type:<26} {s.role:<6} {where}")
        if self.load_plan is not None:
            lp = self.load_plan
            lines.append(f"  load:      {lp.strategy} ({lp.dtype or 'no dtype'}, {lp.quantization or 'no quantization'}, "
                         f"{_max_memory_text(lp.max_memory)}): {lp.reason}")
        if self.resources is not None:
            lines.append(f"  resources: {_resources_text(self.resources)}")
        if self.need is not None:
            lines.append(f"  need:      {_need_text(self.need)}")
        lines += [f"  note:      {n}" for n in self.notes]
        lines.append("  ok" if self.ok else f"  {len(self.findings)} finding(s):")
        lines += [f"    {f.level}: {f}" for f in self.findings]
        return "\n".join(lines)


def _gib(nbytes: int) -> float:
    return round(nbytes / GIB, 6)  # six places: tiny test models still show


def _gib_text(nbytes: int) -> str:
    """GiB with two decimals; MiB (KiB) for what would round to 0.00 GiB."""
    gib = nbytes / GIB
    if gib >= 0.01 or nbytes == 0:
        return f"{gib:,.2f} GiB"
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 // 100 else f"{nbytes / 1024:.1f} KiB"


def _source_text(s: ResolvedSource) -> str:
    where = str(s.path) if s.path else "not on disk"
    repo = f" {s.repo_id}@{s.revision}" if s.repo_id else ""
    cached = " (cached)" if s.cached and s.kind == "hub" else ""
    gguf = f" from {s.gguf.path} sha256:{s.gguf.sha256}" if s.gguf else ""
    return f"{s.kind}{repo}{gguf} {where}{cached}" + (f"; {s.note}" if s.note else "")


def _family_text(f: FamilyPlan) -> str:
    experts = f"{f.expert_count} experts" if f.expert_count is not None else "experts not declared"
    top = f"top-{f.top_k}" if f.top_k is not None else "top-k not declared"
    moe = f"MoE, {experts}, {top}" if f.is_moe else "dense"
    layers = f"{f.layers} layers" if f.layers is not None else "layers not declared"
    origin = "config.json" if f.from_config else "as the alloy declares"
    return f"{f.name}, {moe}, {layers} ({origin})"


def _max_memory_text(max_memory: dict | None) -> str:
    """accelerate's {0: "10.00GiB", "cpu": "30.00GiB"} as people read it."""
    if not max_memory:
        return "no memory caps"
    return ", ".join(f"{'GPU ' + str(k) if isinstance(k, int) else k.upper()} {str(v).replace('GiB', ' GiB')}"
                     for k, v in max_memory.items())


def _need_text(n: Need) -> str:
    if n.whole_node:
        return n.basis
    gpus = f"{n.gpus} GPU{'s' if n.gpus != 1 else ''} ({_gib_text(n.vram_bytes)} VRAM)" if n.gpus else "no GPU"
    return f"{n.cpu_slots} CPU slot, {_gib_text(n.ram_bytes)} RAM, {gpus}, {_gib_text(n.disk_bytes)} disk: {n.basis}"


def _resources_text(r: Resources) -> str:
    return (f"model {_gib_text(r.model_bytes)} on disk, {_gib_text(r.bytes_at_16bit)} at 16 bit; "
            f"work dir {_gib_text(r.work_dir_bytes)} (1 + {r.full_copies:g} model copies); hot tier "
            f"{r.hot.path} has {_gib_text(r.hot.free_bytes)} free and keeps {r.hot.min_free_gb:g} GiB")


# ── entry point ─────────────────────────────────────────────────────────────


def make_plan(
    path: Path,
    *,
    root: Path,
    config: NodeConfig | None = None,
    node_memory: NodeMemory | None = None,
    offline: bool | None = None,
    hf_cache_dir: Path | None = None,
) -> Plan:
    """Check `path` at parse, schema and plan level against this node.

    `config` defaults to the root's factory_node.toml; `node_memory` to what
    `measure_node_memory` sees now (no GPU query: the daemon never inits
    CUDA). `offline` and `hf_cache_dir` default to huggingface_hub's
    HF_HUB_OFFLINE and HF_HUB_CACHE. Never downloads anything.
    """
    root = Path(root)
    report = check_file(Path(path), root=root)
    plan = Plan(file=Path(path), findings=list(report.findings),
                alloy_hash=alloy_hash(report.raw) if report.raw is not None else None)
    if report.alloy is None or report.findings:
        return plan
    ctx = _Context(alloy=report.alloy, root=root,
                   config=config if config is not None else load_node_config(Layout(root).node_config),
                   node_memory=node_memory, offline=offline, hf_cache_dir=hf_cache_dir)
    for check in CHECKS:
        plan.findings.extend(check(ctx))
    plan.alloy_name = report.alloy.name
    plan.source, plan.family, plan.stages = ctx.source, _family_plan(ctx), ctx.stages
    plan.load_plan, plan.resources, plan.notes = ctx.load_plan, ctx.resources, ctx.notes
    if plan.ok:
        node = node_resources(ctx.config)
        # The checks read the checkpoint already; without one (selftest, a
        # GGUF not dequantized yet, a Hub id not cached) nothing is re-read.
        plan.need = (need_for(report.alloy, checkpoint_sizes(ctx.info), config=ctx.config, node=node)
                     if ctx.info is not None else part_need(report.alloy, root=root, config=ctx.config, node=node))
    return plan


@dataclass
class _Context:
    """What the checks share. The fields below the line are filled in by the
    checks, in CHECKS order; a check whose input is missing does nothing."""

    alloy: Alloy
    root: Path
    config: NodeConfig
    node_memory: NodeMemory | None
    offline: bool | None
    hf_cache_dir: Path | None
    # ---
    family: Family | None = None  # from source.architecture
    stages: list[StagePlan] = field(default_factory=list)
    source: ResolvedSource | None = None
    model_config: dict[str, Any] | None = None  # the source's config.json
    model_family: Family | None = None  # from config.json's model_type
    config_sane: bool = False
    weights_ok: bool = False
    info: CheckpointInfo | None = None
    load_plan: LoadPlan | None = None
    resources: Resources | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_selftest(self) -> bool:
        return self.alloy.source.base_model == SELFTEST and self.alloy.source.architecture == SELFTEST

    @property
    def base_model(self) -> str:
        return self.alloy.source.base_model

    @property
    def geometry_family(self) -> Family | None:
        """The family that reads the model's config: config.json's own first."""
        return self.model_family or self.family


def _finding(path: str, value: object, problem: str, fix: str) -> Finding:
    return Finding("plan", path, value, f"{path} = {excerpt(value)}: {problem}", fix)


# ── checks, in order ────────────────────────────────────────────────────────


def check_architecture(ctx: _Context) -> Iterator[Finding]:
    """source.architecture names a registered family (or the selftest pair)."""
    if ctx.is_selftest:
        return
    arch = ctx.alloy.source.architecture
    try:
        ctx.family = get_family(arch)
    except UnknownArchitectureError as err:
        problem = f"is unsupported here, because no family is registered for {arch!r} (known: {', '.join(err.known)})"
        yield _finding(ARCH_PATH, arch, problem, "use one of the known names, or add a family JSON under "
                                                 "adapters/families/ (see adapters/schema.py)")


def check_stations(ctx: _Context) -> Iterator[Finding]:
    """Each stage is forge work a station here runs, or ship work handed
    off; a type of another domain, or unknown, is refused now, never after
    GPU time."""
    roles = ctx.config.node.roles
    for i, stage in enumerate(ctx.alloy.stages):
        kind = kind_of(stage.type)
        runs_here = kind.role == FORGE and FORGE in roles
        ctx.stages.append(StagePlan(i, stage.type, kind.role, kind.station, runs_here, kind.role == SHIP))
        where = f"$.stages[{i}].type"
        if kind.role == REFUSED:
            yield _finding(where, stage.type, f"stage type {stage.type!r} {kind.reason}",
                           f"remove $.stages[{i}]; stage types this factory runs: {', '.join(forge_types())}; "
                           "handed to the ship role: publish, deliver, deploy")
        elif kind.role == FORGE and FORGE not in roles:
            problem = f"stage type {stage.type!r} is forge work, but this node's roles are {list(roles)}"
            yield _finding(where, stage.type, problem, "queue the alloy on a forge node, or add \"forge\" to "
                                                       "node.roles in factory_node.toml")


def check_source(ctx: _Context) -> Iterator[Finding]:
    """The source model is on this node (or, online, downloadable later)."""
    try:
        ctx.source = resolve_source(ctx.alloy.source, root=ctx.root, config=ctx.config, allow_download=False,
                                    offline=ctx.offline, cache_dir=ctx.hf_cache_dir)
    except SourceError as err:
        yield _finding(err.json_path, err.value, err.problem, err.fix)
        return
    if ctx.source.kind in ("hub", "gguf") and ctx.source.path is None:
        ctx.notes.append(f"{ctx.base_model}: {ctx.source.note}; model checks and sizes wait until then")
    pinned = ctx.alloy.source.source_hash
    if pinned is not None:
        yield from _check_source_hash(ctx, pinned.removeprefix("sha256:").lower())


def _check_source_hash(ctx: _Context, pinned: str) -> Iterator[Finding]:
    where = "$.source.sourceHash"
    if ctx.source.gguf is None:
        yield _finding(where, pinned, "pins the bytes of a GGUF source, but this source is a "
                       f"{ctx.source.kind} model", "remove source.sourceHash, or name the GGUF it was written for")
    elif ctx.source.gguf.sha256 != pinned:
        yield _finding(where, f"sha256:{pinned}", f"does not match {str(ctx.source.gguf.path)!r} "
                       f"(sha256:{ctx.source.gguf.sha256})", "put back the GGUF the alloy was forged from, or "
                       "remove source.sourceHash to start from this file")


def check_calibration_corpora(ctx: _Context) -> Iterator[Finding]:
    """Corpus files exist inside the root and match their pinned sha256."""
    corpora = ctx.alloy.calibration_corpora or []
    for i, corpus in enumerate(corpora):
        if corpus.path is not None:
            yield from _check_corpus_file(ctx, f"$.calibrationCorpora[{i}].path", corpus.path,
                                          corpus.sha256, f"$.calibrationCorpora[{i}].sha256")
    for i, stage in enumerate(ctx.alloy.stages):
        yield from _check_stage_corpus(ctx, i, stage, corpora)


def _check_stage_corpus(ctx: _Context, i: int, stage: Stage, corpora: list[CalibrationCorpus]) -> Iterator[Finding]:
    """The corpus keys the catalog lists for this type: an id must name a
    calibrationCorpora entry with a path (or the stage give a file); a file
    must be inside the root (with the entry's hash when it names one)."""
    keys = kind_of(stage.type).corpus_keys
    if not keys:
        return
    ids = [k for k in keys if not k.endswith("File")]
    files = [k for k in keys if k.endswith("File")]
    id_key = next((k for k in ids if isinstance(stage.field_value(k), str)), ids[0] if ids else None)
    file_key = next((k for k in files if isinstance(stage.field_value(k), str)), None)
    name = stage.field_value(id_key) if id_key else None
    file = stage.field_value(file_key) if file_key else None
    j, corpus = next(((j, c) for j, c in enumerate(corpora) if name is not None and name in (c.id, c.name)),
                     (None, None))
    if isinstance(file, str):
        # The stage's own file is checked against the corpus it names, unless
        # that corpus's path is the same file (checked above already).
        same = corpus is not None and corpus.path is not None and _same_file(ctx.root, corpus.path, file)
        pinned = corpus.sha256 if corpus is not None and not same else None
        yield from _check_corpus_file(ctx, f"$.stages[{i}].{file_key}", file, pinned,
                                      f"$.calibrationCorpora[{j}].sha256")
    elif isinstance(name, str) and (corpus is None or corpus.path is None) and not _names_a_file(ctx, name):
        by_id = Layout(ctx.root).corpus_for_id(name)
        problem = ("names a corpus that no calibrationCorpora entry gives a path for, the stage has no "
                   f"file key, and the node has no {by_id or 'calibration/<id>.jsonl'}: its station would have "
                   "nothing to read")
        fix = ((f"put the corpus (JSONL, one {{\"text\": ...}} per line) at {by_id}, or add " if by_id else "add ")
               + f'{{"name": {name!r}, "path": "calibration/<file>.jsonl", "sha256": "<sha256sum>"}} to '
               f"calibrationCorpora" + (f", or set $.stages[{i}].{files[0]}" if files else ""))
        yield _finding(f"$.stages[{i}].{id_key}", name, problem, fix)


def _names_a_file(ctx: _Context, ref: str) -> bool:
    """An id key may also hold a path (stations accept either), and the node
    may keep an id's corpus at calibration/<id>.jsonl: either existing file
    is a corpus, not a dangling id."""
    by_id = Layout(ctx.root).corpus_for_id(ref)
    if by_id is not None and by_id.is_file():
        return True
    try:
        return resolve_inside(ctx.root, ref, json_path="$").is_file()
    except PathEscapeError:
        return False


def _same_file(root: Path, a: str, b: str) -> bool:
    try:
        return resolve_inside(root, a, json_path="$") == resolve_inside(root, b, json_path="$")
    except PathEscapeError:
        return False


def _check_corpus_file(ctx: _Context, where: str, rel: str, sha256: str | None, sha_where: str) -> Iterator[Finding]:
    try:
        path = resolve_inside(ctx.root, rel, json_path=where)
    except PathEscapeError as err:
        problem = f"{err.reason} and leaves the root {str(ctx.root)!r} (resolves to {str(err.resolved)!r})"
        yield _finding(where, rel, problem, f"put the corpus under {str(Layout(ctx.root).calibration)!r} "
                                            "and write its path relative to the root")
        return
    if not path.is_file():
        what = "is a directory, not a corpus file" if path.is_dir() else f"does not exist ({str(path)!r})"
        yield _finding(where, rel, what, f"copy the corpus to {str(path)!r} (corpora usually live in "
                                         f"{str(Layout(ctx.root).calibration)!r}) or fix the path")
        return
    expected = sha256.removeprefix("sha256:") if sha256 else None
    actual = sha256_file(path) if expected else None
    if expected and actual != expected:
        # A corpus entry's own hash is reported at its sha256; a stage's file
        # at the stage, since that is the path that points at other bytes.
        at, value = (where, rel) if where.startswith("$.stages") else (sha_where, sha256)
        problem = f"the file {str(path)!r} has sha256 {actual}, but {sha_where} pins {expected}"
        yield _finding(at, value, problem, f"restore the corpus the alloy was written for; if this file is "
                                           f"intended, set {sha_where} to \"sha256:{actual}\"")


def check_model_dir_files(ctx: _Context) -> Iterator[Finding]:
    """The resolved model directory passes factory.model_files.check_model_dir:
    the same verdict the part process reaches before it loads anything
    (config of a known family, plausible geometry, no special files, safetensors
    weights, readable headers that agree with config.json)."""
    if ctx.source is None or ctx.source.path is None:
        return
    check = check_model_dir(ctx.source.path, allow_pickle=ctx.config.forge.allow_pickle_weights)
    ctx.model_config, ctx.model_family, ctx.info = check.config, check.family, check.info
    ctx.config_sane, ctx.weights_ok = check.config_sane, check.info is not None
    for p in check.problems:
        yield _finding(SOURCE_PATH, ctx.base_model, p.problem, p.fix)


def check_architecture_agrees(ctx: _Context) -> Iterator[Finding]:
    """source.architecture and config.json name the same family (aliases read)."""
    if ctx.family is None or ctx.model_family is None or ctx.family.name == ctx.model_family.name:
        return
    arch = ctx.alloy.source.architecture
    problem = (f"is family {ctx.family.name!r}, but {ctx.base_model}/{CONFIG_FILE} says model_type "
               f"{ctx.model_config.get('model_type')!r} (family {ctx.model_family.name!r})")
    yield _finding(ARCH_PATH, arch, problem, f"set source.architecture to {ctx.model_family.name!r}, or point "
                                             f"baseModel at a {ctx.family.name} checkpoint")


def check_declared_geometry(ctx: _Context) -> Iterator[Finding]:
    """Numbers the alloy declares about its source match config.json."""
    family, cfg = ctx.model_family, ctx.model_config
    if family is None or cfg is None or not ctx.config_sane:
        return
    src = ctx.alloy.source
    actual = {"is_moe": family.is_moe, "num_experts_per_layer": family.expert_count(cfg),
              "num_layers": family.read(cfg, "num_hidden_layers"), "num_activated_experts": family.top_k(cfg),
              "num_experts_per_tok": family.top_k(cfg), "top_k": family.top_k(cfg)}
    for name, real in actual.items():
        declared = getattr(src, name)
        if declared is None or real is None or declared == real:
            continue
        alias = type(src).model_fields[name].alias
        problem = f"contradicts {ctx.base_model}/{CONFIG_FILE}, which gives {real!r}"
        yield _finding(f"$.source.{alias}", declared, problem, f"set it to {real!r} or drop it")


def check_stage_support(ctx: _Context) -> Iterator[Finding]:
    """What each forge stage's catalog probe says this node lacks: a
    converter, a GPU, a benchmark's runner or data, a dataset."""
    env = ProbeEnv(ctx.root, ctx.config, ctx.offline, ctx.hf_cache_dir)
    for plan in ctx.stages:
        if not plan.runs_here:
            continue
        for u in unsupported(ctx.alloy.stages[plan.index], env):
            yield _finding(f"$.stages[{plan.index}]{u.key}", u.value, f"is unsupported here: {u.problem}", u.fix)


def check_quant_formats(ctx: _Context) -> Iterator[Finding]:
    """A gguf/mlx quant stage's converter takes this architecture; a
    package of such a format has a quant stage to package. Notes say what
    each later stage works on: an artifact is measured by eval and shipped
    by package, while a stage that edits weights keeps the safetensors model."""
    family = ctx.geometry_family
    config = ctx.model_config or ({"architectures": list(family.architectures), "model_type": family.name}
                                  if family else None)
    artifact: tuple[int, str] | None = None  # (stage index, format) of the newest artifact
    made: set[str] = set()
    for i, stage in enumerate(ctx.alloy.stages):
        is_quant = isinstance(stage, QuantStage) and stage.format in catalog.QUANT_FORMATS
        if artifact is not None and kind_of(stage.type).role == FORGE and stage.type != "package":
            k, fmt = artifact
            ctx.notes.append(
                f"$.stages[{i}] (eval) measures the {fmt} artifact of $.stages[{k}] (its first quant type) with "
                "its own runtime, against the source on the same tokens" if stage.type == "eval" else
                f"$.stages[{i}] ({stage.type}) works on the last safetensors model; the {fmt} artifact of "
                f"$.stages[{k}] is for eval and package only")
        if is_quant:
            runs = stage.format in catalog.artifact_formats()
            if runs and config is not None and catalog.format_problem(stage.format) is None:
                problem = catalog.model_problem(stage.format, config)
                if problem:
                    yield _finding(f"$.stages[{i}].format", stage.format, f"cannot take {ctx.base_model}: {problem}",
                                   "drop the stage or quantize to another format")
            artifact = (i, stage.format) if runs else None
            made.add(stage.format)
        elif stage.type == "package" and getattr(stage, "format", None) in catalog.artifact_formats():
            if stage.format not in made:
                yield _finding(f"$.stages[{i}].format", stage.format, f"packages a {stage.format} artifact, and no "
                               "earlier quant stage writes one", f"add a quant stage with format {stage.format!r} "
                               "before it, or package safetensors")
        elif kind_of(stage.type).copies(stage) > 0:
            artifact = None  # a new safetensors model: later stages work on it


def check_datasets(ctx: _Context) -> Iterator[Finding]:
    """Every dataset a stage trains on or names (the catalog's dataset keys,
    a `domain` through [domains]) is on this node: a [datasets] file inside
    the root, the Hugging Face cache, or, online, downloadable later."""
    for i, stage in enumerate(ctx.alloy.stages):
        for found in stage_datasets(stage, i, root=ctx.root, config=ctx.config, offline=ctx.offline,
                                    hub_cache_dir=ctx.hf_cache_dir):
            if isinstance(found, DatasetProblem):
                yield _finding(found.json_path, found.value, found.problem, found.fix)
            elif found.kind == "hub" and found.note:
                ctx.notes.append(f"{found.json_path} {found.ref}: {found.note}")


def check_declarations(ctx: _Context) -> Iterator[Finding]:
    """What source-config and modality stages declare agrees with the
    source's config.json (context length, towers, token ids)."""
    if ctx.model_config is None or not ctx.config_sane:
        return
    for p in declaration_problems(ctx.alloy.stages, config=ctx.model_config, family=ctx.geometry_family,
                                  base_model=ctx.base_model):
        yield _finding(p.json_path, p.value, p.problem, p.fix)


def check_moe_stages(ctx: _Context) -> Iterator[Finding]:
    """Expert stages need an MoE; expert-prune keeps between top-k and the
    experts each layer has (after any earlier expert-prune)."""
    family = ctx.geometry_family
    if family is None:
        return
    if not family.is_moe:
        for i, stage in enumerate(ctx.alloy.stages):
            if kind_of(stage.type).needs_moe:
                problem = f"needs a mixture-of-experts model, but {ctx.base_model} is {family.name}, which is dense"
                yield _finding(f"$.stages[{i}].type", stage.type, problem,
                               f"remove $.stages[{i}], or start from an MoE model")
        return
    if ctx.model_config is None or not ctx.config_sane:
        return
    experts, top_k = family.expert_count(ctx.model_config), family.top_k(ctx.model_config)
    for i, stage in enumerate(ctx.alloy.stages):
        if isinstance(stage, ExpertPruneStage):
            experts = yield from _check_keep(ctx, i, stage, experts, stage.top_k or top_k)


def _check_keep(ctx: _Context, i: int, stage: ExpertPruneStage, experts: int, top_k: int | None
                ) -> Iterator[Finding]:
    """Findings for one expert-prune; returns the experts per layer after it."""
    per_layer = stage.keep_experts_per_layer is not None
    keep = stage.keep_experts_per_layer if per_layer else stage.keep_experts
    if keep is None:
        return experts
    where = f"$.stages[{i}].{'keepExpertsPerLayer' if per_layer else 'keepExperts'}"
    if top_k is not None and keep < top_k:
        problem = f"is below the model's top-k of {top_k}: each token is routed to {top_k} experts"
        yield _finding(where, keep, problem, f"keep at least {top_k} experts per layer")
    if keep > experts:
        problem = f"is more than the {experts} experts each layer of {ctx.base_model} has at this stage"
        yield _finding(where, keep, problem, f"keep at most {experts} (fewer, to prune anything)")
        return experts
    return keep


def check_load_plan(ctx: _Context) -> Iterator[Finding]:
    """The model fits somewhere on this node (GPU, RAM, or streamed)."""
    if ctx.info is None:
        return
    memory = ctx.node_memory or measure_node_memory(query_gpu=False)
    cuda = memory.cuda_available
    family = ctx.geometry_family
    ctx.load_plan = decide_load_plan(
        model_bytes=ctx.info.bytes_at_16bit, free_vram_bytes=memory.free_vram_bytes,
        free_ram_bytes=memory.free_ram_bytes, has_cold_tier=bool(ctx.config.storage.cold), cuda_available=cuda,
        bnb_available=quant_support.bnb_problem() is None,
        nf4_bytes=nf4_size(ctx.info, family) if family is not None else None,
    )
    if not ctx.load_plan.fits:
        fix = "run it on a node with more memory" + ("" if ctx.config.storage.cold else
                                                     ", or give this one a cold tier ([[storage.cold]]) to offload to")
        yield _finding(SOURCE_PATH, ctx.base_model, f"cannot be loaded here: {ctx.load_plan.reason}", fix)


def check_disk(ctx: _Context) -> Iterator[Finding]:
    """Every storage tier exists, and the work dir's model copies fit on the
    hot tier above its reserve."""
    tiers = node_tiers(ctx.root, ctx.config)
    yield from _tier_findings(ctx, tiers)
    hot = tiers[0]
    if ctx.info is None or hot.missing:
        return
    copies = copies_written(ctx.alloy.stages)
    need = int(ctx.info.bytes_at_16bit * (1 + copies))
    ctx.resources = Resources(ctx.info.total_bytes, ctx.info.bytes_at_16bit, copies, need, hot)
    if not ctx.resources.fits:
        # The whole recipe is the cause, so the finding sits at $.stages and
        # its value is the GiB the work dir needs.
        problem = (f"$.stages: the work dir needs about {_gib_text(need)} (the model at 16 bit, "
                   f"{_gib_text(ctx.info.bytes_at_16bit)}, x (1 + {copies:g} model copies the stages write)), but the hot "
                   f"tier {str(hot.path)!r} has {_gib_text(hot.free_bytes)} free and keeps "
                   f"{hot.min_free_gb:g} GiB (storage.hot.min_free_gb)")
        yield Finding("plan", "$.stages", _gib(need), problem, "free space on the hot tier, lower "
                      "storage.hot.min_free_gb, or run the alloy on a node with a larger disk")


def _tier_findings(ctx: _Context, tiers: list[Tier]) -> Iterator[Finding]:
    """A configured tier whose path is missing (an unmounted disk) is a
    finding for every alloy: work dirs, evictions or offloaded weights would
    land on whatever disk holds its parent."""
    offloads = ctx.load_plan is not None and ctx.load_plan.offload_folder_needed
    for tier in tiers:
        if tier.problem is None:
            continue
        use = ("the load plan offloads weights to it" if offloads and tier.name == "cold[0]"
               else "cleanup evicts work dirs to it" if tier.name != "hot" else "the work dirs live on it")
        problem = f"$: storage tier {tier.name} ({tier.key} in factory_node.toml): {tier.problem}; {use}"
        yield Finding("plan", "$", str(tier.path), problem,
                      f"mount the disk or create the directory {tier.path}, or remove {tier.key} "
                      "from factory_node.toml")


CHECKS: tuple[Callable[[_Context], Iterator[Finding]], ...] = (
    check_architecture,
    check_stations,
    check_stage_support,
    check_source,
    check_calibration_corpora,
    check_model_dir_files,
    check_architecture_agrees,
    check_declared_geometry,
    check_declarations,
    check_quant_formats,
    check_datasets,
    check_moe_stages,
    check_load_plan,
    check_disk,
)


def check_source_location(ctx: _Context) -> Iterator[Finding]:
    """A local baseModel resolves inside the root or a cold tier, symlinks
    followed; decided from the path alone (the rules of factory.sources),
    so the gate refuses `../../etc` without opening a model file. A GGUF
    source's header is read (a few bytes) and a [models] package must be
    installed. A Hub id is not a path and waits for the full plan."""
    if ctx.is_selftest:
        return
    gguf = gguf_source.mapped(ctx.base_model, ctx.config)
    if gguf is None and not looks_local(ctx.base_model, root=ctx.root):
        return
    try:
        if gguf is not None and gguf_source.package_module(gguf):
            gguf_source.check_package(gguf_source.package_module(gguf), value=ctx.base_model)
        elif gguf is not None:  # a GGUF's header is read too: its architecture decides
            path = inside_root_or_cold(gguf, root=ctx.root, config=ctx.config)
            gguf_source.checked_architecture(path, value=ctx.base_model)
        else:
            inside_root_or_cold(ctx.base_model, root=ctx.root, config=ctx.config)
    except SourceError as err:
        yield _finding(err.json_path, err.value, err.problem, err.fix)


# What the intake gate can afford on every drop: no model, no corpus read.
# (The full plan's check_source resolves the same path and more.)
QUICK_CHECKS: tuple[Callable[[_Context], Iterator[Finding]], ...] = (
    check_architecture, check_stations, check_stage_support, check_quant_formats, check_datasets,
    check_source_location)


def quick_findings(alloy: Alloy, *, root: Path, config: NodeConfig) -> list[Finding]:
    """The cheap plan-level checks, for the intake gate: an alloy this node
    can never run is refused before it is queued, not hours later."""
    ctx = _Context(alloy=alloy, root=Path(root), config=config, node_memory=None, offline=None,
                   hf_cache_dir=None)
    return [f for check in QUICK_CHECKS for f in check(ctx)]


def _family_plan(ctx: _Context) -> FamilyPlan | None:
    family, cfg = ctx.geometry_family, ctx.model_config
    if family is None:
        return None
    if cfg is not None and ctx.model_family is not None:
        return FamilyPlan(family.name, family.is_moe, family.expert_count(cfg), family.top_k(cfg),
                          family.read(cfg, "num_hidden_layers"), from_config=True)
    src = ctx.alloy.source
    return FamilyPlan(family.name, family.is_moe, src.num_experts_per_layer, src.router_top_k, src.num_layers,
                      from_config=False)
