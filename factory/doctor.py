"""`factory doctor`: can this node run a line? Each check says ok, warn or fail."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from factory.errors import FactoryError
from factory.line import Line
from factory.nodeconfig import load_node_config
from factory.protocol import Layout
from factory.tiers import GiB, Tier, node_tiers

Verdict = Literal["ok", "warn", "fail"]

# Below this many inotify watches per user, a busy node (editors, other
# daemons) can run out and the line falls back to rescans.
MIN_INOTIFY_WATCHES = 8192


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str


def _gpus() -> Check:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return Check("gpus", "warn", "no nvidia-smi: no NVIDIA GPU visible; stations will plan CPU loads")
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError) as err:
        return Check("gpus", "fail", f"nvidia-smi failed: {err}")
    gpus = [line.split(", ") for line in out.strip().splitlines()]
    desc = "; ".join(f"{g[0]} {float(g[2]) / 1024:.1f}/{float(g[1]) / 1024:.1f} GiB free" for g in gpus)
    return Check("gpus", "ok", desc or "none")


def _inotify() -> Check:
    try:
        watches = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
        instances = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    except (OSError, ValueError):
        return Check("inotify", "warn", "cannot read inotify limits: intake relies on rescans")
    verdict: Verdict = "ok" if watches >= MIN_INOTIFY_WATCHES and instances >= 16 else "warn"
    return Check("inotify", verdict, f"max_user_watches={watches} max_user_instances={instances}")


def _systemd() -> Check:
    if not Path("/run/systemd/system").is_dir():
        return Check("systemd", "warn", "not booted with systemd: run the daemon under another supervisor")
    unit = subprocess.run(["systemctl", "is-active", "forge-factory"], capture_output=True, text=True)
    return Check("systemd", "ok", f"systemd present; forge-factory unit is {unit.stdout.strip() or 'unknown'}")


def _tier_check(tier: Tier, *, hot: Tier) -> Check:
    """A missing tier fails: cleanup and offloads would otherwise write to
    whatever disk holds its parent (an unmounted cold disk fills the root)."""
    name = f"tier {tier.name} {tier.path}"
    if tier.problem:
        return Check(name, "fail", f"{tier.problem} ({tier.key} in factory_node.toml)")
    verdict: Verdict = "ok"
    notes = [f"{tier.free_gib:.1f} GiB free", f"fs {tier.fs_type}"]
    if tier.free_gib < tier.min_free_gb:
        verdict = "warn"
        notes.append(f"below min_free_gb {tier.min_free_gb}")
    if tier.name == "hot" and tier.weak_fs:
        verdict = "warn"
        notes.append("hot tier on a network/virtual filesystem: renames, fsync and inotify may be unreliable")
    if tier is not hot and not tier.mount_point and tier.device == hot.device:
        verdict = "warn"
        notes.append("not a mount point and on the hot tier's filesystem: evicting here frees nothing there; "
                     "mount the cold disk at this path")
    if tier.declared_fs_type and tier.declared_fs_type != tier.fs_type:
        verdict = "warn"
        notes.append(f"declared fs_type {tier.declared_fs_type!r} differs")
    if tier.read_mb_s or tier.write_mb_s:
        notes.append(f"declared read {tier.read_mb_s} / write {tier.write_mb_s} MB/s")
    return Check(name, verdict, ", ".join(notes))


def run_checks(root: Path | None) -> list[Check]:
    """The machine's checks, then (with a root) its node config, disks and
    line. Without a root the machine is still checked: a new node is
    doctored before it has one."""
    checks = [
        Check("cpu", "ok", f"{os.cpu_count()} logical CPUs"),
        Check("ram", "ok", f"{psutil.virtual_memory().available / GiB:.1f} of "
                           f"{psutil.virtual_memory().total / GiB:.1f} GiB available"),
        _gpus(),
    ]
    if root is None:
        return [*checks, Check("root", "warn", "no root given (--root ROOT or $FACTORY_ROOT): its node config, "
                                               "disks and line were not checked"),
                _inotify(), _systemd(), _sandbox(), *_formats()]
    try:
        config = load_node_config(Layout(root).node_config)
        checks.append(Check("node config", "ok", f"{Layout(root).node_config} (node {config.node.name})"))
    except FactoryError as err:
        return [*checks, Check("node config", "fail", str(err))]
    tiers = node_tiers(root, config)
    checks += [_tier_check(tier, hot=tiers[0]) for tier in tiers]
    line = Line(root, config)
    try:
        line.require_layout()
        line.check_one_filesystem()
        checks.append(Check("line", "ok", f"{line.layout.line}: stations on one filesystem"))
    except FactoryError as err:
        checks.append(Check("line", "fail", str(err)))
    checks += [_inotify(), _systemd(), _sandbox(), *_formats()]
    return checks


def _formats() -> list[Check]:
    """Each quant format: can this node write it, and if not, what provides
    it (the same probes the plan asks; package metadata, no imports)."""
    from factory.catalog import QUANT_FORMATS, format_problem

    checks = []
    for fmt in QUANT_FORMATS:
        why = format_problem(fmt)
        checks.append(Check(f"quant {fmt}", "ok" if why is None else "warn",
                            "available" if why is None else f"refused at plan time: {why}"))
    return checks


def _sandbox() -> Check:
    """Benchmarks that execute generated code (HumanEval) need the OS
    sandbox; without it they are refused at plan time, so say so here."""
    from factory.sandbox import sandbox_available  # stdlib only, no torch

    why = sandbox_available()
    if why is None:
        return Check("code sandbox", "ok", "user, pid, mount and network namespaces available")
    return Check("code sandbox", "warn", f"generated code cannot run here (HumanEval refused): {why}")
