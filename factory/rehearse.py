"""`factory rehearse`: prove a recipe on a CPU before it costs GPU hours.

Each alloy runs end to end on a scratch root, through the real intake gate,
the real daemon and the real stations, with three things swapped for
stand-ins (and every swap reported):

* **the model**: a tiny random model of the source's family
  (`stations.standin`), its geometry from the source's cached config.json
  when the node has it, else from what the alloy declares, shrunk in width
  and depth but with the expert count, top-k, head ratios and layer types
  kept;
* **the data**: every calibration corpus, dataset and benchmark the alloy
  names gets a small stand-in file, wired in the way an operator would wire
  real data (corpus paths and pinned hashes, the node config's `[datasets]`,
  `[domains]` and `[benchmarks]` tables), so resolution itself is rehearsed;
* **the budgets**: steps, calibration tokens, benchmark problems and
  generated tokens are capped (`CAPS`).

Stages a real run would refuse on this node (the plan's findings on a stage,
e.g. an output format that needs tooling this node lacks) are reported as
failed with the plan's reason; the stages before them still run, the stages
after them are `not-run`. Every model a stage writes is reloaded in a fresh
process (`stations.smoke`), as the package stage does for the final one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from factory import durable
from factory.alloy import DOMAINS, Alloy, ContextExtendStage
from factory.catalog import SHIP, kind_of
from factory.errors import FactoryError
from factory.integrity import sha256_file
from factory.line import Line, init_root
from factory.protocol import CHECKPOINT, Layout
from factory.results import ARTIFACT, MODEL_DIR, artifact_unit

# Budget caps: stage type -> {camelCase key: the most a rehearsal runs}.
CAPS: dict[str, dict[str, int]] = {
    "train": {"steps": 2, "sequenceLength": 64, "batchSize": 2, "gradientAccumulation": 1},
    "lora": {"steps": 2, "sequenceLength": 64, "batchSize": 2, "gradientAccumulation": 1},
    "compensation-lora": {"steps": 2, "sequenceLength": 64, "batchSize": 2, "gradientAccumulation": 1},
    "context-extend": {"trainingSteps": 2, "sequenceLength": 64},
    "expert-activation-profile": {"calibrationTokens": 512, "sequenceLength": 64},
    "prune": {"analysisSteps": 2},
    "compact": {"analysisSteps": 2},
    "eval": {"limit": 2, "maxNewTokens": 16, "nSamples": 1, "evalTokens": 256},
}
# Keys a cap replaces even when the alloy did not set them (an unset one
# would run the schema's default, e.g. 2048-token sequences).
ALWAYS_CAPPED = {"steps", "sequenceLength", "limit", "maxNewTokens", "nSamples", "evalTokens", "analysisSteps"}
MODELS_DIR = "models"
DATA_DIR = "data"
# The daemon's per-stage limit on a scratch root: a tiny stage that takes
# longer than this is a bug worth reporting as a failure.
STAGE_TIMEOUT_SECONDS = 1800
# Instruction datasets the published alloys name, with their column layout,
# so the stand-in exercises the same formatting path as the real data.
INSTRUCTION_COLUMNS: dict[str, tuple[str, str]] = {
    "m-a-p/CodeFeedback-Filtered-Instruction": ("query", "answer"),
}
STANDIN_DOCS = 48  # documents per stand-in text file
_SOURCE_FIELDS_KEPT = ("architecture", "isMoE", "numExpertsPerLayer", "numActivatedExperts", "numExpertsPerTok",
                       "topK", "totalParamsB", "activeParamsB", "contextLength", "license", "revision")


@dataclass
class StageReport:
    """One stage of a rehearsal: `ran`, `handed-off`, `failed` or `not-run`."""

    index: int
    type: str
    status: str
    reason: str | None = None
    seconds: float | None = None
    wrote: list[str] = field(default_factory=list)  # files and dirs, relative to the work dir
    reloaded: bool | None = None  # a model it wrote reloaded in a fresh process


@dataclass
class Rehearsal:
    alloy: str
    ok: bool
    stages: list[StageReport]
    standins: list[str] = field(default_factory=list)  # what was swapped, for people
    part: str | None = None
    station: str | None = None  # where the part ended: finished | rework | None (never enqueued)
    acceptance: bool | None = None  # the alloy's gate on the stand-in's numbers (informational)
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ── stand-in data ──────────────────────────────────────────────────────────


def _stdlib_texts() -> tuple[list[str], list[str]]:
    """Real text from this interpreter's standard library: source code
    (code corpora, completions) and docstrings (prose). Deterministic."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    code, prose = [], []
    for name in ("textwrap.py", "string.py", "heapq.py", "bisect.py", "fractions.py", "calendar.py",
                 "shlex.py", "difflib.py", "statistics.py", "colorsys.py", "fnmatch.py", "glob.py"):
        path = lib / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"\n(?=def |class )", text):
            if 80 < len(chunk) < 4000:
                code.append(chunk.strip())
        prose += [d.strip() for d in re.findall(r'"""(.*?)"""', text, flags=re.S) if len(d.strip()) > 60]
    if not code or not prose:
        raise FactoryError(f"no standard-library sources under {lib} to make stand-in text from")
    return code[:STANDIN_DOCS * 4], prose[:STANDIN_DOCS * 4]


