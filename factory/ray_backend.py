"""The Ray backend: each try of a part runs on whichever cluster node fits it.

Imported only when the node config says `[cluster] backend = "ray"`; the
single-node path never imports ray. Every node mounts the same root at the
same path, so the child reads the claimed alloy and writes its checkpoint
exactly as on one node; only the report pipe changes: a cluster child
appends its report lines to work/<base>/reports-r<retry>.jsonl and the
dispatcher reads the new bytes from there.

One try is one named, detached Ray actor (see submission_id). The actor
starts the child in its constructor, so the child starts at most once per
name, and a dispatcher that restarts finds the running try by its name
instead of starting it again. The actor is the child's parent: the child
dies with it (PDEATHSIG), so a killed actor or a lost node leaves no
orphan building on the shared root.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from factory.durable import file_mode_for
from factory.errors import FactoryError, NodeConfigError
from factory.protocol import CHILD_LOG, Layout


class ClusterExtraMissing(NodeConfigError, ImportError):
    """`[cluster] backend = "ray"` on a node without ray installed (exit 78:
    the config asks for what this node does not have; no restart loop)."""


class ClusterUnreachable(FactoryError):
    """The Ray head does not answer (exit 1: systemd restarts the
    dispatcher later, when the head may be back)."""


try:
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
except ImportError as err:
    raise ClusterExtraMissing(
        "the Ray backend needs the cluster extra: pip install 'forge-factory[cluster]' "
        f"(importing ray failed: {err})") from err


class RunLost(FactoryError):
    """A try's outcome cannot be known: its actor is gone. The child did not
    report an exit code, so the line treats it as an infrastructure failure."""

    def __init__(self, message: str, *, name: str, node: str | None) -> None:
        super().__init__(message)
        self.name = name
        self.node = node


class NodeLost(RunLost):
    """The node running the try died or left the cluster."""


class LaunchFailed(RunLost):
    """The actor started but could not start the child (the shared root is
    not mounted on that node, no python there...)."""


NAMESPACE = "forge-factory"
# Custom Ray resource a node declares for its GPUs' memory, in GB
# (`ray start --resources '{"vram_gb": 80}'`); parts request their total.
VRAM_RESOURCE = "vram_gb"
NAME_PREFIX = "forge-"
# Ray names may hold any characters, but the name is also shown in logs and
# `ray list actors`: keep the part's own safe alphabet, replace the rest.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# How long one poll waits for the actor's answer before saying "still
# running": the dispatcher's loop must never block on a busy cluster.
POLL_WAIT_S = 0.0
# How long a status call waits for each actor's whereabouts.
INFO_WAIT_S = 2.0
# How long the dispatcher waits for the head's port before giving up.
CONNECT_TIMEOUT_S = 5.0


class NeedLike(Protocol):
    """What a part needs from a node (factory/resources.py's Need)."""

    cpus: int
    gpus: int
    vram_gb_total: float
    ram_bytes: int


def submission_id(base: str, retry: int) -> str:
    """The Ray actor name of one try of one part. Deterministic: a restarted
    dispatcher derives it again to find the try it left running."""
    return f"{NAME_PREFIX}{_UNSAFE.sub('_', base)}-r{retry}"


@dataclass(frozen=True)
class Resources:
    """One node's resources in the units the line uses."""

    cpus: float = 0.0
    gpus: float = 0.0
    vram_gb: float = 0.0
    memory_bytes: float = 0.0

    @classmethod
    def from_ray(cls, res: dict) -> "Resources":
        return cls(cpus=res.get("CPU", 0.0), gpus=res.get("GPU", 0.0), vram_gb=res.get(VRAM_RESOURCE, 0.0),
                   memory_bytes=res.get("memory", 0.0))

    def fits(self, need: NeedLike) -> bool:
        return (self.cpus >= need.cpus and self.gpus >= need.gpus and self.vram_gb >= need.vram_gb_total
                and self.memory_bytes >= need.ram_bytes)

    def describe(self) -> str:
        return (f"{self.vram_gb:g} GB VRAM on {self.gpus:g} GPU(s), {self.cpus:g} CPU(s), "
                f"{self.memory_bytes / 2**30:.1f} GiB RAM")


@dataclass(frozen=True)
class NodeView:
    """One alive node, for `factory status` and the gate."""

    node_id: str
    address: str
    total: Resources
    available: Resources
    running: tuple[str, ...] = ()  # submission ids of the tries placed there


def _describe_need(need: NeedLike) -> str:
    return (f"{need.vram_gb_total:g} GB VRAM on {need.gpus} GPU(s), {need.cpus} CPU(s), "
            f"{need.ram_bytes / 2**30:.1f} GiB RAM")


class _PartRunner:
    """Lives on the node that runs one try and owns its child process."""

    def __init__(self, root: str, part: str, reports: str, log: str, env: dict[str, str]) -> None:
        self.node_id = ray.get_runtime_context().get_node_id()
        self.address = ray.util.get_node_ip_address()
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None
        argv = [sys.executable, "-m", "factory.child", "--root", root, "--part", part,
                "--report-file", reports, "--parent-pid", str(os.getpid())]
        child_env = {**os.environ, **env}
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this actor, and it
        # wins over the caller's. With num_gpus=0 Ray (2.60) leaves the node's
        # own value, so a CPU-only try would see every GPU: it sees none.
        gpu_ids = ray.get_gpu_ids()
        ray_value = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, gpu_ids)))
        child_env["CUDA_VISIBLE_DEVICES"] = ray_value if gpu_ids else ""
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                         file_mode_for(Path(log).parent))
            with os.fdopen(fd, "ab") as logf:
                logf.write(f"--- {part} on Ray node {self.node_id} ({self.address}), actor pid {os.getpid()}\n"
                           .encode())
                logf.flush()
                # A new session, as the daemon starts it: kill() takes the child's whole tree.
                self.proc = subprocess.Popen(argv, env=child_env, cwd=root, stdin=subprocess.DEVNULL,
                                             stdout=logf, stderr=logf, start_new_session=True)
        except OSError as err:
            self.error = f"could not start the child on node {self.node_id} ({self.address}): {err}"

    def where(self) -> tuple[str, str]:
        return self.node_id, self.address

    def poll(self) -> tuple[int | None, str | None, str, str]:
        """(exit code or None while it runs, why it never started, node id, address)."""
        code = None if self.proc is None else self.proc.poll()
        return code, self.error, self.node_id, self.address

    def send(self, signum: int, group: bool) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if group:
                os.killpg(self.proc.pid, signum)
            else:
                self.proc.send_signal(signum)
        except ProcessLookupError:  # RACE: it exited since the poll: nothing to stop
            pass


