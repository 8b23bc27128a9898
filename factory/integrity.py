"""All hashing in one place: alloy hash, file sha256, modelHash, verification.

Conventions, matched against the published alloys in the corpus:

* `alloyHash` is `"sha256:" + sha256(file bytes)`. The hash is of the bytes
  as they sit on disk, never of a re-serialised model: re-serialising changes
  whitespace, key order and float spelling, so it would not reproduce. The
  first 16 hex characters are what forge-alloy's `verify#<hash16>` URLs use.
  (Some older receipts hold a hash of `json.dumps(alloy without receipt,
  indent=2)`; that is theirs to reproduce, not ours.)
* `fileHashes` entries are `{"filename", "sha256", "size"}` with bare hex.
* `modelHash` is `"sha256:" + sha256` of the compact, key-sorted JSON of
  `[{"filename": f, "sha256": h}, ...]` sorted by filename (`size` is left out).
  Every modelHash beside fileHashes in the corpus recomputes this way. Older
  alloys have a legacy modelHash: the raw sha256 of their single shard.

Nothing here imports torch: the daemon imports this module.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal
from factory.errors import VerifyInputError  # noqa: F401 - re-exported

HASH_PREFIX = "sha256:"
# 1 MiB: large enough that syscall overhead vanishes on multi-GB shards, small
# enough to stay cache-friendly.
DEFAULT_CHUNK = 1 << 20
# What makes up a model for hashing: its weight files, and only those. This is
# the corpus convention (fileHashes list *.safetensors shards and *.gguf files,
# never config.json or tokenizer files), so our modelHash agrees with
# published ones. Config and tokenizer stay covered by the alloy's own hash
# when they are generated from it.
MODEL_FILE_GLOBS = ("*.safetensors", "*.gguf")
# Names an alloy has inside a model directory.
ALLOY_FILE_GLOBS = ("*.alloy.json", "forge-alloy.json")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ── hashing primitives ──────────────────────────────────────────────────────


def alloy_hash(raw: bytes) -> str:
    """`sha256:<hex>` of an alloy file's exact bytes (the alloy's own
    `alloyHash` convention)."""
    return HASH_PREFIX + sha256_hex(raw)


def sha256_hex(raw: bytes) -> str:
    """Bare sha256 hex of some bytes: what the line's records name
    `*_sha256` (checkpoint.json, result.json)."""
    return hashlib.sha256(raw).hexdigest()


def sha256_file(path: Path | str, *, chunk: int = DEFAULT_CHUNK) -> str:
    """Bare sha256 hex of a file, read in `chunk`-byte pieces (shards are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class HashingWriter:
    """A binary file wrapper that hashes bytes as they are written, so a shard
    is hashed in the same pass that writes it instead of being read back.

    Usage::

        with HashingWriter(open(tmp, "wb")) as w:
            w.write(data)
        w.hexdigest(), w.size
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of `data` and hash it; returns the byte count."""
        view = memoryview(data).cast("B")
        self._raw.write(view)
        self._digest.update(view)
        self.size += len(view)
        return len(view)

    def hexdigest(self) -> str:
        """Bare sha256 hex of everything written so far."""
        return self._digest.hexdigest()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        """The underlying descriptor, so the caller can fsync before renaming."""
        return self._raw.fileno()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ── modelHash ───────────────────────────────────────────────────────────────

FileHashes = Mapping[str, str] | Iterable[tuple[str, str] | Mapping[str, Any]]


def _pairs(file_hashes: FileHashes) -> list[tuple[str, str]]:
    """(filename, hex) pairs from a dict, pairs, or corpus-style entries."""
    if isinstance(file_hashes, Mapping):
        return [(str(k), str(v)) for k, v in file_hashes.items()]
    pairs = []
    for entry in file_hashes:
        if isinstance(entry, Mapping):
            pairs.append((str(entry["filename"]), str(entry["sha256"])))
        else:
            name, digest = entry
            pairs.append((str(name), str(digest)))
    return pairs


def model_hash(file_hashes: FileHashes) -> str:
    """The forge-alloy modelHash of a set of files.

    Accepts `{filename: hex}`, `[(filename, hex)]`, or the alloy's own
    `fileHashes` entries (extra keys such as `size` are ignored). Order does
    not matter. Hashes must be bare 64-char lowercase hex, as in fileHashes:
    a `sha256:` prefix inside would silently give a different modelHash, so
    it is refused.
    """
    pairs = _pairs(file_hashes)
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate filenames in file hashes: {dup}; fix: list each file once")
    for name, digest in pairs:
        if not _HEX64.match(digest):
            raise ValueError(
                f"file hash of {name!r} is {digest!r}, not 64 lowercase hex characters; "
                "fix: use the bare sha256 hex, without a 'sha256:' prefix"
            )
    entries = [{"filename": n, "sha256": h} for n, h in sorted(pairs)]
    canonical = json.dumps(entries, separators=(",", ":"), sort_keys=True)
    return HASH_PREFIX + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def model_files(path: Path) -> list[Path]:
    """The weight files of a model directory (top level only, sorted)."""
    found = {p for pattern in MODEL_FILE_GLOBS for p in path.glob(pattern) if p.is_file()}
    return sorted(found)


def hash_model_dir(path: Path | str) -> dict[str, str]:
    """`{filename: sha256 hex}` of a model directory's weight files.

    Only `*.safetensors` and `*.gguf` at the top level count (see
    MODEL_FILE_GLOBS for why); feed the result to `model_hash`.
    """
    return {p.name: sha256_file(p) for p in model_files(Path(path))}


# ── verification ────────────────────────────────────────────────────────────

MismatchKind = Literal["modelHash", "sha256", "size", "missing", "bad-filename", "legacy-modelHash"]


@dataclass(frozen=True)
class Mismatch:
    """One recorded value that the bytes on disk (or the record) contradict."""

    kind: MismatchKind
    where: str  # JSON path of the record, e.g. "$.results.integrity.fileHashes[0]"
    name: str  # the file, or the field
    expected: object
    actual: object

    def __str__(self) -> str:
        return f"{self.where}: {self.kind} of {self.name}: expected {self.expected!r}, got {self.actual!r}"


@dataclass
class VerifyResult:
    """Outcome of `verify_path`. `ok` only when something was checked and
    everything checked matched: an alloy with nothing to verify is not a pass."""

    path: Path
    checked: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files recorded but not present

    @property
    def ok(self) -> bool:
        return bool(self.checked) and not self.mismatches


def _load_alloy_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = f"cannot read it as JSON ({err})"
        raise VerifyInputError(path, problem, "run `factory validate` on it") from err
    if not isinstance(data, dict):
        raise VerifyInputError(path, "is not a JSON object", "point verify at an alloy file")
    return data


def _integrity_blocks(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Integrity records with their JSON paths (top level, then results)."""
    blocks = []
    if isinstance(data.get("integrity"), dict):
        blocks.append(("$.integrity", data["integrity"]))
    results = data.get("results")
    if isinstance(results, dict) and isinstance(results.get("integrity"), dict):
        blocks.append(("$.results.integrity", results["integrity"]))
    return blocks


def _is_plain_name(name: str) -> bool:
    """A file name with no directory part: fileHashes must never point outside."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _check_model_hash(where: str, block: dict[str, Any], result: VerifyResult) -> None:
    recorded, entries = block.get("modelHash"), block.get("fileHashes")
    if not isinstance(recorded, str) or not isinstance(entries, list):
        return
    result.checked.append(f"{where}.modelHash")
    try:
        actual = model_hash(entries)
    except (ValueError, KeyError, TypeError) as err:
        actual = f"<cannot compute: {err}>"
    if actual != recorded:
        result.mismatches.append(Mismatch("modelHash", f"{where}.modelHash", "modelHash", recorded, actual))


def _check_file(
    where: str, entry: dict[str, Any], base: Path, *, must_exist: bool, result: VerifyResult
) -> None:
    """Compare one fileHashes entry with the file beside the alloy: size first
    (free), then sha256."""
    name = str(entry.get("filename", ""))
    if not _is_plain_name(name):
        result.mismatches.append(Mismatch("bad-filename", where, name, "a plain file name", name))
        return
    target = base / name
    if not target.is_file():
        if must_exist:
            result.mismatches.append(Mismatch("missing", where, name, "present", "missing"))
        else:
            result.skipped.append(name)
        return
    result.checked.append(name)
    size = entry.get("size")
    if isinstance(size, int) and target.stat().st_size != size:
        result.mismatches.append(Mismatch("size", where, name, size, target.stat().st_size))
        return  # a wrong size is conclusive; skip hashing GBs
    actual = sha256_file(target)
    if actual != entry.get("sha256"):
        result.mismatches.append(Mismatch("sha256", where, name, entry.get("sha256"), actual))


def _check_legacy(where: str, block: dict[str, Any], base: Path, result: VerifyResult) -> None:
    """Old alloys: modelHash is the sha256 of their one shard, no fileHashes."""
    recorded, files = block.get("modelHash"), model_files(base)
    if not isinstance(recorded, str) or "fileHashes" in block or len(files) != 1:
        return
    result.checked.append(f"{where}.modelHash")
    actual = HASH_PREFIX + sha256_file(files[0])
    if actual != recorded:
        mismatch = Mismatch("legacy-modelHash", f"{where}.modelHash", files[0].name, recorded, actual)
        result.mismatches.append(mismatch)


def _verify_alloy(alloy_file: Path, *, model_dir: bool, result: VerifyResult) -> None:
    base = alloy_file.parent
    for where, block in _integrity_blocks(_load_alloy_json(alloy_file)):
        _check_model_hash(where, block, result)
        entries = block.get("fileHashes")
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(entry, dict):
                _check_file(f"{where}.fileHashes[{i}]", entry, base, must_exist=model_dir, result=result)
        if model_dir:
            _check_legacy(where, block, base, result)


def _alloys_in(directory: Path) -> list[Path]:
    found = {p for pattern in ALLOY_FILE_GLOBS for p in directory.glob(pattern) if p.is_file()}
    return sorted(found)


def verify_path(path: Path | str) -> VerifyResult:
    """Re-hash what an alloy records and compare.

    * An alloy file: recompute each `modelHash` from its `fileHashes`, and
      re-hash any recorded file that sits next to it (absent ones are listed
      in `skipped`, since a published alloy usually travels alone).
    * A model directory holding `*.alloy.json` / `forge-alloy.json`: the same,
      but every recorded file must be present, and a legacy single-shard
      modelHash is checked against the one weight file.
    """
    path = Path(path)
    result = VerifyResult(path=path)
    if path.is_dir():
        alloys = _alloys_in(path)
        if not alloys:
            problem = "holds no *.alloy.json or forge-alloy.json"
            raise VerifyInputError(path, problem, "put the model's alloy beside its weights")
        for alloy_file in alloys:
            _verify_alloy(alloy_file, model_dir=True, result=result)
    elif path.is_file():
        _verify_alloy(path, model_dir=False, result=result)
    else:
        raise VerifyInputError(path, "does not exist", "check the path")
    return result