@dataclass
class _Data:
    """Stand-in files written into the scratch root, and the node-config
    tables that point at them."""

    root: Path
    code: list[str]
    prose: list[str]
    datasets: dict[str, str] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)
    benchmarks: dict[str, str] = field(default_factory=dict)

    def _write(self, rel: str, rows: list[dict]) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode(), overwrite=True)
        return path

    def corpus(self, rel: str, *, code: bool = True) -> str:
        """A JSONL corpus with a `text` field at `rel`; its bare sha256."""
        texts = self.code if code else self.prose
        return sha256_file(self._write(rel, [{"text": t} for t in texts[:STANDIN_DOCS]]))

    def dataset(self, dataset_id: str) -> str:
        """A stand-in for dataset `dataset_id`, mapped in [datasets]."""
        if dataset_id not in self.datasets:
            rel = f"{DATA_DIR}/{_slug(dataset_id)}.jsonl"
            columns = INSTRUCTION_COLUMNS.get(dataset_id)
            if columns:
                rows = [{columns[0]: f"Explain and write this code:\n{p[:200]}", columns[1]: c}
                        for p, c in zip(self.prose, self.code)][:STANDIN_DOCS]
            else:
                rows = [{"text": t} for t in (self.prose + self.code)[:STANDIN_DOCS]]
            self._write(rel, rows)
            self.datasets[dataset_id] = rel
        return self.datasets[dataset_id]

    def benchmark(self, spec: dict) -> str | None:
        """A stand-in data file for one benchmark entry, mapped in
        [benchmarks] under the key factory.benchmarks looks up; None for a
        benchmark whose data ships with its runner (humaneval) or is a
        corpus (perplexity), or that has no stand-in (the plan says so)."""
        from factory.benchmarks import LM_EVAL, benchmark_for, lm_eval_task
        from factory.standin_data import write_standin

        bench = benchmark_for(str(spec.get("name")))
        if bench is None or not (bench.data_key or bench.data == LM_EVAL):
            return None
        key = bench.data_key or lm_eval_task(spec)
        if key not in self.benchmarks:
            path = write_standin(key, self.root / DATA_DIR / "benchmarks")
            if path is None:
                return None
            self.benchmarks[key] = str(path.relative_to(self.root))
        return self.benchmarks[key]

    def domain(self, domain: str) -> None:
        """[domains] maps the domain to a stand-in dataset id, which [datasets] maps to a file."""
        if domain in DOMAINS and domain not in self.domains:
            self.domains[domain] = f"standin/{domain}"
            self.dataset(self.domains[domain])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80] or "x"


# ── the rehearsal copy of an alloy ─────────────────────────────────────────


def _cap(stage: dict, caps: dict[str, int], notes: list[str], where: str) -> None:
    for key, cap in caps.items():
        value = stage.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value > cap:
                stage[key] = cap
                notes.append(f"{where}.{key}: {value:g} -> {cap} (budget)")
        elif value is None and key in ALWAYS_CAPPED:
            stage[key] = cap


