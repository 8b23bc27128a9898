"""`factory demo`: the factory's real job, end to end, on a fresh root.

It makes a root, ships the tiny trained models and the corpora into it, drops
examples/demo.alloy.json into intake, runs the real daemon (a `factory run
--until-empty` subprocess) while showing its events live, then prints what
came out: source vs forged perplexity on held-out code and prose, experts
kept, size on disk, modelHash, the acceptance verdict and where the model is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from factory.errors import FactoryError
from factory.events import read_events
from factory.intake import enqueue
from factory.line import Line, init_root

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_ALLOY = EXAMPLES / "demo.alloy.json"
MODEL = "tiny-moe"
# Every shipped example model goes into the root, so every examples/*.alloy.json runs there.
MODELS = ("tiny-moe", "tiny-dense")
CORPORA = ("code.calib", "code.eval", "prose.calib", "prose.eval")
POLL_SECONDS = 0.2


def prepare(root: Path) -> Line:
    """A root holding the demo's model and corpora (idempotent)."""
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
    return line


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
        return f"  loaded {Path(ev['model_dir']).name} ({ev['plan']['strategy']}, {ev['dtype']}) for {ev.get('purpose')}"
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
                    console.print(text)
            if proc.poll() is not None:
                break
            time.sleep(POLL_SECONDS)
    if proc.returncode != 0:
        console.print(proc.stderr.read())
    return proc.returncode


def _source_bytes(line: Line) -> int:
    return sum(f.stat().st_size for f in (line.root / "models" / MODEL).glob("*.safetensors"))


def _ppl(result: dict, corpus: str) -> dict:
    return next((p for p in result.get("perplexity", []) if p.get("corpus") == corpus), {})


def summary(line: Line, part: str) -> dict:
    """What the demo reports, from the part's sidecars (result or error)."""
    found = line.find(part)
    if found is None:
        raise FactoryError(f"part {part!r} vanished from {line.root}")
    record = found.read_sidecar("result") if found.station == "finished" else (found.read_sidecar("error") or {})
    result = record if found.station == "finished" else record.get("result") or {}
    source_cfg = json.loads((line.root / "models" / MODEL / "config.json").read_text())
    return {
        "station": found.station,
        "message": None if found.station == "finished" else record.get("message"),
        "code": _ppl(result, "code-eval"),
        "prose": _ppl(result, "prose-eval"),
        "experts": (source_cfg.get("num_local_experts") or source_cfg.get("num_experts"), result.get("experts_per_layer")),
        "bytes": (_source_bytes(line), result.get("size_bytes")),
        "modelHash": result.get("modelHash"),
        "acceptance": (result.get("acceptance") or {}).get("passed"),
        "forged_dir": result.get("forged_dir"),
    }


def render(s: dict, console, elapsed: float) -> None:
    from rich.table import Table

    t = Table(title=f"tiny MoE forged on code ({s['station']}, {elapsed:.0f}s)")
    for col in ("", "source", "forged", "forged / source"):
        t.add_column(col, justify="right")
    for label, p in (("held-out code perplexity", s["code"]), ("held-out prose perplexity", s["prose"])):
        if p:
            t.add_row(label, f"{p['source']:.2f}", f"{p['forged']:.2f}", f"{p['forged'] / p['source']:.2f}x")
    (e0, e1), (b0, b1) = s["experts"], s["bytes"]
    t.add_row("experts per layer", str(e0), str(e1), f"{e1 / e0:.2f}x" if e0 and e1 else "")
    t.add_row("weights on disk (MB)", f"{b0 / 1e6:.2f}", f"{b1 / 1e6:.2f}" if b1 else "", f"{b1 / b0:.2f}x" if b1 else "")
    console.print(t)
    verdict = {True: "[green]passed[/]", False: "[red]failed[/]", None: "not evaluated"}[s["acceptance"]]
    console.print(f"acceptance: {verdict}")
    console.print(f"modelHash:  {s['modelHash']}")
    console.print(f"model:      {s['forged_dir']}")
    if s["message"]:
        console.print(f"[red]{s['message']}[/]")


def demo(root: Path | None) -> int:
    from rich.console import Console

    console = Console()
    t0 = time.monotonic()
    root = root or Path(tempfile.mkdtemp(prefix="forge-demo-"))
    line = prepare(root)
    part = line.free_base(json.loads(DEMO_ALLOY.read_text())["name"])
    console.print(f"root {line.root}: enqueueing {DEMO_ALLOY.name} as {part}")
    enqueued = enqueue(line, DEMO_ALLOY, name=part)
    if enqueued.station != "intake":
        raise FactoryError(f"the demo alloy was refused: {(enqueued.read_sidecar('error') or {}).get('message')}")
    rc = run_daemon(line, part, console)
    s = summary(line, part)
    render(s, console, time.monotonic() - t0)
    return 0 if rc == 0 and s["station"] == "finished" and s["acceptance"] else 1
