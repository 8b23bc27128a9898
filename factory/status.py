"""`factory status`: one snapshot of a root, for people (rich) and programs (JSON)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from factory import heartbeat as hb
from factory.errors import printable
from factory.line import Line
from factory.durable import tmp_owner
from factory.events import utc_now
from factory.protocol import STATIONS, base_of, parse_part
from factory.resources import node_resources
from factory.tiers import node_tiers

RECENT_OUTCOMES = 8
# Text from the heartbeat (written by a worker, but read as untrusted) is
# cut to this and made printable before it reaches a terminal.
_TEXT_LIMIT = 200


def _text(value: Any) -> str | None:
    """A heartbeat string fit to print: printable, bounded; None otherwise."""
    if not isinstance(value, str):
        return None
    return printable(value, _TEXT_LIMIT)


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _pid(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _stage(value: Any) -> dict | None:
    if not isinstance(value, dict):
        return None
    index = value.get("index")
    return {"index": index if isinstance(index, int) and not isinstance(index, bool) else None,
            "type": _text(value.get("type")), "started_at": _text(value.get("started_at"))}


def _progress(value: Any) -> dict | None:
    if not isinstance(value, dict) or _number(value.get("done")) is None:
        return None
    return {"done": value["done"], "total": _number(value.get("total")), "unit": _text(value.get("unit")) or ""}


def _eta_seconds(stage: dict | None, prog: dict | None) -> float | None:
    """Remaining time of the current stage from its rate so far."""
    if not stage or not prog or not prog["total"] or not prog["done"] or prog["done"] <= 0:
        return None
    started = hb.beat_time(stage["started_at"])
    if started is None:
        return None
    eta = (time.time() - started) * (prog["total"] - prog["done"]) / prog["done"]
    return eta if math.isfinite(eta) and eta >= 0 else None


def recent_outcomes(line: Line, n: int = RECENT_OUTCOMES) -> list[dict]:
    """The last n outcome objects of throughput.jsonl (other lines skipped)."""
    try:
        lines = line.layout.throughput.read_bytes().splitlines()[-n:]
    except (FileNotFoundError, IsADirectoryError):
        return []
    out = []
    for raw in lines:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _liveness(path: Path, beat: dict | None) -> hb.Liveness:
    if beat is None and os.path.lexists(path):
        return hb.Liveness(True, None, f"{path.name} is unreadable or not a JSON object (torn, foreign or "
                                       "oversized); a running worker rewrites it on its next beat")
    return hb.judge(beat)


def _gpus(value: Any) -> list[int]:
    if not isinstance(value, list):
        return []
    return [g for g in value[:1024] if isinstance(g, int) and not isinstance(g, bool) and g >= 0]


def _part_views(value: Any) -> list[dict]:
    """The heartbeat's running parts, each field checked like the rest."""
    if not isinstance(value, list):
        return []
    out = []
    for v in value[:1024]:
        if not isinstance(v, dict) or _text(v.get("part")) is None:
            continue
        stage, progress = _stage(v.get("stage")), _progress(v.get("progress"))
        out.append({"part": _text(v["part"]), "pid": _pid(v.get("pid")), "gpus": _gpus(v.get("gpus")),
                    "started_at": _text(v.get("started_at")), "stage": stage, "progress": progress,
                    "eta_s": _eta_seconds(stage, progress), "stalled": _text(v.get("stalled"))})
    return out


def _cluster(beat: dict | None) -> dict | None:
    """A Ray dispatcher's cluster view from its heartbeat, fields checked."""
    view = (beat or {}).get("cluster")
    if not isinstance(view, dict):
        return None

    def res(r: Any) -> dict:
        r = r if isinstance(r, dict) else {}
        return {k: _number(r.get(k)) or 0 for k in ("cpus", "gpus", "vram_gb", "memory_bytes")}

    nodes = [{"node_id": _text(n.get("node_id")), "address": _text(n.get("address")), "total": res(n.get("total")),
              "available": res(n.get("available")),
              "parts": [p for p in map(_text, n.get("parts") or []) if p] if isinstance(n.get("parts"), list) else []}
             for n in (view.get("nodes") or [])[:1024] if isinstance(n, dict)] if isinstance(view.get("nodes"), list) else []
    return {"backend": _text(view.get("backend")), "address": _text(view.get("address")), "nodes": nodes,
            "error": _text(view.get("error"))}


