"""The on-disk protocol: every path and file name of a line, in one place.

Other programs read a root's directories without importing this package, so
everything here is specified in docs/FACTORY-PROTOCOL.md and the two must
change together (bump PROTOCOL_VERSION for incompatible changes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PROTOCOL_VERSION = 1

STATIONS = ("intake", "assembly", "finished", "rework", "deferred")
TERMINAL_STATIONS = ("finished", "rework")
# Scan order for "is this name anywhere on the line": the forward direction of
# the state machine, so a part moving forward during a scan is still seen.
# What throughput.jsonl records a part ending as (section 8).
OUTCOME_FINISHED, OUTCOME_REWORK, OUTCOME_REJECTED, OUTCOME_CANCELLED = "finished", "rework", "rejected", "cancelled"
OUTCOMES = (OUTCOME_FINISHED, OUTCOME_REWORK, OUTCOME_REJECTED, OUTCOME_CANCELLED)
# error.json's stage.type for a failure outside any stage (section 10): the
# intake gate, a part that could not start, the acceptance verdict.
STAGE_INTAKE, STAGE_START, STAGE_ACCEPTANCE = "intake", "start", "acceptance"
LINE_STAGES = (STAGE_INTAKE, STAGE_START, STAGE_ACCEPTANCE)
SCAN_ORDER = ("incoming", "intake", "deferred", "assembly", "finished", "rework")

ALLOY_SUFFIX = ".alloy.json"
# The most an alloy file may hold: real ones are under 300 KB, and a parsed
# alloy costs about 30x its bytes in memory. Bigger files are refused unread.
MAX_ALLOY_BYTES = 4 * 2**20

# Sidecar tags the factory itself writes. Other tools may add their own
# `<base>.x-<word>.json`; every `<base>.<tag>.json` moves with the part.
TICKET = "ticket"  # enqueue time, priority, origin
RESULT = "result"  # finished sidecar
ERROR = "error"  # failure record (rework, or last failure before a retry)
CANCEL = "cancel"  # a foreman's request to cancel a running part

# Files in work/<base>/ the line itself writes.
CLAIMED_ALLOY = "claimed.alloy.json"  # the alloy's bytes as gated and hashed at claim: what the part runs
FAILURE_TEXT = "failure.txt"  # a failure's whole message and traceback when error.json's is cut short
CHILD_LOG = "child.log"  # the part process's stdout and stderr
CHECKPOINT = "checkpoint.json"

# A base is a file-name-safe word that may contain dots (published alloys do:
# "qwen3.5-4b-code-forged"). It never ends in ".retry<N>", which is reserved.
MAX_BASE_CHARS = 200
_BASE = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_BASE_CHARS - 1}}}?"
_PART_RE = re.compile(rf"^(?P<base>{_BASE})(?:\.retry(?P<retry>[1-9][0-9]*))?\.alloy\.json$")
_SIDECAR_RE = re.compile(r"^(?P<base>[A-Za-z0-9][A-Za-z0-9._-]*)\.(?P<tag>[a-z][a-z0-9_-]*)\.json$")
_RETRY_TAIL = re.compile(r"\.retry[0-9]+$")


@dataclass(frozen=True, order=True)
class PartName:
    """A part's identity (`base`) and how many retries it has spent."""

    base: str
    retry: int = 0

    @property
    def filename(self) -> str:
        tail = f".retry{self.retry}" if self.retry else ""
        return f"{self.base}{tail}{ALLOY_SUFFIX}"

    def sidecar(self, tag: str) -> str:
        return f"{self.base}.{tag}.json"

    def with_retry(self, retry: int) -> "PartName":
        return PartName(self.base, retry)


def parse_part(filename: str) -> PartName | None:
    """The part a file name denotes, or None if it is not an alloy file.
    fullmatch, not match: `$` would accept a trailing newline."""
    m = _PART_RE.fullmatch(filename)
    if not m or _RETRY_TAIL.search(m["base"]):
        return None
    return PartName(m["base"], int(m["retry"] or 0))


def parse_sidecar(filename: str) -> tuple[str, str] | None:
    """(base, tag) of a sidecar file name, or None. Alloy files are not sidecars."""
    if filename.endswith(ALLOY_SUFFIX):
        return None
    m = _SIDECAR_RE.fullmatch(filename)
    return (m["base"], m["tag"]) if m else None


def base_of(filename: str) -> str | None:
    """The part base any bundle member belongs to."""
    part = parse_part(filename)
    if part:
        return part.base
    side = parse_sidecar(filename)
    return side[0] if side else None


