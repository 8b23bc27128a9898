"""Storage tiers of a node: the hot work dir and the cold tiers, as measured.

Used by `status` (disk per tier), `doctor` (filesystem types), `plan` and
`cleanup` (where to evict a work dir) and the load plan (where to offload
weights). A tier's path must be a directory that exists: a missing one is
an unmounted disk or a typo, and every caller refuses it through
`Tier.problem` (measuring its nearest existing parent instead would fill
the root disk).
"""

from __future__ import annotations

import os
import shutil
import stat
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
    fs_type: str  # "" when the path cannot be measured (see `problem`)
    declared_fs_type: str | None
    total_bytes: int
    free_bytes: int
    min_free_gb: float
    read_mb_s: float | None = None
    write_mb_s: float | None = None
    # Why nothing may be written here, with the fix; None for a usable tier.
    problem: str | None = None
    device: int | None = None  # st_dev of the path
    mount_point: bool = False

    @property
    def key(self) -> str:
        """The node-config key of this tier's path (storage.hot.path, storage.cold[0].path)."""
        return f"storage.{self.name}.path"

    @property
    def missing(self) -> bool:
        return self.problem is not None

    @property
    def free_gib(self) -> float:
        return self.free_bytes / GiB

    @property
    def weak_fs(self) -> bool:
        return self.fs_type.startswith(WEAK_FS_TYPES)

    def remeasured(self) -> "Tier":
        """This tier measured again now (free space moves; a disk can be unmounted)."""
        return measure(self.path, name=self.name, min_free_gb=self.min_free_gb, declared=self.declared_fs_type,
                       read_mb_s=self.read_mb_s, write_mb_s=self.write_mb_s)

    def room_for(self, nbytes: int) -> bool:
        """Can `nbytes` land here and leave min_free_gb free? Never on a missing tier."""
        return self.problem is None and self.free_bytes - nbytes >= self.min_free_gb * GiB


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


def path_problem(path: Path) -> str | None:
    """Why `path` cannot hold a tier (with the fix), or None when it can."""
    if not path.is_absolute():
        return f"{path} is not an absolute path: give the full path of the disk's directory"
    try:
        mode = os.stat(path).st_mode  # a symlink to a mounted disk is fine
    except FileNotFoundError:
        return f"{path} does not exist (an unmounted disk?): mount the disk or create the directory"
    except OSError as err:
        return f"{path} cannot be read ({err.strerror}): mount the disk or fix its permissions"
    if not stat.S_ISDIR(mode):
        return f"{path} is not a directory: mount the disk or create the directory"
    return None


def measure(path: Path, *, name: str, min_free_gb: float = 0.0, declared: str | None = None,
            read_mb_s: float | None = None, write_mb_s: float | None = None) -> Tier:
    """Measure the tier at `path` itself, never a parent of it."""
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:
        return Tier(name, path, "", declared, 0, 0, min_free_gb, read_mb_s, write_mb_s, problem=problem)
    usage = shutil.disk_usage(path)
    return Tier(name, path, fs_type_of(path), declared, usage.total, usage.free, min_free_gb, read_mb_s,
                write_mb_s, device=os.stat(path).st_dev, mount_point=os.path.ismount(path))


def node_tiers(root: Path, config: NodeConfig) -> list[Tier]:
    """The hot tier, then the cold tiers in the config's order of preference."""
    hot = config.storage.hot
    tiers = [measure(config.hot_dir(Path(root).absolute()), name="hot", min_free_gb=hot.min_free_gb,
                     declared=hot.fs_type, read_mb_s=hot.read_mb_s, write_mb_s=hot.write_mb_s)]
    return tiers + [cold_tier(config, i) for i in range(len(config.storage.cold))]


def cold_tier(config: NodeConfig, i: int) -> Tier:
    """Cold tier `i` of the node config, measured now."""
    c = config.storage.cold[i]
    return measure(c.path, name=f"cold[{i}]", min_free_gb=c.min_free_gb,
                   declared=c.fs_type, read_mb_s=c.read_mb_s, write_mb_s=c.write_mb_s)


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


def usage_at(path: Path):
    """shutil.disk_usage of the filesystem a write under `path` just failed
    on (ENOSPC), measured at its nearest existing ancestor (the failed file
    may not exist), or None. For the waiting-for-room rule, never for a
    configured tier: a tier whose path is missing is a problem (see measure)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path)
    except OSError:
        return None


def free_bytes_at(path: Path) -> int | None:
    usage = usage_at(path)
    return None if usage is None else usage.free
