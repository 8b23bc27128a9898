"""systemd's notify protocol (sd_notify), without libsystemd.

With Type=notify, systemd waits for READY=1 before the unit counts as
started, kills the service if WATCHDOG=1 stops arriving within WatchdogSec,
and shows STATUS= in `systemctl status`. Outside systemd (NOTIFY_SOCKET unset)
every call is a no-op.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        usec = os.environ.get("WATCHDOG_USEC")
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec and usec.isdigit() else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str) -> None:
        """send(READY="1", STATUS="idle") -> "READY=1\\nSTATUS=idle"."""
        if not self.address:
            return
        addr = self.address
        if addr.startswith("@"):  # abstract namespace socket
            addr = "\0" + addr[1:]
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(msg, addr)
        except OSError:
            pass  # systemd gone (e.g. during shutdown): nothing useful to do

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def status(self, line: str) -> None:
        self.send(STATUS=line)

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
