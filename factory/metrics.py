"""Prometheus metrics of one factory root, read from its files at each scrape.

`LineCollector` is a prometheus_client custom collector: stations, heartbeat
and disk are measured afresh on every scrape (they are small), while
events.jsonl and throughput.jsonl, which grow without bound (events rotate at
64 MiB), are followed: the first scrape reads what is there, rotations oldest
first, and later scrapes only the bytes appended since. Counters and
histograms built from them therefore count from what the log held when the
collector started, and survive rotation.

Everything read is untrusted (other programs write into a root): a line that
is not an event is skipped, numbers are checked, and label values come only
from small known sets, with anything else counted under "other", so a
hostile file can neither crash a scrape nor blow up the series count.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from factory import __version__, durable
from factory.catalog import CATALOG
from factory.events import MAX_READ_LINE_BYTES, parse_event
from factory.heartbeat import State
from factory.line import Line
from factory.nodeconfig import NodeConfig, load_node_config
from factory.outcomes import FailureClass
from factory.protocol import LINE_STAGES, OUTCOMES, PROTOCOL_VERSION, STATIONS, Layout
from factory.status import worker
from factory.tiers import GiB, node_tiers

log = logging.getLogger(__name__)

# The label for a value outside its known set, and for a stage that is absent.
OTHER = "other"
NO_STAGE = "none"
# Stage types a failure names: the catalog's, and the line's own (the
# gate, a part that could not start, the acceptance verdict).
STAGE_LABELS = frozenset(CATALOG) | frozenset(LINE_STAGES)
FAILURE_CLASSES = frozenset(get_args(FailureClass))

# The event kinds counted here. A line is parsed only when it names one of
# them, or has a backslash (a JSON escape could spell a kind differently):
# most of a log is progress events, and skipping them unparsed makes the
# first scrape of a full history (6 x 64 MiB) about four times faster.
STAGE_COMPLETED, STAGE_FAILED, PART_RETRIED = "stage/completed", "stage/failed", "part/retried"
_NEEDLES = (b"\\", *(k.encode() for k in (STAGE_COMPLETED, STAGE_FAILED, PART_RETRIED)))

# Histogram buckets. Stages take from a hundredth of a second (selftest) to
# a day (a long LoRA on CPU); memory from 64 MiB to 1 TiB (RSS) and 256 MiB
# to 256 GiB (one node's VRAM), in powers of two.
DURATION_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
RSS_BUCKETS = tuple(float(2**n) for n in range(26, 41))
VRAM_BUCKETS = tuple(float(2**n) for n in range(28, 39))
MiB = 2**20

# Logs are read in chunks this big: memory per scrape is a chunk, not a file.
_CHUNK = 1 << 20
# A followed file must still hold the bytes it had just before the offset
# read so far; this many are compared on every scrape (one small pread).
_SEAL_BYTES = 64


def _label(value: Any, known: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in known else OTHER


def _stage_label(stage: Any) -> str:
    """The stage_type label of an event's `stage` ({"index", "type"} or null)."""
    if not isinstance(stage, dict) or stage.get("type") is None:
        return NO_STAGE
    return _label(stage["type"], STAGE_LABELS)


