"""How a part's run ended, and the records the line writes for it.

Failures fall into classes that decide what the line does next:

- infrastructure: the node failed the part (killed by a signal, the OOM
  killer, a stage timeout, MemoryError). Retried with backoff, up to
  [forge] max_retries, then rework.
- deterministic: the part itself is wrong (invalid alloy, a stage raising).
  Running it again would fail the same way: straight to rework.
- cancelled: a foreman asked for it: rework, where `factory retry` can
  bring it back.
"""

from __future__ import annotations

from typing import Literal

from factory.events import utc_now

FailureClass = Literal["infrastructure", "deterministic", "cancelled"]

# Child exit codes (the child's side of the contract, see factory/child.py).
EXIT_DONE = 0
EXIT_FAILED = 1  # a deterministic failure, reported on the report pipe first
EXIT_STOPPED = 75  # sysexits EX_TEMPFAIL: stopped at a safe point on request
EXIT_INFRA = 76  # an infrastructure failure the child caught (MemoryError, CUDA OOM)

# Exception class names that mean "the node ran out", not "the recipe is wrong".
INFRA_EXCEPTIONS = frozenset({"MemoryError", "OutOfMemoryError"})

RETRY_BACKOFF_CAP_SECONDS = 3600.0


def backoff_seconds(base: float, retry: int) -> float:
    """Wait before retry number `retry` (1-based): base, 2*base, 4*base, ... capped."""
    return min(RETRY_BACKOFF_CAP_SECONDS, base * (2 ** max(0, retry - 1)))


def error_record(stage: dict | None, cls: FailureClass, message: str, *, retries: int,
                 tb: str | None = None, problems: list | None = None, **extra) -> dict:
    """The body of `<base>.error.json` (docs/FACTORY-PROTOCOL.md, "error.json")."""
    return {
        "failed_at": utc_now(),
        "stage": stage,
        "class": cls,
        "message": message,
        "traceback": tb,
        "retries": retries,
        "problems": problems or [],
        **extra,
    }
