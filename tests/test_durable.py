"""Crash-safe reads and writes (factory/durable.py): what the line refuses to read."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest

from factory import durable


def test_a_symlink_is_never_followed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("TOKEN-123\n")
    link = tmp_path / "p.alloy.json"
    link.symlink_to(secret)
    with pytest.raises(durable.NotARegularFile, match="symbolic link"):
        durable.read_regular(link)


def test_fifo_and_directory_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "f.alloy.json"
    os.mkfifo(fifo)  # opening a FIFO for reading would block without O_NONBLOCK
    with pytest.raises(durable.NotARegularFile, match="not a regular file"):
        durable.read_regular(fifo)
    (tmp_path / "d.json").mkdir()
    with pytest.raises(durable.NotARegularFile):
        durable.read_regular(tmp_path / "d.json")


def test_an_oversized_file_is_refused_unread(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(durable.MAX_PROTOCOL_FILE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(durable.NotARegularFile, match="limit"):
        durable.read_regular(big)


def test_non_finite_floats_are_written_as_null(tmp_path):
    path = tmp_path / "r.json"
    durable.write_json(path, {"ppl": math.inf, "nested": [math.nan, 1.5], "ok": 2})
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"ppl": None, "nested": [None, 1.5], "ok": 2}


def test_files_are_never_wider_than_their_directory(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    os.chmod(closed, 0o700)
    durable.write_json(closed / "x.json", {"a": 1})
    durable.append_line(closed / "events.jsonl", b"{}\n")
    for name in ("x.json", "events.jsonl"):
        assert stat.S_IMODE((closed / name).stat().st_mode) & 0o077 == 0, name


def test_a_closed_root_keeps_its_line_files_closed(tmp_path):
    """An operator who makes the root private (0700) gets private stations,
    sidecars and events: nothing the line writes is wider than the root."""
    import subprocess
    import sys

    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    os.chmod(root, 0o700)
    subprocess.run([sys.executable, "-m", "factory.cli", "init", str(root)], check=True, capture_output=True)
    alloy = tmp_path / "p.alloy.json"
    alloy.write_text(json.dumps({"name": "p", "version": "1.0.0",
                                 "source": {"baseModel": "selftest", "architecture": "selftest"},
                                 "stages": [{"type": "selftest", "seconds": 0}]}))
    subprocess.run([sys.executable, "-m", "factory.cli", "enqueue", str(alloy), "--root", str(root)],
                   check=True, capture_output=True)
    written = [p for p in root.rglob("*") if not p.is_symlink()]
    assert any(p.name == "events.jsonl" for p in written) and any(p.name == "p.ticket.json" for p in written)
    wide = [str(p) for p in written if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not wide, wide


def test_append_line_closes_a_torn_last_line_first(tmp_path):
    """throughput.jsonl and events.jsonl: a crash mid-append leaves half a
    line; the next record must start on a line of its own, not merge."""
    path = tmp_path / "throughput.jsonl"
    path.write_bytes(b'{"part": "a"}\n{"part": "b", "outc')  # torn by a crash
    durable.append_line(path, b'{"part": "c"}\n')
    assert path.read_bytes().splitlines() == [b'{"part": "a"}', b'{"part": "b", "outc', b'{"part": "c"}']
    durable.append_line(path, b'{"part": "d"}\n')  # a whole last line: nothing added
    assert path.read_bytes().endswith(b'{"part": "c"}\n{"part": "d"}\n')
