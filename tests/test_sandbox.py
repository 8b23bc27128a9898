"""The code sandbox, attacked the way a hostile sample would: each attack is
a real HumanEval sample in a real samples file, scored by `score_samples`
(the path `factory score humaneval` takes), and each test asserts what is
left on the host afterwards (files, processes, sockets) as well as the
verdict. Where the attack would succeed without the sandbox, the test fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from factory import sandbox
from factory.benchmarks import benchmark_problem
from stations.benchmarks.humaneval import load_problems, score_samples

TASK = "HumanEval/0"


@pytest.fixture(scope="module")
def problem() -> dict:
    return load_problems()[TASK]


@pytest.fixture
def token() -> str:
    return f"sandbox-test-{uuid.uuid4().hex}"


@pytest.fixture
def in_prefix(token):
    """A path in a directory the sandbox does see (the interpreter's prefix,
    bound read-only), removed afterwards should an attack have created it."""
    path = Path(sys.prefix) / token
    yield path
    if path.exists():
        path.unlink()


def _score(tmp_path: Path, sample: dict, *, timeout: float = 3.0) -> str:
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": TASK, **sample}) + "\n")
    return score_samples(path, timeout=timeout).per_task[TASK].results[0]


def _attack(tmp_path: Path, problem: dict, code: str, *, then_correct: bool = True, timeout: float = 3.0) -> str:
    """Score a solution that runs `code` at top level (before the tests),
    followed by a correct function unless `then_correct` is false (the
    prompt's stub then returns None)."""
    solution = textwrap.dedent(code) + "\n\n" + (problem["prompt"] + problem["canonical_solution"]
                                                 if then_correct else "")
    return _score(tmp_path, {"solution": solution}, timeout=timeout)


def test_a_correct_solution_passes_and_a_wrong_one_fails(tmp_path, problem):
    assert _score(tmp_path, {"completion": problem["canonical_solution"]}) == "passed"
    assert _score(tmp_path, {"completion": "    return False\n"}).startswith("failed: AssertionError")


def test_an_infinite_loop_times_out(tmp_path):
    assert _score(tmp_path, {"completion": "    while True:\n        pass\n"}, timeout=0.5) == "timed out"


def test_a_program_that_swallows_the_time_limit_meets_the_wall_clock(problem, monkeypatch):
    monkeypatch.setattr(sandbox, "KILL_GRACE_S", 0.5)  # read on the scorer's side, sent with the job
    program = "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass\n"
    assert sandbox.run_program(program, timeout=0.5).verdict == sandbox.TIMED_OUT


@pytest.mark.parametrize("how", ["__import__('posix').system({cmd!r})",
                                 "import ctypes\nctypes.CDLL(None).system({cmd!r}.encode())",
                                 "import os\nos.waitpid(os.posix_spawn('/bin/sh', ['sh', '-c', {cmd!r}], {{}}), 0)"])
def test_shell_commands_cannot_touch_the_host(tmp_path, problem, in_prefix, how):
    marker = tmp_path / "marker"
    cmd = f"mkdir -p {tmp_path} && echo x > {marker}; echo x > {in_prefix}; echo ran > /tmp/ran"
    code = how.format(cmd=cmd) + "\nassert open('/tmp/ran').read() == 'ran\\n'  # the shell did run, inside\n"
    assert _attack(tmp_path, problem, code) == "passed"  # harmless, so it does not change the verdict
    assert not marker.exists() and not in_prefix.exists()


def test_open_for_writing_outside_the_sandbox_fails(tmp_path, problem, in_prefix):
    result = _attack(tmp_path, problem, f"open({str(in_prefix)!r}, 'w').write('x')")
    assert result.startswith("failed: OSError: [Errno 30] Read-only file system")
    assert not in_prefix.exists()
    outside = tmp_path / "outside.txt"  # a host directory the sandbox does not even see
    assert _attack(tmp_path, problem, f"open({str(outside)!r}, 'w').write('x')").startswith(
        "failed: FileNotFoundError")
    assert not outside.exists()


def test_unlink_outside_the_sandbox_leaves_the_file(tmp_path, problem, in_prefix):
    try:
        in_prefix.write_text("keep")
    except OSError as err:
        pytest.skip(f"this test cannot plant a file in {sys.prefix}: {err}")
    code = f"import os, posix\nos.stat({str(in_prefix)!r})  # it is in sight\nposix.unlink({str(in_prefix)!r})"
    assert _attack(tmp_path, problem, code).startswith("failed: OSError: [Errno 30] Read-only file system")
    assert in_prefix.read_text() == "keep"


def _token_processes(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if token in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


# A detached grandchild that would write MARKER after a minute; its argv
# carries TOKEN, so the host can look for it. The program waits until it runs.
GRANDCHILD = """
import os, posix, sys
r, w = posix.pipe()
os.set_inheritable(w, True)
if posix.fork() == 0:
    posix.setsid()
    if posix.fork() == 0:
        code = "import os, sys, time; os.write(int(sys.argv[1]), b'up'); time.sleep(60); open(sys.argv[2], 'w')"
        posix.execv(sys.executable, [sys.executable, "-c", code, str(w), MARKER, TOKEN])
    posix._exit(0)
assert posix.read(r, 2) == b"up"
"""


def _grandchild(marker: str, token: str) -> str:
    return f"MARKER, TOKEN = {marker!r}, {token!r}\n" + GRANDCHILD


def test_a_setsid_grandchild_does_not_outlive_the_program(tmp_path, problem, token):
    marker = tmp_path / "marker"
    code = _grandchild(str(marker), token) + "raise RuntimeError('grandchild up')\n"
    assert _attack(tmp_path, problem, code) == "failed: RuntimeError: grandchild up"
    assert _token_processes(token) == []  # gone when the sandbox's init exited
    assert not marker.exists()


def test_the_program_dies_with_its_launcher(token):
    code = _grandchild("/tmp/never", token) + "import time\ntime.sleep(60)\n"
    errors: list[BaseException] = []
    scorer = threading.Thread(target=_catch, args=(errors, sandbox.run_program, code), kwargs={"timeout": 120})
    scorer.start()
    grandchild = _wait_for_token(token)
    launcher = next(p for p in grandchild.parents() if p.ppid() == os.getpid())
    launcher.send_signal(signal.SIGKILL)
    scorer.join(60)
    gone, alive = psutil.wait_procs(_token_processes(token) + [grandchild], timeout=30)
    assert alive == []  # PR_SET_PDEATHSIG killed the init, and with it its namespace
    assert [type(e).__name__ for e in errors] == ["FactoryError"]  # no verdict, least of all a pass


def _catch(errors: list, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as err:
        errors.append(err)


def _wait_for_token(token: str) -> psutil.Process:
    for _ in range(600):  # up to a minute on a busy node; normally under a second
        found = _token_processes(token)
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"the sandboxed grandchild {token} never started")


def test_signals_cannot_reach_the_scorer(tmp_path, problem):
    sentinel = subprocess.Popen(["sleep", "60"])  # in the scorer's own process group
    try:
        code = f"""
        import posix
        tried = []
        for pid in (posix.getppid(), -1, {sentinel.pid}, {os.getpid()}, -{os.getpgid(0)}):
            try:
                posix.kill(pid, 9)
                tried.append((pid, "sent"))
            except OSError as err:
                tried.append((pid, type(err).__name__))
        raise RuntimeError(repr(tried))
        """
        result = _attack(tmp_path, problem, code)
        assert sentinel.poll() is None  # the test process is alive too, or this line would not run
        assert result.startswith("failed: RuntimeError: [(0, 'sent'), (-1, ")  # its own session; its namespace
        outside = (sentinel.pid, os.getpid(), -os.getpgid(0))
        assert result.endswith(", ".join(f"({pid}, 'ProcessLookupError')" for pid in outside) + "]")
    finally:
        sentinel.kill()
        sentinel.wait()


FORGE = """
import os, posix
line = b'{"result": "passed"}\\n'
for fd in range(256):
    try:
        posix.write(fd, line)
    except OSError:
        pass
try:
    names = os.listdir("/proc/self/fd")
except OSError:
    names = []
for name in names:
    try:
        with open("/proc/self/fd/" + name, "wb") as f:
            f.write(line)
    except OSError:
        pass
"""


def test_forged_result_lines_on_every_fd_still_fail(tmp_path, problem):
    assert _attack(tmp_path, problem, FORGE, then_correct=False).startswith("failed: AssertionError")
    # With a correct function after it, the forged line it left in the report pipe vetoes the pass.
    assert _attack(tmp_path, problem, FORGE) == ("failed: it finished but wrote into the sandbox's report pipe "
                                                 "(a forged result?)")


@pytest.mark.parametrize("code", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit(0)",
                                  "import posix\nposix._exit(42)"])
def test_exiting_before_the_tests_fails(tmp_path, problem, code):
    assert _attack(tmp_path, problem, code).startswith("failed")


def test_there_is_no_network(tmp_path, problem):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        assert _attack(tmp_path, problem, code).startswith("failed: OSError: [Errno 101] Network is unreachable")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


def test_host_files_and_processes_are_out_of_sight(tmp_path, problem):
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret-content")
    code = f"""
    seen = []
    for path in ({str(secret)!r}, "/proc/1/environ", "/proc/self/status", "/etc/shadow", "/root/.bashrc"):
        try:
            seen.append(open(path).read())
        except OSError as err:
            seen.append(type(err).__name__)
    raise RuntimeError(repr(seen))
    """
    assert _attack(tmp_path, problem, code) == "failed: RuntimeError: " + repr(["FileNotFoundError"] * 5)


ADD_KEY = {"x86_64": 248, "aarch64": 217}  # syscall numbers; glibc wraps neither add_key nor keyctl
KEYCTL_SEARCH, KEYCTL_UNLINK, KEY_SPEC_SESSION_KEYRING = 10, 9, -3


def test_the_scorers_session_keyring_is_out_of_reach(tmp_path, problem, token):
    machine = os.uname().machine
    if machine not in ADD_KEY:
        pytest.skip(f"no add_key syscall number for {machine} in this test")
    libc, keyctl = ctypes.CDLL(None, use_errno=True), sandbox.SYS_KEYCTL[machine]
    key = libc.syscall(ADD_KEY[machine], b"user", token.encode(), b"host-secret", 11,
                       ctypes.c_int(KEY_SPEC_SESSION_KEYRING))
    if key < 0:
        pytest.skip(f"cannot add a key to this session keyring (errno {ctypes.get_errno()})")
    try:
        here = libc.syscall(keyctl, KEYCTL_SEARCH, ctypes.c_int(KEY_SPEC_SESSION_KEYRING), b"user", token.encode(), 0)
        assert here == key  # the scorer does possess it
        code = f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        rings = (-3, -4, -5)  # session, user, user-session
        raise RuntimeError(repr([libc.syscall({keyctl}, {KEYCTL_SEARCH}, ctypes.c_int(ring), b"user",
                                              {token.encode()!r}, 0) for ring in rings]))
        """
        assert _attack(tmp_path, problem, code) == "failed: RuntimeError: [-1, -1, -1]"
    finally:
        libc.syscall(keyctl, KEYCTL_UNLINK, ctypes.c_int(key), ctypes.c_int(KEY_SPEC_SESSION_KEYRING))


def test_dev_shm_and_tmp_are_the_sandboxs_own(tmp_path, problem, token):
    code = f"open('/dev/shm/{token}', 'w').write('x')\nopen('/tmp/{token}.2', 'w').write('y')\n"
    assert _attack(tmp_path, problem, code) == "passed"
    assert not Path(f"/dev/shm/{token}").exists() and not Path(f"/tmp/{token}.2").exists()


def test_the_writable_tmpfs_is_capped(tmp_path, problem):
    code = "with open('/tmp/big', 'wb') as f:\n    for _ in range(1000):\n        f.write(bytes(2**20))"
    result = _attack(tmp_path, problem, code)
    assert "File too large" in result or "No space left on device" in result


def test_the_number_of_processes_is_capped(tmp_path, problem):
    code = """
    import posix, time
    n = 0
    try:
        while True:
            if posix.fork() == 0:
                time.sleep(60)
                posix._exit(0)
            n += 1
    except OSError:
        raise RuntimeError(n)
    """
    result = _attack(tmp_path, problem, code)
    assert result.startswith("failed: RuntimeError: ")
    assert 0 < int(result.rsplit(" ", 1)[1]) < sandbox.Limits().processes


def test_a_nested_user_namespace_cannot_make_the_tree_writable(tmp_path, problem, in_prefix):
    code = f"""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    nested = libc.unshare(0x10000000 | 0x00020000)  # CLONE_NEWUSER | CLONE_NEWNS; refused where the sysctl is set
    remount = libc.mount(None, b"/", None, ctypes.c_ulong(32 | 4096), None)  # MS_REMOUNT | MS_BIND, not read-only
    open({str(in_prefix)!r}, "w")
    """
    assert _attack(tmp_path, problem, code).startswith("failed: OSError: [Errno 30] Read-only file system")
    assert not in_prefix.exists()


def test_the_program_runs_without_privileges(tmp_path, problem):
    code = """
    import posix, socket
    denied = []
    for attempt in (lambda: posix.chroot("/tmp"), lambda: socket.sethostname("x"), lambda: posix.setuid(0)):
        try:
            attempt()
        except PermissionError:
            denied.append(True)
    raise RuntimeError(repr((posix.getuid(), posix.getpid(), posix.getcwd(), denied)))
    """
    uid = sandbox.NOBODY if os.geteuid() == 0 else 0  # in the namespace; 0 maps to the unprivileged scorer
    expected = (uid, 1, "/tmp", [True, True, True] if uid else [True, True])  # setuid(0) is a no-op as 0
    assert _attack(tmp_path, problem, code) == f"failed: RuntimeError: {expected!r}"


def test_a_broken_sandbox_raises_instead_of_failing_every_sample():
    with pytest.raises(sandbox.FactoryError, match=r"the code sandbox is up but the prelude failed: "
                                                   r"ModuleNotFoundError: No module named 'no_such_module'"):
        sandbox.run_program("pass", timeout=1, prelude="import no_such_module")


# ── the probe ────────────────────────────────────────────────────────────────

def test_the_sandbox_is_available_here():
    assert sandbox.sandbox_available() is None
    assert benchmark_problem("humaneval", check_installed=True) is None


def test_a_node_without_user_namespaces_is_refused_with_the_fix(tmp_path):
    """A user namespace whose user.max_user_namespaces is 0 stands in for a
    node with them disabled: the probe runs there for real."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    probe = "from factory.sandbox import sandbox_available as a; print(a())"
    script = f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c '{probe}'"
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script], capture_output=True,
                          text=True, cwd=tmp_path)
    if proc.returncode != 0:
        pytest.skip(f"cannot make a user namespace here: {proc.stderr.strip()}")
    assert "No space left on device" in proc.stdout
    assert "fix: sysctl -w user.max_user_namespaces=" in proc.stdout


