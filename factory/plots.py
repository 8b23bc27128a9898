"""Small charts as inline SVG, drawn on the server for the dashboard and `factory report`.

No plotting library: the charts are a few rectangles, lines and labels, and
SVG text needs no JavaScript, no fonts and no network, so a report file shows
them anywhere. Every label may come from a line's untrusted files: it is
escaped here, and callers pass plain strings and numbers only. The <svg>
carries no xmlns: inside HTML the parser gives it the SVG namespace, and a
report then names no URL at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# Layout in SVG user units (pixels at 100%): a label column, then the bars.
WIDTH = 640
ROW = 22  # one bar's height plus its gap
LABEL_W = 190
VALUE_W = 90
PAD = 8
SOURCE_COLOUR, FORGED_COLOUR, RSS_COLOUR, VRAM_COLOUR = "#8a8f98", "#2f6fdf", "#d9822b", "#7b4bc4"
SERIES_COLOURS = ("#2f6fdf", "#d9822b", "#2a9d5b", "#c0392b", "#7b4bc4", "#8a6d3b")
LABEL_CHARS = 32  # longer labels are cut (the table beside the chart has them whole)


@dataclass(frozen=True)
class Compared:
    """One measured quantity, source against forged."""

    label: str
    source: float | None
    forged: float | None
    better: str  # "lower is better" | "higher is better"


@dataclass(frozen=True)
class Series:
    """One line of a line chart: (x, y) points, drawn in x order."""

    label: str
    points: Sequence[tuple[float, float]]
    dashed: bool = False


def _num(value: float) -> str:
    return f"{value:.4g}"


def _label(text: str) -> str:
    text = text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"
    return escape(text)


def _svg(height: int, body: list[str], title: str) -> str:
    return (f'<svg class="plot" role="img" viewBox="0 0 {WIDTH} {height}" '
            f'width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">'
            f"<title>{escape(title)}</title>{''.join(body)}</svg>")


def _text(x: float, y: float, text: str, *, anchor: str = "start", colour: str = "#222") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{colour}">{text}</text>'


def _bar(x: float, y: float, w: float, h: float, colour: str, tip: str) -> str:
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0.5):.1f}" height="{h:.1f}" fill="{colour}">'
            f"<title>{escape(tip)}</title></rect>")


def _legend(y: float, entries: Sequence[tuple[str, str]]) -> list[str]:
    out, x = [], LABEL_W
    for name, colour in entries:
        out += [f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour}"/>', _text(x + 14, y, escape(name))]
        x += 24 + 7 * len(name)
    return out


def compare_bars(rows: Sequence[Compared], *, title: str = "source vs forged") -> str:
    """Source and forged side by side per quantity, each row on its own
    scale (perplexity and pass@1 share no unit), with its direction."""
    rows = [r for r in rows if r.source is not None or r.forged is not None]
    if not rows:
        return ""
    span = WIDTH - LABEL_W - VALUE_W - PAD
    body = _legend(14, [("source", SOURCE_COLOUR), ("forged", FORGED_COLOUR)])
    y = 26
    for r in rows:
        top = max(abs(v) for v in (r.source, r.forged) if v is not None) or 1.0
        body.append(_text(PAD, y + 13, _label(r.label)))
        body.append(_text(PAD, y + 2 * ROW - 4, escape(r.better), colour="#666"))
        for i, (side, value, colour) in enumerate((("source", r.source, SOURCE_COLOUR),
                                                   ("forged", r.forged, FORGED_COLOUR))):
            by = y + i * ROW
            if value is None:
                body.append(_text(LABEL_W, by + 14, "not measured", colour="#666"))
                continue
            w = span * abs(value) / top
            body.append(_bar(LABEL_W, by + 2, w, ROW - 6, colour, f"{r.label} {side}: {_num(value)}"))
            body.append(_text(LABEL_W + w + 4, by + 14, _num(value)))
        y += 2 * ROW + 8
    return _svg(y + PAD, body, title)


def timeline(stages: Sequence[tuple[str, float | None]], *, title: str = "stage timeline") -> str:
    """Stages one after another on a shared time axis: where the part's
    time went. `stages`: (label, seconds); a stage without a time is shown
    as not timed."""
    if not stages:
        return ""
    total = sum(s for _, s in stages if s) or 1.0
    span = WIDTH - LABEL_W - VALUE_W - PAD
    body, start, y = [], 0.0, 8
    for i, (label, seconds) in enumerate(stages):
        body.append(_text(PAD, y + 14, _label(label)))
        if seconds is None:
            body.append(_text(LABEL_W + span * start / total, y + 14, "not timed", colour="#666"))
        else:
            x, w = LABEL_W + span * start / total, span * seconds / total
            colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
            body.append(_bar(x, y + 2, w, ROW - 6, colour, f"{label}: {seconds:.2f} s"))
            body.append(_text(x + w + 4, y + 14, f"{seconds:.2f} s"))
            start += seconds
        y += ROW
    body.append(f'<line x1="{LABEL_W}" y1="{y + 2}" x2="{LABEL_W + span}" y2="{y + 2}" stroke="#999"/>')
    body.append(_text(LABEL_W, y + 16, "0 s", colour="#666"))
    body.append(_text(LABEL_W + span, y + 16, f"{total:.2f} s", anchor="end", colour="#666"))
    return _svg(y + 24, body, title)


def memory_bars(stages: Sequence[tuple[str, float | None, float | None]], *, title: str = "peak memory") -> str:
    """Peak RSS and VRAM (MB) per stage, on one scale. `stages`: (label,
    rss_mb, vram_mb); empty when no stage measured either."""
    if not any(r is not None or v is not None for _, r, v in stages):
        return ""
    top = max(v for _, *vals in stages for v in vals if v is not None) or 1.0
    span = WIDTH - LABEL_W - VALUE_W - PAD
    body = _legend(14, [("peak RSS", RSS_COLOUR), ("peak VRAM", VRAM_COLOUR)])
    y = 26
    for label, rss, vram in stages:
        body.append(_text(PAD, y + 14, _label(label)))
        for i, (what, value, colour) in enumerate((("RSS", rss, RSS_COLOUR), ("VRAM", vram, VRAM_COLOUR))):
            if value is None:
                continue
            w, by = span * value / top, y + i * (ROW // 2)
            body.append(_bar(LABEL_W, by + 2, w, ROW // 2 - 2, colour, f"{label} peak {what}: {value:.0f} MB"))
            body.append(_text(LABEL_W + w + 4, by + 10, f"{value:.0f} MB"))
        y += ROW + 6
    return _svg(y + PAD, body, title)


def line_chart(series: Sequence[Series], *, x_label: str, y_label: str, title: str) -> str:
    """Lines over a numeric x (e.g. keep ratio against perplexity), with
    axis ranges from the data and a legend; empty without points."""
    pts = [p for s in series for p in s.points if all(map(math.isfinite, p))]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x0 == x1 else (x0, x1)
    y0, y1 = (y0 * 0.9, y1 * 1.1 or 1.0) if y0 == y1 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    left, right, top, bottom = 70, WIDTH - 180, 16, 220

    def sx(x: float) -> float:
        return left + (right - left) * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return bottom - (bottom - top) * (y - y0) / (y1 - y0)

    body = [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#999"/>',
            _text((left + right) / 2, bottom + 34, escape(x_label), anchor="middle"),
            f'<text x="14" y="{(top + bottom) / 2:.1f}" transform="rotate(-90 14 {(top + bottom) / 2:.1f})" '
            f'text-anchor="middle" fill="#222">{escape(y_label)}</text>']
    for v in sorted({x0, x1, *(p[0] for p in pts)}):
        body.append(_text(sx(v), bottom + 16, _num(v), anchor="middle", colour="#666"))
    for v in (y0, (y0 + y1) / 2, y1):
        body.append(_text(left - 6, sy(v) + 4, _num(v), anchor="end", colour="#666"))
    for i, s in enumerate(series):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        points = sorted(p for p in s.points if all(map(math.isfinite, p)))
        if not points:
            continue
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        body += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{colour}">'
                 f"<title>{escape(s.label)}: {_num(x)} → {_num(y)}</title></circle>" for x, y in points]
        ly = top + 4 + 18 * i
        body += [f'<line x1="{right + 12}" y1="{ly}" x2="{right + 32}" y2="{ly}" stroke="{colour}" '
                 f'stroke-width="2"{dash}/>', _text(right + 36, ly + 4, _label(s.label))]
    return _svg(bottom + 44, body, title)
