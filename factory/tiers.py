"""Storage tiers of a node: the hot work dir and the cold tiers, as measured.

Used by `status` (disk per tier), `doctor` (filesystem types), `cleanup`
(where to evict a work dir) and the load plan (where to offload weights).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from factory.nodeconfig import NodeConfig

# Filesystems on which rename/fsync/inotify semantics are weak or slow: the
# hot tier (the line and work dirs) should not live on one.
WEAK_FS_TYPES = ("9p", "drvfs", "fuse", "nfs", "cifs", "smb", "virtiofs", "sshfs")

GiB = 2**30


@dataclass(frozen=True)
class Tier:
    name: str  # "hot" or "cold[N]"
    path: Path
    fs_type: str
    declared_fs_type: str | None
    total_bytes: int
    free_bytes: int
    min_free_gb: float
    read_mb_s: float | None = None
    write_mb_s: float | None = None

    @property
    def free_gib(self) -> float:
        return self.free_bytes / GiB

    @property
    def weak_fs(self) -> bool:
        return self.fs_type.startswith(WEAK_FS_TYPES)

    def room_for(self, nbytes: int) -> bool:
        """Can `nbytes` land here and leave min_free_gb free?"""
        return self.free_bytes - nbytes >= self.min_free_gb * GiB


def fs_type_of(path: Path) -> str:
    """The filesystem type of the mount holding `path` (longest /proc/mounts prefix)."""
    path = Path(os.path.realpath(path))
    best, best_type = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, best_type = mnt, fields[2]
    except OSError:
        pass
    return best_type


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def measure(path: Path, *, name: str, min_free_gb: float = 0.0, declared: str | None = None,
            read_mb_s: float | None = None, write_mb_s: float | None = None) -> Tier:
    where = _existing(Path(path))
    usage = shutil.disk_usage(where)
    return Tier(name, Path(path), fs_type_of(where), declared, usage.total, usage.free,
                min_free_gb, read_mb_s, write_mb_s)


def node_tiers(root: Path, config: NodeConfig) -> list[Tier]:
    hot = config.storage.hot
    tiers = [measure(config.hot_dir(root), name="hot", min_free_gb=hot.min_free_gb,
                     declared=hot.fs_type, read_mb_s=hot.read_mb_s, write_mb_s=hot.write_mb_s)]
    for i, c in enumerate(config.storage.cold):
        tiers.append(measure(c.path, name=f"cold[{i}]", min_free_gb=c.min_free_gb,
                             declared=c.fs_type, read_mb_s=c.read_mb_s, write_mb_s=c.write_mb_s))
    return tiers


# Cold-tier folders the factory writes into (docs/FACTORY-PROTOCOL.md).
OFFLOAD_DIR = "factory-offload"
EVICTED_DIR = "factory-evicted"


def offload_dir(config: NodeConfig, base: str) -> Path | None:
    """Where a streaming load of part `base` spills weights: the first cold
    tier's `factory-offload/<base>`, or None on a node without cold tiers.
    The part's process removes it after every stage; cleanup removes those
    of parts that are not running."""
    if not config.storage.cold:
        return None
    return Path(config.storage.cold[0].path) / OFFLOAD_DIR / base
