"""Parse- and schema-level checking: the corpus passes, each bad input is named.

Every bad case is a real file written to a temp dir: a valid base alloy with
one mutation (or raw bytes for parse errors), checked with `check_file`.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from factory.alloy import Alloy
from factory.integrity import model_hash
from factory.protocol import MAX_BASE_CHARS, check_base, parse_part
from factory.validation import (
    EXCERPT_CHARS,
    MAX_ALLOY_BYTES,
    MAX_FINDINGS,
    MAX_JSON_VALUES,
    SYNTAX_EXCERPT_CHARS,
    Finding,
    PathEscapeError,
    Report,
    check_bytes,
    check_file,
    excerpt,
    is_local_path_like,
    resolve_inside,
)

from tests.shared_corpus import CORPUS
CORPUS_FILES = sorted((CORPUS / "alloys").glob("*.json")) + sorted((CORPUS / "alloy_versions").glob("*.json"))
REPO = Path(__file__).resolve().parent.parent

# A valid alloy touching every rule: MoE source with top-k 8 of 64 experts.
BASE: dict = {
    "name": "olmoe-test",
    "version": "1.0.0",
    "source": {
        "baseModel": "allenai/OLMoE-1B-7B-0924-Instruct",
        "architecture": "olmoe",
        "isMoE": True,
        "numExpertsPerLayer": 64,
        "numActivatedExperts": 8,
    },
    "stages": [
        {"type": "prune", "strategy": "entropy", "level": 0.3},  # 0
        {"type": "train", "domain": "code", "dataset": "m-a-p/CodeFeedback-Filtered-Instruction", "steps": 100, "learningRate": "2e-4"},  # 1
        {"type": "lora", "rank": 16, "alpha": 32, "learningRate": "1e-4"},  # 2
        {"type": "expert-activation-profile", "calibrationCorpus": "code300", "calibrationCorpusFile": "calibration/code300.jsonl"},  # 3
        {"type": "expert-prune", "keepExpertsPerLayer": 48, "originalExpertsPerLayer": 64, "prunePct": 25.0},  # 4
        {"type": "selftest", "seconds": 0.2, "steps": 4, "outcome": "pass"},  # 5
        {"type": "quant", "format": "gguf", "quantTypes": ["Q4_K_M"]},  # 6
        {"type": "eval", "benchmarks": [{"name": "humaneval"}]},  # 7
        {"type": "deliver"},  # 8
    ],
    "priority": 3,
    "calibrationCorpora": [{"name": "code300", "path": "calibration/code300.jsonl", "sha256": "a" * 64, "format": "jsonl", "textField": "text"}],
    "results": {
        "integrity": {
            "fileHashes": [{"filename": "model.safetensors", "sha256": "b" * 64, "size": 10}],
            "modelHash": model_hash({"model.safetensors": "b" * 64}),
        }
    },
    "receipt": {"issuedAt": "2026-04-08T16:36:55.037319+00:00"},
}


def _set(path: str, value: object) -> Callable[[dict], None]:
    """Mutation setting a dotted path ("stages.0.level"); `DELETE` removes it."""
    *parents, last = path.split(".")

    def mutate(data: dict) -> None:
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value

    return mutate


DELETE = object()


def _symlink_out(root: Path) -> None:
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    os.symlink(outside, root / "calibration")


@dataclass
class Case:
    id: str
    level: str
    path: str
    fragment: str
    mutate: Callable[[dict], None] | None = None
    raw: bytes | None = None
    file_name: str = "case.alloy.json"
    setup: Callable[[Path], None] | None = None
    only: bool = True  # the mutation must produce exactly this one finding


CASES = [
    # ── parse level ──
    Case("json-missing-comma", "parse", "$", "line 3, column 3", raw=b'{\n  "name": "x"\n  "version": "1"\n}'),
    Case("json-trailing-comma", "parse", "$", "line 1, column 12", raw=b'{"name": 1,}'),
    Case("json-empty-file", "parse", "$", "line 1, column 1", raw=b""),
    Case("not-an-object-array", "parse", "$", "is a JSON array", raw=b"[1, 2]"),
    Case("not-an-object-string", "parse", "$", "is a JSON string", raw=b'"alloy"'),
    Case("wrong-file-name", "parse", "$", "does not end in '.json'", file_name="case.alloy.yaml"),
    Case("non-utf8", "parse", "$", "not UTF-8: byte ff at line 2, column 11", raw=b'{\n "name": "\xff"}'),
    Case("nan-constant", "parse", "$.name", "NaN is not a JSON value", raw=b'{"name": NaN}'),
    Case("duplicate-key", "parse", "$", "key 'name' twice", raw=b'{"name": "a", "name": "b"}', only=False),
    Case("byte-order-mark", "parse", "$", "byte-order mark", raw=b"\xef\xbb\xbf" + json.dumps(BASE).encode()),
    # ── schema level: structure ──
    Case("stages-missing", "schema", "$.stages", "is missing", _set("stages", DELETE)),
    Case("stages-not-a-list", "schema", "$.stages", "must be a list", _set("stages", {"type": "prune"})),
    Case("stages-empty", "schema", "$.stages", "is empty", _set("stages", [])),
    Case("stage-without-type", "schema", "$.stages[8].type", "is missing", _set("stages.8.type", DELETE)),
    Case("stage-type-not-string", "schema", "$.stages[8].type", "must be a string", _set("stages.8.type", 7)),
    Case("stage-not-an-object", "schema", "$.stages[8]", "must be an object", _set("stages.8", "deliver")),
    Case("source-missing", "schema", "$.source", "required", _set("source", DELETE)),
    Case("source-basemodel-missing", "schema", "$.source.baseModel", "required", _set("source.baseModel", DELETE)),
    Case("source-architecture-type", "schema", "$.source.architecture", "must be a string", _set("source.architecture", ["olmoe"])),
    Case("source-ismoe-type", "schema", "$.source.isMoE", "must be true or false", _set("source.isMoE", "yes")),
    Case("name-type", "schema", "$.name", "must be a string", _set("name", 12)),
    Case("priority-string", "schema", "$.priority", "must be a whole number", _set("priority", "high")),
    # ── schema level: stage ranges ──
    Case("prune-level-high", "schema", "$.stages[0].level", "at most 0.9", _set("stages.0.level", 1.5)),
    Case("prune-level-negative", "schema", "$.stages[0].level", "at least 0", _set("stages.0.level", -0.1)),
    Case("prune-level-missing", "schema", "$.stages[0].level", "required", _set("stages.0.level", DELETE)),
    Case("lora-rank-zero", "schema", "$.stages[2].rank", "at least 1", _set("stages.2.rank", 0)),
    Case("lora-rank-huge", "schema", "$.stages[2].rank", "at most 256", _set("stages.2.rank", 512)),
    Case("lora-rank-string", "schema", "$.stages[2].rank", "whole number", _set("stages.2.rank", "16")),
    Case("keep-experts-zero", "schema", "$.stages[4].keepExpertsPerLayer", "at least 1", _set("stages.4.keepExpertsPerLayer", 0)),
    Case("learning-rate-abc", "schema", "$.stages[1].learningRate", "not a number", _set("stages.1.learningRate", "abc")),
    Case("learning-rate-negative", "schema", "$.stages[1].learningRate", "positive", _set("stages.1.learningRate", -0.001)),
    Case("train-steps-zero", "schema", "$.stages[1].steps", "at least 1", _set("stages.1.steps", 0)),
    Case("selftest-outcome", "schema", "$.stages[5].outcome", "must be one of 'pass', 'fail', 'crash'", _set("stages.5.outcome", "explode")),
    Case("selftest-steps-zero", "schema", "$.stages[5].steps", "at least 1", _set("stages.5.steps", 0)),
    Case("selftest-seconds-negative", "schema", "$.stages[5].seconds", "at least 0", _set("stages.5.seconds", -1)),
    Case("timeout-zero", "schema", "$.stages[1].timeoutSeconds", "above 0", _set("stages.1.timeoutSeconds", 0)),
    Case("quant-types-empty", "schema", "$.stages[6].quantTypes", "at least 1 item", _set("stages.6.quantTypes", [])),
    Case("eval-benchmarks-missing", "schema", "$.stages[7].benchmarks", "required", _set("stages.7.benchmarks", DELETE)),
    Case("bad-timestamp", "schema", "$.receipt.issuedAt", "ISO 8601", _set("receipt.issuedAt", "last tuesday")),
    Case("file-hash-prefixed", "schema", "$.results.integrity.fileHashes[0].sha256", "not a sha256 digest", _set("results.integrity.fileHashes.0.sha256", "sha256:" + "b" * 64)),
    # ── schema level: consistency ──
    Case("dense-with-expert-prune", "schema", "$.source.isMoE", "expert-prune stage", _set("source.isMoE", False), only=False),
    Case("keep-below-top-k", "schema", "$.stages[4].keepExpertsPerLayer", "top-k of 8", _set("stages.4.keepExpertsPerLayer", 4), only=False),
    Case("keep-above-original", "schema", "$.stages[4].keepExpertsPerLayer", "more than the 64 experts", _set("stages.4.keepExpertsPerLayer", 80)),
    Case("prune-pct-contradicts", "schema", "$.stages[4].prunePct", "contradicts keepExpertsPerLayer = 48 of 64", _set("stages.4.prunePct", 50.0)),
    Case("keep-experts-spellings-disagree", "schema", "$.stages[4].keepExperts", "contradicts keepExpertsPerLayer = 48", _set("stages.4.keepExperts", 32)),
    Case("original-contradicts-source", "schema", "$.stages[4].originalExpertsPerLayer", "numExpertsPerLayer = 64", _set("stages.4.originalExpertsPerLayer", 128), only=False),
    Case("expert-prune-without-keep", "schema", "$.stages[4].keepExpertsPerLayer", "how many experts", _set("stages.4.keepExpertsPerLayer", DELETE)),
    Case("lora-rank-spellings-disagree", "schema", "$.stages[2].loraRank", "contradicts rank = 16", _set("stages.2.loraRank", 8)),
    Case("model-hash-mismatch", "schema", "$.results.integrity.modelHash", "not the hash of its fileHashes", _set("results.integrity.modelHash", "sha256:" + "0" * 64)),
    Case("calibration-corpus-without-path", "schema", "$.calibrationCorpora[0].path", "needs a file", _set("calibrationCorpora.0.path", DELETE)),
    # ── schema level: paths ──
    Case("path-dotdot-escape", "schema", "$.calibrationCorpora[0].path", "climbs out with '..'", _set("calibrationCorpora.0.path", "../../etc/passwd")),
    Case("path-absolute-outside", "schema", "$.stages[3].calibrationCorpusFile", "is absolute", _set("stages.3.calibrationCorpusFile", "/etc/passwd")),
    Case("dataset-path-escape", "schema", "$.stages[1].dataset", "climbs out with '..'", _set("stages.1.dataset", "../../data/train.jsonl")),
    Case("path-nul-byte", "schema", "$.calibrationCorpora[0].path", "cannot be resolved", _set("calibrationCorpora.0.path", "a\x00b")),
    Case("impossible-date", "schema", "$.receipt.issuedAt", "ISO 8601", _set("receipt.issuedAt", "2026-02-30")),
    Case("path-symlink-out", "schema", "$.calibrationCorpora[0].path", "goes through a symlink", setup=_symlink_out, only=False),
]


def _write_case(case: Case, root: Path) -> Path:
    if case.raw is not None:
        raw = case.raw
    else:
        data = copy.deepcopy(BASE)
        if case.mutate is not None:
            case.mutate(data)
        raw = json.dumps(data, indent=2).encode()
    path = root / case.file_name
    path.write_bytes(raw)
    if case.setup is not None:
        case.setup(root)
    return path


def test_base_alloy_is_valid(tmp_path: Path) -> None:
    report = check_file(_write_case(Case("base", "", "", ""), tmp_path))
    assert report.findings == []
    assert isinstance(report.alloy, Alloy)


def test_enough_bad_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_named(case: Case, tmp_path: Path) -> None:
    report = check_file(_write_case(case, tmp_path))
    assert not report.ok
    matching = [f for f in report.findings if f.level == case.level and f.path == case.path and case.fragment in f.message]
    assert matching, "\n".join(map(str, report.findings))
    if case.only:
        assert len(report.findings) == 1, "\n".join(map(str, report.findings))
    finding = matching[0]
    assert finding.fix
    if case.path != "$":
        assert finding.path in finding.message  # the message names the JSON path
    if case.level == "schema":
        assert report.alloy is None


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name[-60:])
def test_corpus_alloy_has_zero_findings(path: Path) -> None:
    report = check_file(path)
    assert report.findings == [], "\n".join(map(str, report.findings))
    assert report.alloy is not None
    assert report.raw == path.read_bytes()


def test_finding_str_is_one_line() -> None:
    finding = Finding("schema", "$.stages[1].level", 1.5, "$.stages[1].level = 1.5 must be at most 0.9", "use a value between 0.0 and 0.9")
    assert str(finding) == "$.stages[1].level = 1.5 must be at most 0.9; fix: use a value between 0.0 and 0.9"
    assert "\n" not in str(finding)


def test_report_to_json_is_serialisable() -> None:
    report = check_bytes(b'{\n "name": "\xff"}', file_name="x.alloy.json")
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False
    assert data["alloyHash"].startswith("sha256:")
    assert data["findings"][0]["level"] == "parse"
    assert data["findings"][0]["value"] == "ff"  # the bad byte, as hex text


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_finding_values_are_json_safe(case: Case, tmp_path: Path) -> None:
    """Intake writes findings into error.json: values must serialise as is."""
    report = check_file(_write_case(case, tmp_path))
    json.dumps([f.value for f in report.findings], allow_nan=False)


def test_check_bytes_without_root_still_catches_dotdot() -> None:
    data = copy.deepcopy(BASE)
    data["calibrationCorpora"][0]["path"] = "../outside.jsonl"
    report = check_bytes(json.dumps(data).encode())
    assert [f.path for f in report.findings] == ["$.calibrationCorpora[0].path"]
    data["calibrationCorpora"][0]["path"] = "/abs/inside/maybe.jsonl"  # unknowable without a root
    assert check_bytes(json.dumps(data).encode()).ok


def test_hub_dataset_ids_are_not_paths(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["stages"][1]["dataset"] = "Salesforce/wikitext"
    assert check_bytes(json.dumps(data).encode(), root=tmp_path).ok


def test_check_file_reports_unreadable_file(tmp_path: Path) -> None:
    report = check_file(tmp_path / "absent.alloy.json")
    assert isinstance(report, Report) and report.raw is None
    assert report.findings[0].level == "parse" and "cannot be read" in report.findings[0].message


def test_multiple_problems_are_reported_together() -> None:
    data = copy.deepcopy(BASE)
    data["stages"][0]["level"] = 2
    data["stages"][2]["rank"] = 0
    data["priority"] = "high"
    paths = {f.path for f in check_bytes(json.dumps(data).encode()).findings}
    assert paths == {"$.stages[0].level", "$.stages[2].rank", "$.priority"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m-a-p/CodeFeedback-Filtered-Instruction", False),
        ("wikitext-2", False),
        ("heldout_mix.jsonl (50 examples: code/math/science)", False),
        ("calibration/heldout_code300.jsonl", True),
        ("./data", True),
        ("../data", True),
        ("/srv/data", True),
        ("~/data", True),
        ("a/../../b", True),
        ("shards/train.parquet", True),
    ],
)
def test_is_local_path_like(text: str, expected: bool) -> None:
    assert is_local_path_like(text) is expected


def test_is_local_path_like_sees_existing_local_dirs(tmp_path: Path) -> None:
    (tmp_path / "myorg" / "mydata").mkdir(parents=True)
    assert is_local_path_like("myorg/mydata", root=tmp_path)
    assert not is_local_path_like("myorg/other", root=tmp_path)


def test_resolve_inside_accepts_paths_inside(tmp_path: Path) -> None:
    assert resolve_inside(tmp_path, "a/b.jsonl", json_path="$.x") == tmp_path.resolve() / "a" / "b.jsonl"
    assert resolve_inside(tmp_path, str(tmp_path / "c"), json_path="$.x") == tmp_path.resolve() / "c"
    assert resolve_inside(tmp_path, "a/../b", json_path="$.x") == tmp_path.resolve() / "b"


@pytest.mark.parametrize(
    ("rel", "reason"),
    [("../x", "climbs out with '..'"), ("/etc/passwd", "is absolute"), ("link/passwd", "goes through a symlink")],
)
def test_resolve_inside_raises_with_attributes(tmp_path: Path, rel: str, reason: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/etc", root / "link")
    with pytest.raises(PathEscapeError, match="fix: use a relative path inside") as info:
        resolve_inside(root, rel, json_path="$.calibrationCorpora[0].path")
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.json_path, err.value, err.root, err.reason) == ("$.calibrationCorpora[0].path", rel, root, reason)


# ── hostile files: never read what is not a regular alloy-sized file ───────


def _cli_validate(path: Path) -> subprocess.CompletedProcess:
    """`factory validate PATH` in a real process; the timeout is the hang guard
    (a FIFO that were opened for reading would block forever)."""
    return subprocess.run([sys.executable, "-m", "factory.cli", "validate", str(path)], capture_output=True,
                          text=True, timeout=30, cwd=REPO)


def test_cli_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "part.alloy.json"
    os.mkfifo(fifo)
    done = _cli_validate(fifo)
    assert done.returncode == 2, done.stderr
    assert "is a FIFO (named pipe), not a regular file; it was not read" in done.stdout


def test_cli_refuses_dev_zero_without_reading_it() -> None:
    done = _cli_validate(Path("/dev/zero"))
    assert done.returncode == 2, done.stderr
    assert "/dev/zero: parse: $ is a character device, not a regular file" in done.stdout
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr


def test_directory_and_socket_are_not_read(tmp_path: Path) -> None:
    (tmp_path / "dir.alloy.json").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.alloy.json"))
    try:
        for name, kind in (("dir.alloy.json", "a directory"), ("sock.alloy.json", "a socket")):
            [finding] = check_file(tmp_path / name).findings
            assert f"$ is {kind}, not a regular file" in finding.message and finding.fix
    finally:
        sock.close()


def test_oversize_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.alloy.json"
    with path.open("wb") as f:
        f.truncate(MAX_ALLOY_BYTES + 1)  # sparse: the size is what counts
    report = check_file(path)
    assert report.raw is None
    [finding] = report.findings
    assert finding.value == MAX_ALLOY_BYTES + 1
    assert f"$ is {MAX_ALLOY_BYTES + 1} bytes, larger than the limit of {MAX_ALLOY_BYTES} bytes" in finding.message


def test_check_bytes_refuses_oversize_input_unparsed() -> None:
    raw = json.dumps(BASE).encode() + b" " * MAX_ALLOY_BYTES
    report = check_bytes(raw, file_name="x.alloy.json")
    assert [f.value for f in report.findings] == [len(raw)] and report.alloy is None
    assert "larger than the limit" in report.findings[0].message
    assert check_bytes(json.dumps(BASE).encode().ljust(MAX_ALLOY_BYTES)).ok  # at the limit: fine


def test_absurdly_many_values_stop_before_the_schema() -> None:
    data = copy.deepcopy(BASE)
    data["stages"] = [{}] * (MAX_JSON_VALUES + 1)
    [finding] = check_bytes(json.dumps(data).encode()).findings
    assert finding.level == "parse" and f"more than {MAX_JSON_VALUES} JSON values" in finding.message


def test_many_bad_items_give_a_bounded_report() -> None:
    data = copy.deepcopy(BASE)
    data["stages"] = [{"type": "prune", "strategy": "entropy", "level": 5}] * 1000
    findings = check_bytes(json.dumps(data).encode()).findings
    assert len(findings) == MAX_FINDINGS
    assert findings[-1].message == f"$: {1000 - MAX_FINDINGS + 1} more finding(s) not listed"


# ── numbers other JSON readers cannot hold ──────────────────────────────────


def _with(path: str, token: str) -> bytes:
    """BASE with the value at a dotted path replaced by a raw JSON token."""
    data = copy.deepcopy(BASE)
    _set(path, "@@TOKEN@@")(data)
    return json.dumps(data).replace('"@@TOKEN@@"', token).encode()


@pytest.mark.parametrize(("path", "token", "json_path", "fragment"), [
    ("stages.1.steps", "1" * 5000, "$.stages[1].steps", "integer of 5000 digits"),
    ("priority", "-" + "9" * 5000, "$.priority", "integer of 5000 digits"),
    ("priority", str(2**63), "$.priority", "outside the 64-bit range"),
    ("priority", str(-(2**63) - 1), "$.priority", "outside the 64-bit range"),
    ("stages.5.seconds", "1e999", "$.stages[5].seconds", "overflows to infinity"),
    ("stages.0.level", "-1e999", "$.stages[0].level", "overflows to infinity"),
    ("stages.0.level", "NaN", "$.stages[0].level", "NaN is not a JSON value"),
    ("stages.5.seconds", "Infinity", "$.stages[5].seconds", "Infinity is not a JSON value"),
    ("results.integrity.fileHashes.0.size", "-Infinity", "$.results.integrity.fileHashes[0].size",
     "-Infinity is not a JSON value"),
])
def test_numbers_beyond_json_are_findings_at_their_path(path: str, token: str, json_path: str, fragment: str) -> None:
    report = check_bytes(_with(path, token), file_name="x.alloy.json")
    [finding] = report.findings
    assert (finding.level, finding.path) == ("parse", json_path)
    assert fragment in finding.message and finding.fix
    assert len(finding.value) <= 24 and len(finding.message) < 200  # an excerpt, not 5000 digits
    assert report.alloy is None
    json.dumps(report.to_json(), allow_nan=False)


def test_many_bad_numbers_give_a_bounded_report() -> None:
    findings = check_bytes(b"[" + b",".join([b"NaN"] * 5000) + b"]").findings
    assert len(findings) == MAX_FINDINGS and findings[0].path == "$[0]"
    assert findings[-1].message == f"$: {5000 - MAX_FINDINGS + 1} more finding(s) not listed"


def test_numbers_at_the_64_bit_edges_are_fine() -> None:
    assert check_bytes(_with("priority", str(2**63 - 1))).ok
    assert check_bytes(_with("priority", str(-(2**63)))).ok
    assert check_bytes(_with("stages.5.seconds", "1e-999")).ok  # underflows to 0.0: finite


# ── findings quote only short escaped excerpts ──────────────────────────────


def _assert_short_and_escaped(finding: Finding) -> None:
    if isinstance(finding.value, str):
        assert len(finding.value) <= EXCERPT_CHARS and finding.value.isprintable(), finding.value
    for text in (finding.path, finding.message, finding.fix):
        assert text.isprintable() and len(text) <= 1000, text


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_case_quotes_only_excerpts(case: Case, tmp_path: Path) -> None:
    for finding in check_file(_write_case(case, tmp_path)).findings:
        _assert_short_and_escaped(finding)


def test_a_secret_that_is_not_json_is_barely_quoted(tmp_path: Path) -> None:
    """A symlink to a secret dropped as an alloy: the syntax error names line
    and column and quotes a few characters, never the line."""
    secret = "hunter2-TOPSECRET-0123456789abcdef"
    (tmp_path / "secret.txt").write_text(f"{secret}\nmore: secrets\n")
    os.symlink(tmp_path / "secret.txt", tmp_path / "drop.alloy.json")
    report = check_file(tmp_path / "drop.alloy.json")
    [finding] = report.findings
    assert "line 1, column 1" in finding.message
    dumped = json.dumps(report.to_json()) + str(finding)
    assert secret[:SYNTAX_EXCERPT_CHARS] in dumped and secret[: SYNTAX_EXCERPT_CHARS + 1] not in dumped
    assert "more: secrets" not in dumped


def test_syntax_error_quotes_where_it_breaks() -> None:
    [finding] = check_bytes(b'{\n  "name": "x"\n  "version": "1"\n}').findings
    assert finding.message == ("$ is not valid JSON: Expecting ',' delimiter at line 3, column 3 "
                               "(near '\"version\": \"')")


@pytest.mark.parametrize(("mutate", "json_path"), [
    (_set("priority", "A" * 100_000), "$.priority"),
    (_set("priority", "\x1b[31mred\x1b[0m\n" * 3), "$.priority"),
    (_set("stages.0.level", ["x" * 1000] * 100), "$.stages[0].level"),
    (_set("acceptanceCriteria", {"benchmarks": {"k" * 10_000 + "\n": {"min": 7}}}), None),
    (_set("calibrationCorpora.0.path", "../" + "d/" * 20_000 + "x.jsonl"), "$.calibrationCorpora[0].path"),
    (_set("calibrationCorpora.0.path", "/" + "a" * 5000 + "/x.jsonl"), "$.calibrationCorpora[0].path"),
])
def test_long_or_control_values_are_excerpted(mutate: Callable[[dict], None], json_path: str | None,
                                              tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    mutate(data)
    findings = check_bytes(json.dumps(data).encode(), root=tmp_path).findings
    assert findings
    for finding in findings:
        _assert_short_and_escaped(finding)
        assert "\x1b" not in json.dumps(finding.value) + finding.message
        assert len(finding.path) < 120
    if json_path is not None:
        assert json_path in [f.path for f in findings]


def test_a_huge_duplicate_key_is_excerpted() -> None:
    key = "k" * 50_000
    [finding] = check_bytes(f'{{"{key}": 1, "{key}": 2}}'.encode()).findings[:1]
    _assert_short_and_escaped(finding)
    assert "twice in one object" in finding.message


def test_findings_built_anywhere_store_excerpts() -> None:
    """Finding itself enforces the rule, whoever builds one (plan, stations)."""
    finding = Finding("plan", "$.x", {"deep": ["\x00" * 500]}, "bad \x1b[2J thing\nsecond line", "fix\tit")
    assert isinstance(finding.value, str) and len(finding.value) <= EXCERPT_CHARS
    assert finding.message == "bad \\x1b[2J thing\\nsecond line" and finding.fix == "fix\\tit"
    assert Finding("plan", "$", float("inf"), "m", "f").value == "inf"
    assert Finding("plan", "$", 12, "m", "f").value == 12 and Finding("plan", "$", "ok", "m", "f").value == "ok"
    assert excerpt("x" * 500) == "'" + "x" * 78 + "…"


# ── one spelling per field ──────────────────────────────────────────────────


@pytest.mark.parametrize(("mutate", "json_path", "alias"), [
    (_set("stages.5.timeout_seconds", 5), "$.stages[5].timeout_seconds", "timeoutSeconds"),
    (_set("stages.1.learning_rate", "1e-4"), "$.stages[1].learning_rate", "learningRate"),
    (_set("source.num_layers", 16), "$.source.num_layers", "numLayers"),
    (_set("source.is_moe", True), "$.source.is_moe", "isMoE"),
    (_set("calibrationCorpora.0.text_field", "text"), "$.calibrationCorpora[0].text_field", "textField"),
    (_set("results.integrity.trust_level", "x"), "$.results.integrity.trust_level", "trustLevel"),
    (_set("results.integrity.fileHashes.0.x", 1), None, None),  # an unknown key: allowed
    (_set("stages.7.benchmarks.0.n_shot", 0), "$.stages[7].benchmarks[0].n_shot", "nShot"),
    (_set("acceptanceCriteria", {"benchmarks": {"humaneval": {"anchor_delta": 0.1}}}),
     "$.acceptanceCriteria.benchmarks.humaneval.anchor_delta", "anchorDelta"),
    (_set("stages.8", {"type": "many-worlds", "timeout_seconds": 5}), "$.stages[8].timeout_seconds",
     "timeoutSeconds"),  # an unknown stage type still has the common fields
    (_set("user_summary", "x"), "$.user_summary", "userSummary"),
])
def test_python_spelling_of_a_schema_key_is_a_finding(mutate, json_path: str | None, alias: str | None) -> None:
    data = copy.deepcopy(BASE)
    mutate(data)
    report = check_bytes(json.dumps(data).encode())
    if json_path is None:
        assert report.ok, report.findings
        return
    [finding] = report.findings
    assert (finding.level, finding.path, finding.fix) == ("schema", json_path, f"rename it to {alias}")
    assert f"{json_path}: unknown spelling of {alias}" in finding.message
    assert report.alloy is None


def test_required_key_in_python_spelling_names_the_rename() -> None:
    data = copy.deepcopy(BASE)
    data["source"]["base_model"] = data["source"].pop("baseModel")
    [finding] = check_bytes(json.dumps(data).encode()).findings
    assert finding.path == "$.source.baseModel" and "'base_model', the Python spelling" in finding.message
    assert finding.fix == "rename 'base_model' to 'baseModel'"


def test_unknown_extras_keep_zero_findings() -> None:
    data = copy.deepcopy(BASE)
    data["_note"], data["priorMetricBaselines"] = "kept", [{"any_thing": 1}]
    data["stages"][0]["some_future_field"] = {"timeout_seconds": 1}  # inside an extra: not schema
    assert check_bytes(json.dumps(data).encode()).ok


# ── file names ──────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("name", "shown", "suggested"), [
    ("x.alloy.json\n", "'x.alloy.json\\n'", "x.alloy.json"),
    (" x.alloy.json", "' x.alloy.json'", "x.alloy.json"),
    ("case.alloy.yaml", "'case.alloy.yaml'", "case.alloy.json"),
    ("qwen3.5-4b", "'qwen3.5-4b'", "qwen3.5-4b.alloy.json"),
    ("my recipe.txt", "'my recipe.txt'", "my-recipe.alloy.json"),
    ("\x1b[31mevil\x1b[0m.json\r", "'\\x1b[31mevil\\x1b[0m.json\\r'", "31mevil-0m.alloy.json"),
    ("a\x00b.json", "'a\\x00b.json'", "a-b.alloy.json"),
    ("x.retry2.alloy.json\t", "'x.retry2.alloy.json\\t'", "x.alloy.json"),
    ("\n", "'\\n'", "alloy.alloy.json"),
    ("n" * 300 + ".yml", None, "n" * MAX_BASE_CHARS + ".alloy.json"),
])
def test_bad_file_names_get_a_valid_escaped_rename(name: str, shown: str | None, suggested: str) -> None:
    [finding] = check_bytes(json.dumps(BASE).encode(), file_name=name).findings
    assert finding.fix == f"rename it to {suggested!r}"
    assert parse_part(suggested) is not None and check_base(suggested.removesuffix(".alloy.json")) is None
    if shown is not None:
        assert f"file name {shown} " in finding.message
    _assert_short_and_escaped(finding)


def test_deep_nesting_in_free_form_fields_is_fine() -> None:
    data = copy.deepcopy(BASE)
    raw = json.dumps(data).encode()[:-1] + b', "target": ' + b'{"a": ' * 900 + b"1" + b"}" * 900 + b"}"
    assert check_bytes(raw).ok
    [finding] = check_bytes(b"[" * 100_000 + b"]" * 100_000).findings
    assert "nested too deeply" in finding.message


def test_a_dataset_name_too_long_for_the_kernel_is_a_finding_not_a_traceback(tmp_path):
    from factory.validation import check_bytes

    alloy = {"name": "x", "version": "1.0.0", "source": {"baseModel": "selftest", "architecture": "selftest"},
             "stages": [{"type": "train", "dataset": "a" * 5000, "steps": 1}]}
    report = check_bytes(json.dumps(alloy).encode(), root=tmp_path)
    assert all(len(str(f)) < 2500 for f in report.findings)
