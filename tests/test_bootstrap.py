"""bootstrap/: the systemd unit says what the daemon needs, install.sh's dry
run shows every step without touching the system, and a real install into a
sandbox keeps HF_TOKEN in a root-only file and off every command line."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import threading
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


def test_unit_reads_secrets_from_the_root_only_environment_file(unit):
    assert one(unit, "Service", "EnvironmentFile") == "-/etc/forge-factory/env"
    assert not any("HF_TOKEN" in v for v in unit["Service"].get("Environment", []))
    assert "HF_TOKEN" not in one(unit, "Service", "ExecStart")


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
    for expected in ("system user", f"{prefix}/venv", "factory init", str(root), "would write /etc/forge-factory/env",
                     "bootstrap/format-tools.sh",
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


def test_dry_run_never_shows_the_token(tmp_path):
    env, log = _stub_path(tmp_path)
    token = "hf_" + secrets.token_hex(16)
    env.update(HF_TOKEN=token, FORGE_ENV_FILE=str(tmp_path / "etc/env"))
    proc = subprocess.run([str(INSTALL), "--dry-run", "--root", str(tmp_path / "r"), "--prefix", str(tmp_path / "p")],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"would write {tmp_path / 'etc/env'}, mode 0600" in proc.stdout and "value not shown" in proc.stdout
    assert token not in proc.stdout + proc.stderr
    assert not (tmp_path / "etc").exists() and not log.exists()


# -- a real install into a sandbox -----------------------------------------------------
# Everything install.sh does runs for real (install, chown, chmod, runuser,
# `factory init`), under sandbox paths and as root; only what would change
# this machine is stubbed: useradd, pip (no network, and the venv is this
# checkout's), systemctl.

PASS_THROUGH = ("install", "chown", "chmod", "mkdir", "ln", "runuser")
STUBBED = ("useradd", "groupadd", "usermod", "pip", "pip3", "systemctl")


class Sandbox:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.root, self.prefix = tmp_path / "srv/factory", tmp_path / "opt/forge-factory"
        self.units, self.bindir = tmp_path / "units", tmp_path / "bin"
        self.env_file = tmp_path / "etc/forge-factory/env"
        self.calls = tmp_path / "calls.log"
        stubs = tmp_path / "stub-bin"
        stubs.mkdir()
        for name in PASS_THROUGH:
            self._script(stubs / name, f'echo "{name} $*" >> "{self.calls}"\nexec {shutil.which(name)} "$@"')
        for name in STUBBED:
            query = 'case "$1" in is-*|show|status|cat) exit 1;; esac\n' if name == "systemctl" else ""
            self._script(stubs / name, f'{query}echo "{name} $*" >> "{self.calls}"')
        # The venv exists already: this checkout's interpreter, pip stubbed.
        venv_bin = self.prefix / "venv/bin"
        venv_bin.mkdir(parents=True)
        pip_stub = f'if [ "$1 $2" = "-m pip" ]; then echo "pip $*" >> "{self.calls}"; exit 0; fi'
        self._script(venv_bin / "python", f'{pip_stub}\nexec {sys.executable} "$@"')
        self._script(venv_bin / "factory", f'exec {sys.executable} -m factory.cli "$@"')
        self.base_env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "FORGE_USER": "root",
                         "FORGE_UNIT_DIR": str(self.units), "FORGE_BIN_DIR": str(self.bindir),
                         "FORGE_ENV_FILE": str(self.env_file)}
        for key in ("FACTORY_ROOT", "HF_TOKEN"):
            self.base_env.pop(key, None)

    @staticmethod
    def _script(path: Path, body: str) -> None:
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def install(self, token: str | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
        """Run install.sh; also every command line seen in /proc while it ran."""
        env = dict(self.base_env, **({"HF_TOKEN": token} if token is not None else {}))
        seen: set[str] = set()
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                for pid in os.listdir("/proc"):
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            seen.add(f.read().replace(b"\0", b" ").decode(errors="replace"))
                    except (OSError, ValueError):
                        continue

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            # --no-gguf: the GGUF tools step is checked by the dry run; here it
            # would only rerun this venv's llama.cpp selftest per install.
            proc = subprocess.run([str(INSTALL), "--root", str(self.root), "--prefix", str(self.prefix), "--no-gguf"],
                                  capture_output=True, text=True, env=env, timeout=300, check=False)
        finally:
            done.set()
            watcher.join()
        return proc, seen

    def files_holding(self, needle: str) -> list[Path]:
        return [p for p in self.dir.rglob("*") if p.is_file() and not p.is_symlink() and p != self.env_file
                and needle.encode() in p.read_bytes()]


@pytest.fixture
def sandbox(tmp_path) -> Sandbox:
    if os.geteuid() != 0:
        pytest.skip("a real install chowns files to root and runs runuser: needs root")
    return Sandbox(tmp_path)


def test_install_puts_the_token_in_a_root_only_file_and_nowhere_else(sandbox):
    token = "hf_" + secrets.token_hex(16)
    proc, cmdlines = sandbox.install(token)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = os.stat(sandbox.env_file)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert f"HF_TOKEN={token}\n" in sandbox.env_file.read_text()
    unit = (sandbox.units / "forge-factory.service").read_text()
    assert f"EnvironmentFile=-{sandbox.env_file}\n" in unit and token not in unit
    assert f"ExecStart={sandbox.prefix}/venv/bin/factory run --root {sandbox.root}" in unit
    assert token not in proc.stdout + proc.stderr  # not in the installer's output
    assert "HF_TOKEN from the environment, not shown" in proc.stdout
    assert cmdlines and not [c for c in cmdlines if token in c]  # not in `ps` args
    assert token not in sandbox.calls.read_text()  # nor in the args of any command it ran
    assert sandbox.files_holding(token) == []  # nor in any other file it wrote
    assert (sandbox.root / "factory_node.toml").exists()  # the rest of the install really ran


def test_reinstalling_keeps_the_token_and_repairs_the_mode(sandbox):
    token = "hf_" + secrets.token_hex(16)
    assert sandbox.install(token)[0].returncode == 0
    before = sandbox.env_file.read_bytes()
    proc, _ = sandbox.install(token)  # idempotent
    assert proc.returncode == 0 and f"{sandbox.env_file} is up to date" in proc.stdout
    assert sandbox.env_file.read_bytes() == before

    sandbox.env_file.chmod(0o644)  # someone loosened it
    proc, _ = sandbox.install()  # no HF_TOKEN this time: the file's token stays
    assert proc.returncode == 0, proc.stderr
    assert sandbox.env_file.read_bytes() == before and stat.S_IMODE(os.stat(sandbox.env_file).st_mode) == 0o600
    assert f"chmod 0600 {sandbox.env_file}" in proc.stdout and token not in proc.stdout

    other = "hf_" + secrets.token_hex(16)
    sandbox.env_file.write_text(sandbox.env_file.read_text() + "HTTPS_PROXY=http://proxy:3128\n")
    assert sandbox.install(other)[0].returncode == 0  # a new token replaces the old, keeps other lines
    text = sandbox.env_file.read_text()
    assert f"HF_TOKEN={other}\n" in text and token not in text and "HTTPS_PROXY=http://proxy:3128\n" in text


def test_without_a_token_the_file_is_created_empty_with_a_comment(sandbox):
    proc, _ = sandbox.install()
    assert proc.returncode == 0, proc.stderr
    lines = sandbox.env_file.read_text().splitlines()
    assert lines and all(line.startswith("#") for line in lines)
    assert any("HF_TOKEN=" in line for line in lines)  # says how to add one
    assert stat.S_IMODE(os.stat(sandbox.env_file).st_mode) == 0o600


@pytest.mark.parametrize("token", ["hf_abc def", "hf_abc\nEVIL=1", "hf_$(id)", "hf_\"quoted\""])
def test_a_token_systemd_would_mangle_is_refused_unshown(sandbox, token):
    proc, _ = sandbox.install(token)
    assert proc.returncode != 0 and "HF_TOKEN holds characters" in proc.stderr
    assert token not in proc.stdout + proc.stderr
    assert not sandbox.env_file.exists()


def test_a_symlinked_env_file_is_refused(sandbox):
    target = sandbox.dir / "elsewhere"
    target.write_text("keep\n")
    sandbox.env_file.parent.mkdir(parents=True)
    sandbox.env_file.symlink_to(target)
    proc, _ = sandbox.install("hf_" + secrets.token_hex(8))
    assert proc.returncode != 0 and "is a symbolic link" in proc.stderr
    assert target.read_text() == "keep\n"
