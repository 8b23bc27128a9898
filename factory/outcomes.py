"""How a part's run ended, and the records the line writes for it.

Failures fall into classes that decide what the line does next:

- infrastructure: the node failed the part (killed by a signal, the OOM
  killer, a stage timeout, MemoryError, a network or Hugging Face download
  error). Retried with backoff, up to [forge] max_retries, then rework. A
  full disk (ENOSPC, EDQUOT) is infrastructure too, but spends no retry: the
  part waits in intake until its filesystem has room again.
- deterministic: the part itself is wrong (invalid alloy, a stage raising).
  Running it again would fail the same way: straight to rework.
- cancelled: a foreman asked for it: rework, where `factory retry` can
  bring it back.
"""

from __future__ import annotations

import errno
import signal
from dataclasses import dataclass
from typing import Literal

from factory.events import utc_now

FailureClass = Literal["infrastructure", "deterministic", "cancelled"]

# Child exit codes (the child's side of the contract, see factory/child.py).
EXIT_DONE = 0
EXIT_FAILED = 1  # a deterministic failure, reported on the report pipe first
EXIT_STOPPED = 75  # sysexits EX_TEMPFAIL: stopped at a safe point on request
EXIT_INFRA = 76  # an infrastructure failure the child caught (MemoryError, CUDA OOM)

# Exception class names (anywhere in the exception's class hierarchy or its
# cause chain) that mean "the node or the network failed", not "the recipe
# is wrong". By name, so the child need not import requests/httpx/hub to ask.
INFRA_EXCEPTIONS = frozenset({
    "MemoryError", "OutOfMemoryError",
    "ConnectionError", "TimeoutError", "BrokenPipeError",  # builtins (socket.timeout is TimeoutError)
    "Timeout", "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError", "ContentDecodingError",  # requests
    "ProtocolError", "NewConnectionError", "MaxRetryError", "IncompleteRead",  # urllib3 / http.client
    "TransportError", "RemoteProtocolError",  # httpx
})
# OS errors that say the node is out of room: the part waits, spends nothing.
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# OS errors of a flaky device or network filesystem: retried.
INFRA_ERRNOS = frozenset({errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                          errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE})
# HTTP statuses a download may be retried on (Hugging Face hub errors carry one).
RETRY_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

RETRY_BACKOFF_CAP_SECONDS = 3600.0
# error.json messages and event payloads stay this short; the full text goes
# to the part's work dir (see cap_message).
MAX_MESSAGE_CHARS = 2000
MAX_TRACEBACK_CHARS = 20000  # the innermost frames are the ones that matter


@dataclass(frozen=True)
class Classified:
    """What a stage's exception means for the line."""

    cls: FailureClass
    cause: str  # one line: which kind of fault, for the message
    no_room: bool = False  # a full disk: the part waits for room, spends no retry
    no_room_path: str | None = None  # the path that filled up, when the error names it


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen and len(seen) < 16:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def classify(err: BaseException) -> Classified:
    """Infrastructure (retry, or wait for room) or deterministic (rework).

    A missing file the part needs, a bad value or an unsupported model is
    deterministic: running again fails the same way. Out of memory or disk,
    a network or download failure, a flaky device: the node's fault.
    """
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in NO_ROOM_ERRNOS:
            return Classified("infrastructure", f"out of disk space ({e.strerror or 'ENOSPC'})", no_room=True,
                              no_room_path=e.filename if isinstance(e.filename, str) else None)
    for e in _chain(err):
        names = {c.__name__ for c in type(e).__mro__}
        status = _http_status(e)
        if status is not None:
            if status in RETRY_HTTP_STATUSES:
                return Classified("infrastructure", f"download failed with HTTP {status} ({type(e).__name__})")
            return Classified("deterministic", f"download refused with HTTP {status} ({type(e).__name__})")
        if "OfflineModeIsEnabled" in names or isinstance(e, FileNotFoundError):
            return Classified("deterministic", type(e).__name__)
        if names & INFRA_EXCEPTIONS:
            return Classified("infrastructure", f"{type(e).__name__} (node or network)")
        if isinstance(e, OSError) and e.errno in INFRA_ERRNOS:
            return Classified("infrastructure", f"I/O error {errno.errorcode.get(e.errno, e.errno)}")
    return Classified("deterministic", type(err).__name__)


def signal_name(signum: int) -> str:
    """SIGKILL, SIGRTMIN+6, or 'signal 99': any number a process can die of."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN} (signal {signum})"
        return f"signal {signum}"


def cap_message(message: str, *, full_text_at: str | None = None) -> str:
    """`message` cut to MAX_MESSAGE_CHARS, saying where the full text is."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    where = f"; full text in {full_text_at}" if full_text_at else ""
    marker = f"... [truncated {len(message)} chars{where}]"
    return message[: max(0, MAX_MESSAGE_CHARS - len(marker))] + marker


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
        "message": cap_message(message),
        "traceback": tb if tb is None or len(tb) <= MAX_TRACEBACK_CHARS else "..." + tb[-MAX_TRACEBACK_CHARS:],
        "retries": retries,
        "problems": problems or [],
        **extra,
    }
