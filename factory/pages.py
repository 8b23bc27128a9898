"""The dashboard's pages as HTML strings: what `factory serve` shows and `factory report` writes.

Each page is built from the same readers as the terminal views (status.gather,
show.story, study.studies), so the web and the CLI never disagree. Rendering
is separate from serving (factory.dashboard) so a report is the part page
without a server: same content, same plots, no links, forms or script.
"""

from __future__ import annotations

import math
from typing import Any

from jinja2 import DictLoader, Environment
from markupsafe import Markup

from factory import plots
from factory.events import utc_now
from factory.line import Line
from factory.protocol import ERROR, STATIONS
from factory.show import story
from factory.status import gather
from factory.status import worker as worker_view
from factory.study import studies
from factory.templates import CSS, FEED, TEMPLATES

# Parts named per station on the overview; the rest are counted.
PARTS_PER_STATION = 200

_ENV = Environment(loader=DictLoader(TEMPLATES), autoescape=True)


def _fmt(value: Any) -> str:
    """A number to 4 significant digits, anything else as text, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _render(name: str, **context: Any) -> str:
    return _ENV.get_template(name).render(css=Markup(CSS), fmt=_fmt, **context)


def _obj(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def running_fragment(line: Line) -> str:
    """The worker's health, its running parts and the station counts as an
    HTML fragment (the overview re-fetches it, so they never disagree)."""
    w = worker_view(line.layout.heartbeat)
    return _render("running", w=w, parts=w["parts"], stations={s: len(line.parts(s)) for s in STATIONS})


def overview(line: Line) -> str:
    """`/`: the line at a glance."""
    snap = gather(line)
    parts, more = {}, {}
    for st in STATIONS:
        names = [p.base for p in line.parts(st)]
        parts[st], more[st] = names[:PARTS_PER_STATION], max(0, len(names) - PARTS_PER_STATION)
    running = Markup(_render("running", w=snap["worker"], parts=snap["worker"]["parts"], stations=snap["stations"]))
    return _render("overview", title="line", s=snap, parts=parts, more=more, running=running, feed=Markup(FEED),
                   script=True)


def events_page() -> str:
    """`/events`: the live feed alone."""
    return _render("events", title="events", feed=Markup(FEED), script=True)


def part_plots(s: dict) -> dict[str, Markup]:
    """The part page's charts from its story: timeline, memory, source vs forged."""
    labels = [f"{st['index']} {st['type']}" for st in s["stages"]]
    return {
        "timeline": Markup(plots.timeline([(lb, None if st["handed_off"] else st["elapsed_s"])
                                           for lb, st in zip(labels, s["stages"])])),
        "memory": Markup(plots.memory_bars([(lb, st["peak_rss_mb"], st["peak_vram_mb"])
                                            for lb, st in zip(labels, s["stages"])])),
        "compare": Markup(plots.compare_bars([plots.Compared(str(m["what"]), m["source"], m["forged"], m["better"])
                                              for m in s["measured"]])),
    }


def _actions(station: str) -> list[str]:
    """The writes a part page offers in this station."""
    return {"rework": ["retry"], "intake": ["cancel"], "deferred": ["cancel"], "assembly": ["cancel"]}.get(station, [])


def _problems(line: Line, s: dict) -> list[dict]:
    """The findings an intake refusal recorded (error.json's problems): each says its fix."""
    problems = (line.get(s["part"]).read_sidecar(ERROR) or {}).get("problems")
    return [p for p in problems[:50] if isinstance(p, dict)] if isinstance(problems, list) else []


def part_page(line: Line, name: str, *, need_token: bool = False, report: bool = False) -> str:
    """`/parts/{name}` (or, with report=True, `factory report`'s file).
    PartNotFound when no such part is on the line."""
    s = story(line, name)
    acc = _obj(s["acceptance"])
    checks = acc.get("checks") if isinstance(acc.get("checks"), list) else []
    return _render("part", title=s["part"], s=s, plots=part_plots(s), checks=list(map(_obj, checks)),
                   problems=_problems(line, s) if s["error"] else [],
                   handed=[_obj(h) for h in s["handed_off"]], actions=_actions(s["station"]),
                   need_token=need_token, report=report, generated=utc_now())


def study_page(line: Line) -> str:
    """`/study`: the calibration studies of this line."""
    found = studies(line)
    charts = [Markup(plots.line_chart(st.series(), x_label="keep ratio (experts kept / experts)",
                                      y_label="held-out perplexity", title=f"{st.source_model}: perplexity by keep ratio"))
              for st in found]
    return _render("study", title="study", studies=found, charts=charts)


def enqueue_page(*, need_token: bool, name: str = "", alloy: str = "", findings: list | None = None,
                 plan: str | None = None, enqueued: str | None = None, problem: str | None = None) -> str:
    """`/enqueue`: the form, with what the last submission found."""
    return _render("enqueue", title="enqueue", need_token=need_token, part_name=name, alloy=alloy,
                   findings=findings or [], plan=plan, enqueued=enqueued, problem=problem)


def problem_page(title: str, message: str, *, back: str | None = None) -> str:
    """A refusal or an error, said in words (403, 404, 409, ...)."""
    return _render("problem", title=title, message=message, back=back)
