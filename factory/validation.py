"""Checking an alloy file before it enters the line: parse level, then schema level.

Every problem becomes a `Finding` that names the JSON path (`$.stages[2].rank`),
the bad value and what to do, so a person can fix a recipe in one pass instead
of one traceback at a time. Plan-level checks (can this node run it, do the
files exist) build on this module and live elsewhere.

Levels, in order; a level runs only if the one before let the file parse:

0. read: only a regular file is read, and only up to `MAX_ALLOY_BYTES`
   (a FIFO would block, /dev/zero never ends).
1. parse: file name, UTF-8, JSON syntax (with line and column), top level is
   an object. Duplicate keys, NaN/Infinity, numbers that overflow to
   infinity and integers beyond 64 bits are reported too: Python's json
   module accepts them, other JSON readers do not.
2. schema: the pydantic models of `factory.alloy` (types, ranges, required
   fields), keys in their Python spelling (`timeout_seconds` for
   `timeoutSeconds`), then the consistency rules in `RULES` (fields that
   contradict each other), then paths that escape the alloy's root.

A finding repeats at most a short escaped excerpt of what the alloy says
(`EXCERPT_CHARS`): findings go into error.json and events, which other
people read, and the bytes may not be an alloy at all (a symlinked secret).
"""

from __future__ import annotations

import codecs
import json
import math
import os
import posixpath
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_snake
from pydantic_core import ErrorDetails

from factory.alloy import (
    DOMAINS,
    CompactStage,
    ExpertActivationProfileStage,
    GENERIC_TAG,
    STAGE_TYPES,
    Alloy,
    AlloyModel,
    ExpertPruneStage,
    _TrainingFields,
    Stage,
)
from factory.catalog import kind_of
from factory.durable import file_kind
from factory.integrity import alloy_hash, model_hash
from factory.errors import EXCERPT_CHARS, PathEscapeError, excerpt, printable  # noqa: F401 - PathEscapeError, excerpt re-exported
from factory.protocol import ALLOY_SUFFIX, MAX_ALLOY_BYTES, MAX_BASE_CHARS, check_base

Level = Literal["parse", "schema", "plan"]

# The rule for file names: an alloy file must end in `.json`. The line itself
# queues `<base>.alloy.json` (factory.protocol); published alloys are also
# named `forge-alloy.json` or `<name>.alloy@<commit>.json`, so anything more
# specific than `.json` would reject real recipes.
ALLOY_FILE_SUFFIX = ".json"
# The most bytes an alloy file may have. Real alloys are under 100 KB (the
# largest in the published corpus ~20 KB, the largest example ~260 KB); 4 MiB
# leaves room for long provenance and results, while bounding what one drop
# costs the gate: parsed JSON takes ~30x its size in memory.
# Of a file that is not valid JSON, only this much is quoted at the error:
# the file may be anything a symlink pointed at, and line and column already
# locate the problem.
SYNTAX_EXCERPT_CHARS = 12
# The most characters of an object key a JSON path shows.
PATH_KEY_CHARS = 40
# A finding's message and fix are sentences about the alloy; this cap is a
# backstop so no message can carry a large piece of the input.
MESSAGE_CHARS = 1000
# The most findings one report lists; the rest are counted in the last one.
MAX_FINDINGS = 100
# The most JSON values (objects, arrays, strings, numbers, ...) an alloy may
# hold. The largest alloy we know has ~16,000; the bound keeps one drop from
# costing the gate minutes and gigabytes in schema errors.
MAX_JSON_VALUES = 200_000
# Integers other JSON readers hold exactly: the signed 64-bit range.
# (Python reads any size, up to its 4300-digit conversion limit, and fails
# with a traceback beyond it.)
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
# A prunePct more than this many percentage points from what keep/original
# implies is a contradiction, not rounding (the corpus is exact: 25.0, 37.5).
PRUNE_PCT_TOLERANCE = 0.05
# Keys whose string values are local paths wherever they appear in an alloy.
PATH_KEYS = frozenset({"path"})
PATH_KEY_SUFFIXES = ("Path", "File", "Dir")
# Keys that hold a dataset: a hub id ("org/name") or a local path.
DATASET_KEYS = frozenset({"dataset", "trainingDataset", "calibrationDataset"})
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zst")


# ── public types ────────────────────────────────────────────────────────────


