"""The part's child process: runs one part's stages, then exits.

The daemon starts `python -m factory.child` per part, so whatever a station
does (import torch, allocate 60 GB, segfault in a kernel) cannot take the
daemon down. The child talks to the daemon only through JSON lines on an
inherited pipe (--report-fd) and its exit code (factory/outcomes.py);
its stdout and stderr go to work/<base>/child.log. A child run on a cluster
node (factory/ray_backend.py) has no daemon parent: it appends the same
lines to a file on the shared root instead (--report-file).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import sys
import time
import traceback
from pathlib import Path

from pydantic import ValidationError

from factory.alloy import Alloy
from factory.catalog import SHIP, kind_of, load_station
from factory.checkpoint import Checkpoint, hash_outputs
from factory.durable import NotARegularFile, file_mode_for
from factory.errors import StageFailed, StopRequested
from factory.integrity import alloy_hash, sha256_hex
from factory.nodeconfig import load_node_config
from factory.outcomes import (
    EXIT_DONE, EXIT_FAILED, EXIT_INFRA, EXIT_STOPPED, MAX_MESSAGE_CHARS, classify,
)
from factory.protocol import CLAIMED_ALLOY, FAILURE_TEXT, Layout, parse_part
from factory.stages import StageContext, write_report_line
from factory.tiers import free_bytes_at, offload_dir

_PR_SET_PDEATHSIG = 1
_stop = False


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the daemon dies, so a new daemon
    never recovers a part that an orphaned child is still building."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the worker lock still guards
        pass
    if os.getppid() != parent_pid:  # the daemon died before prctl took effect
        os._exit(EXIT_STOPPED)


def _open_report_file(path: Path) -> int:
    """The report file, opened for appending: each report is one os.write,
    so a reader on the shared root sees whole lines as soon as they are
    written. Never through a symlink, never a FIFO (it would block)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 file_mode_for(path.parent))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFile(errno.EINVAL, "is not a regular file (report file)", str(path))
    return fd


def _on_stop(signum, frame) -> None:
    global _stop
    _stop = True


def _peak_vram_mb() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def _failure_report(err: BaseException, info: dict, work_dir: Path, stage_dir: Path | None) -> dict:
    """The `failed` report: class from factory.outcomes.classify; a message
    too long for error.json is kept whole in work/<base>/failure.txt. On a
    full disk the stage's partial output (redone anyway) is removed first,
    then the free space is measured: the part waits until there is more."""
    verdict = classify(err)
    message = str(err) or type(err).__name__
    tb = traceback.format_exc()
    free = None
    if verdict.no_room:
        if stage_dir is not None:
            shutil.rmtree(stage_dir, ignore_errors=True)
        free = free_bytes_at(Path(verdict.no_room_path or work_dir))
    if len(message) > MAX_MESSAGE_CHARS:
        try:
            (work_dir / FAILURE_TEXT).write_text(f"{message}\n\n{tb}", encoding="utf-8", errors="replace")
        except OSError:
            pass  # a full disk: error.json keeps the capped message
    return {"t": "failed", **info, "class": verdict.cls, "cause": verdict.cause,
            "no_room": verdict.no_room, "no_room_path": verdict.no_room_path, "free_bytes": free, "message": message,
            "exception": type(err).__name__, "traceback": tb}



