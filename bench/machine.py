"""What machine a benchmark ran on, recorded beside its figures (this node
is shared and noisy: the load average at start says how quiet it was)."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path


def machine() -> dict:
    model = ""
    try:
        for raw in Path("/proc/cpuinfo").read_text().splitlines():
            if raw.startswith("model name"):
                model = raw.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "tmp": tempfile.gettempdir()}
