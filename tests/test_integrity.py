"""Hashing: alloy hash, file hashes, modelHash and verify, against real files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from factory.integrity import (
    HashingWriter,
    VerifyInputError,
    alloy_hash,
    hash_model_dir,
    model_hash,
    sha256_file,
    verify_path,
)

from tests.shared_corpus import CORPUS
CORPUS_FILES = sorted((CORPUS / "alloys").glob("*.json")) + sorted((CORPUS / "alloy_versions").glob("*.json"))


def _with_file_hashes() -> list[Path]:
    out = []
    for path in CORPUS_FILES:
        integrity = (json.loads(path.read_bytes()).get("results") or {}).get("integrity") or {}
        if "fileHashes" in integrity and "modelHash" in integrity:
            out.append(path)
    return out


WITH_FILE_HASHES = _with_file_hashes()


@pytest.mark.skipif(not WITH_FILE_HASHES, reason="shared alloy corpus not present")
def test_corpus_has_model_hashes_to_check() -> None:
    assert len(WITH_FILE_HASHES) >= 19


@pytest.mark.parametrize("path", WITH_FILE_HASHES, ids=lambda p: p.name[-60:])
def test_corpus_model_hash_recomputes(path: Path) -> None:
    integrity = json.loads(path.read_bytes())["results"]["integrity"]
    assert model_hash(integrity["fileHashes"]) == integrity["modelHash"]
    result = verify_path(path)
    assert result.ok, [str(m) for m in result.mismatches]
    assert result.checked == ["$.results.integrity.modelHash"]


def test_alloy_hash_matches_sources_md_prefixes() -> None:
    """SOURCES.md lists sha256[:16] of each saved file; three are pinned upstream."""
    pinned = {
        "continuum-ai_olmoe-1b-7b-compacted-5b__olmoe-1b-7b-compacted-5b.alloy@04e9cc5e.json": "bba0a92ff0c8bebb",
        "continuum-ai_qwen3-coder-30b-a3b-compacted-19b-256k__qwen3-coder-30b-a3b-compacted-19b-256k.alloy@04e9cc5e.json": "aa61c4bdf463847c",
    }
    for name, prefix in pinned.items():
        path = CORPUS / "alloy_versions" / name
        if not path.exists():
            pytest.skip("shared alloy corpus not present")
        assert alloy_hash(path.read_bytes()) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        assert alloy_hash(path.read_bytes()).removeprefix("sha256:")[:16] == prefix


def test_sha256_file_streams_in_small_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    (tmp_path / "f.bin").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f.bin", chunk=7) == expected
    assert sha256_file(tmp_path / "f.bin") == expected


def test_hashing_writer_equals_sha256_of_what_was_written(tmp_path: Path) -> None:
    target = tmp_path / "shard.safetensors"
    with HashingWriter(open(target, "wb")) as writer:
        writer.write(b"header")
        writer.write(bytearray(b"\x00" * 4096))
        writer.write(memoryview(b"tail"))
    assert writer.closed
    assert writer.size == target.stat().st_size == 6 + 4096 + 4
    assert writer.hexdigest() == sha256_file(target)


def test_model_hash_is_order_independent_and_accepts_each_shape() -> None:
    a, b = "a" * 64, "b" * 64
    as_dict = model_hash({"model-00002.safetensors": b, "model-00001.safetensors": a})
    as_pairs = model_hash([("model-00001.safetensors", a), ("model-00002.safetensors", b)])
    as_entries = model_hash([
        {"filename": "model-00002.safetensors", "sha256": b, "size": 2},
        {"filename": "model-00001.safetensors", "sha256": a, "size": 1},
    ])
    assert as_dict == as_pairs == as_entries
    assert as_dict.startswith("sha256:") and len(as_dict) == 71
    assert model_hash({"x": a}) != model_hash({"y": a})


def test_model_hash_refuses_prefixed_or_duplicate_entries() -> None:
    with pytest.raises(ValueError, match="without a 'sha256:' prefix"):
        model_hash({"model.safetensors": "sha256:" + "a" * 64})
    with pytest.raises(ValueError, match="duplicate"):
        model_hash([("m.gguf", "a" * 64), ("m.gguf", "b" * 64)])


def _model_dir(tmp_path: Path) -> Path:
    """A tiny 'model': two weight shards, a config and its alloy with fileHashes."""
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\x01" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x02" * 500)
    (tmp_path / "config.json").write_text("{}")
    hashes = hash_model_dir(tmp_path)
    entries = [{"filename": n, "sha256": h, "size": (tmp_path / n).stat().st_size} for n, h in sorted(hashes.items())]
    alloy = {
        "name": "tiny", "version": "1", "source": {"baseModel": "selftest", "architecture": "selftest"},
        "stages": [{"type": "selftest"}],
        "results": {"integrity": {"fileHashes": entries, "modelHash": model_hash(hashes)}},
    }
    (tmp_path / "tiny.alloy.json").write_text(json.dumps(alloy, indent=2))
    return tmp_path


def test_hash_model_dir_takes_weights_only(tmp_path: Path) -> None:
    assert sorted(hash_model_dir(_model_dir(tmp_path))) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_verify_model_dir_passes_when_untouched(tmp_path: Path) -> None:
    result = verify_path(_model_dir(tmp_path))
    assert result.ok
    assert "model-00001-of-00002.safetensors" in result.checked


def test_verify_detects_a_flipped_byte(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    shard = model / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[123] ^= 0x01
    shard.write_bytes(bytes(data))
    result = verify_path(model)
    assert not result.ok
    assert [(m.kind, m.name) for m in result.mismatches] == [("sha256", "model-00002-of-00002.safetensors")]


def test_verify_detects_missing_and_resized_files(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    (model / "model-00001-of-00002.safetensors").unlink()
    (model / "model-00002-of-00002.safetensors").write_bytes(b"short")
    kinds = sorted(m.kind for m in verify_path(model).mismatches)
    assert kinds == ["missing", "size"]


def test_verify_detects_edited_model_hash(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    alloy_file = model / "tiny.alloy.json"
    data = json.loads(alloy_file.read_text())
    data["results"]["integrity"]["modelHash"] = "sha256:" + "0" * 64
    alloy_file.write_text(json.dumps(data))
    result = verify_path(alloy_file)
    assert [m.kind for m in result.mismatches] == ["modelHash"]


def test_verify_refuses_filenames_that_leave_the_directory(tmp_path: Path) -> None:
    alloy = {"results": {"integrity": {"fileHashes": [{"filename": "../secret", "sha256": "a" * 64}]}}}
    (tmp_path / "x.alloy.json").write_text(json.dumps(alloy))
    assert [m.kind for m in verify_path(tmp_path / "x.alloy.json").mismatches] == ["bad-filename"]


def test_verify_legacy_single_shard_model_hash(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    legacy = "sha256:" + hashlib.sha256(b"weights").hexdigest()
    (tmp_path / "forge-alloy.json").write_text(json.dumps({"results": {"integrity": {"modelHash": legacy}}}))
    assert verify_path(tmp_path).ok
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    assert [m.kind for m in verify_path(tmp_path).mismatches] == ["legacy-modelHash"]


def test_verify_with_nothing_to_check_is_not_ok(tmp_path: Path) -> None:
    (tmp_path / "plain.alloy.json").write_text(json.dumps({"name": "x"}))
    result = verify_path(tmp_path / "plain.alloy.json")
    assert not result.ok and result.checked == [] and result.mismatches == []


def test_verify_input_errors(tmp_path: Path) -> None:
    with pytest.raises(VerifyInputError, match="no \\*.alloy.json"):
        verify_path(tmp_path)
    (tmp_path / "bad.alloy.json").write_text("{nope")
    with pytest.raises(VerifyInputError, match="cannot read it as JSON") as info:
        verify_path(tmp_path / "bad.alloy.json")
    assert info.value.path == tmp_path / "bad.alloy.json"
    with pytest.raises(VerifyInputError, match="does not exist"):
        verify_path(tmp_path / "absent.alloy.json")


def test_no_torch_in_hashing_or_checking_modules() -> None:
    import subprocess
    import sys

    code = "import sys, factory.alloy, factory.validation, factory.integrity; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