def _amount(value: Any) -> float | None:
    """A finite, non-negative number from an event, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


# -- following a log ------------------------------------------------------------


@dataclass
class _Spot:
    """How far one file (by device and inode) has been read."""

    offset: int = 0  # the start of the first line not yet read
    skipping: bool = False  # inside a line too long to be an event: drop it up to its newline
    seal: bytes = b""  # the last bytes before `offset` (see _sealed)


class LogFollower:
    """The complete lines appended to a log (and its rotations) since the last call.

    Each file is known by its device and inode, with the offset read so far,
    so a rotation (events.jsonl renamed to .1, .1 to .2 ...) costs nothing:
    the renamed file keeps its offset and the new one starts at 0. A file
    that shrank, or whose bytes before that offset changed, was truncated or
    rewritten in place and is read again from its start.
    A line counts once its newline is written; an unfinished one is read
    again next time. A missing file has no lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._spots: dict[tuple[int, int], _Spot] = {}

    def new_lines(self, *, keep: int = 0) -> Iterator[bytes]:
        """New lines, oldest first: `path`.keep .. `path`.1, then `path`."""
        # Open the live file first, then walk the rotations oldest first and
        # stop at that same file should it be among them. RACE: a rotation
        # between opening and walking renames it to .1; reading it there and
        # then the newer live file would put newer lines before older ones.
        # Files newer than the one held are read on the next call.
        live = _open(self.path)
        held = _identity(live) if live else None
        seen = set()
        try:
            for n in range(keep, 0, -1):
                f = _open(self.path.with_name(f"{self.path.name}.{n}"))
                if f is None:
                    continue
                with f:
                    ident = _identity(f)
                    if ident == held:
                        break
                    seen.add(ident)
                    yield from self._read(f, ident)
            if live is not None:
                seen.add(held)
                yield from self._read(live, held)
        finally:
            if live is not None:
                live.close()
        # Forget files that are gone, so a new file given a freed inode
        # number starts at 0. RACE: one that gets it between two calls and
        # grows past the old file's offset has its first bytes skipped;
        # that takes a whole rotated file's worth of appends in one interval.
        self._spots = {k: v for k, v in self._spots.items() if k in seen}

    def _read(self, f, ident: tuple[int, int]) -> Iterator[bytes]:
        spot = self._spots.get(ident)
        if spot is None or not _sealed(f, spot):
            spot = self._spots[ident] = _Spot()
        f.seek(spot.offset)
        pending = b""  # the unfinished line at spot.offset
        while chunk := f.read(_CHUNK):
            data, pos = pending + chunk, 0
            if spot.skipping:
                nl = data.find(b"\n")
                pos, spot.skipping = (nl + 1, False) if nl >= 0 else (len(data), True)
            end = data.rfind(b"\n", pos) + 1
            lines = data[pos:end - 1].split(b"\n") if end else []
            done = end or pos  # bytes of data read for good
            pending = data[done:]
            if len(pending) > MAX_READ_LINE_BYTES:  # not an event; never held in memory
                done, pending, spot.skipping = len(data), b"", True
            spot.offset += done
            spot.seal = (spot.seal + data[:done])[-_SEAL_BYTES:]
            yield from lines


def _sealed(f, spot: _Spot) -> bool:
    """Is the file still the one `spot` was read from, neither cut nor rewritten?"""
    if os.fstat(f.fileno()).st_size < spot.offset:
        return False
    return os.pread(f.fileno(), len(spot.seal), spot.offset - len(spot.seal)) == spot.seal


def _open(path: Path):
    """A reader on `path` when it is a regular file (never followed), else None."""
    try:
        return durable.open_regular(path)
    except OSError:
        return None


def _identity(f) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino


