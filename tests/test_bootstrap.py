"""bootstrap/: the systemd unit says what the daemon needs, and install.sh's
dry run shows every step without touching the system."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from factory.errors import BadInput, Conflict, NodeConfigError
from factory.nodeconfig import DaemonSection

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "bootstrap" / "forge-factory.service"
INSTALL = REPO / "bootstrap" / "install.sh"

# Commands install.sh uses to change a system; the dry run must call none of
# them (cp and rm are left out: the script uses them on its own mktemp scratch).
MUTATORS = ("useradd", "groupadd", "usermod", "runuser", "chown", "chmod", "install", "ln",
            "mkdir", "pip", "pip3", "systemctl")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> every value (keys may repeat)."""
    units: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = units.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"key outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return units


def seconds(value: str) -> float:
    """systemd time spans as used here: '90', '90s', '1min 30s'."""
    total = 0.0
    for token in value.split():
        for suffix, mult in (("min", 60), ("ms", 0.001), ("s", 1), ("h", 3600)):
            if token.endswith(suffix):
                total += float(token[: -len(suffix)]) * mult
                break
        else:
            total += float(token)
    return total


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= missing from {UNIT.name}"
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
    return values[0]


def test_unit_is_a_notify_service_with_a_watchdog(unit):
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert seconds(one(unit, "Service", "WatchdogSec")) > 0


def test_unit_restarts_on_failure_but_not_on_bad_config(unit):
    assert one(unit, "Service", "Restart") == "on-failure"
    prevent = one(unit, "Service", "RestartPreventExitStatus").split()
    assert str(NodeConfigError.exit_code) in prevent  # 78: a restart cannot fix the config
    assert str(Conflict.exit_code) in prevent  # 4: another worker holds the root


def test_start_limits_live_in_the_unit_section(unit):
    # systemd ignores StartLimit* in [Service] on current versions.
    assert seconds(one(unit, "Unit", "StartLimitIntervalSec")) > 0
    assert int(one(unit, "Unit", "StartLimitBurst")) >= 1
    assert "StartLimitIntervalSec" not in unit["Service"]
    assert "StartLimitBurst" not in unit["Service"]


def test_stop_timeout_covers_the_daemons_grace_period(unit):
    assert one(unit, "Service", "KillMode") == "mixed"
    timeout = seconds(one(unit, "Service", "TimeoutStopSec"))
    assert timeout > DaemonSection().stop_grace_seconds


def test_unit_keeps_the_service_alive_through_a_childs_oom_kill(unit):
    assert one(unit, "Service", "OOMPolicy") == "continue"


def test_hardening_leaves_gpus_reachable(unit):
    svc = unit["Service"]
    assert svc.get("PrivateDevices", ["no"]) == ["no"]
    assert "DeviceAllow" not in svc and "DevicePolicy" not in svc
    assert svc.get("ProtectClock", ["no"]) == ["no"]  # adds a DeviceAllow= rule


def test_unit_runs_the_venv_factory_on_the_root_it_may_write(unit):
    exec_start = one(unit, "Service", "ExecStart").split()
    assert exec_start[:2] == ["/opt/forge-factory/venv/bin/factory", "run"]
    root = exec_start[exec_start.index("--root") + 1]
    assert f"FACTORY_ROOT={root}" in unit["Service"]["Environment"]
    assert root in " ".join(unit["Service"]["ReadWritePaths"]).split()
    assert one(unit, "Service", "User") == "forge"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path):
    """systemd's own parser: unknown keys and bad values are reported. Only
    the missing binary (not installed here) and the user are expected."""
    proc = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, check=False)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if line.strip() and "is not executable" not in line and "/opt/forge-factory" not in line]
    assert not complaints, complaints


def test_install_script_parses():
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    assert os.stat(INSTALL).st_mode & stat.S_IXUSR, "install.sh must be executable"


def _stub_path(tmp_path: Path) -> tuple[dict, Path]:
    """A PATH whose mutating commands only log that they were called."""
    bindir, log = tmp_path / "stub-bin", tmp_path / "calls.log"
    bindir.mkdir()
    for name in MUTATORS:
        stub = bindir / name
        # Queries (systemctl is-enabled/is-active on a systemd host) answer "no" unlogged.
        query = 'case "$1" in is-*|show|status|cat) exit 1;; esac\n' if name == "systemctl" else ""
        stub.write_text(f'#!/bin/sh\n{query}echo "{name} $*" >> "{log}"\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    env.pop("FACTORY_ROOT", None)
    return env, log


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    env, log = _stub_path(tmp_path)
    root, prefix = tmp_path / "srv" / "factory", tmp_path / "opt" / "forge-factory"
    units, bindir = tmp_path / "units", tmp_path / "bin"
    env.update(FORGE_UNIT_DIR=str(units), FORGE_BIN_DIR=str(bindir))
    proc = subprocess.run([str(INSTALL), "--dry-run", "--root", str(root), "--prefix", str(prefix)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in ("system user", f"{prefix}/venv", "factory init", str(root),
                     f"{units}/forge-factory.service", "enable --now forge-factory"):
        assert expected in out, f"dry run does not mention {expected!r}:\n{out}"
    assert "would run:" in out
    assert not log.exists(), f"dry run called system commands:\n{log.read_text()}"
    for path in (root, prefix, units, bindir):
        assert not path.exists(), f"dry run created {path}"


def test_dry_run_puts_cpu_torch_first_without_a_gpu(tmp_path):
    env, _ = _stub_path(tmp_path)
    (tmp_path / "stub-bin" / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # a broken driver
    (tmp_path / "stub-bin" / "nvidia-smi").chmod(0o755)
    proc = subprocess.run([str(INSTALL), "--dry-run", "--root", str(tmp_path / "r"),
                           "--prefix", str(tmp_path / "p")], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    torch_at = proc.stdout.index("torch==")
    assert "download.pytorch.org/whl/cpu" in proc.stdout
    assert torch_at < proc.stdout.index(f"pip install --quiet {REPO}")


def test_unknown_flag_is_refused_with_usage_code(tmp_path):
    proc = subprocess.run([str(INSTALL), "--dry-run", "--bogus"], capture_output=True, text=True, check=False)
    assert proc.returncode == BadInput.exit_code
    assert "--bogus" in proc.stderr
