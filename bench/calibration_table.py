"""The calibration table: does calibration-aware expert ranking beat router-gate L2?

Every number comes out of the real pipeline. The script makes a fresh root
with `factory.demo.prepare` (the tiny trained MoE and its corpora), writes one
alloy per (method, keep, seed) and the seeded calibration subsets they pin,
enqueues them with `factory.intake.enqueue`, runs the real daemon
(`factory run --until-empty`, a subprocess) and reads held-out code and prose
perplexity, source and forged, from each finished part's result.json. It
computes nothing about the models itself: it only groups and averages.

Methods, at each keep K of 16 experts (top-2 routing, so K >= 2):

* ``activation_count-code``   profile on a code subset, keep the K most-routed;
* ``reap-code``               the same profile, keep the K highest REAP;
* ``router_l2``               data-free: the K largest router rows. It has no
                              seed, so it runs once per K (deterministic);
* ``random``                  explicit keepExpertIndices drawn from the seed;
* ``activation_count-prose``  profile on a prose subset, keep the K most-routed.

A seed picks the calibration subset: a seeded permutation of the split's
documents, taken whole until SUBSET_CHARS characters, written as
ROOT/calibration/<domain>.calib.seed<S>.jsonl and pinned by sha256; the profile
reads its first CALIBRATION_TOKENS tokens. activation_count-code and reap-code
of one seed share the subset (a paired comparison). All methods are evaluated
on the same first EVAL_TOKENS tokens of code.eval and prose.eval.

    . .venv/bin/activate
    python bench/calibration_table.py --out docs/RESULTS.md      # 7 min on 2 idle CPU cores
    python bench/calibration_table.py --dry-run                  # build + validate the alloys only

Writes the table between the calibration-table markers of --out (the rest of
the file is kept) and every run's raw numbers to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from factory.integrity import hash_model_dir, model_hash, sha256_file
from results_doc import splice  # bench/results_doc.py

EXAMPLES = REPO / "examples"
MODEL = "tiny-moe"
KEEPS = (8, 4)  # of 16 experts; top-2 routing needs at least 2
SEEDS = (0, 1, 2, 3, 4)  # the calibration subset moves activation-count by ~10%: 3 seeds are too few
# The same for every method: 64 blocks of 512, ~65% of code.eval (13 files)
# and all of prose.eval (~29k tokens, so prose stops at the corpus's end).
# 8192 covered only the first 2-3 code files; the station's 64Ki default would
# re-read prose and double the run.
EVAL_TOKENS = 32768
EVAL_BLOCK = 512
# 8192 tokens x top-2 / 16 experts: ~1000 routed tokens per expert on average.
CALIBRATION_TOKENS = 8192
CALIBRATION_SEQUENCE = 256
# ~3.5 characters a token on both corpora: ~11k tokens, more than the budget.
SUBSET_CHARS = 40_000
FORMAT = "forge-factory/calibration-table"
BEGIN, END = "<!-- calibration-table:begin -->", "<!-- calibration-table:end -->"
EVAL_CORPORA = {"code": "code-eval", "prose": "prose-eval"}


@dataclass(frozen=True)
class Method:
    id: str
    label: str
    calibration: str | None  # the calibration domain, None when data-free
    metric: str | None  # expert-prune metric; None: explicit keepExpertIndices
    seeded: bool = True


METHODS = (
    Method("activation_count-code", "activation-count", "code", "activation_count"),
    Method("reap-code", "REAP", "code", "reap"),
    Method("router_l2", "router-gate-L2", None, "router_l2", seeded=False),
    Method("random", "random", None, None),
    Method("activation_count-prose", "activation-count", "prose", "activation_count"),
)
BY_ID = {m.id: m for m in METHODS}


@dataclass(frozen=True)
class Subset:
    """A seeded calibration subset, as written into ROOT/calibration/."""

    domain: str
    seed: int
    docs: tuple[str, ...]  # document ids, in the order written
    text: str  # the JSONL bytes, decoded

    @property
    def rel(self) -> str:
        return f"calibration/{self.domain}.calib.seed{self.seed}.jsonl"

    @property
    def sha256(self) -> str:
        import hashlib

        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Run:
    method: Method
    keep: int
    seed: int | None
    subset: Subset | None
    indices: dict[str, list[int]] | None  # random's draw
    alloy: dict = field(hash=False)

    @property
    def part(self) -> str:
        return f"cal-k{self.keep}-{self.method.id}" + ("" if self.seed is None else f"-s{self.seed}")


# ── 1. inputs: subsets, random draws, alloys ────────────────────────────────


def calibration_subset(domain: str, seed: int) -> Subset:
    """Whole documents of <domain>.calib in a seeded order, up to SUBSET_CHARS."""
    lines = (EXAMPLES / "corpora" / f"{domain}.calib.jsonl").read_text(encoding="utf-8").splitlines()
    order = random.Random(f"{domain}-calib-{seed}").sample(range(len(lines)), len(lines))
    taken, chars = [], 0
    for i in order:
        if chars >= SUBSET_CHARS:
            break
        taken.append(lines[i])
        chars += len(json.loads(lines[i])["text"])
    return Subset(domain, seed, tuple(json.loads(x)["id"] for x in taken), "\n".join(taken) + "\n")


def random_indices(seed: int, keep: int, layers: list[int], experts: int) -> dict[str, list[int]]:
    """K distinct experts per layer, drawn from the seed (string-seeded: stable across Pythons)."""
    rng = random.Random(f"random-experts-{seed}-{keep}")
    return {str(layer): sorted(rng.sample(range(experts), keep)) for layer in layers}


def _corpus_entry(cid: str, rel: str, sha: str) -> dict:
    return {"id": cid, "path": rel, "sha256": sha, "format": "jsonl", "textField": "text"}


def _eval_stage(corpus: str) -> dict:
    return {"type": "eval", "benchmarks": [{"name": "perplexity", "subset": corpus}],
            "evalTokens": EVAL_TOKENS, "evalBlockSize": EVAL_BLOCK}


def build_alloy(method: Method, keep: int, seed: int | None, subset: Subset | None,
                indices: dict | None, *, experts: int, top_k: int) -> dict:
    corpora = [_corpus_entry(cid, f"calibration/{cid.replace('-', '.')}.jsonl",
                             sha256_file(EXAMPLES / "corpora" / f"{cid.replace('-', '.')}.jsonl"))
               for cid in EVAL_CORPORA.values()]
    stages: list[dict] = []
    if subset is not None:
        corpora.insert(0, _corpus_entry("calib-subset", subset.rel, subset.sha256))
        stages.append({"type": "expert-activation-profile", "calibrationCorpus": "calib-subset",
                       "calibrationTokens": CALIBRATION_TOKENS, "sequenceLength": CALIBRATION_SEQUENCE})
    prune = {"type": "expert-prune", "keepExpertsPerLayer": keep, "originalExpertsPerLayer": experts,
             "prunePct": 100.0 * (1 - keep / experts)}
    prune.update({"metric": method.metric} if indices is None else {"keepExpertIndices": indices})
    stages += [prune, _eval_stage("code-eval"), _eval_stage("prose-eval")]
    what = f"{method.label}" + (f" calibrated on {method.calibration} (seed {seed})" if subset else
                                f" (seed {seed})" if seed is not None else " (data-free)")
    return {
        "name": f"calibration-table-k{keep}-{method.id}", "version": "1.0.0",
        "description": f"Calibration table: keep {keep} of {experts} experts per layer by {what}; "
                       "held-out code and prose perplexity.",
        "author": "bench/calibration_table.py", "license": "psf-2.0", "tags": ["bench", "expert-prune"],
        "source": {"baseModel": f"models/{MODEL}", "architecture": "qwen3_moe", "isMoE": True,
                   "numExpertsPerLayer": experts, "numExpertsPerTok": top_k},
        "calibrationCorpora": corpora, "stages": stages,
    }


def model_geometry() -> tuple[list[int], int, int]:
    """(MoE layers, experts per layer, top-k) of the example model, via its family adapter."""
    from adapters import family_for_config

    config = json.loads((EXAMPLES / MODEL / "config.json").read_text())
    family = family_for_config(config)
    return family.moe_layers(config), family.expert_count(config), family.top_k(config)


def plan_runs(keeps: tuple[int, ...], seeds: tuple[int, ...]) -> list[Run]:
    layers, experts, top_k = model_geometry()
    subsets = {(d, s): calibration_subset(d, s) for d in ("code", "prose") for s in seeds}
    runs = []
    for keep in keeps:
        for method in METHODS:
            for seed in (seeds if method.seeded else (None,)):
                subset = subsets[(method.calibration, seed)] if method.calibration else None
                indices = random_indices(seed, keep, layers, experts) if method.id == "random" else None
                alloy = build_alloy(method, keep, seed, subset, indices, experts=experts, top_k=top_k)
                runs.append(Run(method, keep, seed, subset, indices, alloy))
    return runs


def write_inputs(root: Path, runs: list[Run], alloy_dir: Path) -> dict[str, Path]:
    """Subsets into ROOT/calibration, alloys into alloy_dir; {part: alloy path}."""
    (root / "calibration").mkdir(parents=True, exist_ok=True)
    alloy_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for run in runs:
        if run.subset is not None:
            (root / run.subset.rel).write_text(run.subset.text, encoding="utf-8")
        paths[run.part] = alloy_dir / f"{run.part}.alloy.json"
        paths[run.part].write_text(json.dumps(run.alloy, indent=2) + "\n")
    return paths


# ── 2. dry run: `factory validate` semantics, nothing runs ──────────────────


def dry_run(runs: list[Run]) -> int:
    """Write every input into a scratch root and check each alloy as
    `factory validate --root` does, plus every pinned corpus's sha256."""
    from factory.validation import check_file

    with tempfile.TemporaryDirectory(prefix="calibration-table-dry-") as tmp:
        root = Path(tmp)
        paths = write_inputs(root, runs, root / "alloys")
        for name in ("code.eval", "prose.eval"):
            shutil.copy2(EXAMPLES / "corpora" / f"{name}.jsonl", root / "calibration" / f"{name}.jsonl")
        bad = 0
        for run in runs:
            report = check_file(paths[run.part], root=root)
            problems = [str(f) for f in report.findings]
            for c in run.alloy["calibrationCorpora"]:
                if sha256_file(root / c["path"]) != c["sha256"]:
                    problems.append(f"{c['path']}: sha256 does not match the pinned {c['sha256']}")
            bad += bool(problems)
            print(f"{run.part}: {'ok' if not problems else '; '.join(problems)}")
    print(f"{len(runs)} alloys, {len(runs) - bad} valid")
    return 1 if bad else 0


