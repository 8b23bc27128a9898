"""factory.sources: local dirs stay inside the root or a cold tier; repo ids
resolve from a real (temporary) Hugging Face cache layout, never the network,
and a snapshot's symlinks into the cache's blobs/ pass the model checks.

Every call passes `offline` and `cache_dir` explicitly except the one test
that checks the defaults, which runs in a subprocess with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from factory.alloy import Source
from factory.errors import BadInput, CheckpointError
from factory.model_files import check_model_dir, inspect_checkpoint
from factory.nodeconfig import NodeConfig
from factory.sources import (
    ResolvedSource,
    SourceNotAModel,
    SourceNotCached,
    SourceNotFound,
    SourceOutsideRoot,
    resolve_source,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NODE = NodeConfig()


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def _fake_cache(cache: Path, repo_id: str, *, commit: str = COMMIT, ref: str | None = "main",
                files: tuple[str, ...] = ("config.json",)) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs,snapshots}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")
    if ref is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def _resolve(base: str, root: Path, *, config: NodeConfig = NODE, cache: Path | None = None,
             offline: bool = True, **source) -> ResolvedSource:
    return resolve_source({"baseModel": base, "architecture": "llama", **source}, root=root, config=config,
                          offline=offline, cache_dir=cache if cache is not None else root / "no-hf-cache")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return (tmp_path / "root").resolve()


# ── local directories ───────────────────────────────────────────────────────


@pytest.mark.parametrize("spelling", ["models/tiny", "./models/tiny", "{root}/models/tiny"])
def test_local_dir_inside_root(root: Path, spelling: str) -> None:
    model = _model_dir(root / "models" / "tiny")
    resolved = _resolve(spelling.format(root=root), root)
    assert resolved == ResolvedSource(kind="local", path=model, cached=True)


def test_source_model_accepted_as_model_or_dict(root: Path) -> None:
    _model_dir(root / "m")
    source = Source.model_validate({"baseModel": "./m", "architecture": "llama"})
    assert resolve_source(source, root=root, config=NODE).path == root / "m"


@pytest.mark.parametrize(("make", "reason"), [
    (lambda root, out: str(out), "is absolute"),
    (lambda root, out: "../outside/model", "climbs out with '..'"),
    (lambda root, out: (root / "link").symlink_to(out, target_is_directory=True) or "link",
     "goes through a symlink"),
    (lambda root, out: (root / "models").mkdir() or (root / "models" / "m").symlink_to(out) or "./models/m",
     "goes through a symlink"),
])
def test_local_dir_outside_root_refused(root: Path, make, reason: str) -> None:
    outside = _model_dir(root.parent / "outside" / "model")
    value = make(root, outside)
    with pytest.raises(SourceOutsideRoot, match=reason) as info:
        _resolve(value, root)
    err = info.value
    assert (err.json_path, err.value, err.exit_code) == ("$.source.baseModel", value, 2)
    assert str(outside) in err.problem and "move or link the checkpoint" in err.fix


def test_cold_tier_paths_allowed(root: Path, tmp_path: Path) -> None:
    cold = (tmp_path / "cold").resolve()
    model = _model_dir(cold / "models" / "big")
    config = NodeConfig.model_validate({"storage": {"cold": [{"path": str(cold)}]}})
    assert _resolve(str(model), root, config=config).path == model
    (root / "big").symlink_to(model, target_is_directory=True)  # a link from the root into the cold tier
    assert _resolve("./big", root, config=config).path == model
    with pytest.raises(SourceOutsideRoot):  # the same link, on a node without that tier
        _resolve("./big", root)


def test_missing_dir_and_non_model_refused(root: Path) -> None:
    with pytest.raises(SourceNotFound, match="no such directory") as info:
        _resolve("./models/missing", root)
    assert isinstance(info.value, BadInput) and info.value.value == "./models/missing"
    (root / "empty").mkdir()
    with pytest.raises(SourceNotAModel, match="has no config.json"):
        _resolve("./empty", root)
    (root / "file.json").write_text("{}")
    with pytest.raises(SourceNotAModel, match="is a file"):
        _resolve("file.json", root)


def test_repo_shaped_name_under_root_is_local(root: Path) -> None:
    """`org/name` that exists under the root is a directory, not a repo id."""
    model = _model_dir(root / "Qwen" / "Qwen3-0.6B")
    assert _resolve("Qwen/Qwen3-0.6B", root).path == model


def test_selftest_pair_resolves_nothing(root: Path) -> None:
    resolved = resolve_source({"baseModel": "selftest", "architecture": "selftest"}, root=root, config=NODE)
    assert (resolved.kind, resolved.path, resolved.repo_id) == ("selftest", None, None)


# ── the Hugging Face cache ──────────────────────────────────────────────────


def test_repo_found_in_cache_offline(root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = _fake_cache(cache, "acme/tiny-llama", files=("config.json", "model.safetensors"))
    resolved = _resolve("acme/tiny-llama", root, cache=cache)
    assert resolved == ResolvedSource(kind="hub", path=snapshot, repo_id="acme/tiny-llama", revision="main",
                                      commit=COMMIT, cached=True)
    assert resolved.to_json()["path"] == str(snapshot)


def _cache_with_blobs(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """The layout huggingface_hub really writes: each snapshot file a relative
    symlink into the repo's blobs/ (named by content hash)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_cached_snapshot_links_into_blobs_are_read(root: Path, tmp_path: Path, tiny_model) -> None:
    """Shards that are symlinks into the repo's blobs/ are the cache's normal
    shape, not an escape: the model checks read them like local files."""
    cache = tmp_path / "hub"
    snapshot = _cache_with_blobs(cache, "acme/tiny-llama", tiny_model("llama"))
    resolved = _resolve("acme/tiny-llama", root, cache=cache)
    assert resolved.path == snapshot and (snapshot / "model.safetensors").is_symlink()
    check = check_model_dir(resolved.path)
    assert check.ok, check.problems
    assert check.info.total_bytes == inspect_checkpoint(tiny_model("llama")).total_bytes


