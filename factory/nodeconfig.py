"""factory_node.toml: what this node is and how its line behaves.

Parsed with tomllib (tomli on 3.10) and validated with pydantic. Unknown keys
are errors (a typo must not silently fall back to a default), and every error
names the file and the dotted key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.errors import NodeConfigError
from factory.protocol import PROTOCOL_VERSION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    name: str = Field(default_factory=lambda: __import__("socket").gethostname())
    # forge: runs parts; ship: publishes finished parts (publish/deliver/deploy
    # stages are handed to it, never run here).
    roles: list[Literal["forge", "ship", "eval"]] = ["forge"]


class TierSection(_Section):
    # None for the hot tier means "the root's own filesystem".
    path: Path | None = None
    # Below this much free space the tier counts as full (doctor warns,
    # cleanup will not evict into it).
    min_free_gb: float = Field(default=50.0, ge=0)
    # Declared speeds, for people and for estimating offload time.
    read_mb_s: float | None = Field(default=None, gt=0)
    write_mb_s: float | None = Field(default=None, gt=0)
    # What the operator expects; doctor warns when the mount says otherwise.
    fs_type: str | None = None


class ColdTier(TierSection):
    path: Path


class StorageSection(_Section):
    # Hot tier: the root's fast local disk (the line and work/ live there).
    hot: TierSection = TierSection(min_free_gb=20.0)
    cold: list[ColdTier] = []


class ForgeSection(_Section):
    max_retries: int = Field(default=3, ge=0)
    # A whole day: real stages (a LoRA on a 30B model) run for hours. An
    # alloy stage's own timeoutSeconds overrides it.
    stage_timeout_seconds: float = Field(default=86400.0, gt=0)
    # First infrastructure retry waits this long, doubling up to an hour, so a
    # node that OOMs every part does not spin.
    retry_backoff_seconds: float = Field(default=30.0, ge=0)
    # Pickle weights (.bin/.pt) and trust_remote_code both run code written
    # by the model's authors on this node: off unless the operator says so.
    allow_pickle_weights: bool = False
    trust_remote_code: bool = False
    # A part whose acceptanceCriteria fail: true sends it to rework (the
    # result is kept in its error.json), false finishes it with the failed
    # verdict recorded in result.json for people to judge.
    rework_on_failed_acceptance: bool = True


class DaemonSection(_Section):
    heartbeat_interval_seconds: float = Field(default=30.0, gt=0)
    # The safety net under inotify: a full intake scan this often.
    rescan_seconds: float = Field(default=10.0, gt=0)
    # SIGTERM: how long a running part gets to reach a safe point before the
    # child is killed. The systemd unit's TimeoutStopSec must exceed it.
    stop_grace_seconds: float = Field(default=60.0, ge=0)
    # A hand-copied file (cp is not atomic) is adopted once its size and
    # mtime have not changed for this long (sooner if inotify saw it closed).
    settle_seconds: float = Field(default=2.0, ge=0)
    events_max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    events_keep: int = Field(default=5, ge=1)


class ProtocolSection(_Section):
    version: int = PROTOCOL_VERSION


class NodeConfig(_Section):
    node: NodeSection = NodeSection()
    storage: StorageSection = StorageSection()
    forge: ForgeSection = ForgeSection()
    daemon: DaemonSection = DaemonSection()
    protocol: ProtocolSection = ProtocolSection()

    def hot_dir(self, root: Path) -> Path:
        return self.storage.hot.path or root


def _dotted(loc: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate a node config; a missing file means all defaults."""
    if not path.exists():
        return NodeConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise NodeConfigError(f"{path}: not valid TOML: {err}; fix the syntax") from err
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = _dotted(first["loc"])
        got = first.get("input")
        raise NodeConfigError(
            f"{path}: key {key}: {first['msg']} (got {got!r}); "
            f"fix that key (see factory_node.toml.example)"
            + (f" [+{err.error_count() - 1} more]" if err.error_count() > 1 else "")
        ) from err
    if cfg.protocol.version != PROTOCOL_VERSION:
        raise NodeConfigError(
            f"{path}: key protocol.version is {cfg.protocol.version}, but this factory speaks "
            f"protocol {PROTOCOL_VERSION}; migrate the root or install a matching factory"
        )
    return cfg