def _standin_model(alloy: Alloy, dest: Path, notes: list[str]) -> Path:
    """A tiny random model of the source's family at `dest`."""
    from adapters import get_family
    from factory.nodeconfig import NodeConfig
    from factory.sources import SourceError, resolve_source
    from stations.standin import build_standin

    family = get_family(alloy.source.architecture)
    source_config = None
    try:
        found = resolve_source(alloy.source, root=dest.parent, config=NodeConfig(), allow_download=False,
                               offline=True)
        if found.path is not None and (found.path / "config.json").is_file():
            source_config = json.loads((found.path / "config.json").read_text())
    except SourceError:
        pass
    declared = alloy.source.model_dump(by_alias=True, exclude_unset=True)
    build_standin(family, dest, source_config=source_config, declared=declared)
    origin = "its cached config.json" if source_config else "the alloy's declared geometry and family defaults"
    notes.append(f"model: {alloy.source.base_model} -> a tiny random {family.name} from {origin} ({dest.name})")
    return dest


def rehearsal_alloy(data: dict, recipe: Alloy, model_rel: str, store: _Data, notes: list[str]) -> dict:
    """The alloy as rehearsed: the stand-in model, stand-in data, capped budgets."""
    out = json.loads(json.dumps(data))
    source = {k: v for k, v in out["source"].items() if k in _SOURCE_FIELDS_KEPT}
    out["source"] = {"baseModel": model_rel, **source}
    for i, corpus in enumerate(out.get("calibrationCorpora") or []):
        rel = f"calibration/standin-{_slug(str(corpus.get('id') or corpus.get('name') or i))}.jsonl"
        corpus.update(path=rel, sha256=f"sha256:{store.corpus(rel)}", format="jsonl", textField="text")
        notes.append(f"$.calibrationCorpora[{i}]: a stand-in corpus at {rel}")
    for i, (stage, typed) in enumerate(zip(out["stages"], recipe.stages)):
        where = f"$.stages[{i}]"
        kind = kind_of(typed.type)
        named = {c.get(k) for c in out.get("calibrationCorpora") or [] for k in ("id", "name")}
        for key in kind.corpus_keys:
            value = stage.get(key)
            if isinstance(value, str) and key.endswith("File"):
                store.corpus(value, code="prose" not in value)
                notes.append(f"{where}.{key}: a stand-in corpus at {value}")
            elif isinstance(value, str) and value not in named and not any(
                    isinstance(stage.get(k), str) for k in kind.corpus_keys if k.endswith("File")):
                by_id = Layout(store.root).corpus_for_id(value)
                if by_id is not None:
                    store.corpus(str(by_id.relative_to(store.root)))
                    notes.append(f"{where}.{key}: {value} -> a stand-in corpus at the node's "
                                 f"{by_id.relative_to(store.root)}")
        for key in kind.dataset_keys:
            if isinstance(stage.get(key), str):
                notes.append(f"{where}.{key}: {stage[key]} -> stand-in {store.dataset(stage[key])}")
        if isinstance(stage.get("domain"), str):
            store.domain(stage["domain"])
        if isinstance(typed, ContextExtendStage) and typed.training_steps and not typed.training_dataset:
            store.domain(typed.training_domain)
        if isinstance(stage.get("teacher"), str):
            stage["teacher"] = model_rel
        _cap(stage, CAPS.get(typed.type, {}), notes, where)
        for j, bench in enumerate(stage.get("benchmarks") or []):
            if isinstance(bench, dict):
                _cap(bench, {k: v for k, v in CAPS["eval"].items() if k in bench}, notes,
                     f"{where}.benchmarks[{j}]")
                data = store.benchmark(bench)
                if data:
                    notes.append(f"{where}.benchmarks[{j}] {bench.get('name')}: stand-in data {data}")
    return out


# ── running and reading back ───────────────────────────────────────────────


def _write_config(root: Path, store: _Data) -> None:
    """The scratch root's node config: no disk reserve, no rework for a
    failed acceptance gate (the stand-in's numbers mean nothing), and the
    stand-in data tables."""
    def table(name: str, mapping: dict[str, str]) -> str:
        rows = "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in sorted(mapping.items()))
        return f"\n[{name}]\n{rows}"

    text = ("[storage.hot]\nmin_free_gb = 0\n\n[forge]\nmax_retries = 0\n"
            f"stage_timeout_seconds = {STAGE_TIMEOUT_SECONDS}\nrework_on_failed_acceptance = false\n\n"
            "[daemon]\nsettle_seconds = 0\nrescan_seconds = 0.5\n"
            + table("datasets", store.datasets) + table("domains", store.domains)
            + table("benchmarks", store.benchmarks))
    durable.write_bytes(Layout(root).node_config, text.encode(), overwrite=True)