def test_cached_snapshot_link_out_of_the_repo_is_refused(root: Path, tmp_path: Path, tiny_model) -> None:
    cache = tmp_path / "hub"
    snapshot = _cache_with_blobs(cache, "acme/tiny-llama", tiny_model("llama"))
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(tiny_model("llama") / "model.safetensors", elsewhere)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(elsewhere)
    check = check_model_dir(_resolve("acme/tiny-llama", root, cache=cache).path)
    assert [p.step for p in check.problems] == ["files"]
    assert f"is a symlink to {elsewhere}, outside the model directory" in str(check.problems[0])
    with pytest.raises(CheckpointError, match="outside the model directory"):
        inspect_checkpoint(snapshot)


def test_pinned_revision(root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = _fake_cache(cache, "acme/tiny-llama", ref="v1.0")
    by_tag = _resolve("acme/tiny-llama", root, cache=cache, revision="v1.0")
    by_commit = _resolve("acme/tiny-llama", root, cache=cache, revision=COMMIT)
    assert by_tag.path == by_commit.path == snapshot
    assert (by_tag.revision, by_commit.revision) == ("v1.0", COMMIT)
    with pytest.raises(SourceNotCached, match="at revision 'main'"):  # only v1.0 is cached
        _resolve("acme/tiny-llama", root, cache=cache)


def test_repo_missing_offline_names_the_fix(root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    with pytest.raises(SourceNotCached) as info:
        _resolve("acme/ghost-7b", root, cache=cache, revision="v2")
    err = info.value
    assert (err.repo_id, err.revision, err.cache_dir, err.exit_code) == ("acme/ghost-7b", "v2", cache, 2)
    assert isinstance(err, FileNotFoundError) and isinstance(err, BadInput)
    assert "'acme/ghost-7b' at revision 'v2' is not in the Hugging Face cache" in str(err)
    assert "`hf download acme/ghost-7b --revision v2`" in err.fix
    assert "`huggingface-cli download acme/ghost-7b --revision v2`" in err.fix
    assert "HF_HOME" in err.fix and "unset HF_HUB_OFFLINE" in err.fix


def test_snapshot_without_config_is_not_a_cached_model(root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    _fake_cache(cache, "acme/partial", files=("tokenizer.json",))
    with pytest.raises(SourceNotCached, match="acme/partial"):
        _resolve("acme/partial", root, cache=cache)


def test_online_without_download_leaves_it_for_the_run(root: Path, tmp_path: Path) -> None:
    """Online but downloads not allowed (the plan): nothing fetched, a note."""
    resolved = _resolve("acme/ghost-7b", root, cache=tmp_path / "hub", offline=False)
    assert (resolved.kind, resolved.path, resolved.cached) == ("hub", None, False)
    assert "downloaded when the part runs" in resolved.note
    assert not (tmp_path / "hub").exists()


def test_invalid_repo_id(root: Path) -> None:
    with pytest.raises(SourceNotFound, match="neither a directory under the root nor a valid"):
        _resolve("not a repo", root)


def test_defaults_read_hf_hub_offline_and_cache(root: Path, tmp_path: Path) -> None:
    """With no `offline`/`cache_dir`, huggingface_hub's own settings apply."""
    cache = tmp_path / "hub"
    _fake_cache(cache, "acme/tiny-llama")
    script = (
        "import sys; from pathlib import Path; from factory.nodeconfig import NodeConfig\n"
        "from factory.sources import resolve_source, SourceNotCached\n"
        "root = Path(sys.argv[1])\n"
        "print(resolve_source({'baseModel': 'acme/tiny-llama', 'architecture': 'llama'}, root=root, "
        "config=NodeConfig()).path)\n"
        "try:\n"
        "    resolve_source({'baseModel': 'acme/ghost', 'architecture': 'llama'}, root=root, config=NodeConfig())\n"
        "except SourceNotCached as err:\n"
        "    print(type(err).__name__, err.fix)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", script, str(root)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == str(cache / "models--acme--tiny-llama" / "snapshots" / COMMIT)
    assert out[1].startswith("SourceNotCached ") and "unset HF_HUB_OFFLINE" in out[1]