# ── 3. the real line ────────────────────────────────────────────────────────


def run_line(root: Path, runs: list[Run], *, timeout_s: float) -> float:
    """Prepare the root, enqueue every alloy, run the daemon to empty; its wall seconds."""
    from factory.demo import prepare
    from factory.intake import enqueue

    line = prepare(root)
    paths = write_inputs(root, runs, root / "bench-alloys")
    for run in runs:
        part = enqueue(line, paths[run.part], name=run.part)
        if part.station != "intake":
            raise SystemExit(f"{run.part} was refused at intake: {(part.read_sidecar('error') or {}).get('message')}")
    t0 = time.monotonic()
    with (root / "daemon.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", "--until-empty", "--root", str(root)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(5)
                done = len(list(line.layout.finished.glob("*.result.json")))
                print(f"\r{done}/{len(runs)} parts finished, {time.monotonic() - t0:.0f}s", end="", file=sys.stderr)
                if time.monotonic() - t0 > timeout_s:
                    proc.terminate()  # first SIGTERM: the daemon stops safely
                    proc.wait(60)
                    raise SystemExit(f"the line took longer than {timeout_s:.0f}s; see {root / 'daemon.log'}")
        finally:
            print(file=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"factory run exited {proc.returncode}; see {root / 'daemon.log'}")
    return time.monotonic() - t0


def read_run(root: Path, run: Run) -> dict:
    """One run's record, read from its finished part's result.json (and prune.json for the kept experts)."""
    from factory.line import Line

    found = Line(root).find(run.part)
    if found is None or found.station != "finished":
        where = found.station if found else "nowhere"
        error = (found.read_sidecar("error") or {}).get("message") if found else None
        raise SystemExit(f"{run.part} ended in {where}, not finished: {error}")
    result = found.read_sidecar("result")
    ppl = {domain: next(p for p in result["perplexity"] if p["corpus"] == cid)
           for domain, cid in EVAL_CORPORA.items()}
    stages = {s["type"]: s for s in result["stages"]}
    prune = json.loads((Path(result["work_dir"]) / stages["expert-prune"]["metrics"]["prune"]).read_text())
    profile = stages.get("expert-activation-profile")
    return {
        "part": run.part, "method": run.method.id, "keep": run.keep, "seed": run.seed,
        "calibration": None if run.subset is None else {
            "path": run.subset.rel, "sha256": run.subset.sha256, "docs": list(run.subset.docs),
            "profiled_tokens": profile["metrics"]["tokens"], "profiled_sha256": profile["metrics"]["corpus_sha256"]},
        "keepExpertIndices": run.indices, "metric": prune["metric"], "kept": prune["kept"],
        **{domain: {k: p[k] for k in ("source", "forged", "tokens", "blocks", "block_size", "corpus_sha256")}
           for domain, p in ppl.items()},
        "elapsed_s": result["elapsed_s"],
    }


# ── 4. the table ────────────────────────────────────────────────────────────


def cell(values: list[float]) -> dict:
    """n, mean, sample std (None for one run), min and max."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def cells(records: list[dict], keeps: tuple[int, ...]) -> list[dict]:
    out = []
    for keep in keeps:
        for method in METHODS:
            rs = [r for r in records if r["keep"] == keep and r["method"] == method.id]
            out.append({"keep": keep, "method": method.id,
                        **{domain: cell([r[domain]["forged"] for r in rs]) for domain in EVAL_CORPORA}})
    return out


def fmt(c: dict) -> str:
    return f"{c['mean']:.1f}" if c["std"] is None else f"{c['mean']:.1f} ± {c['std']:.1f}"


def table(data: dict) -> str:
    experts = data["source"]["experts"]
    rows = ["| keep | method | calibration | runs | code ppl | prose ppl | code min–max | prose min–max |",
            "|---|---|---|---|---|---|---|---|",
            (f"| {experts}/{experts} | source (unpruned) | — | 1 | {data['source']['code_ppl']:.1f} | "
             f"{data['source']['prose_ppl']:.1f} | — | — |")]
    for c in data["cells"]:
        m = BY_ID[c["method"]]
        calib = m.calibration or ("none (deterministic)" if not m.seeded else "none (seeded draw)")
        rows.append(f"| {c['keep']}/{experts} | {m.label} | {calib} | {c['code']['n']} | {fmt(c['code'])} | "
                    f"{fmt(c['prose'])} | {c['code']['min']:.1f}–{c['code']['max']:.1f} | "
                    f"{c['prose']['min']:.1f}–{c['prose']['max']:.1f} |")
    return "\n".join(rows)


def _forged(data: dict, method: str, keep: int, domain: str) -> dict[int | None, float]:
    """{seed: forged perplexity} of one method at one keep."""
    return {r["seed"]: r[domain]["forged"] for r in data["runs"] if r["method"] == method and r["keep"] == keep}


def verdicts(data: dict) -> str:
    """The claims, checked mechanically (lower perplexity is better): cell
    means, and per seed how many runs land below the comparison."""
    by = {(c["keep"], c["method"]): c for c in data["cells"]}
    lines = []
    for keep in data["settings"]["keeps"]:
        l2 = by[(keep, "router_l2")]["code"]["mean"]
        for method, name in (("activation_count-code", "activation-count (code)"), ("reap-code", "REAP (code)")):
            runs = _forged(data, method, keep, "code")
            below = sum(v < l2 for v in runs.values())
            mean = by[(keep, method)]["code"]["mean"]
            word = "beats" if below == len(runs) else "does NOT beat" if below == 0 else "mixed against"
            lines.append(f"- keep {keep}: {name} **{word}** router-gate-L2 on held-out code: mean {mean:.1f} vs "
                         f"{l2:.1f}, {below} of {len(runs)} seeds below it.")
        act, reap = _forged(data, "activation_count-code", keep, "code"), _forged(data, "reap-code", keep, "code")
        lines.append(f"- keep {keep}: REAP vs activation-count on the same code subsets (paired): REAP lower on "
                     f"code in {sum(reap[s] < act[s] for s in act)} of {len(act)} seeds.")
        for domain in ("code", "prose"):
            own = _forged(data, f"activation_count-{domain}", keep, domain)
            other = _forged(data, f"activation_count-{'prose' if domain == 'code' else 'code'}", keep, domain)
            lines.append(f"- keep {keep}: on held-out {domain}, activation-count calibrated on {domain} vs on the "
                         f"other domain: {statistics.fmean(own.values()):.1f} vs {statistics.fmean(other.values()):.1f}"
                         f", own domain lower in {sum(own[s] < other[s] for s in own)} of {len(own)} seeds.")
        rnd = by[(keep, "random")]["code"]
        lines.append(f"- keep {keep}: random keeps give code {rnd['mean']:.1f} ({rnd['min']:.1f}–{rnd['max']:.1f}); "
                     f"router-gate-L2 is {'inside' if rnd['min'] <= l2 <= rnd['max'] else 'outside'} that range.")
    return "\n".join(lines)


def section(data: dict) -> str:
    s = data["settings"]
    return f"""{BEGIN}
<!-- generated by bench/calibration_table.py from docs/results/calibration_table.json; do not edit by hand -->
## Calibration table (toy scale)

Held-out perplexity (lower is better) of `examples/{MODEL}` (modelHash
`{data['source']['modelHash']}`) after expert pruning, source vs forged on the
same tokens: the first {s['evalTokens']} tokens of code.eval and of prose.eval in
blocks of {s['evalBlockSize']}, for every method. Cells are the **mean ± sample
standard deviation** over seeds (min–max beside them); router-gate-L2 is
data-free and deterministic, so it ran once per keep ratio. A seed picks the
calibration subset (whole documents of the calib split in a seeded order, up to
{s['subsetChars']:,} characters, pinned by sha256; the profile reads its first
{s['calibrationTokens']} tokens in blocks of {s['calibrationSequence']}) or, for random, the experts
kept. Seeds {s['seeds']}; each run's raw numbers, kept experts and calibration
documents are in `docs/results/calibration_table.json`.

{table(data)}

What the means say:

{verdicts(data)}

- command: `{data['command']}`
- wall time: {data['wall_s'] / 60:.1f} min for {len(data['runs'])} parts through one daemon
  (the line alone: {data['line_s'] / 60:.1f} min)
- machine: {data['machine']}
- versions: {data['versions']}
{END}"""


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, CPU only; "
            f"load average {load:.1f} at the start (shared machine)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "RESULTS.md", help="markdown file to write the table into")
    p.add_argument("--json", type=Path, default=None, help="raw runs (default: <out dir>/results/calibration_table.json)")
    p.add_argument("--root", type=Path, default=None, help="a new factory root (default: a temp dir, removed after)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--keeps", type=int, nargs="+", default=list(KEEPS))
    p.add_argument("--timeout", type=float, default=3600, help="give up on the line after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="build and validate every alloy; run nothing")
    args = p.parse_args(argv)
    seeds, keeps = tuple(args.seeds), tuple(args.keeps)
    runs = plan_runs(keeps, seeds)
    if args.dry_run:
        return dry_run(runs)

    t0 = time.monotonic()
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/calibration_table.py",
                                                             *(sys.argv[1:] if argv is None else argv)])
    start_machine = machine()
    if args.root is not None and args.root.exists() and any(args.root.iterdir()):
        raise SystemExit(f"--root {args.root} is not empty; the table needs a fresh root")
    root = args.root or Path(tempfile.mkdtemp(prefix="calibration-table-"))
    line_s = run_line(root, runs, timeout_s=args.timeout)
    records = [read_run(root, run) for run in runs]
    source_hash = model_hash(hash_model_dir(root / "models" / MODEL))
    layers, experts, top_k = model_geometry()
    data = {
        "format": FORMAT, "version": 1, "command": command, "machine": start_machine,
        "versions": f"Python {platform.python_version()}, torch {metadata.version('torch')}, "
                    f"transformers {metadata.version('transformers')}, factory {metadata.version('forge-factory')}",
        "source": {"model": f"examples/{MODEL}", "modelHash": source_hash, "experts": experts, "top_k": top_k,
                   "moe_layers": layers, "code_ppl": records[0]["code"]["source"],
                   "prose_ppl": records[0]["prose"]["source"]},
        "settings": {"keeps": list(keeps), "seeds": list(seeds), "evalTokens": EVAL_TOKENS,
                     "evalBlockSize": EVAL_BLOCK, "calibrationTokens": CALIBRATION_TOKENS,
                     "calibrationSequence": CALIBRATION_SEQUENCE, "subsetChars": SUBSET_CHARS,
                     "spread": "sample standard deviation (n-1) over seeds; min and max also given"},
        "methods": [asdict(m) for m in METHODS], "runs": records, "cells": cells(records, keeps),
        "line_s": line_s, "wall_s": time.monotonic() - t0,
    }
    if any(len({(r[d]["source"], r[d]["tokens"]) for r in records}) != 1 for d in EVAL_CORPORA):
        raise SystemExit("the source perplexity differs between runs: the eval tokens were not the same")
    json_out = args.json or args.out.parent / "results" / "calibration_table.json"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(data, indent=2) + "\n")
    splice(args.out, section(data), begin=BEGIN, end=END)
    if args.root is None:
        shutil.rmtree(root)
    print(f"wrote {args.out} and {json_out} in {data['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