def worker(path: Path) -> dict:
    """The worker as its heartbeat shows it; every field checked, so a
    malformed heartbeat reads as a stale worker with the reason."""
    beat = hb.read(path)
    live = _liveness(path, beat)
    beat, fresh = beat or {}, not live.stale
    stage = _stage(beat.get("stage")) if fresh else None
    progress = _progress(beat.get("progress")) if fresh else None
    stalled = _text(beat.get("stalled")) if fresh else None
    parts = _part_views(beat.get("parts")) if fresh else []
    if fresh and not parts and _text(beat.get("part")):  # a worker from before `parts`
        parts = [{"part": _text(beat["part"]), "pid": None, "gpus": [], "started_at": None, "stage": stage,
                  "progress": progress, "eta_s": _eta_seconds(stage, progress), "stalled": stalled}]
    return {
        "state": beat["state"] if fresh else "offline",
        "stale": live.stale,
        "why": live.reason,
        # A fresh beat is not health: the part's process may be stopped.
        "stalled": stalled,
        "healthy": fresh and stalled is None,
        "beat_age_s": None if live.age_seconds is None else round(live.age_seconds, 1),
        "pid": _pid(beat.get("pid")),
        "host": _text(beat.get("host")),
        "part": _text(beat.get("part")) if fresh else None,
        "stage": stage,
        "progress": progress,
        "eta_s": _eta_seconds(stage, progress) if fresh else None,
        "parts": parts,
    }


def waiting(line: Line) -> list[dict]:
    """Parts in intake that may not be claimed yet, and until when: a retry
    backing off ("next try at"), or a part waiting for disk room."""
    now = utc_now()
    out = []
    for w in line.queue():
        if w.not_before and w.not_before > now:
            out.append({"part": w.part.base, "retry": w.part.name.retry, "why": "backoff",
                        "next_try_at": w.not_before})
        elif w.wait_for_room:
            out.append({"part": w.part.base, "retry": w.part.name.retry, "why": "disk",
                        "next_try_at": None, "path": _text(w.wait_for_room.get("path"))})
    return out


def ignored(line: Line) -> list[str]:
    """Files in intake/ the line will never read: not an alloy, a sidecar or
    a temporary file (e.g. notes.json): said, so nobody waits on them."""
    names = []
    for entry in os.scandir(line.layout.intake):
        name = entry.name
        if parse_part(name) or base_of(name) or tmp_owner(name) is not None or name.startswith("."):
            continue
        names.append(printable(name, _TEXT_LIMIT))
    return sorted(names)[:100]


def gather(line: Line) -> dict:
    return {
        "root": str(line.root),
        "node": {"name": line.config.node.name, "roles": line.config.node.roles},
        "worker": worker(line.layout.heartbeat),
        "resources": node_resources(line.config).to_json(),
        "cluster": _cluster(hb.read(line.layout.heartbeat)),
        "stations": {s: len(line.parts(s)) for s in STATIONS},
        "waiting": waiting(line),
        "ignored": ignored(line),
        "recent": recent_outcomes(line),
        "tiers": [
            {"name": t.name, "path": str(t.path), "fs_type": t.fs_type, "free_gib": round(t.free_gib, 1),
             "total_gib": round(t.total_bytes / 2**30, 1), "min_free_gb": t.min_free_gb,
             "low": t.free_gib < t.min_free_gb, "missing": t.missing, "problem": t.problem}
            for t in node_tiers(line.root, line.config)
        ],
    }