def _run_daemon(root: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "factory.cli", "run", "--until-empty", "--root", str(root)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise FactoryError(f"the rehearsal daemon on {root} exited {proc.returncode}: {proc.stderr[-2000:]}")


def _reload(root: Path, model_dir: Path, fmt: str | None = None) -> str | None:
    """None when `model_dir` reloads and answers sanely in a fresh process
    (a gguf/mlx artifact through its own runtime), else why not."""
    how = ["--format", fmt] if fmt else []
    proc = subprocess.run([sys.executable, "-m", "stations.smoke", str(model_dir), "--root", str(root), *how],
                          capture_output=True, text=True)
    try:
        verdict = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"the reload check crashed (exit {proc.returncode}): {proc.stderr[-500:]}"
    return None if verdict.get("ok") else "; ".join(verdict.get("problems") or ["not ok"])


def _collect(line: Line, base: str, stages: list, cut: dict[int, str]) -> Rehearsal:
    found = line.find(base)
    station = found.station if found else None
    record = (found.read_sidecar("result") if station == "finished" else found.read_sidecar("error")) if found else None
    record = record or {}
    ckpt = durable.read_json(line.layout.work_dir(base) / CHECKPOINT) if (
        line.layout.work_dir(base) / CHECKPOINT).is_file() else {"stages": []}
    entries = {e["index"]: e for e in ckpt.get("stages", [])}
    failed_at = (record.get("stage") or {}).get("index") if station == "rework" else None
    reports: list[StageReport] = []
    for i, stage in enumerate(stages):
        entry = entries.get(i)
        if entry is not None and entry.get("handed_off"):
            reports.append(StageReport(i, stage.type, "handed-off", f"to the {SHIP} role (result.json handed_off)"))
        elif entry is not None:
            rep = StageReport(i, stage.type, "ran", seconds=entry.get("elapsed_s"),
                              wrote=sorted({p.split("/")[2] if p.count("/") >= 2 else p
                                            for p in entry.get("outputs", {})}))
            metrics, work = entry.get("metrics") or {}, line.layout.work_dir(base)
            artifact = metrics.get(ARTIFACT)
            if metrics.get(MODEL_DIR) or artifact:
                problem = (_reload(line.root, artifact_unit(work, artifact), artifact["format"]) if artifact
                           else _reload(line.root, work / metrics[MODEL_DIR]))
                rep.reloaded = problem is None
                if problem:
                    rep.status, rep.reason = "failed", f"the model it wrote does not reload: {problem}"
            reports.append(rep)
        elif i in cut:
            reports.append(StageReport(i, stage.type, "failed", cut[i]))
        elif i == failed_at:
            reports.append(StageReport(i, stage.type, "failed", record.get("message")))
        else:
            reports.append(StageReport(i, stage.type, "not-run", _not_run_reason(reports)))
    acceptance = (record.get("acceptance") or {}).get("passed") if station == "finished" else None
    ok = station == "finished" and all(r.status in ("ran", "handed-off") for r in reports)
    return Rehearsal(alloy="", ok=ok, stages=reports, part=base, station=station, acceptance=acceptance,
                     message=None if station == "finished" else record.get("message"))


def _not_run_reason(before: list[StageReport]) -> str:
    failed = next((r for r in before if r.status == "failed"), None)
    return f"after stage {failed.index} ({failed.type}), which failed" if failed else "the part stopped before it"


def _plan_cut(findings: list) -> tuple[dict[int, str], list[str]]:
    """Plan findings by stage index, and those about the alloy as a whole."""
    by_stage: dict[int, list[str]] = {}
    whole: list[str] = []
    for f in findings:
        m = re.match(r"^\$\.stages\[(\d+)\]", f.path)
        (by_stage.setdefault(int(m.group(1)), []) if m else whole).append(f"{f.message} (fix: {f.fix})")
    return {i: "; ".join(msgs) for i, msgs in by_stage.items()}, whole


def rehearse(files: list[Path], *, keep: Path | None = None) -> list[Rehearsal]:
    """Rehearse each alloy file on one scratch root (kept at `keep`, else removed)."""
    from factory.intake import enqueue
    from factory.plan import make_plan
    from factory.validation import check_file

    root = Path(keep).absolute() if keep else Path(tempfile.mkdtemp(prefix="forge-rehearse-"))
    try:
        line = init_root(root)
        code, prose = _stdlib_texts()
        store = _Data(root, code, prose)
        prepared: list[tuple[Rehearsal, Path, dict, Alloy]] = []
        for file in files:
            report = check_file(Path(file), root=root)
            rehearsal = Rehearsal(alloy=str(file), ok=False, stages=[])
            if report.alloy is None or report.findings:
                rehearsal.message = "; ".join(f"{f.message} (fix: {f.fix})" for f in report.findings)
                prepared.append((rehearsal, Path(file), {}, None))
                continue
            slug = _slug(Path(file).name.removesuffix(".json").removesuffix(".alloy"))
            model_rel = f"{MODELS_DIR}/{slug}"
            if not (root / model_rel).is_dir():
                _standin_model(report.alloy, root / model_rel, rehearsal.standins)
            data = rehearsal_alloy(json.loads(report.raw), report.alloy, model_rel, store, rehearsal.standins)
            prepared.append((rehearsal, root / "alloys" / f"{slug}.alloy.json", data, report.alloy))
        _write_config(root, store)
        line = init_root(root)  # re-read: the config now has the stand-in tables
        queued: list[tuple[Rehearsal, str, list, dict[int, str]]] = []
        (root / "alloys").mkdir(exist_ok=True)
        for rehearsal, path, data, recipe in prepared:
            if recipe is None:
                continue
            durable.write_bytes(path, json.dumps(data, indent=2).encode(), overwrite=True)
            plan = make_plan(path, root=root)
            cut, whole = _plan_cut(plan.findings)
            if whole:
                rehearsal.message = "; ".join(whole)
                rehearsal.stages = [StageReport(i, s.type, "not-run", "the plan refused the alloy")
                                    for i, s in enumerate(recipe.stages)]
                continue
            first = min(cut) if cut else len(data["stages"])
            if first == 0:
                rehearsal.stages = [StageReport(0, recipe.stages[0].type, "failed", cut[0])]
                rehearsal.stages += [StageReport(i, s.type, "not-run", _not_run_reason(rehearsal.stages))
                                     for i, s in enumerate(recipe.stages) if i > 0]
                continue
            runnable = {**data, "stages": data["stages"][:first]}
            durable.write_bytes(path, json.dumps(runnable, indent=2).encode(), overwrite=True)
            part = enqueue(line, path, name=line.free_base(path.name.removesuffix(".alloy.json")))
            queued.append((rehearsal, part.base, recipe.stages, {i: r for i, r in cut.items() if i == first}))
        _run_daemon(root)
        for rehearsal, base, stages, cut in queued:
            got = _collect(line, base, stages, cut)
            rehearsal.ok, rehearsal.stages, rehearsal.part = got.ok, got.stages, got.part
            rehearsal.station, rehearsal.acceptance, rehearsal.message = got.station, got.acceptance, got.message
        return [r for r, *_ in prepared]
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def render_text(rehearsals: list[Rehearsal]) -> str:
    lines = []
    for r in rehearsals:
        lines.append(f"{'ok  ' if r.ok else 'FAIL'} {r.alloy}" + (f"  ({r.station})" if r.station else ""))
        for s in r.stages:
            secs = f" {s.seconds:.1f}s" if s.seconds is not None else ""
            reload = "" if s.reloaded is None else (", reloaded" if s.reloaded else ", DOES NOT RELOAD")
            lines.append(f"  {s.index:>2} {s.type:<26} {s.status:<10}{secs}{reload}"
                         + (f"  {s.reason}" if s.reason else ""))
        lines += [f"  stand-in: {n}" for n in r.standins]
        if r.message and not r.ok:
            lines.append(f"  {r.message}")
    return "\n".join(lines)