def _drop_offload(config, base: str) -> None:
    """A streaming load's spilled weights are scratch: gone after every stage."""
    folder = offload_dir(config, base)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def run_part(layout: Layout, filename: str, report) -> int:
    """Every stage not yet verified in the checkpoint, in order. Any failure,
    in a station or in the line's own bookkeeping around it (a full disk
    under the checkpoint), is reported and classified, never a bare exit."""
    config = load_node_config(layout.node_config)
    base = parse_part(filename).base
    work_dir = layout.work_dir(base)
    info = {"index": None, "type": None}
    stage_dir: Path | None = None  # the running stage's (its partial output may be removed on ENOSPC)
    try:
        # The bytes the daemon gated and hashed at claim, not the file in
        # assembly/ (which someone may edit or delete while the part runs).
        raw = (work_dir / CLAIMED_ALLOY).read_bytes()
        alloy = json.loads(raw)
        recipe = _typed(alloy)
        raw_hash = alloy_hash(raw)
        ckpt = Checkpoint.load(work_dir, sha256_hex(raw))
        done = ckpt.verified_prefix(work_dir, [s.type for s in recipe.stages])
        if done < len(ckpt.stages):
            ckpt.truncate(done)
            ckpt.save()
        for i, stage in enumerate(recipe.stages):
            info = {"index": i, "type": stage.type}
            if i < done:
                report({"t": "stage_skipped", **info, "reason": "checkpoint verified"})
                continue
            if kind_of(stage.type).role == SHIP:
                _hand_off(alloy, i, ckpt, report)
                continue
            report({"t": "stage_started", **info})
            stage_dir = work_dir / "stages" / f"{i}-{stage.type}"
            _run_stage(layout, config, alloy, recipe, i, work_dir, stage_dir, ckpt, raw_hash, report)
    except StopRequested:
        report({"t": "stopped", **info})
        return EXIT_STOPPED
    except BaseException as err:  # noqa: BLE001 - every failure is reported, then classified
        failure = _failure_report(err, info, work_dir, stage_dir)
        report(failure)
        return EXIT_INFRA if failure["class"] == "infrastructure" else EXIT_FAILED
    report({"t": "done"})
    return EXIT_DONE


def _typed(alloy: dict) -> Alloy:
    """The claimed alloy as the stations receive it. The intake gate
    validated these bytes, so a failure here means the schema changed under
    a queued part (a factory upgrade): the part fails with the schema's words."""
    try:
        return Alloy.model_validate(alloy)
    except ValidationError as err:
        raise StageFailed(f"the claimed alloy no longer validates against this factory's schema: {err}; "
                          "run `factory validate` on it, fix it and enqueue it again") from None


def _hand_off(alloy: dict, i: int, ckpt: Checkpoint, report) -> None:
    """A ship-role stage (publish, deliver, deploy) is not run here: its
    checkpoint entry records it as handed off, with its parameters as the
    alloy wrote them, and result.json lists it for the shipping side."""
    stage = alloy["stages"][i]
    entry = {"index": i, "type": stage["type"], "elapsed_s": 0.0, "outputs": {},
             "metrics": {}, "handed_off": {"role": SHIP, "params": stage}}
    ckpt.record(entry)
    report({"t": "stage_handed_off", "index": i, "type": stage["type"], "role": SHIP})


def _run_stage(layout: Layout, config, alloy: dict, recipe: Alloy, i: int, work_dir: Path, stage_dir: Path,
               ckpt: Checkpoint, raw_hash: str, report) -> None:
    """One stage from scratch, then its checkpoint entry (outputs hashed)."""
    shutil.rmtree(stage_dir, ignore_errors=True)  # a stage restarts from scratch
    stage_dir.mkdir(parents=True)
    stage = recipe.stages[i]
    ctx = StageContext(layout=layout, config=config, alloy=alloy, recipe=recipe, stage=stage, index=i,
                       work_dir=work_dir, stage_dir=stage_dir, previous=list(ckpt.stages),
                       report=report, stop_requested=lambda: _stop, alloy_hash=raw_hash)
    t0 = time.monotonic()
    try:
        result = load_station(stage.type)(ctx)
    finally:
        _drop_offload(config, work_dir.name)
    entry = {"index": i, "type": stage.type, "elapsed_s": round(time.monotonic() - t0, 3),
             "outputs": hash_outputs(work_dir, result.outputs), "metrics": {**ctx.recorded, **result.metrics}}
    vram = _peak_vram_mb()
    if vram is not None:
        entry["peak_vram_mb"] = vram
    ckpt.record(entry)
    report({"t": "stage_completed", **entry})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="factory.child")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--part", required=True, help="alloy file name in line/assembly/")
    reports = ap.add_mutually_exclusive_group(required=True)
    reports.add_argument("--report-fd", type=int, help="inherited pipe to the daemon")
    reports.add_argument("--report-file", type=Path, help="file to append the report lines to (cluster runs)")
    ap.add_argument("--parent-pid", type=int, help="the daemon's pid: die with it (omit when there is none)")
    args = ap.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    fd = args.report_fd if args.report_file is None else _open_report_file(args.report_file)
    return run_part(Layout(args.root), args.part, lambda msg: write_report_line(fd, msg))


if __name__ == "__main__":
    sys.exit(main())
