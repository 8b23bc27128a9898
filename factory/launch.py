"""Where a part's child runs: a local process, or a try on a Ray cluster.

The worker drives both through one small interface (poll, read, stop,
kill), so placement, deadlines, cancels, stops and routing are the same
code whichever backend runs the child. The local child is a process group
of this node; a cluster child (factory.ray_backend, imported only when
`[cluster] backend = "ray"`) runs on whichever node Ray picked, against the
same root on a shared filesystem.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Protocol

# The exit status the worker routes when a child's outcome cannot be known
# (its cluster node was lost): never a real exit code (those are 0..255 or
# a negative signal number).
LOST = -1000
# After a hard kill, how long to wait for the child to be reaped.
KILL_WAIT_SECONDS = 10.0


class Child(Protocol):
    """A running child as the worker sees it."""

    pid: int | None  # a local process to sample (RSS, SIGSTOP), or None
    fd: int | None  # a pipe to select on for reports, or None (read() is polled)
    lost: str | None  # set when poll() returned LOST: why

    def poll(self) -> int | None: ...

    def read(self) -> bytes | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class LocalChild:
    """`python -m factory.child` in its own session on this node."""

    lost = None

    def __init__(self, proc: subprocess.Popen, fd: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.fd = fd

    def poll(self) -> int | None:
        return self.proc.poll()

    def read(self) -> bytes | None:
        """Reports waiting in the pipe (b"" when none yet), None at EOF."""
        try:
            return os.read(self.fd, 65536) or None
        except BlockingIOError:
            return b""

    def terminate(self) -> None:
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the part's whole session (it runs in its own process
        group), so no grandchild (a sandbox, a tokenizer worker) outlives
        it; then reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=KILL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            pass  # a process stuck in the kernel (D state): poll() sees it go


class ClusterChild:
    """One try on the Ray cluster (a factory.ray_backend.RayRun)."""

    pid = None
    fd = None

    def __init__(self, run) -> None:
        self.run = run
        self.lost: str | None = None
        self._code: int | None = None

    def poll(self) -> int | None:
        if self._code is not None:
            return self._code
        from factory.ray_backend import RunLost

        try:
            code = self.run.poll()
        except RunLost as err:
            self.lost = f"{err} (a lost node or actor: infrastructure)"
            code = LOST
        self._code = code
        return code

    def read(self) -> bytes | None:
        return self.run.read_reports()

    @property
    def node(self) -> str | None:
        """The Ray node it runs on, once known (never blocks)."""
        return self.run.placed()

    def terminate(self) -> None:
        self._quietly(self.run.terminate)

    def kill(self) -> None:
        self._quietly(self.run.kill)

    @staticmethod
    def _quietly(call) -> None:
        """A signal to a try whose node is going away may fail: poll() says how it ended."""
        try:
            call()
        except Exception:  # noqa: BLE001 - ray's own errors: poll() reports how the try ended
            pass