def _finding_value(value: object) -> object:
    """What a Finding stores as its value: JSON scalars as they are, a short
    printable string as it is, anything else as its `excerpt`."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else excerpt(value)
    if isinstance(value, str) and len(value) <= EXCERPT_CHARS and value.isprintable():
        return value
    return excerpt(value)


@dataclass(frozen=True)
class Finding:
    """One problem in one place of one alloy.

    Findings end up in error.json and events: whoever builds one, the value
    is stored as a short excerpt and message and fix are printable one-liners
    of bounded length (see `_finding_value`).
    """

    level: Level
    path: str  # JSON path like "$.stages[1].level" ("$" for the whole file)
    value: object  # the offending value or its excerpt (or None); always JSON-serialisable
    message: str  # what is wrong, naming the JSON path and bad value
    fix: str  # what to do

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _finding_value(self.value))
        object.__setattr__(self, "path", printable(self.path, MESSAGE_CHARS))
        object.__setattr__(self, "message", printable(self.message, MESSAGE_CHARS))
        object.__setattr__(self, "fix", printable(self.fix, MESSAGE_CHARS))

    def __str__(self) -> str:
        return finding_text(self.path, self.message, self.value, self.fix)


def finding_text(path: str, message: str, value: object, fix: str) -> str:
    """A finding as one line that says its path and value once: messages
    usually name both already (`$.x = 5: ...`), and then they are not repeated."""
    head = "" if message.startswith(path) else f"{path}: "
    got = excerpt(value)
    tail = "" if value is None or got in message else f" (got {got})"
    return f"{head}{message}{tail}; fix: {fix}"


@dataclass
class Report:
    """Everything known about one alloy file after checking it."""

    file: Path | None
    findings: list[Finding] = field(default_factory=list)
    alloy: Alloy | None = None  # set when the schema level found nothing
    raw: bytes | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (for `--json` output and error sidecars)."""
        return {
            "file": str(self.file) if self.file is not None else None,
            "ok": self.ok,
            "alloyHash": alloy_hash(self.raw) if self.raw is not None else None,
            "findings": [asdict(f) for f in self.findings],  # values are JSON-safe (_finding_value)
        }


# ── entry points ────────────────────────────────────────────────────────────


def check_file(path: Path, *, root: Path | None = None) -> Report:
    """Read `path` once and check its bytes. Paths inside the alloy must stay
    within `root`, which defaults to the alloy's own directory. Only a regular
    file of at most MAX_ALLOY_BYTES is read; anything else is one finding."""
    path = Path(path)
    raw = _read_capped(path)
    if isinstance(raw, _Unreadable):
        value = raw.value if raw.value is not None else str(path)
        return Report(file=path, findings=[_parse_finding(value, f"$ {raw.problem}", raw.fix)])
    report = check_bytes(raw, file_name=path.name, root=root if root is not None else path.parent)
    report.file = path
    return report


def check_bytes(raw: bytes, *, file_name: str | None = None, root: Path | None = None) -> Report:
    """Check an alloy's bytes at parse and schema level.

    `file_name` enables the file-name rule. Without `root`, paths are only
    checked lexically (a `..` that climbs out); with it, they are resolved,
    symlinks included, and must stay inside `root`. Bytes over
    MAX_ALLOY_BYTES are refused unparsed.
    """
    report = Report(file=None, raw=raw)
    if file_name is not None:
        report.findings.extend(_check_file_name(file_name))
    report.alloy = _check_content(raw, root=root, findings=report.findings)
    report.findings = _at_most(report.findings, MAX_FINDINGS)
    return report


def _check_content(raw: bytes, *, root: Path | None, findings: list[Finding]) -> Alloy | None:
    """Size, parse and schema level: adds to `findings`; the alloy when the
    schema level found nothing."""
    if len(raw) > MAX_ALLOY_BYTES:
        findings.append(_parse_finding(len(raw), f"$ {_too_big(len(raw), done='parsed')}", _TOO_BIG_FIX))
        return None
    data, parse_findings = _parse(raw)
    findings.extend(parse_findings)
    if not isinstance(data, dict):
        return None
    alloy, schema_findings = _check_schema(data, root=root)
    findings.extend(schema_findings)
    return alloy if not schema_findings else None


def _at_most(findings: list[Finding], limit: int) -> list[Finding]:
    """The first `limit` findings and one that counts the rest: a file of a
    million bad items must not make a million-line error.json."""
    if len(findings) <= limit:
        return findings
    hidden = sum(f.value if f.fix == _MORE_FIX else 1 for f in findings[limit - 1 :])
    return [*findings[: limit - 1], *_more(hidden, findings[limit - 1].level)]


_MORE_FIX = "fix the findings above and check the file again"


def _more(count: int, level: Level) -> list[Finding]:
    """One finding counting `count` findings not listed (none when count <= 0)."""
    if count <= 0:
        return []
    return [Finding(level, "$", count, f"$: {count} more finding(s) not listed", _MORE_FIX)]


# ── read level ──────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class _Unreadable:
    """Why a file was not read (its value: the size, or None)."""

    problem: str
    fix: str
    value: object = None


_TOO_BIG_FIX = ("check that this is the alloy you meant (real alloys are well under 100 KB); keep data such "
                "as corpora in separate files the alloy names")


def _too_big(size: int | str, *, done: str = "read") -> str:
    return f"is {size} bytes, larger than the limit of {MAX_ALLOY_BYTES} bytes for an alloy; it was not {done}"


def _not_regular(mode: int) -> _Unreadable:
    kind = file_kind(mode) or "not a regular file"
    return _Unreadable(f"is {kind}, not a regular file; it was not read",
                       "pass the alloy file itself (a regular file holding the JSON)")


