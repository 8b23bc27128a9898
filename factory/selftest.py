"""The `selftest` stage: node burn-in, and how the line is tested without torch.

    {"type": "selftest", "seconds": 0.2, "steps": 4, "outcome": "pass"}

It sleeps `seconds` split over `steps`, reporting progress and honouring
stop requests between steps, then ends as `outcome` says:

- pass: writes stages/<i>-selftest/selftest.json and succeeds;
- fail: raises StageFailed (deterministic: the part goes to rework);
- crash: SIGKILLs its own process, as the OOM killer would (infrastructure:
  the part is retried, then reworked after max_retries);
- hang: stops reporting and ignores stop requests (the stage timeout or the
  stop grace period must end it);
- nospace: raises ENOSPC as a full disk would (infrastructure: the part waits
  for room without spending a retry); it passes instead once the file
  `stages/<i>-selftest.room` exists in its work dir, so a test can "free" room.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time

from factory.errors import StageFailed
from factory.stages import StageContext, StageResult

_TICK = 0.02  # sleep granularity: how fast a stop request is noticed


def run_stage(ctx: StageContext) -> StageResult:
    seconds, steps, outcome = ctx.stage.seconds, ctx.stage.steps, ctx.stage.outcome
    for step in range(steps):
        deadline = time.monotonic() + seconds / steps
        while time.monotonic() < deadline:
            ctx.stop_point()
            time.sleep(min(_TICK, max(0.0, deadline - time.monotonic())))
        ctx.progress(step + 1, steps, "step")
        if outcome == "hang" and step == steps // 2:
            while True:
                time.sleep(3600)
    ctx.stop_point()
    if outcome == "fail":
        raise StageFailed(f"selftest stage {ctx.index} failed on purpose (outcome \"fail\"); "
                          "set outcome to \"pass\" for a passing burn-in")
    if outcome == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if outcome == "nospace" and not (ctx.work_dir / "stages" / f"{ctx.index}-selftest.room").exists():
        raise OSError(errno.ENOSPC, "No space left on device (selftest outcome \"nospace\")", str(ctx.stage_dir))
    out = ctx.stage_dir / "selftest.json"
    out.write_text(json.dumps({"steps": steps, "seconds": seconds, "pid": os.getpid()}) + "\n")
    return StageResult(outputs=[out], metrics={"steps": steps})
