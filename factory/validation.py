"""Checking an alloy file before it enters the line: parse level, then schema level.

Every problem becomes a `Finding` that names the JSON path (`$.stages[2].rank`),
the bad value and what to do, so a person can fix a recipe in one pass instead
of one traceback at a time. Plan-level checks (can this node run it, do the
files exist) build on this module and live elsewhere.

Levels, in order; a level runs only if the one before let the file parse:

1. parse: file name, UTF-8, JSON syntax (with line and column), top level is
   an object. Duplicate keys and NaN/Infinity are reported too: Python's
   json module accepts both, other JSON readers do not.
2. schema: the pydantic models of `factory.alloy` (types, ranges, required
   fields), then the consistency rules in `RULES` (fields that contradict
   each other), then paths that escape the alloy's root.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from factory.alloy import (
    ExpertActivationProfileStage,
    GENERIC_TAG,
    MOE_STAGE_TYPES,
    STAGE_TYPES,
    Alloy,
    ExpertPruneStage,
    LoraStage,
    Stage,
)
from factory.integrity import alloy_hash, model_hash
from factory.errors import PathEscapeError  # noqa: F401 - re-exported

Level = Literal["parse", "schema", "plan"]

# The rule for file names: an alloy file must end in `.json`. The line itself
# queues `<base>.alloy.json` (factory.protocol); published alloys are also
# named `forge-alloy.json` or `<name>.alloy@<commit>.json`, so anything more
# specific than `.json` would reject real recipes.
ALLOY_FILE_SUFFIX = ".json"
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


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Finding:
    """One problem in one place of one alloy."""

    level: Level
    path: str  # JSON path like "$.stages[1].level" ("$" for the whole file)
    value: object  # the offending value (or None); always JSON-serialisable
    message: str  # what is wrong, naming the JSON path and bad value
    fix: str  # what to do

    def __str__(self) -> str:
        return f"{self.path}: {self.message} (got {_short(self.value)}); fix: {self.fix}"


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
            "findings": [_finding_json(f) for f in self.findings],
        }


def _finding_json(finding: Finding) -> dict[str, Any]:
    data = asdict(finding)
    try:
        json.dumps(data["value"], allow_nan=False)
    except (TypeError, ValueError):
        data["value"] = repr(data["value"])
    return data


# ── entry points ────────────────────────────────────────────────────────────


def check_file(path: Path, *, root: Path | None = None) -> Report:
    """Read `path` once and check its bytes. Paths inside the alloy must stay
    within `root`, which defaults to the alloy's own directory."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        problem = f"$ cannot be read: {err.strerror or err}"
        return Report(file=path, findings=[_parse_finding(str(path), problem, "check the path and its permissions")])
    report = check_bytes(raw, file_name=path.name, root=root if root is not None else path.parent)
    report.file = path
    return report


def check_bytes(raw: bytes, *, file_name: str | None = None, root: Path | None = None) -> Report:
    """Check an alloy's bytes at parse and schema level.

    `file_name` enables the file-name rule. Without `root`, paths are only
    checked lexically (a `..` that climbs out); with it, they are resolved,
    symlinks included, and must stay inside `root`.
    """
    report = Report(file=None, raw=raw)
    if file_name is not None:
        report.findings.extend(_check_file_name(file_name))
    data, parse_findings = _parse(raw)
    report.findings.extend(parse_findings)
    if not isinstance(data, dict):
        return report
    alloy, schema_findings = _check_schema(data, root=root)
    report.findings.extend(schema_findings)
    report.alloy = alloy if not schema_findings else None
    return report


# ── parse level ─────────────────────────────────────────────────────────────


def _parse_finding(value: object, message: str, fix: str) -> Finding:
    return Finding("parse", "$", value, message, fix)


def _check_file_name(name: str) -> list[Finding]:
    if name.endswith(ALLOY_FILE_SUFFIX):
        return []
    stem = name.rsplit(".", 1)[0] if "." in name else name
    message = f"file name {name!r} does not end in {ALLOY_FILE_SUFFIX!r}"
    return [_parse_finding(name, message, f"rename it to {stem + '.alloy.json'!r}")]


class _JsonConstantError(ValueError):
    """NaN / Infinity: Python reads them, JSON does not have them."""


