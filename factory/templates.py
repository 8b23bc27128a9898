"""The dashboard's HTML templates (Jinja2), its stylesheet and its one script.

Kept as Python strings so they ship inside the package with no package-data
rules. The environment autoescapes every value: names, messages and fields
read from a line's files are untrusted, and only the SVG that factory.plots
builds (escaped there) is passed through as Markup.
"""

from __future__ import annotations

CSS = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:0 16px 40px;color:#222}
nav{display:flex;gap:16px;padding:10px 0;border-bottom:1px solid #ddd;margin-bottom:12px}
nav a{font-weight:600} a{color:#1f5fbf;text-decoration:none} a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:6px 0 14px} th,td{border-bottom:1px solid #eee;padding:3px 8px;
text-align:left;vertical-align:top} th{background:#f6f6f6} td.num{text-align:right}
.bad{color:#b00020;font-weight:600} .ok{color:#1a7f37;font-weight:600} .warn{color:#9a6700;font-weight:600}
.muted{color:#666} pre{background:#f6f6f6;padding:8px;overflow:auto;white-space:pre-wrap}
progress{width:180px} textarea{width:100%;font-family:monospace} .plot{max-width:100%;height:auto}
.box{border:1px solid #ddd;border-radius:4px;padding:8px 12px;margin:10px 0}
#feed td{font-family:monospace;font-size:12px} form.inline{display:inline-block;margin-right:8px}
"""

# The live parts of a page: the event feed (server-sent events; rows are
# built with textContent, never parsed as HTML) and the running parts,
# with the worker's health, re-fetched as a server-rendered (escaped) fragment.
SCRIPT = """
(function () {
  var feed = document.getElementById("feed");
  if (feed && window.EventSource) {
    var body = feed.tBodies[0], max = 200;
    var source = new EventSource(feed.dataset.stream);
    source.onmessage = function (m) {
      var ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      var rest = {};
      for (var k in ev) { if (["seq", "ts", "kind", "part"].indexOf(k) < 0) { rest[k] = ev[k]; } }
      var more = JSON.stringify(rest);
      var tr = document.createElement("tr");
      tr.className = "event";
      [ev.seq, ev.ts, ev.kind, ev.part || "-", more.length > 200 ? more.slice(0, 199) + "\\u2026" : more]
        .forEach(function (v) {
          var td = document.createElement("td");
          td.textContent = v === undefined || v === null ? "" : String(v);
          tr.appendChild(td);
        });
      body.insertBefore(tr, body.firstChild);
      while (body.rows.length > max) { body.deleteRow(body.rows.length - 1); }
    };
  }
  var running = document.getElementById("running");
  if (running) {
    setInterval(function () {
      fetch(running.dataset.src, {cache: "no-store"}).then(function (r) {
        if (r.ok) { return r.text().then(function (t) { running.innerHTML = t; }); }
      }).catch(function () {});
    }, 2000);
  }
})();
"""

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }} · forge-factory</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{{ css }}</style></head>
<body>
{% if not report %}<nav><a href="/">line</a><a href="/events">events</a><a href="/study">study</a>
<a href="/enqueue">enqueue</a><a href="/metrics">metrics</a></nav>{% endif %}
{% block body %}{% endblock %}
{% if script %}<script src="/dashboard.js"></script>{% endif %}
</body></html>
"""

# Shared pieces: a part link, the token field of a write form.
MACROS = """
{% macro part_link(name) -%}
{% if name %}<a href="/parts/{{ name | urlencode }}">{{ name }}</a>{% else %}-{% endif %}
{%- endmacro %}
{% macro token_field(need_token) -%}
{% if need_token %}<label>token <input type="password" name="token" autocomplete="off"></label>{% endif %}
{%- endmacro %}
"""

RUNNING = """{% from "macros" import part_link %}
<div class="box" id="worker">worker: <b>{{ w.state }}</b>
{% if w.stalled %}<span class="bad">STALLED: {{ w.stalled }}</span>
{% elif w.stale %}<span class="{{ 'warn' if not w.pid else 'bad' }}">{{ 'stopped' if not w.pid else 'STALE' }}:
{{ w.why }}</span>{% else %}<span class="ok">healthy</span>{% endif %}
{% if w.beat_age_s is not none %}· beat {{ w.beat_age_s }} s ago{% endif %}{% if w.pid %} · pid {{ w.pid }}{% endif %}
{% if w.host %} · host {{ w.host }}{% endif %}</div>
<h2>Running</h2>
{% if parts %}<table><tr><th>part</th><th>stage</th><th>progress</th><th>ETA</th><th>GPUs</th><th>health</th></tr>
{% for p in parts %}<tr class="running-part"><td>{{ part_link(p.part) }}</td>
<td>{% if p.stage %}{{ p.stage.index }} {{ p.stage.type }}{% else %}-{% endif %}</td>
<td>{% if p.progress and p.progress.total %}<progress value="{{ p.progress.done }}" max="{{ p.progress.total }}">
</progress> {{ "%g" | format(p.progress.done) }}/{{ "%g" | format(p.progress.total) }} {{ p.progress.unit }}
{% elif p.progress %}{{ p.progress.done }} {{ p.progress.unit }}{% else %}-{% endif %}</td>
<td>{% if p.eta_s is not none %}{{ "%.0f" | format(p.eta_s) }} s{% else %}-{% endif %}</td>
<td>{{ p.gpus | join(", ") or "-" }}</td>
<td>{% if p.stalled %}<span class="bad">STALLED: {{ p.stalled }}</span>{% else %}ok{% endif %}</td></tr>
{% endfor %}</table>{% else %}<p class="muted">nothing running</p>{% endif %}
<h2>Stations</h2><table><tr>{% for st in stations %}<th>{{ st }}</th>{% endfor %}</tr>
<tr>{% for n in stations.values() %}<td class="num station-count">{{ n }}</td>{% endfor %}</tr></table>
"""

FEED = """<table id="feed" data-stream="/events/stream"><thead><tr><th>seq</th><th>time</th><th>kind</th>
<th>part</th><th>details</th></tr></thead><tbody></tbody></table>
"""

OVERVIEW = """{% extends "base" %}{% from "macros" import part_link %}{% block body %}
<h1>{{ s.node.name }} <span class="muted">({{ s.node.roles | join(", ") }})</span></h1>
<p class="muted">root {{ s.root }}</p>
<div id="running" data-src="/fragments/running">{{ running }}</div>
{% for st, names in parts.items() if names %}<p><b>{{ st }}:</b> {% for n in names %}{{ part_link(n) }}{{ ", " if not loop.last }}{% endfor %}
{% if more[st] %}<span class="muted">and {{ more[st] }} more</span>{% endif %}</p>{% endfor %}
{% if s.waiting %}<h2>Waiting</h2><table><tr><th>part</th><th>retry</th><th>why</th><th>next try at</th></tr>
{% for wt in s.waiting %}<tr><td>{{ part_link(wt.part) }}</td><td>{{ wt.retry }}</td>
<td>{{ "backing off after a failure" if wt.why == "backoff" else "waiting for disk room on " ~ wt.path }}</td>
<td>{{ wt.next_try_at or "-" }}</td></tr>{% endfor %}</table>{% endif %}
{% if s.ignored %}<p class="warn">ignored in intake/ (not alloys, never read): {{ s.ignored | join(", ") }}</p>{% endif %}
<h2>Disk</h2><table><tr><th>tier</th><th>path</th><th>fs</th><th>free GiB</th><th>total GiB</th><th>min free</th></tr>
{% for t in s.tiers %}<tr><td>{{ t.name }}</td><td>{{ t.path }}</td>
{% if t.missing %}<td colspan="4" class="bad">MISSING: {{ t.problem }}</td>{% else %}<td>{{ t.fs_type }}</td>
<td class="num {{ 'bad' if t.low }}">{{ t.free_gib }}</td><td class="num">{{ t.total_gib }}</td>
<td class="num">{{ t.min_free_gb }}</td>{% endif %}</tr>{% endfor %}</table>
<h2>Recent outcomes</h2>{% if s.recent %}<table><tr><th>when</th><th>part</th><th>outcome</th><th>retry</th></tr>
{% for o in s.recent | reverse %}<tr><td>{{ o.ts or "-" }}</td><td>{{ part_link(o.part if o.part is string else none) }}</td>
<td>{{ o.outcome or "-" }}</td><td>{{ o.retry or 0 }}</td></tr>{% endfor %}</table>
{% else %}<p class="muted">none yet</p>{% endif %}
<h2>Events</h2>{{ feed }}
{% endblock %}"""

EVENTS = """{% extends "base" %}{% block body %}<h1>Events</h1>
<p class="muted">events.jsonl as it grows (newest first)</p>{{ feed }}{% endblock %}"""

PART = """{% extends "base" %}{% from "macros" import part_link, token_field %}{% block body %}
<h1>{{ s.part }}</h1>
<p>station <b>{{ s.station }}</b> · file {{ s.file }} · retry {{ s.retry }}</p>
{% if not report and actions %}<div class="box">{% for a in actions %}
<form class="inline" method="post" action="/parts/{{ s.part | urlencode }}/{{ a }}">{{ token_field(need_token) }}
<button type="submit" name="action" value="{{ a }}">{{ a }}</button></form>{% endfor %}</div>{% endif %}
{% set t = s.ticket %}{% if t %}<h2>Ticket</h2><table>
<tr><th>enqueued</th><td>{{ t.enqueued_at or "-" }} by {{ t.origin or "-" }}</td></tr>
<tr><th>priority</th><td>{{ t.priority or 0 }}</td></tr>
{% if t.not_before %}<tr><th>next try at</th><td>{{ t.not_before }}</td></tr>{% endif %}
{% if t.need is mapping and t.need.basis %}<tr><th>need</th><td>{{ t.need.basis }}</td></tr>{% endif %}</table>{% endif %}
{% set run = s.running %}{% if run %}<h2>Running</h2><p>stage {{ run.stage.index if run.stage is mapping }}
{{ run.stage.type if run.stage is mapping }}{% if run.progress is mapping %} · {{ run.progress.done }}/{{ run.progress.total }}
{{ run.progress.unit }}{% endif %}{% if run.pid %} · pid {{ run.pid }}{% endif %}</p>{% endif %}
{% if s.stages %}<h2>Stages</h2><table><tr><th>#</th><th>type</th><th>took</th><th>peak RSS</th><th>peak VRAM</th></tr>
{% for st in s.stages %}<tr><td>{{ st.index }}</td><td>{{ st.type }}</td>
<td>{% if st.handed_off %}handed off to the ship role{% elif st.elapsed_s is not none %}{{ "%.2f" | format(st.elapsed_s) }} s{% else %}-{% endif %}</td>
<td class="num">{{ "%.0f MB" | format(st.peak_rss_mb) if st.peak_rss_mb is not none else "-" }}</td>
<td class="num">{{ "%.0f MB" | format(st.peak_vram_mb) if st.peak_vram_mb is not none else "-" }}</td></tr>{% endfor %}</table>
{{ plots.timeline }}{{ plots.memory }}{% endif %}
{% if s.measured %}<h2>Measured: source vs forged</h2><table><tr><th>what</th><th>source</th><th>forged</th><th>ratio</th><th>direction</th></tr>
{% for m in s.measured %}<tr><td>{{ m.what }}</td><td class="num">{{ fmt(m.source) }}</td><td class="num">{{ fmt(m.forged) }}</td>
<td class="num">{{ "%.2fx" | format(m.ratio) if m.ratio is not none else "-" }}</td><td>{{ m.better }}</td></tr>{% endfor %}</table>
{{ plots.compare }}{% endif %}
{% if s.acceptance %}<h2>Acceptance: {% if s.acceptance.passed %}<span class="ok">passed</span>{% else %}<span class="bad">FAILED</span>{% endif %}</h2>
{% if checks %}<table><tr><th>check</th><th>required</th><th>got</th><th>verdict</th></tr>{% for c in checks %}
<tr><td>{{ c.check }}</td><td>{{ fmt(c.required) }}</td><td>{{ fmt(c.actual) }}</td>
<td>{% if c.passed %}<span class="ok">ok</span>{% else %}<span class="bad">FAILED</span>{% endif %}</td></tr>{% endfor %}</table>{% endif %}{% endif %}
{% set e = s.error %}{% if e %}<h2 class="bad">{{ "Failed" if s.station == "rework" else "Last failure" }}</h2>
<div class="box"><p>{{ e.class }} in {% if e.stage.type %}stage {{ e.stage.index }} {{ e.stage.type }}{% else %}the line{% endif %}
at {{ e.failed_at or "-" }}{% if e.retries is not none %} · retries {{ e.retries }}{% endif %}</p>
<pre class="error-message">{{ e.message }}</pre>{% if e.next_try_at %}<p>next try at {{ e.next_try_at }}</p>{% endif %}
{% for p in problems %}<p>{{ p.path }}: {{ p.message }}<br><b>fix:</b> {{ p.fix }}</p>{% endfor %}</div>{% endif %}
{% for h in handed %}<p>handed off: stage {{ h.index }} {{ h.type }} to the {{ h.role }} role</p>{% endfor %}
{% set m = s.model %}{% if m and m.dir %}<h2>Model</h2><p>{{ m.dir }}</p>{% if m.modelHash %}<p>modelHash {{ m.modelHash }}</p>{% endif %}
<table><tr><th>file</th><th>bytes</th></tr>{% for f in m.files %}<tr><td>{{ f.file }}</td><td class="num">{{ f.bytes }}</td></tr>{% endfor %}</table>{% endif %}
{% if s.work_dir %}<p class="muted">work dir {{ s.work_dir }}</p>{% endif %}
{% if report %}<p class="muted">factory report, {{ generated }}</p>{% endif %}
{% endblock %}"""

STUDY = """{% extends "base" %}{% from "macros" import part_link %}{% block body %}<h1>Calibration studies</h1>
<p class="muted">Finished parts that pruned experts of the same source model, by keep ratio (experts kept /
experts the source had) and ranking metric; held-out perplexity, lower is better.</p>
{% for st in studies %}<h2>{{ st.source_model }}</h2>{{ charts[loop.index0] }}
<table><tr><th>part</th><th>method</th><th>kept</th><th>keep ratio</th><th>perplexity (forged; source)</th></tr>
{% for r in st.runs %}<tr><td>{{ part_link(r.part) }}</td><td>{{ r.method }}</td><td>{{ r.kept }}/{{ r.experts }}</td>
<td class="num">{{ "%.3f" | format(r.keep_ratio) }}</td>
<td>{% for c, v in r.forged.items() %}{{ c }} {{ fmt(v) }} ({{ fmt(r.source.get(c)) }}){{ "; " if not loop.last }}{% endfor %}</td></tr>
{% endfor %}</table>{% else %}<p class="muted">no finished part has pruned experts yet</p>{% endfor %}{% endblock %}"""

ENQUEUE = """{% extends "base" %}{% from "macros" import part_link, token_field %}{% block body %}<h1>Enqueue an alloy</h1>
{% if enqueued %}<p class="ok" id="enqueued">enqueued {{ part_link(enqueued) }}</p>{% endif %}
{% if problem %}<p class="bad" id="problem">{{ problem }}</p>{% endif %}
{% if findings %}<div class="box" id="findings"><h2 class="bad">Not enqueued: {{ findings | length }} finding{{ "s" if findings | length != 1 }}</h2>
<table><tr><th>level</th><th>where</th><th>what</th><th>fix</th></tr>{% for f in findings %}
<tr class="finding"><td>{{ f.level }}</td><td>{{ f.path }}</td><td>{{ f.message }}</td><td>{{ f.fix }}</td></tr>{% endfor %}</table></div>{% endif %}
{% if plan %}<h2>Plan</h2><pre id="plan">{{ plan }}</pre>{% endif %}
<form method="post" action="/enqueue" enctype="multipart/form-data">
<p><label>part name <input name="name" value="{{ part_name or '' }}" size="50"></label>
<span class="muted">(default: the uploaded file's name)</span></p>
<p><label>alloy JSON<br><textarea name="alloy" rows="18">{{ alloy or '' }}</textarea></label></p>
<p><label>or a file <input type="file" name="file" accept=".json"></label></p>
<p>{{ token_field(need_token) }} <button type="submit" id="submit">validate, plan and enqueue</button></p>
</form>{% endblock %}"""

PROBLEM = """{% extends "base" %}{% block body %}<h1 class="bad">{{ title }}</h1><p id="problem">{{ message }}</p>
{% if back %}<p><a href="{{ back }}">back</a></p>{% endif %}{% endblock %}"""

TEMPLATES = {"base": BASE, "macros": MACROS, "running": RUNNING, "overview": OVERVIEW, "events": EVENTS,
             "part": PART, "study": STUDY, "enqueue": ENQUEUE, "problem": PROBLEM}