_RemoteRunner = ray.remote(_PartRunner)


def _node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


class RayRun:
    """One try running (or waiting for a node) on the cluster."""

    def __init__(self, name: str, actor, reports: Path) -> None:
        self.name = name
        self.actor = actor
        self.reports = reports
        self.offset = 0
        self.exit_code: int | None = None
        self._pending = None  # the poll call in flight
        self._where: tuple[str, str] | None = None

    def poll(self) -> int | None:
        """The child's exit code once it has ended, else None (running, or
        waiting for a node). RunLost when the actor is gone: NodeLost for a
        dead node, LaunchFailed when the child never started. Never blocks."""
        if self.exit_code is not None:
            return self.exit_code
        if self._pending is None:
            self._pending = self.actor.poll.remote()
        ready, _ = ray.wait([self._pending], timeout=POLL_WAIT_S)
        if not ready:
            return None
        ref, self._pending = self._pending, None
        try:
            code, error, *where = ray.get(ref)
        except ActorUnavailableError:
            return None  # a network blip or the node restarting its worker: ask again
        except RayActorError as err:
            raise self._lost(err) from err
        self._where = tuple(where)
        if error is not None:
            self._release()
            raise LaunchFailed(f"{self.name}: {error}", name=self.name, node=self._node_or_none())
        if code is not None:
            self.exit_code = code
            self._release()  # the name and the node's resources are free for the next try
        return code

    def _lost(self, err: RayActorError) -> RunLost:
        """Why the actor is gone: its node died (NodeLost), its constructor
        failed (LaunchFailed), or the actor alone died (RunLost: killed by
        hand, or by Ray's memory monitor on a node that still lives)."""
        node = self._node_or_none()
        where = f"node {node} ({self._where[1]})" if self._where else "its node"
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        self._release()
        if isinstance(err, ActorDiedError) and err.actor_init_failed:
            return LaunchFailed(f"{self.name}: its actor failed to start on {where}: {text}",
                                name=self.name, node=node)
        if node is None or not _node_alive(node):
            return NodeLost(f"{self.name}: {where} left the cluster while it ran; the child's exit is unknown "
                            f"({text})", name=self.name, node=node)
        return RunLost(f"{self.name}: its actor on {where} died while the node lives; the child's exit is "
                       f"unknown ({text})", name=self.name, node=node)

    def node(self) -> str:
        """The node id it runs on (blocks until it is placed: use after poll
        has seen it start, or for status)."""
        return self._whereabouts()[0]

    def placed(self) -> str | None:
        """The node id, if a poll has learnt it (never blocks)."""
        return self._node_or_none()

    def address(self) -> str:
        return self._whereabouts()[1]

    def _whereabouts(self, timeout: float | None = None) -> tuple[str, str]:
        if self._where is None:
            self._where = tuple(ray.get(self.actor.where.remote(), timeout=timeout))
        return self._where

    def _node_or_none(self) -> str | None:
        return self._where[0] if self._where else None

    def terminate(self) -> None:
        """SIGTERM to the child: it stops at the next stage boundary and exits
        75 (EXIT_STOPPED). Fire and forget; poll sees the exit."""
        self.actor.send.remote(signal.SIGTERM, False)

    def kill(self) -> None:
        """SIGKILL to the child's whole process group, now."""
        self.actor.send.remote(signal.SIGKILL, True)

    def read_reports(self) -> bytes:
        """The bytes appended to the try's report file since the last call
        (possibly ending in a partial line). Call once more after poll has
        returned an exit code: the last lines are written before the exit."""
        try:
            fd = os.open(self.reports, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return b""  # RACE: not placed yet, or the child has not reported anything
        with os.fdopen(fd, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data

    def _release(self) -> None:
        """The actor is done with: ray.kill frees the name at once (a
        detached actor otherwise lives until the cluster does)."""
        try:
            ray.kill(self.actor, no_restart=True)
        except (RayActorError, ValueError):  # RACE: already gone
            pass


def _reachable(address: str) -> None:
    """Refuse fast when nothing listens at the head's address: ray.init
    itself retries for minutes."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as err:
        raise ClusterUnreachable(
            f"nothing answers at the Ray head {address} ([cluster] address in factory_node.toml): {err}; start "
            "the head (ray start --head) or fix the address") from err


def _largest(views: list[NodeView]) -> NodeView | None:
    return max(views, key=lambda v: (v.total.vram_gb, v.total.gpus, v.total.memory_bytes, v.total.cpus),
               default=None)


class RayLauncher:
    """Starts parts' tries on a Ray cluster and finds them again."""

    def __init__(self, address: str, root: Path, *, namespace: str = NAMESPACE) -> None:
        self.address = address
        self.root = Path(root).absolute()
        self.namespace = namespace
        if not ray.is_initialized():
            _reachable(address)
            try:
                ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="warning")
            except Exception as err:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ...
                raise ClusterUnreachable(
                    f"cannot connect to the Ray cluster at {address} ([cluster] address in factory_node.toml): "
                    f"{type(err).__name__}: {str(err)[:300]}; start the head (ray start --head) or fix the "
                    "address") from err

    def start(self, part_filename: str, base: str, retry: int, need: NeedLike,
              env: dict[str, str] | None = None) -> RayRun:
        """Launch the try on a node that fits `need`, or return the one already
        running under its name (a restarted dispatcher): never two children.
        work/<base>/ with the claimed alloy must exist (the dispatcher makes it)."""
        name = submission_id(base, retry)
        work = Layout(self.root).work_dir(base)
        reports = Layout(self.root).report_file(base, retry)
        options = dict(name=name, namespace=self.namespace, lifetime="detached", get_if_exists=True,
                       max_restarts=0, max_task_retries=0, num_cpus=need.cpus, num_gpus=need.gpus)
        if need.vram_gb_total > 0:
            options["resources"] = {VRAM_RESOURCE: float(need.vram_gb_total)}
        if need.ram_bytes > 0:
            options["memory"] = int(need.ram_bytes)
        # RACE: two dispatchers starting the same name: get_if_exists makes the
        # GCS create it once; the second gets a handle to the first's actor.
        actor = _RemoteRunner.options(**options).remote(
            str(self.root), part_filename, str(reports), str(work / CHILD_LOG), dict(env or {}))
        return RayRun(name, actor, reports)

    def attach(self, base: str, retry: int) -> RayRun | None:
        """The try of that part still alive on the cluster (running, ended but
        not yet collected, or waiting for a node), or None."""
        name = submission_id(base, retry)
        try:
            actor = ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            return None
        return RayRun(name, actor, Layout(self.root).report_file(base, retry))

    def running(self) -> list[str]:
        """Submission ids of every try alive in this namespace."""
        named = ray.util.list_named_actors(all_namespaces=True)
        return sorted(a["name"] for a in named
                      if a["namespace"] == self.namespace and a["name"].startswith(NAME_PREFIX))

    def nodes(self, *, placements: bool = True) -> list[NodeView]:
        """Every alive node with its resources and (unless placements=False,
        which saves a call per try) the tries placed there."""
        placed = self._placements() if placements else {}
        total = ray._private.state.state.total_resources_per_node()
        available = ray._private.state.state.available_resources_per_node()
        out = []
        for n in ray.nodes():
            if not n["Alive"]:
                continue
            nid = n["NodeID"]
            out.append(NodeView(node_id=nid, address=n["NodeManagerAddress"],
                                total=Resources.from_ray(total.get(nid, n["Resources"])),
                                available=Resources.from_ray(available.get(nid, {})),
                                running=tuple(sorted(placed.get(nid, ())))))
        return out

    def _placements(self) -> dict[str, list[str]]:
        """node id -> submission ids; a try still waiting for a node is under ""."""
        refs = {}
        for name in self.running():
            try:
                refs[ray.get_actor(name, namespace=self.namespace).where.remote()] = name
            except ValueError:  # RACE: ended since the listing
                continue
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=INFO_WAIT_S) if refs else ([], [])
        placed: dict[str, list[str]] = {}
        for ref in refs:
            node = ""
            if ref in ready:
                try:
                    node = ray.get(ref)[0]
                except RayActorError:
                    continue
            placed.setdefault(node, []).append(refs[ref])
        return placed

    def largest_node(self) -> NodeView | None:
        """The alive node with the most VRAM (then GPUs, RAM, CPUs)."""
        return _largest(self.nodes(placements=False))

    def fits_anywhere(self, need: NeedLike) -> str | None:
        """None when some alive node could run `need` (when idle), else why
        not, naming the largest node: the gate refuses such a part."""
        views = self.nodes(placements=False)
        if any(v.total.fits(need) for v in views):
            return None
        largest = _largest(views)
        if largest is None:
            return f"the Ray cluster at {self.address} has no alive node"
        return (f"no node of the Ray cluster at {self.address} fits this part (it needs {_describe_need(need)}); "
                f"the largest node, {largest.node_id[:12]} at {largest.address}, has {largest.total.describe()}")

    def shutdown(self) -> None:
        """Disconnect this process (tries keep running: they are detached)."""
        ray.shutdown()