def render(snapshot: dict, con=None) -> None:
    """The snapshot for a terminal (rich); `con`: the Console to print on."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    con = con or Console()
    w = snapshot["worker"]
    colour = {"building": "green", "idle": "cyan", "offline": "red", "stopping": "yellow"}.get(w["state"], "white")
    con.print(f"[bold]{snapshot['node']['name']}[/] ({', '.join(snapshot['node']['roles'])})  root {snapshot['root']}")
    if w["stalled"]:
        colour = "red"
    stale = _liveness_text(w)
    con.print(f"worker: [{colour}]{w['state']}[/]  pid {w['pid']}  beat {w['beat_age_s']}s ago"
              + (f"  [{'red' if 'STALE' in stale else 'yellow'}]{escape(stale[2:])}[/]" if stale else "")
              + (f"  [bold red]STALLED: {escape(w['stalled'])}[/]" if w["stalled"] else ""))
    for part in w["parts"]:
        st = part["stage"] or {}
        gpus = f"  GPUs {','.join(map(str, part['gpus']))}" if part["gpus"] else ""
        con.print(f"building [bold]{escape(part['part'])}[/] stage {st.get('index')} "
                  f"{escape(str(st.get('type')))}{gpus}"
                  + ("  [bold red]STALLED[/]" if part["stalled"] else ""))
        p = part["progress"]
        if p and p["total"]:
            eta = f"  ETA {part['eta_s']:.0f}s" if part["eta_s"] is not None else ""
            con.print(ProgressBar(total=p["total"], completed=p["done"], width=40))
            con.print(f"{p['done']:g}/{p['total']:g} {escape(p['unit'])}{eta}")
    res = snapshot["resources"]
    con.print(f"resources: {res['cpu_slots']} CPU slots ({res['cores']} cores), {res['ram_gib']} GiB RAM for parts, "
              f"{len(res['gpus'])} GPUs, up to {res['max_parallel_parts']} parts at once")
    for line in _waiting_lines(snapshot) + _cluster_lines(snapshot.get("cluster")):
        con.print(escape(line))
    t = Table(title="stations")
    for s in snapshot["stations"]:
        t.add_column(s, justify="right")
    t.add_row(*(str(v) for v in snapshot["stations"].values()))
    con.print(t)
    if snapshot["recent"]:
        r = Table(title="recent outcomes")
        for col in ("when", "part", "outcome", "retry"):
            r.add_column(col)
        for o in snapshot["recent"]:
            r.add_row(*(escape(str(o.get(k, "-"))) for k in ("ts", "part", "outcome")), escape(str(o.get("retry", 0))))
        con.print(r)
    d = Table(title="disk")
    for col in ("tier", "path", "fs", "free GiB", "total GiB"):
        d.add_column(col)
    for tier in snapshot["tiers"]:
        if tier["missing"]:
            d.add_row(tier["name"], escape(tier["path"]), "[red]MISSING[/]", "-", "-")
            continue
        free = f"[red]{tier['free_gib']}[/]" if tier["low"] else str(tier["free_gib"])
        d.add_row(tier["name"], escape(tier["path"]), tier["fs_type"], free, str(tier["total_gib"]))
    con.print(d)
    for tier in snapshot["tiers"]:
        if tier["missing"]:
            con.print(f"[red]tier {tier['name']} MISSING:[/] {escape(tier['problem'])}")


def _liveness_text(w: dict) -> str:
    """What the heartbeat says about a worker that is not running: a clean
    stop is no failure; anything else is STALE with the reason."""
    if not w["stale"]:
        return ""
    return f": {w['why']}" if w["why"] in (hb.STOPPED_CLEANLY,) or not w["pid"] else f": STALE, {w['why']}"


def _waiting_lines(snapshot: dict) -> list[str]:
    lines = []
    for wt in snapshot["waiting"]:
        retry = f" (retry {wt['retry']})" if wt["retry"] else ""
        lines.append(f"waiting {wt['part']}{retry}: next try at {wt['next_try_at']}" if wt["why"] == "backoff"
                     else f"waiting {wt['part']}{retry}: for disk room on {wt.get('path')}")
    if snapshot["ignored"]:
        lines.append(f"ignored in intake/ (not alloys: never read): {', '.join(snapshot['ignored'])}")
    return lines


def _cluster_lines(cluster: dict | None) -> list[str]:
    if not cluster:
        return []
    lines = [f"cluster {cluster['backend']} at {cluster['address']}: {len(cluster['nodes'])} nodes"
             + (f" ({cluster['error']})" if cluster["error"] else "")]
    for n in cluster["nodes"]:
        t, a = n["total"], n["available"]
        lines.append(f"node {(n['node_id'] or '?')[:12]} {n['address']}: {a['cpus']:g}/{t['cpus']:g} CPUs, "
                     f"{a['gpus']:g}/{t['gpus']:g} GPUs, {a['vram_gb']:g}/{t['vram_gb']:g} GB VRAM free; "
                     f"runs {', '.join(n['parts']) or 'nothing'}")
    return lines


def plain(snapshot: dict) -> str:
    w = snapshot["worker"]
    lines = [f"node {snapshot['node']['name']} worker {w['state']}" + _liveness_text(w)
             + (f" STALLED: {w['stalled']}" if w["stalled"] else "")]
    for part in w["parts"]:
        st = part["stage"] or {}
        prog = part["progress"] or {}
        gpus = f" gpus {','.join(map(str, part['gpus']))}" if part["gpus"] else ""
        lines.append(f"building {part['part']} stage {st.get('index')} {st.get('type')} "
                     f"{prog.get('done', '')}/{prog.get('total', '')} {prog.get('unit', '')}".rstrip() + gpus)
    lines.append(" ".join(f"{k}={v}" for k, v in snapshot["stations"].items()))
    lines += _waiting_lines(snapshot)
    lines += _cluster_lines(snapshot.get("cluster"))
    lines += [f"tier {t['name']} MISSING: {t['problem']}" for t in snapshot["tiers"] if t["missing"]]
    return "\n".join(lines)