class _DuplicateKeys:
    """object_pairs_hook that remembers keys given twice in one object."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        self.seen.extend(sorted({k for k in keys if keys.count(k) > 1}))
        return dict(pairs)


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


def _reject_constant(name: str) -> float:
    raise _JsonConstantError(name)


def _syntax_finding(err: json.JSONDecodeError) -> Finding:
    lines = err.doc.splitlines()
    line_text = lines[err.lineno - 1].strip()[:80] if 0 < err.lineno <= len(lines) else ""
    where = f"line {err.lineno}, column {err.colno}"
    fix = f"correct the JSON at {where} (often a missing comma, quote or bracket)"
    return _parse_finding(line_text, f"$ is not valid JSON: {err.msg} at {where}", fix)


_UNPARSED = object()  # _load's data when the text is not JSON at all
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _load(text: str) -> tuple[object, list[Finding]]:
    """json.loads, with every way it can fail turned into a finding."""
    dupes = _DuplicateKeys()
    try:
        data = json.loads(text, object_pairs_hook=dupes, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        return _UNPARSED, [_syntax_finding(err)]
    except _JsonConstantError as err:
        return _UNPARSED, [_parse_finding(str(err), f"$ contains {err}, which is not a JSON value", "write a number, or null")]
    except RecursionError:
        return _UNPARSED, [_parse_finding(None, "$ is nested too deeply to read", "flatten the structure")]
    message = "$ has the key {!r} twice in one object; readers disagree on which one wins"
    return data, [_parse_finding(k, message.format(k), f"keep one {k!r}") for k in dupes.seen]


def _parse(raw: bytes) -> tuple[object, list[Finding]]:
    """Decode and parse; the data is None when it cannot be parsed."""
    text, findings = _decode(raw)
    if text is None:
        return None, findings
    data, load_findings = _load(text)
    findings.extend(load_findings)
    if data is _UNPARSED:
        return None, findings
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), "null")
        message = f"$ is a JSON {kind}, but an alloy is a JSON object"
        fix = 'wrap the recipe in { ... } with "name", "version", "source" and "stages"'
        findings.append(_parse_finding(_short(data, 60), message, fix))
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
    parts = ["$"]
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif _IDENT.match(part):
            parts.append(f".{part}")
        else:
            parts.append(f"[{json.dumps(part)}]")
    return "".join(parts)


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
        what, fix = (t.format(key=json.dumps(key), **ctx) for t in _ERROR_TEXT[err["type"]])
    else:  # a pydantic error we have no wording for: its own text is still precise
        what, fix = err["msg"], f"see the forge-alloy schema for {json.dumps(key)}"
    stage = f" in the {loc[2]} stage" if _stage_model(loc) is not None else ""
    head = path if err["type"] == "missing" else f"{path} = {_short(value, 60)}"
    return Finding("schema", path, value, f"{head} {what}{stage}", fix)


def _check_schema(data: dict[str, Any], *, root: Path | None) -> tuple[Alloy | None, list[Finding]]:
    try:
        alloy = Alloy.model_validate(data)
    except ValidationError as exc:
        return None, [_finding_from_error(e) for e in exc.errors()]
    findings = [f for rule in RULES for f in rule(alloy)]
    findings.extend(_check_paths(data, root=root))
    return alloy, findings


# ── schema level: consistency rules ─────────────────────────────────────────

Rule = Callable[[Alloy], Iterator[Finding]]


def _stages(alloy: Alloy, kind: type[Stage]) -> Iterator[tuple[str, Any]]:
    """(JSON path, stage) for each stage of a model class."""
    for i, stage in enumerate(alloy.stages):
        if isinstance(stage, kind):
            yield f"$.stages[{i}]", stage


def _schema(path: str, value: object, message: str, fix: str) -> Finding:
    return Finding("schema", path, value, f"{path} = {_short(value, 60)}: {message}", fix)


def rule_moe_stages_need_moe(alloy: Alloy) -> Iterator[Finding]:
    """Expert stages on a model the alloy itself calls dense cannot work."""
    if alloy.source.is_moe is not False:
        return
    for i, stage in enumerate(alloy.stages):
        if stage.type in MOE_STAGE_TYPES:
            problem = (
                f"the source is declared dense, but $.stages[{i}] is an {stage.type} stage, "
                "which needs a mixture-of-experts model"
            )
            fix = f"set source.isMoE to true if {alloy.source.base_model} is an MoE; otherwise remove $.stages[{i}]"
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
    for path, stage in _stages(alloy, LoraStage):
        for short, long in (("rank", "lora_rank"), ("alpha", "lora_alpha")):
            a, b = getattr(stage, short), getattr(stage, long)
            if a is not None and b is not None and a != b:
                alias = LoraStage.model_fields[long].alias
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


RULES: tuple[Rule, ...] = (
    rule_moe_stages_need_moe,
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
    return root is not None and bool(s) and (root / s).exists()


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
        raise PathEscapeError(
            json_path=json_path, value=rel, root=Path(root), resolved=candidate, reason=f"cannot be resolved ({err})"
        ) from err
    if resolved == real_root or resolved.is_relative_to(real_root):
        return resolved
    reason = _escape_reason(real_root, candidate)
    raise PathEscapeError(json_path=json_path, value=rel, root=Path(root), resolved=resolved, reason=reason)


def _path_values(node: object, path: str = "$") -> Iterator[tuple[str, str, bool]]:
    """(JSON path, value, is_dataset) of every path-valued string in the alloy."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if _IDENT.match(key) else f"{path}[{json.dumps(key)}]"
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
            problem = f"{err.reason} and leaves {str(root)!r} (resolves to {str(err.resolved)!r})"
            yield _schema(path, value, problem, f"use a relative path inside {str(root)!r}")
