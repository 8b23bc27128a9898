"""What a node has and what a part needs: the numbers placement decides on.

A node's resources are measured once when the worker starts (cores and RAM
by psutil, GPUs by `nvidia-smi`: the worker never imports torch or touches
CUDA) and each may be overridden in `[resources]` of factory_node.toml.
A part's need is computed at the intake gate from its source's safetensors
headers (or the GGUF's size) and its stages, and written into its ticket,
so placing a part never loads a model. Every estimate below says what it
covers; they err on the side of waiting rather than of an OOM kill.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.load_plan import GIB, VRAM_ACTIVATION_FRACTION, VRAM_RESERVE_GIB, usable_vram_gib

if TYPE_CHECKING:
    from factory.alloy import Alloy
    from factory.model_files import CheckpointInfo
    from factory.nodeconfig import NodeConfig


PART_BASE_RAM_BYTES = int(1.5 * GIB)
"""A forging child before any weights: torch, transformers, a tokenizer and
a calibration batch (the tiny models' stages peak at about 1 GiB RSS)."""

CPU_WEIGHT_COPIES = 2.0
"""Weights in RAM when a part computes on the CPU, in units of the model at
16 bit: the model plus the copy a stage writes or the gradients a LoRA holds."""

GPU_STAGING_SHARDS = 2.0
"""Weights in RAM when a part computes on GPUs: loading and saving pass
through RAM a shard at a time, held in two copies while converted."""

GGUF_TO_16BIT = 4.0
"""A GGUF source's size at 16 bit, per byte of the file: 16 bits over the
~4 bits per weight of the smallest common quant (Q4_K_M is ~4.8), so a Q8_0
file is overestimated twice over, the safe side."""

NVIDIA_SMI_TIMEOUT_S = 10.0
# Ticket key: the RSS a part had when it was stopped for breaking the RAM
# budget beside other parts; its need is at least that from then on.
OBSERVED_RAM = "observed_ram_bytes"


@dataclass(frozen=True)
class Gpu:
    index: int  # the CUDA index CUDA_VISIBLE_DEVICES names
    memory_bytes: int


@dataclass(frozen=True)
class NodeResources:
    """What parts may use on this node, together. `basis` says, per key,
    whether it was measured or set in factory_node.toml."""

    cores: int
    cpu_slots: int  # parts computing on CPUs at once; each part takes one
    ram_bytes: int  # RAM all parts' process trees may hold together
    gpus: tuple[Gpu, ...]
    max_parallel_parts: int
    basis: dict[str, str]

    def threads_per_part(self) -> int:
        return max(1, self.cores // self.cpu_slots)

    def to_json(self) -> dict[str, Any]:
        return {"cores": self.cores, "cpu_slots": self.cpu_slots, "ram_gib": round(self.ram_bytes / GIB, 2),
                "gpus": [{"index": g.index, "memory_gib": round(g.memory_bytes / GIB, 2)} for g in self.gpus],
                "max_parallel_parts": self.max_parallel_parts, "basis": dict(self.basis)}


@dataclass(frozen=True)
class Need:
    """What one part holds while it runs. `whole_node` parts (source size
    unknown until they download it) run alone, with everything."""

    cpu_slots: int
    ram_bytes: int
    gpus: int
    vram_bytes: int  # over all its GPUs: the weights plus each GPU's reserve
    disk_bytes: int  # its work dir's model copies
    whole_node: bool
    basis: str  # one sentence: where the numbers come from

    @property
    def vram_gb_total(self) -> float:
        """For schedulers counting VRAM as a resource (Ray's `vram_gb`)."""
        return round(self.vram_bytes / 1e9, 3)

    @property
    def cpus(self) -> int:
        """CPUs to ask a cluster scheduler for: one at least, also for a
        whole-node part (a cluster has no "whole node" to give)."""
        return max(1, self.cpu_slots)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def at_least(self, ticket: dict) -> "Need":
        """This need, its RAM raised to what the part was seen to use
        (`OBSERVED_RAM` in its ticket): an estimate never wins over a measurement."""
        seen = ticket.get(OBSERVED_RAM)
        if isinstance(seen, bool) or not isinstance(seen, int) or seen <= self.ram_bytes or self.whole_node:
            return self
        return replace(self, ram_bytes=seen, basis=f"{self.basis}; raised to the {size_text(seen)} it used "
                                                   "when stopped beside other parts")

    @classmethod
    def from_json(cls, obj: object) -> "Need | None":
        """The need a ticket carries, or None when absent or malformed
        (tickets are untrusted: the gate computes it again)."""
        if not isinstance(obj, dict):
            return None
        ints = ("cpu_slots", "ram_bytes", "gpus", "vram_bytes", "disk_bytes")
        if any(isinstance(obj.get(k), bool) or not isinstance(obj.get(k), int) or obj[k] < 0 for k in ints):
            return None
        if not isinstance(obj.get("whole_node"), bool) or not isinstance(obj.get("basis"), str):
            return None
        return cls(**{k: obj[k] for k in (*ints, "whole_node")}, basis=obj["basis"][:300])


def size_text(nbytes: int) -> str:
    """Bytes for people: GiB, or MiB below one GiB."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.0f} MiB"


# -- the node ----------------------------------------------------------------


@functools.cache
def measure_gpus() -> tuple[Gpu, ...]:
    """Each NVIDIA GPU's index and memory from `nvidia-smi`; none without it.
    A failing nvidia-smi (driver mismatch) counts as no GPUs: the parts
    then plan for the CPU, as the load plan's own probe would. Once per
    process: `factory enqueue` of a thousand files gates each of them."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run([exe, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """`index, memory.total` lines (MiB) as GPUs; odd lines are skipped."""
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            gpus.append(Gpu(int(fields[0]), int(fields[1]) * 2**20))
    return tuple(gpus)


def node_resources(config: "NodeConfig") -> NodeResources:
    """This node's resources: `[resources]` where set, measured otherwise."""
    import psutil

    res, parallel = config.resources, config.daemon.max_parallel_parts
    cores = os.cpu_count() or 1
    basis = {}
    if res.cpu_slots is not None:
        slots, basis["cpu_slots"] = res.cpu_slots, "resources.cpu_slots"
    else:
        slots, basis["cpu_slots"] = parallel, "daemon.max_parallel_parts"
    if res.ram_gb is not None:
        ram, basis["ram"] = int(res.ram_gb * GIB), "resources.ram_gb"
    elif config.forge.part_memory_gb is not None:
        ram, basis["ram"] = int(config.forge.part_memory_gb * GIB), "forge.part_memory_gb"
    else:
        ram, basis["ram"] = int(0.9 * psutil.virtual_memory().total), "measured: 90% of physical RAM"
    if res.gpus is not None:
        gpus, basis["gpus"] = tuple(Gpu(i, int(gb * GIB)) for i, gb in enumerate(res.gpus)), "resources.gpus"
    else:
        gpus, basis["gpus"] = measure_gpus(), "measured: nvidia-smi"
    return NodeResources(cores=cores, cpu_slots=slots, ram_bytes=ram, gpus=gpus, max_parallel_parts=parallel,
                         basis=basis)


# -- a part ------------------------------------------------------------------


def selftest_need() -> Need:
    """A selftest part's child holds no model: its interpreter (about 35 MB
    measured) is left to the reserves, so only slots limit selftests."""
    return Need(cpu_slots=1, ram_bytes=0, gpus=0, vram_bytes=0, disk_bytes=0, whole_node=False,
                basis="a selftest part: no model")


def whole_node_need(why: str) -> Need:
    return Need(cpu_slots=0, ram_bytes=0, gpus=0, vram_bytes=0, disk_bytes=0, whole_node=True,
                basis=f"{why}: it runs alone, with the whole node")


def part_need(alloy: "Alloy", *, root: Path, config: "NodeConfig", node: NodeResources) -> Need:
    """What `alloy` will hold on `node`, from headers and file sizes only."""
    return need_for(alloy, source_sizes(alloy, root=root, config=config), config=config, node=node)


def need_for(alloy: "Alloy", sizes: tuple[int, int] | None, *, config: "NodeConfig", node: NodeResources) -> Need:
    """The need of `alloy` whose source has `sizes` (see source_sizes): for
    a caller that has already read the checkpoint (the plan)."""
    from factory.catalog import copies_written

    if sizes is None:
        return whole_node_need("its source model is not on this node yet, so its size is unknown")
    if sizes == (0, 0):
        return selftest_need()
    model16, shard = sizes
    disk = int(model16 * (1 + copies_written(alloy.stages)))
    if node.gpus:
        gpus, vram = gpu_share(model16, node.gpus)
        ram = PART_BASE_RAM_BYTES + int(GPU_STAGING_SHARDS * shard)
        where = f"{gpus} of {len(node.gpus)} GPUs"
    else:
        gpus, vram = 0, 0
        ram = PART_BASE_RAM_BYTES + int(CPU_WEIGHT_COPIES * model16)
        where = "the CPU"
    basis = (f"the model is {model16 / GIB:.2f} GiB at 16 bit, computed on {where}; the work dir holds "
             f"{disk / GIB:.2f} GiB of model copies")
    if ram > node.ram_bytes and (node.gpus or config.storage.cold):
        # The load plan streams what does not fit (GPUs, or a cold tier to
        # offload to): such a part takes all the RAM parts may have.
        ram, basis = node.ram_bytes, basis + "; its weights do not fit in RAM, so it takes all of it"
    return Need(cpu_slots=1, ram_bytes=ram, gpus=gpus, vram_bytes=vram, disk_bytes=disk, whole_node=False,
                basis=basis)


def gpu_share(model16: int, gpus: tuple[Gpu, ...]) -> tuple[int, int]:
    """The fewest of the node's GPUs whose usable memory holds the model in
    bf16 (the load plan's own reserve and activation share), and the VRAM
    that takes; all of them when even that is short (the part's load plan
    then goes to 4 bit or offloads)."""
    smallest = min(g.memory_bytes for g in gpus)
    usable = usable_vram_gib(smallest) * GIB
    count = len(gpus) if usable <= 0 else min(len(gpus), max(1, math.ceil(model16 / usable)))
    vram = model16 / (1 - VRAM_ACTIVATION_FRACTION) + count * VRAM_RESERVE_GIB * GIB
    return count, int(min(vram, count * smallest))


def source_sizes(alloy: "Alloy", *, root: Path, config: "NodeConfig") -> tuple[int, int] | None:
    """(bytes at 16 bit, largest shard) of the alloy's source; (0, 0) for
    the selftest pair; None when its weights are not on this node. Reads
    headers and file sizes only: a GGUF is neither hashed nor assembled."""
    from factory import gguf_source
    from factory.errors import SourceError
    from factory.sources import resolve_source

    from factory.sources import SELFTEST

    if alloy.source.base_model == SELFTEST and alloy.source.architecture == SELFTEST:
        return (0, 0)
    gguf = gguf_source.mapped(alloy.source.base_model, config)
    if gguf is not None:
        return _gguf_sizes(gguf, root=root, config=config)
    try:
        src = resolve_source(alloy.source, root=root, config=config, allow_download=False)
    except SourceError:
        return None  # the gate's own checks say why, where it matters
    return None if src.path is None else _checkpoint_sizes(src.path)


def _checkpoint_sizes(model_dir: Path) -> tuple[int, int] | None:
    from factory.model_files import CheckpointError, inspect_checkpoint

    try:
        return checkpoint_sizes(inspect_checkpoint(model_dir))
    except (CheckpointError, OSError, ValueError):
        return None


def checkpoint_sizes(info: "CheckpointInfo") -> tuple[int, int]:
    """(bytes at 16 bit, largest shard at 16 bit) of an inspected checkpoint."""
    shards: dict[str, int] = {}
    for meta in info.tensors.values():
        shards[meta.file] = shards.get(meta.file, 0) + 2 * meta.numel
    return info.bytes_at_16bit, max(shards.values(), default=0)


def _gguf_sizes(target: str, *, root: Path, config: "NodeConfig") -> tuple[int, int] | None:
    """A GGUF source's sizes: the file's (or the package's data files') size
    x GGUF_TO_16BIT. Neither hashed nor imported: that is the part's work."""
    import importlib.util

    from factory import gguf_source
    from factory.errors import SourceError
    from factory.sources import inside_root_or_cold

    module = gguf_source.package_module(target)
    if module is not None:
        spec = importlib.util.find_spec(module.split(".")[0])
        if spec is None or not spec.submodule_search_locations:
            return None
        size = sum(f.stat().st_size for d in spec.submodule_search_locations for f in Path(d).rglob("*")
                   if f.is_file() and f.suffix != ".py")
    else:
        try:
            size = inside_root_or_cold(target, root=root, config=config).stat().st_size
        except (SourceError, OSError):
            return None
    return int(size * GGUF_TO_16BIT), int(size * GGUF_TO_16BIT)


def capacity_problem(need: Need, node: NodeResources) -> str | None:
    """Why `need` can never fit `node`, even alone (naming the capacity and
    the key that sets it), or None."""
    if need.whole_node:
        return None
    if need.ram_bytes > node.ram_bytes:
        return (f"it needs about {need.ram_bytes / GIB:.1f} GiB of RAM ({need.basis}), but parts on this node "
                f"may hold {node.ram_bytes / GIB:.1f} GiB ({node.basis['ram']})")
    if need.gpus > len(node.gpus):
        return f"it needs {need.gpus} GPUs, but this node has {len(node.gpus)} ({node.basis['gpus']})"
    if need.cpu_slots > node.cpu_slots:
        return f"it needs {need.cpu_slots} CPU slots, but this node has {node.cpu_slots} ({node.basis['cpu_slots']})"
    return None


def thread_env(need: Need, node: NodeResources) -> dict[str, str]:
    """Thread counts for the part's child when CPU slots share the cores
    (torch, OpenMP and MKL read these at start); nothing when one part has
    the node, which keeps their own defaults."""
    if node.cpu_slots <= 1 or need.whole_node:
        return {}
    n = str(node.threads_per_part() * max(1, need.cpu_slots))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
