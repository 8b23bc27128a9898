"""Where an alloy's source model lives on this node: a local directory, the
Hugging Face cache, a GGUF file (factory.gguf_source), or nowhere (the
selftest pair).

`source.baseModel` is either a path or a Hub repo id, and alloys do not say
which. The rule: a string that looks like a path (absolute, `./`, `../`, a
`..` segment, more than one `/`) or that names something under the root is a
local directory; anything else is a repo id ("Qwen/Qwen3.5-4B").

* A local directory must resolve inside the root or inside one of the node's
  cold tiers, symlinks followed (an alloy is other people's input and must
  not point the stations at arbitrary directories), and hold a config.json.
* A `.gguf` path, or a `[models]` key of the node config, is a GGUF source:
  the file is checked and hashed here, and `path` is its dequantized
  checkpoint once a station has made it (None before).
* A repo id is looked up in the local HF cache only, through huggingface_hub's
  documented offline APIs (`snapshot_download(local_files_only=True)`,
  `try_to_load_from_cache`). Nothing here touches the network unless the
  caller passes `allow_download=True` and HF_HUB_OFFLINE is unset; then only
  safetensors, JSON and tokenizer files are fetched, never pickled weights
  (`*.bin`, `*.pt`: loading them runs arbitrary code) unless `allow_pickle`.

The plan (`factory.plan`) calls this with `allow_download=False`; the
stations' loader calls it with downloads allowed. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from factory import gguf_source
from factory.alloy import Source
from factory.errors import (  # noqa: F401 - re-exported
    SourceError, SourceNotAModel, SourceNotCached, SourceNotFound, SourceOutsideRoot,
)
from factory.gguf_source import GgufFile
from factory.nodeconfig import NodeConfig
from factory.protocol import GGUF_SOURCE_RECORD, Layout
from factory.validation import PathEscapeError, is_local_path_like, resolve_inside

SELFTEST = "selftest"  # baseModel and architecture of the diagnostic alloy
CONFIG_FILE = "config.json"
DEFAULT_REVISION = "main"  # what the Hub serves when no revision is pinned
JSON_PATH = "$.source.baseModel"

# What a station needs from a repo. Tokenizers come as JSON (tokenizer.json,
# tokenizer_config.json, vocab.json), sentencepiece models or BPE merges.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
DOWNLOAD_PATTERNS = (*WEIGHT_PATTERNS, "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt")
# Pickled weights: fetched only when the caller opts in (torch.load runs code).
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")

Kind = Literal["local", "hub", "gguf", "selftest"]


# ── result ──────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ResolvedSource:
    """Where the source model is. `path` is the model directory (for a repo,
    the cache snapshot directory), or None when nothing is on disk yet."""

    kind: Kind
    path: Path | None
    repo_id: str | None = None
    revision: str | None = None  # as pinned by the alloy, else "main"
    commit: str | None = None  # the cache snapshot's commit hash
    cached: bool = False  # on disk before this call (always true for local dirs)
    note: str = ""
    gguf: GgufFile | None = None  # kind "gguf": the file, its hash and architecture

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind, "path": str(self.path) if self.path else None, "repo_id": self.repo_id,
               "revision": self.revision, "commit": self.commit, "cached": self.cached, "note": self.note}
        if self.gguf is not None:
            out["gguf"] = {"file": str(self.gguf.path), "sha256": self.gguf.sha256,
                           "architecture": self.gguf.architecture, "origin": self.gguf.origin}
        return out


# ── entry point ─────────────────────────────────────────────────────────────


def resolve_source(
    source: Source | dict[str, Any],
    *,
    root: Path,
    config: NodeConfig,
    allow_download: bool = False,
    allow_pickle: bool = False,
    offline: bool | None = None,
    cache_dir: Path | None = None,
) -> ResolvedSource:
    """Find the alloy's source model on this node.

    `offline` defaults to huggingface_hub's HF_HUB_OFFLINE and `cache_dir` to
    its HF_HUB_CACHE (both read from huggingface_hub.constants at call time).
    Raises a SourceError subclass (exit code 2) naming the value and the fix.
    """
    if not isinstance(source, Source):
        source = Source.model_validate(source)
    if source.base_model == SELFTEST and source.architecture == SELFTEST:
        return ResolvedSource(kind="selftest", path=None, note="the selftest pair needs no model")
    gguf = gguf_source.mapped(source.base_model, config)
    if gguf is not None:
        return _resolve_gguf(source.base_model, gguf, root=Path(root), config=config)
    if looks_local(source.base_model, root=Path(root)):
        return _resolve_local(source.base_model, root=Path(root), config=config)
    # Said whenever the id is not on disk: a path-looking id is a Hub id here
    # only because no directory of that name is under the root.
    as_hub = (f"read as a Hugging Face repo id: there is no directory {Path(root) / source.base_model}; to use a "
              f"model under the root, put it there or write ./{source.base_model}")
    try:
        found = _resolve_repo(source.base_model, source.revision or DEFAULT_REVISION, allow_download=allow_download,
                              allow_pickle=allow_pickle, offline=_offline(offline), cache_dir=_cache_dir(cache_dir))
    except SourceNotCached as err:
        raise SourceNotCached(repo_id=err.repo_id, revision=err.revision, cache_dir=err.cache_dir,
                              fix=f"{err.fix} ({as_hub})") from None
    return found if found.path is not None else replace(found, note=f"{found.note} ({as_hub})")


def _offline(offline: bool | None) -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE if offline is None else offline


def _cache_dir(cache_dir: Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)


def looks_local(value: str, *, root: Path) -> bool:
    """A path rather than a repo id; repo ids have at most one '/'."""
    return is_local_path_like(value, root=root) or value.count("/") > 1


# ── local directories ───────────────────────────────────────────────────────


def _resolve_local(value: str, *, root: Path, config: NodeConfig) -> ResolvedSource:
    path = inside_root_or_cold(value, root=root, config=config)
    if not path.exists():
        raise SourceNotFound(value=value, problem=f"no such directory ({str(path)!r})",
                             fix=f"put the checkpoint there, or write the path of one inside {str(root)!r}")
    if not path.is_dir():
        raise SourceNotAModel(value=value, problem=f"{str(path)!r} is a file, not a model directory",
                              fix="name the checkpoint's directory (the one holding config.json)")
    if not (path / CONFIG_FILE).is_file():
        raise SourceNotAModel(value=value, problem=f"{str(path)!r} has no {CONFIG_FILE}",
                              fix="name a Hugging Face checkpoint directory (config.json + *.safetensors)")
    return ResolvedSource(kind="local", path=path, cached=True)


def _resolve_gguf(value: str, target: str, *, root: Path, config: NodeConfig) -> ResolvedSource:
    layout = Layout(root)
    module = gguf_source.package_module(target)
    if module is not None:
        found = gguf_source.from_package(module, layout, value=value)
    else:
        found = gguf_source.describe(inside_root_or_cold(target, root=root, config=config), value=value,
                                     origin=target)
    checkpoint = found.checkpoint(layout)
    if (checkpoint / GGUF_SOURCE_RECORD).is_file():
        return ResolvedSource(kind="gguf", path=checkpoint, cached=True, gguf=found,
                              note=f"dequantized from {found.path.name} (sha256 {found.sha256[:12]})")
    return ResolvedSource(kind="gguf", path=None, cached=False, gguf=found,
                          note=f"{found.path.name} ({found.architecture}) is dequantized into "
                               f"{checkpoint} when the part runs")


def inside_root_or_cold(value: str, *, root: Path, config: NodeConfig) -> Path:
    """The real path of `value`: inside the root, else inside a cold tier.

    A symlink under the root into a cold tier is fine (models/ -> /cold/models);
    one that leads anywhere else is refused like an absolute path would be.
    """
    try:
        return resolve_inside(root, value, json_path=JSON_PATH)
    except PathEscapeError as err:
        escape = err
    for tier in config.storage.cold:
        try:
            return resolve_inside(tier.path, str(escape.resolved), json_path=JSON_PATH)
        except PathEscapeError:
            continue
    allowed = [str(root), *(str(t.path) for t in config.storage.cold)]
    raise SourceOutsideRoot(
        value=value,
        problem=f"{escape.reason} and resolves to {str(escape.resolved)!r}, outside {' and '.join(map(repr, allowed))}",
        fix=f"move or link the checkpoint under {str(root)!r} (e.g. models/<name>) or a cold tier, "
            "and write a path inside it",
    ) from escape


# ── Hugging Face repos ──────────────────────────────────────────────────────


def _download_fix(repo_id: str, revision: str) -> str:
    command = f"download {repo_id} --revision {revision}"
    return (f"download it on a connected machine with `hf {command}` "
            f"(older huggingface_hub: `huggingface-cli {command}`) into HF_HOME")


def _resolve_repo(repo_id: str, revision: str, *, allow_download: bool, allow_pickle: bool, offline: bool,
                  cache_dir: Path) -> ResolvedSource:
    _check_repo_id(repo_id)
    snapshot = _cached_snapshot(repo_id, revision, cache_dir=cache_dir)
    if snapshot is not None:
        return ResolvedSource(kind="hub", path=snapshot, repo_id=repo_id, revision=revision,
                              commit=snapshot.name, cached=True)
    if offline:
        raise SourceNotCached(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                              fix=_download_fix(repo_id, revision) + ", or unset HF_HUB_OFFLINE")
    if not allow_download:
        return ResolvedSource(kind="hub", path=None, repo_id=repo_id, revision=revision, cached=False,
                              note="not in the local Hugging Face cache; it is downloaded when the part runs")
    snapshot = _download(repo_id, revision, allow_pickle=allow_pickle, cache_dir=cache_dir)
    return ResolvedSource(kind="hub", path=snapshot, repo_id=repo_id, revision=revision, commit=snapshot.name,
                          cached=False, note="downloaded")


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise SourceNotFound(value=repo_id, problem=f"is neither a directory under the root nor a valid "
                             f"Hugging Face repo id ({err})",
                             fix="write a repo id like 'Qwen/Qwen3.5-4B' or a path like 'models/<name>'") from err


def _cached_snapshot(repo_id: str, revision: str, *, cache_dir: Path) -> Path | None:
    """The cache's snapshot directory for this revision, if it holds a config.json."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                   allow_patterns=[CONFIG_FILE, *DOWNLOAD_PATTERNS])
        config = try_to_load_from_cache(repo_id, CONFIG_FILE, cache_dir=cache_dir, revision=revision)
    except (LocalEntryNotFoundError, HFValidationError):  # incomplete snapshots included
        return None
    return Path(folder) if isinstance(config, str) else None


def _download(repo_id: str, revision: str, *, allow_pickle: bool, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [*DOWNLOAD_PATTERNS, *(PICKLE_PATTERNS if allow_pickle else ())]
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise SourceNotFound(value=repo_id, problem=f"could not be downloaded at revision {revision!r} ({err})",
                             fix="check the repo id, the revision and, for gated repos, HF_TOKEN; or "
                                 + _download_fix(repo_id, revision)) from err
    return Path(folder)
