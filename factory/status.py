"""`factory status`: one snapshot of a root, for people (rich) and programs (JSON)."""

from __future__ import annotations

import json
import time
from datetime import datetime

from factory import heartbeat as hb
from factory.line import Line
from factory.protocol import STATIONS
from factory.tiers import node_tiers

RECENT_OUTCOMES = 8


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _eta_seconds(beat: dict) -> float | None:
    """Remaining time of the current stage from its rate so far."""
    prog, stage = beat.get("progress"), beat.get("stage")
    if not prog or not stage or not prog.get("total") or not prog.get("done"):
        return None
    elapsed = time.time() - _ts(stage["started_at"])
    return elapsed * (prog["total"] - prog["done"]) / prog["done"]


def recent_outcomes(line: Line, n: int = RECENT_OUTCOMES) -> list[dict]:
    try:
        lines = line.layout.throughput.read_bytes().splitlines()[-n:]
    except FileNotFoundError:
        return []
    out = []
    for raw in lines:
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out


def gather(line: Line) -> dict:
    beat = hb.read(line.layout.heartbeat)
    live = hb.judge(beat)
    return {
        "root": str(line.root),
        "node": {"name": line.config.node.name, "roles": line.config.node.roles},
        "worker": {
            "state": "offline" if live.stale else beat["state"],
            "stale": live.stale,
            "why": live.reason,
            "beat_age_s": None if live.age_seconds is None else round(live.age_seconds, 1),
            "pid": beat.get("pid") if beat else None,
            "host": beat.get("host") if beat else None,
            "part": None if live.stale else beat.get("part"),
            "stage": None if live.stale else beat.get("stage"),
            "progress": None if live.stale else beat.get("progress"),
            "eta_s": None if live.stale else _eta_seconds(beat),
        },
        "stations": {s: len(line.parts(s)) for s in STATIONS},
        "recent": recent_outcomes(line),
        "tiers": [
            {"name": t.name, "path": str(t.path), "fs_type": t.fs_type, "free_gib": round(t.free_gib, 1),
             "total_gib": round(t.total_bytes / 2**30, 1), "min_free_gb": t.min_free_gb,
             "low": t.free_gib < t.min_free_gb}
            for t in node_tiers(line.root, line.config)
        ],
    }


def render(snapshot: dict) -> None:
    from rich.console import Console
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    con = Console()
    w = snapshot["worker"]
    colour = {"building": "green", "idle": "cyan", "offline": "red", "stopping": "yellow"}.get(w["state"], "white")
    con.print(f"[bold]{snapshot['node']['name']}[/] ({', '.join(snapshot['node']['roles'])})  root {snapshot['root']}")
    con.print(f"worker: [{colour}]{w['state']}[/]  pid {w['pid']}  beat {w['beat_age_s']}s ago"
              + (f"  [red]STALE: {w['why']}[/]" if w["stale"] and w["pid"] else ""))
    if w["part"]:
        st = w["stage"] or {}
        con.print(f"building [bold]{w['part']}[/] stage {st.get('index')} {st.get('type')}")
        p = w["progress"]
        if p and p.get("total"):
            eta = f"  ETA {w['eta_s']:.0f}s" if w["eta_s"] is not None else ""
            con.print(ProgressBar(total=p["total"], completed=p["done"], width=40))
            con.print(f"{p['done']:g}/{p['total']:g} {p['unit']}{eta}")
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
            r.add_row(o["ts"], o["part"], o["outcome"], str(o.get("retry", 0)))
        con.print(r)
    d = Table(title="disk")
    for col in ("tier", "path", "fs", "free GiB", "total GiB"):
        d.add_column(col)
    for tier in snapshot["tiers"]:
        free = f"[red]{tier['free_gib']}[/]" if tier["low"] else str(tier["free_gib"])
        d.add_row(tier["name"], tier["path"], tier["fs_type"], free, str(tier["total_gib"]))
    con.print(d)


def plain(snapshot: dict) -> str:
    w = snapshot["worker"]
    lines = [f"node {snapshot['node']['name']} worker {w['state']}"
             + (f" ({w['why']})" if w["stale"] else "")]
    if w["part"]:
        st = w["stage"] or {}
        prog = w["progress"] or {}
        lines.append(f"building {w['part']} stage {st.get('index')} {st.get('type')} "
                     f"{prog.get('done', '')}/{prog.get('total', '')} {prog.get('unit', '')}".rstrip())
    lines.append(" ".join(f"{k}={v}" for k, v in snapshot["stations"].items()))
    return "\n".join(lines)


