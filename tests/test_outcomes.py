"""Failure classification, signal names and message caps (factory/outcomes.py)."""

from __future__ import annotations

import errno
import signal
import socket

import pytest

from factory.outcomes import MAX_MESSAGE_CHARS, cap_message, classify, error_record, signal_name


class _Response:
    def __init__(self, status: int) -> None:
        self.status_code = status


class HfHubHTTPError(Exception):
    """Shaped like huggingface_hub's error: an exception carrying `.response`."""

    def __init__(self, status: int) -> None:
        super().__init__(f"{status} error")
        self.response = _Response(status)


def _raised(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as err:
            raise outer from err
    except Exception as err:  # noqa: BLE001
        return err


@pytest.mark.parametrize("err, cls, cause", [
    (OSError(errno.ENOSPC, "No space left on device", "/srv/x"), "infrastructure", "out of disk space"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "infrastructure", "out of disk space"),
    (ConnectionResetError(errno.ECONNRESET, "reset"), "infrastructure", "ConnectionResetError"),
    (socket.timeout("timed out"), "infrastructure", "TimeoutError"),
    (OSError(errno.EIO, "Input/output error"), "infrastructure", "I/O error EIO"),
    (HfHubHTTPError(503), "infrastructure", "HTTP 503"),
    (HfHubHTTPError(429), "infrastructure", "HTTP 429"),
    (HfHubHTTPError(404), "deterministic", "HTTP 404"),
    (MemoryError(), "infrastructure", "MemoryError"),
    (FileNotFoundError(errno.ENOENT, "No such file", "corpus.jsonl"), "deterministic", "FileNotFoundError"),
    (ValueError("bad value"), "deterministic", "ValueError"),
    (_raised(RuntimeError("while loading"), OSError(errno.ENOSPC, "full")), "infrastructure", "out of disk"),
    (_raised(RuntimeError("download"), ConnectionError("refused")), "infrastructure", "ConnectionError"),
])
def test_classify(err, cls, cause):
    got = classify(err)
    assert got.cls == cls
    assert cause in got.cause


def test_a_full_disk_names_the_path_that_filled():
    assert classify(OSError(errno.ENOSPC, "full", "/mnt/cold0/x")).no_room_path == "/mnt/cold0/x"
    assert classify(ValueError("x")).no_room_path is None


@pytest.mark.parametrize("signum, name", [
    (signal.SIGKILL, "SIGKILL"), (signal.SIGSEGV, "SIGSEGV"),
    (signal.SIGRTMIN + 6, "SIGRTMIN+6"), (200, "signal 200"),
])
def test_signal_name_never_raises(signum, name):
    assert name in signal_name(int(signum))


def test_messages_and_tracebacks_are_capped():
    long = "x" * (MAX_MESSAGE_CHARS * 5)
    capped = cap_message(long, full_text_at="/srv/work/p/failure.txt")
    assert len(capped) < MAX_MESSAGE_CHARS + 200
    assert "truncated" in capped and "/srv/work/p/failure.txt" in capped
    rec = error_record(None, "deterministic", long, retries=0, tb="t" * 10**6)
    assert len(rec["message"]) < MAX_MESSAGE_CHARS + 200
    assert len(rec["traceback"]) <= 20003
    assert cap_message("short") == "short"


def test_a_capped_message_keeps_its_pointer_within_the_limit():
    capped = error_record(None, "deterministic", cap_message("y" * 10**5, full_text_at="/w/p/failure.txt"),
                          retries=0)["message"]
    assert len(capped) <= MAX_MESSAGE_CHARS and capped.endswith("full text in /w/p/failure.txt]")