def check_base(base: str) -> str | None:
    """Why `base` is not a valid part name, or None when it is."""
    if not re.fullmatch(_BASE, base):
        return ("must start with a letter or digit and use only letters, digits, '.', '_' and '-' "
                "(at most 200 characters)")
    if _RETRY_TAIL.search(base):
        return "must not end in '.retry<N>' (reserved for retry names)"
    return None


def base_from_filename(filename: str) -> str:
    """The base an enqueued file gets: its name without `.alloy.json` / `.json`."""
    part = parse_part(filename)
    if part:
        return part.base
    return filename[: -len(".json")] if filename.endswith(".json") else filename


CORPUS_SUFFIX = ".jsonl"
GGUF_SUFFIX = ".gguf"
# What sources/gguf-<sha256>/ records about the GGUF it was dequantized from.
GGUF_SOURCE_RECORD = "gguf_source.json"
_CORPUS_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Layout:
    """Where everything of one root lives."""

    root: Path

    @property
    def line(self) -> Path:
        return self.root / "line"

    def station(self, name: str) -> Path:
        if name == "incoming":
            return self.incoming
        if name not in STATIONS:
            raise ValueError(f"unknown station {name!r}; stations are {', '.join(STATIONS)}")
        return self.line / name

    @property
    def intake(self) -> Path:
        return self.line / "intake"

    @property
    def assembly(self) -> Path:
        return self.line / "assembly"

    @property
    def finished(self) -> Path:
        return self.line / "finished"

    @property
    def rework(self) -> Path:
        return self.line / "rework"

    @property
    def deferred(self) -> Path:
        return self.line / "deferred"

    @property
    def incoming(self) -> Path:
        """Staging dir for atomic enqueue: files are written here, then renamed."""
        return self.line / ".incoming"

    @property
    def heartbeat(self) -> Path:
        return self.line / ".heartbeat.json"

    @property
    def worker_lock(self) -> Path:
        return self.line / ".worker.lock"

    @property
    def line_lock(self) -> Path:
        """Serialises moves and enqueues between processes (held for milliseconds)."""
        return self.line / ".line.lock"

    @property
    def events(self) -> Path:
        return self.line / "events.jsonl"

    @property
    def event_seq(self) -> Path:
        """The last event seq handed out (events.py's counter: seq never goes
        back, even when events.jsonl is removed)."""
        return self.line / ".events.seq"

    @property
    def throughput(self) -> Path:
        return self.line / "throughput.jsonl"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def work_dir(self, base: str) -> Path:
        return self.work / base

    def report_file(self, base: str, retry: int) -> Path:
        """A cluster try's report lines (factory.ray_backend). One file per
        try, so lines of an earlier try (a child on a node that was cut off
        but still runs) never mix into this one's, and re-reading it after a
        dispatcher restart replays exactly this try."""
        return self.work_dir(base) / f"reports-r{retry}.jsonl"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    def corpus_for_id(self, corpus_id: str) -> Path | None:
        """calibration/<id>.jsonl: where the node keeps the corpus of a
        `calibrationCorpus` id that no calibrationCorpora entry gives a path
        for (published alloys cite corpora by id alone). None for an id that
        is not a plain file name."""
        if not _CORPUS_ID.fullmatch(corpus_id):
            return None
        return self.calibration / f"{corpus_id}{CORPUS_SUFFIX}"

    @property
    def sources(self) -> Path:
        """Source models the node made from other formats, by content hash:
        shared by every part that names the same file, never a part's own,
        and made on first use (roots older than it lack it)."""
        return self.root / "sources"

    def source_gguf(self, sha256: str) -> Path:
        """Where a GGUF a package provides is assembled (sources/<sha256>.gguf)."""
        return self.sources / f"{sha256}{GGUF_SUFFIX}"

    def gguf_checkpoint(self, sha256: str) -> Path:
        """The safetensors checkpoint dequantized from the GGUF with this sha256."""
        return self.sources / f"gguf-{sha256}"

    def source_lock(self, sha256: str) -> Path:
        """Held while one process assembles or dequantizes that GGUF."""
        return self.sources / f".{sha256}.lock"

    @property
    def node_config(self) -> Path:
        return self.root / "factory_node.toml"

    def all_dirs(self) -> list[Path]:
        return [self.line, *(self.station(s) for s in STATIONS), self.incoming, self.work, self.calibration]