# -- what the logs add up to ------------------------------------------------------


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)  # per bucket, the last for +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # `le` is inclusive
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, ending with +Inf, as exposition wants."""
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


@dataclass
class _StageHistograms:
    """One histogram per stage_type label (a bounded set, see STAGE_LABELS)."""

    bounds: tuple[float, ...]
    by_stage: dict[str, _Histogram] = field(default_factory=dict)

    def observe(self, stage: str, value: float | None) -> None:
        if value is not None:
            self.by_stage.setdefault(stage, _Histogram(self.bounds)).observe(value)

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=["stage_type"])
        for stage, h in sorted(self.by_stage.items()):
            fam.add_metric([stage], h.buckets(), sum_value=h.total)
        return fam


@dataclass
class _EventTotals:
    """Counters and histograms from events.jsonl since the collector started."""

    last_seq: int = 0
    retries: int = 0
    failures: Counter = field(default_factory=Counter)  # (failure_class, stage_type) -> count
    durations: _StageHistograms = field(default_factory=lambda: _StageHistograms(DURATION_BUCKETS))
    rss: _StageHistograms = field(default_factory=lambda: _StageHistograms(RSS_BUCKETS))
    vram: _StageHistograms = field(default_factory=lambda: _StageHistograms(VRAM_BUCKETS))

    def add(self, raw: bytes) -> None:
        if not any(n in raw for n in _NEEDLES):
            return
        ev = parse_event(raw)
        # seq only grows (section 7): one not past the last counted is a
        # line read before, in a file that was copied back or rewritten.
        if ev is None or ev["seq"] <= self.last_seq:
            return
        kind = ev.get("kind")
        if kind not in (STAGE_COMPLETED, STAGE_FAILED, PART_RETRIED):
            return
        self.last_seq = ev["seq"]
        if kind == PART_RETRIED:
            self.retries += 1
        elif kind == STAGE_FAILED:
            self.failures[(_label(ev.get("failure_class"), FAILURE_CLASSES), _stage_label(ev.get("stage")))] += 1
        else:
            stage = _stage_label(ev.get("stage"))
            self.durations.observe(stage, _amount(ev.get("elapsed_s")))
            for hist, key in ((self.rss, "peak_rss_mb"), (self.vram, "peak_vram_mb")):
                mb = _amount(ev.get(key))
                hist.observe(stage, None if mb is None else mb * MiB)


def _outcome(raw: bytes) -> str | None:
    """The outcome label of one throughput.jsonl line, or None for a line
    that is not an outcome record."""
    if len(raw) > MAX_READ_LINE_BYTES:
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return _label(obj.get("outcome"), frozenset(OUTCOMES)) if isinstance(obj, dict) else None


# -- the collector ------------------------------------------------------------------


class LineCollector(Collector):
    """Metrics of the root at `root`; see the module docstring and
    docs/OPERATOR.md "Metrics" for each metric."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(Path(root).absolute())
        self._events = LogFollower(self.layout.events)
        self._throughput = LogFollower(self.layout.throughput)
        self._totals = _EventTotals()
        self._outcomes: Counter = Counter()
        # Scrapes may come at once (the server answers in a thread pool);
        # the followers' offsets must move for one of them at a time.
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            config = _config(self.layout)
            out: list[Metric] = []
            ok = {"config": config is not None}
            cfg = config or NodeConfig()  # the logs and stations are still readable
            sources: dict[str, Callable[[], list[Metric]]] = {
                "stations": lambda: self._stations(cfg),
                "heartbeat": self._worker,
                "events": lambda: self._event_metrics(cfg.daemon.events_keep),
                "throughput": self._outcome_metrics,
            }
            if config is not None:
                sources["tiers"] = lambda: self._tiers(config)
            for name, source in sources.items():
                try:
                    out += source()
                    ok[name] = True
                except Exception as err:  # a scrape reports what it can; the log says what failed
                    log.warning("metrics: reading the %s of %s failed: %s", name, self.layout.root, err)
                    ok[name] = False
            out += [_info(), _success(ok)]
            return out

    def _stations(self, config: NodeConfig) -> list[Metric]:
        line = Line(self.layout.root, config)
        fam = GaugeMetricFamily("factory_parts", "Alloy files in each station of the line.", labels=["station"])
        for station in STATIONS:
            fam.add_metric([station], len(line.parts(station)))
        return [fam]

    def _worker(self) -> list[Metric]:
        w = worker(self.layout.heartbeat)
        up = not w["stale"]
        out = [
            GaugeMetricFamily("factory_worker_up", "1 when the worker's heartbeat is fresh (protocol section 6).",
                              value=int(up)),
            GaugeMetricFamily("factory_worker_stalled", "1 when the worker is alive but a running part makes "
                              "no progress (e.g. its process was SIGSTOPped).", value=int(up and bool(w["stalled"]))),
            GaugeMetricFamily("factory_running_parts", "Parts the live worker is building (0 when it is down).",
                              value=len(w["parts"]) if up else 0),
        ]
        state = GaugeMetricFamily("factory_worker_state", "1 for the worker's state (offline when it is down).",
                                  labels=["state"])
        for s in get_args(State):
            state.add_metric([s], int(w["state"] == s))
        out.append(state)
        if w["beat_age_s"] is not None:
            out.append(GaugeMetricFamily("factory_heartbeat_age_seconds", "Seconds since the worker's last beat.",
                                         value=w["beat_age_s"]))
        return out

    def _event_metrics(self, keep: int) -> list[Metric]:
        t = self._totals
        for raw in self._events.new_lines(keep=keep):
            t.add(raw)
        failures = CounterMetricFamily("factory_stage_failures", "stage/failed events, by failure class and "
                                       "stage type.", labels=["failure_class", "stage_type"])
        for (cls, stage), n in sorted(t.failures.items()):
            failures.add_metric([cls, stage], n)
        return [
            CounterMetricFamily("factory_part_retries", "part/retried events (infrastructure retries and "
                                "foreman retries).", value=t.retries),
            failures,
            t.durations.family("factory_stage_duration_seconds", "Wall time of completed stages (elapsed_s)."),
            t.rss.family("factory_stage_peak_rss_bytes", "Peak RSS of a completed stage's part process and its "
                         "children."),
            t.vram.family("factory_stage_peak_vram_bytes", "Peak VRAM of a completed stage that used a GPU."),
        ]

    def _outcome_metrics(self) -> list[Metric]:
        for raw in self._throughput.new_lines():
            outcome = _outcome(raw)
            if outcome is not None:
                self._outcomes[outcome] += 1
        fam = CounterMetricFamily("factory_part_outcomes", "Terminal outcomes recorded in throughput.jsonl.",
                                  labels=["outcome"])
        for outcome in (*OUTCOMES, OTHER):
            if outcome != OTHER or self._outcomes[OTHER]:
                fam.add_metric([outcome], self._outcomes[outcome])
        return [fam]

    def _tiers(self, config: NodeConfig) -> list[Metric]:
        labels = ["tier"]
        free = GaugeMetricFamily("factory_disk_free_bytes", "Free bytes on a storage tier.", labels=labels)
        total = GaugeMetricFamily("factory_disk_total_bytes", "Size of a storage tier's filesystem.", labels=labels)
        floor = GaugeMetricFamily("factory_disk_min_free_bytes", "The tier's configured min_free_gb, in bytes.",
                                  labels=labels)
        missing = GaugeMetricFamily("factory_disk_tier_missing", "1 when a tier's path is missing or not a "
                                    "directory (its free and total bytes are then absent).", labels=labels)
        for tier in node_tiers(self.layout.root, config):
            missing.add_metric([tier.name], int(tier.missing))
            floor.add_metric([tier.name], tier.min_free_gb * GiB)
            if not tier.missing:
                free.add_metric([tier.name], tier.free_bytes)
                total.add_metric([tier.name], tier.total_bytes)
        return [free, total, floor, missing]


def _config(layout: Layout) -> NodeConfig | None:
    try:
        return load_node_config(layout.node_config)
    except Exception as err:  # NodeConfigError, or a config file that vanished mid-read
        log.warning("metrics: %s", err)
        return None


def _info() -> Metric:
    fam = GaugeMetricFamily("factory_info", "Always 1: the forge-factory version and protocol this server reads "
                            "the root with.", labels=["version", "protocol"])
    fam.add_metric([__version__, str(PROTOCOL_VERSION)], 1)
    return fam


def _success(ok: dict[str, bool]) -> Metric:
    fam = GaugeMetricFamily("factory_scrape_collector_success", "1 when this scrape could read that part of the "
                            "root (the server's log says why not).", labels=["collector"])
    for name, good in ok.items():
        fam.add_metric([name], int(good))
    return fam


def line_registry(root: Path) -> CollectorRegistry:
    """A registry of its own (never the global default) holding the root's collector."""
    registry = CollectorRegistry()
    registry.register(LineCollector(root))
    return registry
