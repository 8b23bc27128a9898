"""`factory show PART`: one part's story, wherever on the line it is.

Everything comes from the line's own files (ticket, result.json or
error.json, the work dir's checkpoint, the events, the heartbeat), read as
untrusted: a missing or odd field is shown as absent, never a crash.
"""

from __future__ import annotations

import math
from typing import Any

from factory import durable
from factory import heartbeat as hb
from factory.events import read_events
from factory.line import Line
from factory.protocol import CHECKPOINT, ERROR, RESULT

# Which way is better, per measured quantity: shown beside every number.
LOWER_IS_BETTER = "lower is better"
HIGHER_IS_BETTER = "higher is better"


def _obj(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def story(line: Line, name: str) -> dict:
    """The part's story as one JSON-ready object (see render_text)."""
    part = line.get(name)
    result = part.read_sidecar(RESULT)
    error = part.read_sidecar(ERROR)
    record = result or _obj((error or {}).get("result")) or None
    work = line.layout.work_dir(part.base)
    stages = _list((record or {}).get("stages")) or _checkpoint_stages(work)
    # result.json has every stage's peaks; only a part without one needs the
    # (possibly large) event log read for them
    peaks = _peaks(line, part.base) if any(_num(_obj(s).get("peak_rss_mb")) is None for s in stages) else {}
    out = {
        "part": part.base, "station": part.station, "file": part.path.name, "retry": part.name.retry,
        "ticket": line.ticket(part),
        "stages": [{"index": s.get("index"), "type": s.get("type"), "elapsed_s": _num(s.get("elapsed_s")),
                    "peak_rss_mb": _num(s.get("peak_rss_mb")) or peaks.get(s.get("index"), {}).get("rss"),
                    "peak_vram_mb": _num(s.get("peak_vram_mb")) or peaks.get(s.get("index"), {}).get("vram"),
                    "handed_off": bool(s.get("handed_off"))}
                   for s in stages if isinstance(s, dict)],
        "running": _running(line, part.base) if part.station == "assembly" else None,
        "measured": _measured(record) if record else [],
        "acceptance": _obj((record or {}).get("acceptance")) or None,
        "error": _error(error) if error and part.station in ("rework", "intake") else None,
        "handed_off": _list((record or {}).get("handed_off")),
        "model": _model(record) if record else None,
        "work_dir": str(work) if work.is_dir() else None,
    }
    return out


def _checkpoint_stages(work) -> list:
    try:
        return _list(_obj(durable.read_json(work / CHECKPOINT)).get("stages"))
    except (OSError, ValueError):
        return []


def _peaks(line: Line, base: str) -> dict:
    """Peak RSS/VRAM per stage index from the part's stage/completed events."""
    out: dict = {}
    for ev in read_events(line.layout.events, keep=line.config.daemon.events_keep):
        if ev.get("part") == base and ev.get("kind") == "stage/completed":
            index = _obj(ev.get("stage")).get("index")
            out[index] = {"rss": _num(ev.get("peak_rss_mb")), "vram": _num(ev.get("peak_vram_mb"))}
    return out


def _running(line: Line, base: str) -> dict | None:
    beat = hb.read(line.layout.heartbeat)
    if beat is None or hb.judge(beat).stale:
        return None
    return next((p for p in _list(beat.get("parts")) if isinstance(p, dict) and p.get("part") == base), None)


def _measured(record: dict) -> list[dict]:
    """Source against forged, per held-out corpus and per benchmark."""
    rows = []
    for p in _list(record.get("perplexity")):
        p = _obj(p)
        model = f" ({p['model']})" if isinstance(p.get("model"), str) else ""
        rows.append({"what": f"perplexity on {p.get('corpus')}{model}", "source": _num(p.get("source")),
                     "forged": _num(p.get("forged")), "ratio": _num(p.get("ratio")), "better": LOWER_IS_BETTER,
                     "tokens": p.get("tokens")})
    for name, sides in _obj(record.get("benchmarks")).items():
        sides = _obj(sides)
        src, forged = _obj(sides.get("source")), _obj(sides.get("forged"))
        metric = "pass@1" if "pass@1" in forged or "pass@1" in src else "score"
        rows.append({"what": f"{name} {metric}", "source": _num(src.get(metric)), "forged": _num(forged.get(metric)),
                     "ratio": None, "better": HIGHER_IS_BETTER, "tokens": None})
    return rows


def _error(error: dict) -> dict:
    stage = _obj(error.get("stage"))
    return {"class": error.get("class"), "stage": {"index": stage.get("index"), "type": stage.get("type")},
            "message": error.get("message"), "failed_at": error.get("failed_at"), "retries": error.get("retries"),
            "next_try_at": error.get("retry_not_before")}


def _model(record: dict) -> dict:
    return {"dir": record.get("forged_dir"), "modelHash": record.get("modelHash"),
            "files": [{"file": f.get("filename"), "bytes": f.get("size")} for f in map(_obj, _list(
                record.get("fileHashes")))],
            "size_bytes": record.get("size_bytes"), "params": record.get("params")}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def _val(value: Any) -> str:
    """A threshold or a measured value: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_text(s: dict) -> str:
    """The story for people: plain lines, no colour, nothing wrapped."""
    out = [f"{s['part']}: {s['station']} ({s['file']}, retry {s['retry']})"]
    t = s["ticket"]
    if t:
        out.append(f"  enqueued {t.get('enqueued_at')} by {t.get('origin')}, priority {t.get('priority', 0)}"
                   + (f", next try at {t['not_before']}" if t.get("not_before") else ""))
        need = _obj(t.get("need"))
        if need.get("basis"):
            out.append(f"  need: {need['basis']}")
    run = s["running"]
    if run:
        stage, prog = _obj(run.get("stage")), _obj(run.get("progress"))
        done = f" {prog.get('done')}/{prog.get('total')} {prog.get('unit', '')}".rstrip() if prog else ""
        gpus = f", GPUs {run.get('gpus')}" if run.get("gpus") else ""
        out.append(f"  running stage {stage.get('index')} {stage.get('type')}{done} (pid {run.get('pid')}{gpus})")
    if s["stages"]:
        out.append("  stages:")
        for st in s["stages"]:
            mem = f", peak RSS {st['peak_rss_mb']:.0f} MB" if st["peak_rss_mb"] is not None else ""
            vram = f", peak VRAM {st['peak_vram_mb']:.0f} MB" if st["peak_vram_mb"] is not None else ""
            took = "handed off to the ship role" if st["handed_off"] else (
                f"{st['elapsed_s']:.1f} s" if st["elapsed_s"] is not None else "-")
            out.append(f"    {st['index']} {st['type']}: {took}{mem}{vram}")
    if s["measured"]:
        out.append("  measured (source -> forged):")
        for m in s["measured"]:
            ratio = f" ({m['ratio']:.2f}x)" if m["ratio"] is not None else ""
            out.append(f"    {m['what']}: {_fmt(m['source'])} -> {_fmt(m['forged'])}{ratio}, {m['better']}")
    acc = s["acceptance"]
    if acc:
        out.append(f"  acceptance: {'passed' if acc.get('passed') else 'FAILED'}")
        for c in map(_obj, _list(acc.get("checks"))):
            out.append(f"    {c.get('check')}: required {_val(c.get('required'))}, got {_val(c.get('actual'))}: "
                       f"{'ok' if c.get('passed') else 'FAILED'}")
    err = s["error"]
    if err:
        where = f"stage {err['stage']['index']} {err['stage']['type']}" if err["stage"]["type"] else "the line"
        out.append(f"  {'failed' if s['station'] == 'rework' else 'last failure'} ({err['class']}) in {where} at "
                   f"{err['failed_at']}:")
        out.append(f"    {err['message']}")
        if err.get("next_try_at"):
            out.append(f"    next try at {err['next_try_at']}")
    for h in map(_obj, s["handed_off"]):
        out.append(f"  handed off: stage {h.get('index')} {h.get('type')} to the {h.get('role')} role")
    model = s["model"]
    if model and model.get("dir"):
        out.append(f"  model: {model['dir']}")
        if model.get("modelHash"):
            out.append(f"  modelHash: {model['modelHash']}")
        for f in model["files"]:
            out.append(f"    {f['file']} ({f['bytes']} bytes)")
    if s["work_dir"]:
        out.append(f"  work dir: {s['work_dir']}")
    return "\n".join(out)