def _read_capped(path: Path) -> bytes | _Unreadable:
    """The bytes of `path` if it is a regular file within MAX_ALLOY_BYTES.

    stat first: opening a FIFO blocks until a writer comes, and /dev/zero
    never ends. Then open without blocking and check the open file again.
    """
    try:
        st = os.stat(path)  # a symlink the caller named is followed: it is their file
    except OSError as err:
        return _Unreadable(f"cannot be read: {err.strerror or err}", "check the path and its permissions")
    if not stat.S_ISREG(st.st_mode):
        return _not_regular(st.st_mode)
    if st.st_size > MAX_ALLOY_BYTES:
        return _Unreadable(_too_big(st.st_size), _TOO_BIG_FIX, st.st_size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        return _Unreadable(f"cannot be read: {err.strerror or err}", "check the path and its permissions")
    try:
        # RACE: the name may now be another file (swapped for a FIFO, or
        # growing): the open file is checked again and read with the cap.
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return _not_regular(mode)
        raw = _read_at_most(fd, MAX_ALLOY_BYTES + 1)
    except OSError as err:
        return _Unreadable(f"cannot be read: {err.strerror or err}", "check the file and its permissions")
    finally:
        os.close(fd)
    if len(raw) > MAX_ALLOY_BYTES:
        return _Unreadable(_too_big(f"more than {MAX_ALLOY_BYTES}"), _TOO_BIG_FIX)
    return raw


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


# ── parse level ─────────────────────────────────────────────────────────────


def _parse_finding(value: object, message: str, fix: str) -> Finding:
    return Finding("parse", "$", value, message, fix)


def _check_file_name(name: str) -> list[Finding]:
    """An alloy's name ends in `.json` and holds no control characters or
    whitespace at its ends (a name with a trailing newline is not what the
    sender meant, and would print as two lines)."""
    if name.endswith(ALLOY_FILE_SUFFIX) and name.isprintable() and name == name.strip():
        return []
    if not name.endswith(ALLOY_FILE_SUFFIX):
        message = f"file name {excerpt(name)} does not end in {ALLOY_FILE_SUFFIX!r}"
    else:
        message = f"file name {excerpt(name)} has control characters or whitespace at its ends"
    return [_parse_finding(name, message, f"rename it to {suggested_file_name(name)!r}")]


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_TYPE_EXTENSION = re.compile(r"\.[A-Za-z]{1,5}$")  # ".yaml", ".txt"; not a version's ".5-4b"
_NAME_SUFFIXES = (".json", ".alloy")


def suggested_file_name(name: str) -> str:
    """A name the line accepts for a file called `name`: `<base>.alloy.json`
    with a base `factory.protocol.check_base` allows (unsafe characters
    become '-', a file-type extension and any .alloy/.json are dropped)."""
    base = _UNSAFE_NAME_CHARS.sub("-", name.strip()).strip("-._")
    if not base.endswith(ALLOY_FILE_SUFFIX):
        base = _TYPE_EXTENSION.sub("", base)
    while base.endswith(_NAME_SUFFIXES):
        base = base.rsplit(".", 1)[0]
    base = re.sub(r"\.retry[0-9]+$", "", base[:MAX_BASE_CHARS].strip("-._"))
    return f"{base if check_base(base) is None else 'alloy'}{ALLOY_SUFFIX}"


class _DuplicateKeys:
    """object_pairs_hook that remembers keys given twice in one object."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):  # called once per object: count only when needed
            counts = Counter(k for k, _ in pairs)
            self.seen.extend(sorted(k for k, n in counts.items() if n > 1))
        return obj


@dataclass(frozen=True)
class _BadNumber:
    """A number other JSON readers cannot hold, left where it stood in the
    data so that its JSON path can be reported (a hook that raised would
    lose the place)."""

    text: str  # as written in the file
    problem: str
    fix: str


class _Numbers:
    """parse_int / parse_float / parse_constant hooks for json.loads."""

    def __init__(self) -> None:
        self.bad = 0

    def _refuse(self, text: str, problem: str, fix: str) -> _BadNumber:
        self.bad += 1
        return _BadNumber(text, problem, fix)

    def integer(self, text: str) -> int | _BadNumber:
        # Length first: int() of a 5000-digit text raises (Python's
        # int-str conversion limit); 20 characters hold "-2**63".
        if len(text) <= 20 and INT_MIN <= (value := int(text)) <= INT_MAX:
            return value
        digits = len(text.lstrip("-"))
        return self._refuse(text, f"is an integer of {digits} digits, outside the 64-bit range other JSON "
                            "readers hold", "use a smaller number, or write it as a string if it is an id")

    def real(self, text: str) -> float | _BadNumber:
        value = float(text)
        if math.isfinite(value):
            return value
        return self._refuse(text, "overflows to infinity, which JSON cannot write back",
                            "use a finite number (at most about 1.8e308), or null")

    def constant(self, name: str) -> _BadNumber:
        return self._refuse(name, f"is not a JSON value (Python reads {name}, other JSON readers do not)",
                            "write a number, or null")


def _bad_numbers(data: object) -> Iterator[Finding]:
    """A finding for each _BadNumber in the data, in document order.

    Iterative: the data may be nested as deeply as json.loads allows.
    """
    stack: list[tuple[str, object]] = [("$", data)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, _BadNumber):
            yield _number_finding(path, node)
        elif isinstance(node, dict):
            stack.extend(reversed([(_child_path(path, k), v) for k, v in node.items()]))
        elif isinstance(node, list):
            stack.extend(reversed([(f"{path}[{i}]", v) for i, v in enumerate(node)]))


def _number_finding(path: str, number: _BadNumber) -> Finding:
    """A number token is digits, signs and letters: shown unquoted, cut short."""
    text = number.text if len(number.text) <= 24 else number.text[:23] + "…"
    return Finding("parse", path, text, f"{path} = {text} {number.problem}", number.fix)


def _line_col(raw: bytes, offset: int) -> tuple[int, int]:
    line_start = raw.rfind(b"\n", 0, offset) + 1
    return raw.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _decode(raw: bytes) -> tuple[str | None, list[Finding]]:
    """UTF-8 text of the file, or None with a finding that locates the bad byte."""
    findings = []
    if raw.startswith(codecs.BOM_UTF8):
        message = "$ starts with a UTF-8 byte-order mark, which JSON forbids"
        findings.append(_parse_finding("\ufeff", message, "save the file as UTF-8 without BOM"))
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8"), findings
    except UnicodeDecodeError as err:
        line, col = _line_col(raw, err.start)
        bad = raw[err.start : err.end].hex()  # hex text: a Finding's value stays JSON-safe
        message = f"$ is not UTF-8: byte {bad} at line {line}, column {col} ({err.reason})"
        findings.append(_parse_finding(bad, message, "save the file as UTF-8 (re-encode it, e.g. `iconv -t UTF-8`)"))
        return None, findings


def _syntax_finding(err: json.JSONDecodeError) -> Finding:
    """Where the JSON breaks, quoting only a few characters there: the file
    may not be an alloy at all (a symlinked secret), and line and column
    already say where to look."""
    near = err.doc[err.pos : err.pos + SYNTAX_EXCERPT_CHARS]
    where = f"line {err.lineno}, column {err.colno}"
    fix = f"correct the JSON at {where} (often a missing comma, quote or bracket)"
    at = f" (near {excerpt(near)})" if near else " (at the end of the file)"
    return _parse_finding(near, f"$ is not valid JSON: {err.msg} at {where}{at}", fix)


_UNPARSED = object()  # _load's data when the text is not JSON at all
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _load(text: str) -> tuple[object, list[Finding]]:
    """json.loads, with every way it can fail turned into a finding."""
    dupes, numbers = _DuplicateKeys(), _Numbers()
    try:
        data = json.loads(text, object_pairs_hook=dupes, parse_int=numbers.integer, parse_float=numbers.real,
                          parse_constant=numbers.constant)
    except json.JSONDecodeError as err:
        return _UNPARSED, [_syntax_finding(err)]
    except RecursionError:
        return _UNPARSED, [_parse_finding(None, "$ is nested too deeply to read", "flatten the structure")]
    message = "$ has the key {} twice in one object; readers disagree on which one wins"
    findings = [_parse_finding(k, message.format(excerpt(k)), f"keep one {excerpt(k)}")
                for k in dupes.seen[:MAX_FINDINGS]] + _more(len(dupes.seen) - MAX_FINDINGS, "parse")
    if numbers.bad:
        listed = list(islice(_bad_numbers(data), MAX_FINDINGS))
        return _UNPARSED, findings + listed + _more(numbers.bad - len(listed), "parse")
    return data, findings


def _more_values_than(data: object, limit: int) -> bool:
    """Whether the data holds more than `limit` values (stops counting there).

    The schema level gives one error per bad item, and pydantic builds
    every one: a 16 MiB list of five million `{}` takes minutes and
    gigabytes, so absurd structures stop here.
    """
    stack, seen = [data], 0
    while stack and seen <= limit:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return seen > limit


def _parse(raw: bytes) -> tuple[object, list[Finding]]:
    """Decode and parse; the data is None when it cannot be parsed."""
    text, findings = _decode(raw)
    if text is None:
        return None, findings
    data, load_findings = _load(text)
    findings.extend(load_findings)
    if data is _UNPARSED:
        return None, findings
    if _more_values_than(data, MAX_JSON_VALUES):
        message = f"$ holds more than {MAX_JSON_VALUES} JSON values; it was not checked further"
        return None, [*findings, _parse_finding(MAX_JSON_VALUES, message, _TOO_BIG_FIX)]
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), "null")
        message = f"$ is a JSON {kind}, but an alloy is a JSON object"
        fix = 'wrap the recipe in { ... } with "name", "version", "source" and "stages"'
        findings.append(_parse_finding(excerpt(data, 60), message, fix))
    return data, findings


# ── schema level: pydantic errors → findings ───────────────────────────────

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _strip_tags(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """Drop the union tag pydantic puts after `stages[i]` in error locations."""
    out: list[int | str] = []
    for i, part in enumerate(loc):
        if i >= 2 and loc[i - 2] == "stages" and isinstance(loc[i - 1], int) and isinstance(part, str):
            if part in STAGE_TYPES or part == GENERIC_TAG:
                continue
        out.append(part)
    return tuple(out)


def json_path(loc: tuple[int | str, ...]) -> str:
    """`("stages", 2, "rank")` → `"$.stages[2].rank"`."""
    path = "$"
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _child_path(path, part)
    return path


def _child_path(path: str, key: str) -> str:
    """`path` extended by an object key. A key that is not a plain word is
    quoted JSON-escaped, and a long one is cut: the path names the place,
    it does not repeat the file."""
    if len(key) <= PATH_KEY_CHARS and _IDENT.fullmatch(key):
        return f"{path}.{key}"
    shown = key if len(key) <= PATH_KEY_CHARS else key[: PATH_KEY_CHARS - 1] + "…"
    return f"{path}[{json.dumps(shown)}]"


def _stage_model(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    if len(loc) >= 3 and loc[0] == "stages" and isinstance(loc[1], int):
        return STAGE_TYPES.get(str(loc[2]))
    return None


_BOUND_WORDS = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}


def _range_hint(model: type[BaseModel] | None, key: int | str) -> str | None:
    """'between 0.0 and 0.9' for a stage field, read from its Field bounds."""
    if model is None or not isinstance(key, str):
        return None
    info = next((f for name, f in model.model_fields.items() if key in (name, f.alias)), None)
    if info is None:
        return None
    bounds = {k: getattr(m, k) for m in info.metadata for k in _BOUND_WORDS if getattr(m, k, None) is not None}
    if "ge" in bounds and "le" in bounds:
        return f"between {bounds['ge']} and {bounds['le']}"
    return _bound_phrase(bounds, sep=" and ") if bounds else None


def _bound_phrase(bounds: dict[str, Any], *, sep: str | None = None) -> str:
    """'at least 1' (or 'above 0 and below 1' with `sep`) from pydantic bounds."""
    parts = [f"{word} {bounds[k]}" for k, word in _BOUND_WORDS.items() if k in bounds]
    if not parts:
        return "in range"
    return sep.join(parts) if sep else parts[0]


# error type → (what is wrong, what to do); `{...}` filled from the error ctx.
_ERROR_TEXT: dict[str, tuple[str, str]] = {
    "missing": ("is required but missing", "add {key}"),
    "string_type": ("must be a string", "write it as a JSON string in double quotes"),
    "int_type": ("must be a whole number", "write an integer without quotes, e.g. 4"),
    "float_type": ("must be a number", "write a number without quotes, e.g. 0.3"),
    "bool_type": ("must be true or false", "write true or false without quotes"),
    "list_type": ("must be a list", "write a JSON array: [ ... ]"),
    "dict_type": ("must be an object", "write a JSON object: {{ ... }}"),
    "model_type": ("must be an object", "write a JSON object: {{ ... }}"),
    "model_attributes_type": ("must be an object", "write a JSON object: {{ ... }}"),
    "greater_than_equal": ("must be at least {ge}", "use a value {range}"),
    "greater_than": ("must be above {gt}", "use a value {range}"),
    "less_than_equal": ("must be at most {le}", "use a value {range}"),
    "less_than": ("must be below {lt}", "use a value {range}"),
    "literal_error": ("must be one of {expected}", "use one of {expected}"),
    "too_short": ("needs at least {min_length} item(s)", "add at least {min_length} item(s)"),
}


def _special_text(path: str, err: ErrorDetails) -> tuple[str, str] | None:
    """Wording for the handful of errors whose generic text would not help."""
    kind = err["type"]
    if path == "$.stages" and kind == "missing":
        return "is missing: an alloy is a list of stages", 'add "stages": [{"type": "..."}, ...]'
    if path == "$.stages" and kind == "too_short":
        return "is empty: there is nothing to run", "add at least one stage"
    if path.startswith("$.stages[") and path.endswith("].type"):
        known = ", ".join(sorted(STAGE_TYPES))
        if kind == "missing":
            return "is missing: every stage names its type", f'add "type": one of {known}'
        if kind == "string_type":
            return "must be a string naming the stage type", f"use one of {known}"
    return None


def _finding_from_error(err: ErrorDetails) -> Finding:
    loc = tuple(err["loc"])
    clean = _strip_tags(loc)
    path = json_path(clean)
    key = clean[-1] if clean else "$"
    value = None if err["type"] == "missing" else err.get("input")
    ctx = dict(err.get("ctx") or {})
    special = _special_text(path, err)
    if special is not None:
        what, fix = special
    elif "fix" in ctx:  # our own PydanticCustomError types carry their fix
        what, fix = err["msg"], str(ctx["fix"])
    elif err["type"] in _ERROR_TEXT:
        ctx.setdefault("range", _range_hint(_stage_model(loc), key) or _bound_phrase(ctx))
        what, fix = (t.format(key=_key_text(key), **ctx) for t in _ERROR_TEXT[err["type"]])
    else:  # a pydantic error we have no wording for: its own text is still precise
        what, fix = err["msg"], f"see the forge-alloy schema for {_key_text(key)}"
    stage = f" in the {loc[2]} stage" if _stage_model(loc) is not None else ""
    head = path if err["type"] == "missing" else f"{path} = {excerpt(value, 60)}"
    if err["type"] == "missing" and (python := _python_spelling_given(key, err.get("input"))):
        what, fix = f"{what}; the object has {python!r}, the Python spelling, which is not read", \
            f"rename {python!r} to {key!r}"
    return Finding("schema", path, value, f"{head} {what}{stage}", fix)


def _python_spelling_given(key: int | str, obj: object) -> str | None:
    """The snake_case spelling of a missing camelCase key, if the object has it."""
    python = to_snake(key) if isinstance(key, str) else None
    return python if python != key and isinstance(obj, dict) and python in obj else None


def _key_text(key: int | str) -> str:
    """A key for a message: JSON-quoted, cut like a JSON path's keys."""
    text = str(key)
    return json.dumps(text if len(text) <= PATH_KEY_CHARS else text[: PATH_KEY_CHARS - 1] + "…")


def _check_schema(data: dict[str, Any], *, root: Path | None) -> tuple[Alloy | None, list[Finding]]:
    try:
        alloy = Alloy.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        findings = [_finding_from_error(e) for e in errors[:MAX_FINDINGS]]
        return None, findings + _more(len(errors) - len(findings), "schema")
    findings = list(_python_spellings(alloy))
    findings.extend(f for rule in RULES for f in rule(alloy))
    findings.extend(_check_paths(data, root=root))
    return alloy, findings


# ── schema level: one spelling per field ────────────────────────────────────


def _python_names(model: type[BaseModel]) -> dict[str, str]:
    """{Python name: schema key} of a model's fields whose two spellings differ."""
    return {name: info.alias for name, info in model.model_fields.items() if info.alias and info.alias != name}


def _python_spellings(model: AlloyModel, path: str = "$") -> Iterator[Finding]:
    """Keys written in a field's Python spelling (`timeout_seconds`) instead
    of its schema key (`timeoutSeconds`), at every level of the alloy.

    The models read only schema keys, so such a key is kept as an unknown
    extra like any other: without this finding it would pass and be ignored
    (a stage timeout that never applies). Genuinely unknown keys are kept
    and allowed.
    """
    names = _python_names(type(model))
    for key in model.model_extra or {}:
        if key in names:
            where = _child_path(path, key)
            problem = f"{where}: unknown spelling of {names[key]} (alloys use the schema's camelCase keys); not read"
            yield Finding("schema", where, key, problem, f"rename it to {names[key]}")
    for name, info in type(model).model_fields.items():
        yield from _nested_spellings(getattr(model, name), _child_path(path, info.alias or name))


def _nested_spellings(value: object, path: str) -> Iterator[Finding]:
    if isinstance(value, AlloyModel):
        yield from _python_spellings(value, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nested_spellings(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, AlloyModel):
                yield from _python_spellings(item, _child_path(path, key))


# ── schema level: consistency rules ─────────────────────────────────────────

Rule = Callable[[Alloy], Iterator[Finding]]


def _stages(alloy: Alloy, kind: type[Stage]) -> Iterator[tuple[str, Any]]:
    """(JSON path, stage) for each stage of a model class."""
    for i, stage in enumerate(alloy.stages):
        if isinstance(stage, kind):
            yield f"$.stages[{i}]", stage


def _schema(path: str, value: object, message: str, fix: str) -> Finding:
    return Finding("schema", path, value, f"{path} = {excerpt(value, 60)}: {message}", fix)


def rule_moe_stages_need_moe(alloy: Alloy) -> Iterator[Finding]:
    """Expert stages on a model the alloy itself calls dense cannot work."""
    if alloy.source.is_moe is not False:
        return
    for i, stage in enumerate(alloy.stages):
        if kind_of(stage.type).needs_moe:
            problem = (
                f"the source is declared dense, but $.stages[{i}] is an {stage.type} stage, "
                "which needs a mixture-of-experts model"
            )
            model = excerpt(alloy.source.base_model)
            fix = f"set source.isMoE to true if {model} is an MoE; otherwise remove $.stages[{i}]"
            yield _schema("$.source.isMoE", False, problem, fix)


def _keep(stage: ExpertPruneStage) -> int | None:
    return stage.keep_experts_per_layer if stage.keep_experts_per_layer is not None else stage.keep_experts


def rule_expert_prune_keep(alloy: Alloy) -> Iterator[Finding]:
    """keepExpertsPerLayer must exist, agree with keepExperts, and cover top-k:
    a layer with fewer experts than the router picks per token cannot route."""
    for path, stage in _stages(alloy, ExpertPruneStage):
        keep = _keep(stage)
        if keep is None:
            where = f"{path}.keepExpertsPerLayer"
            problem = f"{where} is missing: an expert-prune stage must say how many experts each layer keeps"
            yield Finding("schema", where, None, problem, 'add "keepExpertsPerLayer": <experts to keep per layer>')
            continue
        per_layer = stage.keep_experts_per_layer
        if stage.keep_experts is not None and per_layer not in (None, stage.keep_experts):
            problem = f"contradicts keepExpertsPerLayer = {per_layer}"
            yield _schema(f"{path}.keepExperts", stage.keep_experts, problem, "keep only keepExpertsPerLayer")
        top_k = stage.top_k or alloy.source.router_top_k
        if top_k is not None and keep < top_k:
            problem = f"is below the router's top-k of {top_k}: each token is routed to {top_k} experts"
            yield _schema(f"{path}.keepExpertsPerLayer", keep, problem, f"keep at least {top_k} experts per layer")


def rule_expert_prune_counts(alloy: Alloy) -> Iterator[Finding]:
    """originalExpertsPerLayer and prunePct must agree with keep and the source."""
    declared = alloy.source.num_experts_per_layer
    for path, stage in _stages(alloy, ExpertPruneStage):
        keep, stated = _keep(stage), stage.original_experts_per_layer
        if stated and declared and stated != declared:
            problem = f"contradicts source.numExpertsPerLayer = {declared}"
            fix = "make the two agree with the base model's config"
            yield _schema(f"{path}.originalExpertsPerLayer", stated, problem, fix)
        original = stated or declared
        if keep is None or original is None:
            continue
        if keep > original:
            problem = f"is more than the {original} experts each layer has"
            yield _schema(f"{path}.keepExpertsPerLayer", keep, problem, f"keep at most {original} (fewer to prune anything)")
        elif stage.prune_pct is not None:
            implied = 100.0 * (1 - keep / original)
            if not math.isclose(stage.prune_pct, implied, abs_tol=PRUNE_PCT_TOLERANCE):
                problem = f"contradicts keepExpertsPerLayer = {keep} of {original}, which prunes {implied:g}%"
                yield _schema(f"{path}.prunePct", stage.prune_pct, problem, f"set prunePct to {implied:g} or drop it")


def rule_lora_aliases_agree(alloy: Alloy) -> Iterator[Finding]:
    """rank/loraRank and alpha/loraAlpha are two spellings; both given must agree."""
    for path, stage in _stages(alloy, _TrainingFields):
        for short, long in (("rank", "lora_rank"), ("alpha", "lora_alpha")):
            a, b = getattr(stage, short), getattr(stage, long)
            if a is not None and b is not None and a != b:
                alias = _TrainingFields.model_fields[long].alias
                fix = f"keep one of {short!r} and {alias!r}"
                yield _schema(f"{path}.{alias}", b, f"contradicts {short} = {a}", fix)


def rule_model_hash_matches(alloy: Alloy) -> Iterator[Finding]:
    """A modelHash beside fileHashes must be the hash of those entries
    (computed from the recorded entries, not from the file's bytes)."""
    for where, block in alloy.integrity_blocks():
        if not block.file_hashes or block.model_hash is None:
            continue
        names = [f.filename for f in block.file_hashes]
        try:
            actual = model_hash((f.filename, f.sha256) for f in block.file_hashes)
        except ValueError as err:
            yield _schema(f"{where}.fileHashes", names, str(err).split("; fix:")[0], "list each file once")
            continue
        if actual != block.model_hash:
            fix = "recompute it with factory.integrity.model_hash, or re-hash the files if they changed"
            yield _schema(f"{where}.modelHash", block.model_hash, f"is not the hash of its fileHashes ({actual})", fix)


def rule_calibration_corpora(alloy: Alloy) -> Iterator[Finding]:
    """Each corpus needs a path to read and a name or id stages can cite."""
    for i, corpus in enumerate(alloy.calibration_corpora or []):
        path = f"$.calibrationCorpora[{i}]"
        if corpus.path is None:
            problem = f"{path}.path is missing: a calibration corpus needs a file"
            yield Finding("schema", f"{path}.path", None, problem, 'add "path": "<relative path to the .jsonl>"')
        if corpus.name is None and corpus.id is None:
            problem = f"{path}.name is missing: stages refer to a corpus by name or id"
            yield Finding("schema", f"{path}.name", None, problem, 'add "name": "<corpus name>"')


def rule_profile_names_corpus(alloy: Alloy) -> Iterator[Finding]:
    """A profile without a corpus has nothing to route through the model."""
    for path, stage in _stages(alloy, ExpertActivationProfileStage):
        if not stage.calibration_corpus and not stage.calibration_corpus_file:
            yield _schema(f"{path}.calibrationCorpus", None, "the profile names no calibration corpus",
                          "set calibrationCorpus to an id in $.calibrationCorpora, or calibrationCorpusFile "
                          "to a file inside the factory root")


def rule_domain_is_a_key(alloy: Alloy) -> Iterator[Finding]:
    """`domain` selects training data through the node's [domains] table, so
    it must be one of its keys; a dataset name belongs in `dataset`. A stage
    that distils from a teacher may describe itself with any word (a
    published alloy says "distillation"): its data is the teacher's corpus."""
    for i, stage in enumerate(alloy.stages):
        domain = getattr(stage, "domain", None)
        if domain is None or domain in DOMAINS or getattr(stage, "teacher", None):
            continue
        fix = (f"use one of {', '.join(DOMAINS)}" + (f", and put the dataset in $.stages[{i}].dataset"
                                                       if "/" in domain or "." in domain else ""))
        yield _schema(f"$.stages[{i}].domain", domain, "is not a training domain key", fix)


def rule_compact_thresholds_ordered(alloy: Alloy) -> Iterator[Finding]:
    """Compaction tiers are bands of one importance scale: their bounds
    must not cross (dead <= dormant <= low <= medium <= high)."""
    names = ("dead_threshold", "dormant_threshold", "low_threshold", "medium_threshold", "high_threshold")
    for path, stage in _stages(alloy, CompactStage):
        values = [getattr(stage, n) for n in names]
        for (a, va), (b, vb) in zip(zip(names, values), zip(names[1:], values[1:])):
            if va > vb:
                alias_a, alias_b = (CompactStage.model_fields[n].alias for n in (a, b))
                yield _schema(f"{path}.{alias_b}", vb, f"is below {alias_a} = {va:g}: the tiers would overlap",
                              f"make {alias_b} at least {va:g} (bounds rise: dead, dormant, low, medium, high)")


RULES: tuple[Rule, ...] = (
    rule_moe_stages_need_moe,
    rule_domain_is_a_key,
    rule_compact_thresholds_ordered,
    rule_profile_names_corpus,
    rule_expert_prune_keep,
    rule_expert_prune_counts,
    rule_lora_aliases_agree,
    rule_model_hash_matches,
    rule_calibration_corpora,
)

# ── schema level: paths ─────────────────────────────────────────────────────


def is_local_path_like(s: str, *, root: Path | None = None) -> bool:
    """Whether a dataset-ish string names a local file rather than a hub id.

    Alloys put both in the same fields: `"m-a-p/CodeFeedback-Filtered-Instruction"`
    is a Hugging Face dataset, `"calibration/heldout.jsonl"` is a file. The rule:

    * absolute (`/x`, `~/x`), explicitly relative (`./x`, `../x`) or holding a
      `..` segment: a path;
    * ending in a data-file suffix (`.jsonl`, `.json`, `.parquet`, ...): a path;
    * anything else (`org/name`, `wikitext-2`, free text): a path only if it
      exists under `root`, otherwise a hub id or a description.
    """
    if s.startswith(("/", "~", "./", "../")) or ".." in s.split("/"):
        return True
    if s.lower().endswith(DATA_FILE_SUFFIXES):
        return True
    return root is not None and bool(s) and _exists_or_unprobeable(root / s)


def _exists_or_unprobeable(path: Path) -> bool:
    """Does `path` exist? A name the kernel refuses to look up (too long,
    no permission) counts as a path, so resolve_inside reports it cleanly."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):  # ENAMETOOLONG, EACCES, an embedded NUL
        return True
    return True


def _escape_reason(root: Path, rel: Path) -> str:
    if rel.is_absolute():
        return "is absolute"
    if not Path(posixpath.normpath(os.path.join(root, rel))).is_relative_to(root):
        return "climbs out with '..'"
    return "goes through a symlink"


def resolve_inside(root: Path, rel: str, *, json_path: str) -> Path:
    """The real path of `rel` under `root`, or PathEscapeError if it leaves root.

    `rel` may be relative (to root) or absolute (allowed only inside root).
    Symlinks are followed, so a link inside root that points outside is caught;
    the target need not exist yet (outputs are written later). A path that
    cannot be resolved at all (NUL byte, symlink loop) is refused the same way.
    """
    real_root = Path(root).resolve()
    candidate = Path(rel)
    try:
        if "\x00" in rel:
            raise ValueError("embedded NUL byte")
        resolved = (candidate if candidate.is_absolute() else real_root / candidate).resolve()
    except (OSError, RuntimeError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else excerpt(str(err), 60)
        raise PathEscapeError(
            json_path=json_path, value=rel, root=Path(root), resolved=candidate, reason=f"cannot be resolved ({why})"
        ) from err
    if resolved == real_root or resolved.is_relative_to(real_root):
        return resolved
    reason = _escape_reason(real_root, candidate)
    raise PathEscapeError(json_path=json_path, value=rel, root=Path(root), resolved=resolved, reason=reason)


def _path_values(node: object, path: str = "$") -> Iterator[tuple[str, str, bool]]:
    """(JSON path, value, is_dataset) of every path-valued string in the alloy."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = _child_path(path, key)
            if isinstance(value, str) and (key in PATH_KEYS or key.endswith(PATH_KEY_SUFFIXES)):
                yield child, value, False
            elif isinstance(value, str) and key in DATASET_KEYS:
                yield child, value, True
            else:
                yield from _path_values(value, child)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _path_values(item, f"{path}[{i}]")


def _lexical_escape(value: str) -> bool:
    normal = posixpath.normpath(value)
    return not value.startswith("/") and (normal == ".." or normal.startswith("../"))


def _check_paths(data: dict[str, Any], *, root: Path | None) -> Iterator[Finding]:
    for path, value, is_dataset in _path_values(data):
        if is_dataset and not is_local_path_like(value, root=root):
            continue  # a hub dataset id, not a file
        if root is None:
            if _lexical_escape(value):
                problem = "climbs out of the alloy's directory with '..'"
                yield _schema(path, value, problem, "use a relative path inside the alloy's directory")
            continue
        try:
            resolve_inside(root, value, json_path=path)
        except PathEscapeError as err:
            problem = f"{err.reason} and leaves {str(root)!r} (resolves to {excerpt(str(err.resolved))})"
            yield _schema(path, value, problem, f"use a relative path inside {str(root)!r}")