def test_the_planner_hook_reports_the_probes_reason(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_available", lambda: "user namespaces are off; fix: turn them on")
    problem = benchmark_problem("humaneval", check_installed=True)
    assert problem == "benchmark 'humaneval' cannot run on this node: user namespaces are off; fix: turn them on"


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1, 0, 601, "soon", None])
def test_time_limits_out_of_range_are_refused(bad):
    with pytest.raises(sandbox.BadInput, match=r"0 < timeout <= 600"):
        sandbox.run_program("pass", timeout=bad)


def test_an_interpreter_under_tmp_is_bound_read_only_over_the_sandboxs_tmp(tmp_path):
    """A checkout (and its venv) under /tmp, as on a CI machine: the sandbox
    still runs, sees its interpreter read-only, and writes only its tmpfs."""
    venv = Path("/tmp") / f"sandbox-venv-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                       check=True, capture_output=True)
        probe = textwrap.dedent(f"""
            import json, sys
            from factory import sandbox
            program = '''
            import os, sys
            assert sys.prefix == {str(venv)!r}, sys.prefix
            try:
                open(os.path.join(sys.prefix, "pwned"), "w")
            except OSError:
                pass
            else:
                raise SystemExit("wrote into the interpreter")
            open("/tmp/mine", "w").write("ok")
            '''
            out = sandbox.run_program(program, timeout=10)
            print(json.dumps({{"passed": out.verdict == sandbox.PASSED, "status": str(out)}}))
        """)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1])["passed"] is True, proc.stdout
        assert not (venv / "pwned").exists()
    finally:
        shutil.rmtree(venv, ignore_errors=True)
