"""Several processes, one mesh: a checked start of ``jax.distributed``, and a guard while it runs.

One process per host (or, on one machine, per group of simulated CPU devices); together they
see every device, and a mesh spans all of them. :func:`initialize` wraps
``jax.distributed.initialize`` with what it lacks:

- **Checks before the network**: processes x local devices must equal the devices the mesh
  needs; ids, counts and the coordinator address are validated with the fix in the message.
- **A rendezvous with names**: before JAX's coordinator starts, process 0 listens on the
  coordinator's own port and every other process checks in (id, host, pid, devices). A process
  that never comes is named (``process 1 did not check in within 60 s``), an unreachable
  coordinator is reported as such, both as a :class:`DistributedError` after ``timeout_s``,
  instead of JAX's abort (exit 134, ``DEADLINE_EXCEEDED``) a few seconds after its timeout.
- **A watchdog** on ``jax.distributed.initialize`` itself: should it still hang after the
  rendezvous, the process prints a clear line and exits with :data:`EXIT_TIMEOUT`.
- **A peer guard** while the job runs: the rendezvous sockets stay open (gRPC shares the port),
  so when a process dies its peers know at once (the kernel closes its sockets, even on
  SIGKILL) and exit with :data:`EXIT_PEER_LOST`, naming it, instead of waiting in a collective
  for JAX's heartbeat timeout. A process that ends with an uncaught exception tells its peers
  and exits at once rather than waiting minutes in JAX's shutdown barrier.

The launcher (:mod:`jmp.launch`) and cluster jobs pass the settings as environment variables:
``JMP_COORDINATOR`` (``host:port`` of process 0), ``JMP_NUM_PROCESSES``, ``JMP_PROCESS_ID``,
``JMP_LOCAL_DEVICES`` and ``JMP_TIMEOUT``; ``JMP_DISTRIBUTED=auto`` lets JAX detect SLURM,
Open MPI and the other clusters it knows.

Example:
    >>> import jmp.distributed
    >>> cluster = jmp.distributed.initialize(
    ...     coordinator_address="10.0.0.1:61234", num_processes=2, process_id=0,
    ...     local_device_count=4, expected_devices="data=2,model=4")
    >>> mesh = jmp.make_mesh("data=2,model=4")   # spans both processes
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from jmp.errors import JmpError

ENV_COORDINATOR = "JMP_COORDINATOR"
ENV_NUM_PROCESSES = "JMP_NUM_PROCESSES"
ENV_PROCESS_ID = "JMP_PROCESS_ID"
ENV_LOCAL_DEVICES = "JMP_LOCAL_DEVICES"
ENV_TIMEOUT = "JMP_TIMEOUT"
ENV_AUTO = "JMP_DISTRIBUTED"
DEFAULT_TIMEOUT_S = 60.0
EXIT_PEER_LOST = 3
EXIT_TIMEOUT = 4
_PROTOCOL = 1


class DistributedError(JmpError):
    """Processes could not be started together, or do not fit the mesh asked for."""


@dataclass(frozen=True)
class Cluster:
    """The processes of a job, as :func:`initialize` found them."""

    process_id: int
    num_processes: int
    local_devices: int
    devices: int
    coordinator_address: str | None = None
    hosts: tuple[str, ...] = ()

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


_cluster: Cluster | None = None
_guard: _PeerGuard | None = None


def requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for several processes (our launcher, or ``JMP_DISTRIBUTED``)."""
    env = os.environ if environ is None else environ
    auto = env.get(ENV_AUTO, "").strip().lower() not in ("", "0", "false", "no", "off")
    return bool(env.get(ENV_COORDINATOR)) or auto


def is_initialized() -> bool:
    """Whether :func:`initialize` has run in this process."""
    return _cluster is not None


def cluster() -> Cluster | None:
    """The :class:`Cluster` of the last :func:`initialize`, or ``None``."""
    return _cluster


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None,
               timeout_s: float | None = None, expected_devices: Any = None,
               heartbeat_timeout_s: float | None = None) -> Cluster:
    """Join this process to the others of the job; call it before any JAX operation.

    Each argument left ``None`` is read from its ``JMP_*`` environment variable; with no
    coordinator, process count or id at all, JAX's cluster detection (SLURM, Open MPI, ...)
    fills them. With one process, nothing distributed starts (devices are still simulated and
    checked), so the same script runs alone or launched.

    Args:
        coordinator_address: ``host:port`` of process 0, reachable from every process.
        num_processes: how many processes the job has.
        process_id: this process's id, ``0 <= process_id < num_processes``.
        local_device_count: devices per process: simulated CPU devices on a CPU-only machine;
            on GPUs, the count each process must see (checked).
        timeout_s: how long processes wait for each other at start, and how long a lost or
            stuck peer may go unnoticed (``$JMP_TIMEOUT`` or 60).
        expected_devices: the global device count, or the mesh spec the job will build
            (``"data=2,model=4"``); checked against processes x local devices.
        heartbeat_timeout_s: JAX's heartbeat timeout (default ``timeout_s``, at least 10 s).

    Returns:
        The :class:`Cluster`: ids, device counts, the host of every process.

    Raises:
        DistributedError: inconsistent settings, devices that do not fit ``expected_devices``,
            JAX started before this call, a process that did not check in or an unreachable
            coordinator within ``timeout_s`` (the message names them).
    """
    global _cluster
    settings = _Settings.resolve(coordinator_address, num_processes, process_id,
                                 local_device_count, timeout_s)
    settings.check_devices(expected_devices)
    if _cluster is not None:
        return _already(settings)
    _check_backend_not_started()
    if settings.local_devices is not None:
        from jmp.devices import simulate_cpu_devices

        simulate_cpu_devices(settings.local_devices)
    if settings.num_processes == 1:
        _cluster = _finish_single(settings, expected_devices)
        return _cluster
    peers, hosts = _rendezvous(settings, expected_devices)
    hb = max(10.0, heartbeat_timeout_s or settings.timeout_s)
    _start_jax(settings, hb)
    _cluster = _verify(settings, expected_devices, hosts)
    _start_guard(settings, peers, hosts)
    return _cluster


def abort(code: int, message: str = "") -> NoReturn:
    """Tell the other processes this one failed, and exit now with ``code``.

    Use it where a multi-process program stops on an error it handled (the CLI's error path):
    exiting normally would wait in JAX's shutdown barrier for peers that wait in a collective.
    """
    if _guard is not None:
        _guard.announce({"fail": message or f"exit code {code}"})
    _flush()
    os._exit(code)


def same_on_all(text: str, /, *, max_bytes: int = 1024) -> str:
    """Process 0's ``text`` on every process (all must call it): e.g. a run folder's name."""
    if _cluster is None or _cluster.num_processes == 1:
        return text
    import numpy as np
    from jax.experimental import multihost_utils

    raw = text.encode()
    if len(raw) > max_bytes:
        raise DistributedError(f"same_on_all: {len(raw)} bytes > max_bytes={max_bytes}.")
    buf = np.zeros(max_bytes + 4, np.uint8)
    buf[:4] = np.frombuffer(len(raw).to_bytes(4, "little"), np.uint8)
    buf[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    n = int.from_bytes(out[:4].tobytes(), "little")
    return out[4:4 + n].tobytes().decode()


# --- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_devices: int | None
    timeout_s: float
    local_device_ids: tuple[int, ...] | None = None

    @classmethod
    def resolve(cls, coordinator: str | None, num_processes: int | None,
                process_id: int | None, local_devices: int | None,
                timeout_s: float | None) -> _Settings:
        env = os.environ
        coordinator = coordinator or env.get(ENV_COORDINATOR) or None
        num_processes = _pick(num_processes, ENV_NUM_PROCESSES, "num_processes")
        process_id = _pick(process_id, ENV_PROCESS_ID, "process_id")
        local_devices = _pick(local_devices, ENV_LOCAL_DEVICES, "local_device_count")
        timeout = timeout_s if timeout_s is not None else float(
            _pick(None, ENV_TIMEOUT, "timeout_s", kind=float) or DEFAULT_TIMEOUT_S)
        settings = cls(coordinator, num_processes, process_id, local_devices, float(timeout))
        if num_processes == 1 and process_id in (None, 0):
            return cls(None, 1, 0, local_devices, float(timeout))
        if coordinator is None and num_processes is None and process_id is None:
            settings = settings._detect()
        settings._validate()
        return settings

    def _detect(self) -> _Settings:
        """JAX's cluster detection (SLURM, Open MPI, mpi4py, TPU pods, Kubernetes)."""
        try:  # private, so guarded: JAX's public initialize() does the same detection
            from jax._src.clusters import ClusterEnv

            coord, n, pid, ids = ClusterEnv.auto_detect_unset_distributed_params(
                None, None, None, None, None, int(self.timeout_s))
        except Exception as err:  # noqa: BLE001 - any failure means "not detected"
            raise DistributedError(f"Cluster detection failed ({type(err).__name__}: {err}). "
                                   f"Fix: {_HOW_TO_SET}") from None
        if coord is None or n is None or pid is None:
            raise DistributedError(f"No cluster detected (no SLURM, Open MPI or other job "
                                   f"environment JAX knows) and no {ENV_COORDINATOR}. Fix: "
                                   f"{_HOW_TO_SET}")
        return _Settings(coord, int(n), int(pid), self.local_devices, self.timeout_s,
                         tuple(ids) if ids is not None else None)

    def _validate(self) -> None:
        problems = []
        missing = [name for name, v in (("coordinator_address", self.coordinator),
                                        ("num_processes", self.num_processes),
                                        ("process_id", self.process_id)) if v is None]
        if missing:
            problems.append(f"{', '.join(missing)} not given")
        n, pid = self.num_processes, self.process_id
        if n is not None and n < 1:
            problems.append(f"num_processes={n} must be >= 1")
        if n is not None and pid is not None and not 0 <= pid < n:
            problems.append(f"process_id={pid} must be in 0..{n - 1} (num_processes={n})")
        if self.local_devices is not None and self.local_devices < 1:
            problems.append(f"local_device_count={self.local_devices} must be >= 1")
        if not self.timeout_s > 0:
            problems.append(f"timeout_s={self.timeout_s} must be > 0")
        if self.coordinator is not None:
            try:
                _split_address(self.coordinator)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise DistributedError("Invalid distributed settings: " + "; ".join(problems)
                                   + f". Fix: {_HOW_TO_SET}")

    def check_devices(self, expected: Any) -> None:
        """Processes x local devices against the devices (or mesh) asked for, before starting."""
        if expected is None or self.local_devices is None or self.num_processes is None:
            return
        _check_total(expected, self.num_processes * self.local_devices,
                     f"{self.num_processes} processes x {self.local_devices} local devices",
                     self.num_processes)

    @property
    def where(self) -> str:
        return f"process {self.process_id} of {self.num_processes}"


_HOW_TO_SET = (f"pass coordinator_address='host:port', num_processes and process_id, or set "
               f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} (and "
               f"{ENV_LOCAL_DEVICES}) in every process's environment, or start the job with "
               f"`jmp launch` (one machine) or srun with {ENV_AUTO}=auto (SLURM).")


def _pick(value: Any, env_name: str, name: str, kind: type = int) -> Any:
    if value is not None:
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise DistributedError(f"{name} must be an int, got {value!r}.")
        return value
    text = os.environ.get(env_name, "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise DistributedError(f"Environment variable {env_name}={text!r} is not "
                               f"{'an integer' if kind is int else 'a number'}.") from None


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address={address!r} is not 'host:port' (e.g. "
                         f"'10.0.0.1:61234')")
    return host.strip("[]"), int(port)


def _check_total(expected: Any, total: int, how: str, num_processes: int) -> None:
    from jmp.errors import MeshError
    from jmp.mesh import resolve_mesh_shape

    if isinstance(expected, int) and not isinstance(expected, bool):
        if expected != total:
            raise DistributedError(
                f"{expected} devices were asked for, but {how} give {total}. "
                f"{_fix_counts(expected, num_processes)}")
        return
    try:
        resolve_mesh_shape(expected, total)
    except MeshError as err:
        from jmp.mesh import parse_mesh_spec

        sizes = parse_mesh_spec(expected).values()
        need = math.prod(sizes) if -1 not in sizes else None
        fix = _fix_counts(need, num_processes) if need else (
            "Fix: change the mesh or the process/device counts.")
        raise DistributedError(f"{err} (Devices: {how} = {total}.) {fix}") from None


def _fix_counts(need: int, num_processes: int) -> str:
    if need % num_processes == 0:
        return (f"Fix: give each of the {num_processes} processes {need // num_processes} "
                f"devices (--local-devices {need // num_processes}), or change the mesh.")
    return f"Fix: use a process count that divides {need}, or change the mesh."


def _check_backend_not_started() -> None:
    from jmp.devices import backend_started

    if backend_started():
        raise DistributedError("JAX's backend already started in this process, so it can no "
                               "longer join other processes. Fix: call "
                               "jmp.distributed.initialize() first, before any JAX operation "
                               "(creating an array, jax.devices(), a jitted call).")


def _already(settings: _Settings) -> Cluster:
    assert _cluster is not None
    same = (settings.num_processes in (None, _cluster.num_processes)
            and settings.process_id in (None, _cluster.process_id))
    if not same:
        raise DistributedError(f"jmp.distributed.initialize was already called as process "
                               f"{_cluster.process_id} of {_cluster.num_processes}; it cannot "
                               f"start again as {settings.where}. Fix: call it once.")
    return _cluster


def _finish_single(settings: _Settings, expected: Any) -> Cluster:
    import jax

    local = jax.local_device_count()
    if expected is not None:
        _check_total(expected, local, f"1 process with {local} devices", 1)
    return Cluster(0, 1, local, local, None, (socket.gethostname(),))


# --- the rendezvous: who is there, before JAX's coordinator starts ------------------------


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


def _read_line(sock: socket.socket, deadline: float) -> dict[str, Any] | None:
    """One JSON line, or None on EOF; raises TimeoutError at ``deadline``."""
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    try:
        out = json.loads(data)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def _hello(settings: _Settings) -> dict[str, Any]:
    return {"jmp": _PROTOCOL, "process_id": settings.process_id,
            "num_processes": settings.num_processes, "local_devices": settings.local_devices,
            "host": socket.gethostname(), "pid": os.getpid()}


def _rendezvous(settings: _Settings, expected: Any) -> tuple[dict[int, socket.socket], list]:
    if settings.process_id == 0:
        return _serve(settings, expected)
    return _join(settings)


def _listen(settings: _Settings) -> socket.socket:
    _, port = _split_address(settings.coordinator or "")
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                        reuse_port=False)
        return socket.create_server(("", port))
    except OSError as err:
        raise DistributedError(f"Process 0 cannot listen on port {port} of the coordinator "
                               f"address {settings.coordinator!r}: {err.strerror}. Fix: choose "
                               f"a free port (`jmp launch` picks one), or stop the program "
                               f"that holds it.") from None


def _serve(settings: _Settings, expected: Any) -> tuple[dict[int, socket.socket], list]:
    """Process 0: wait for every other process to check in; tell them all the outcome."""
    n = settings.num_processes or 1
    hellos: dict[int, dict[str, Any]] = {0: _hello(settings)}
    socks: dict[int, socket.socket] = {}
    deadline = time.monotonic() + settings.timeout_s
    problem = None
    with _listen(settings) as server:
        while len(hellos) < n and problem is None and time.monotonic() < deadline:
            server.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            problem = _admit(conn, settings, hellos, socks, deadline)
    if problem is None and len(hellos) < n:
        problem = _missing_message(settings, hellos)
    if problem is None:
        problem = _total_problem(settings, hellos, expected)
    hosts = [hellos[i]["host"] for i in sorted(hellos)]
    for sock in socks.values():
        with contextlib.suppress(OSError):
            _send(sock, {"ok": problem is None, "error": problem, "hosts": hosts})
    if problem is not None:
        for sock in socks.values():
            sock.close()
        raise DistributedError(problem)
    return socks, hosts


def _admit(conn: socket.socket, settings: _Settings, hellos: dict[int, dict[str, Any]],
           socks: dict[int, socket.socket], deadline: float) -> str | None:
    """Read one process's hello; a problem that stops the whole job is returned as text."""
    try:
        hello = _read_line(conn, min(deadline, time.monotonic() + 10))
    except (TimeoutError, OSError):
        hello = None
    if not hello or hello.get("jmp") != _PROTOCOL:
        conn.close()  # a port scanner or a stale client: not one of ours
        return None
    pid, n = hello.get("process_id"), hello.get("num_processes")
    who = f"process {pid} ({hello.get('host')}, pid {hello.get('pid')})"
    if n != settings.num_processes:
        problem = (f"{who} was started with num_processes={n}, process 0 with "
                   f"{settings.num_processes}. Fix: give every process the same count.")
    elif pid in hellos:
        problem = (f"Two processes claim process_id={pid}: {who} and one on "
                   f"{hellos[pid].get('host')} with pid {hellos[pid].get('pid')}. Fix: give each "
                   f"process its own id, 0..{settings.num_processes - 1}.")
    else:
        hellos[pid], socks[pid] = hello, conn
        return None
    socks[-1 - len(socks)] = conn  # so that it hears the outcome too
    return problem


def _missing_message(settings: _Settings, hellos: dict[int, dict[str, Any]]) -> str:
    n = settings.num_processes or 1
    missing = [i for i in range(n) if i not in hellos]
    arrived = ", ".join(f"{i} ({h['host']})" for i, h in sorted(hellos.items()))
    names = ", ".join(map(str, missing))
    return (f"Timed out after {settings.timeout_s:g} s waiting for process(es) {names} of "
            f"{n} to reach the coordinator {settings.coordinator} (checked in: {arrived}). Fix: "
            f"start every process with the same {ENV_COORDINATOR}/{ENV_NUM_PROCESSES} and its "
            f"own {ENV_PROCESS_ID}; check that they can reach this host and port (a process "
            f"that stopped on an error of its own says so in its output); or raise the "
            f"timeout ({ENV_TIMEOUT}).")


def _total_problem(settings: _Settings, hellos: dict[int, dict[str, Any]],
                   expected: Any) -> str | None:
    counts = [hellos[i].get("local_devices") for i in sorted(hellos)]
    if expected is None or any(c is None for c in counts):
        return None
    how = " + ".join(map(str, counts)) + " local devices of the processes"
    if len(set(counts)) == 1:
        how = f"{len(counts)} processes x {counts[0]} local devices"
    try:
        _check_total(expected, sum(counts), how, len(counts))
    except DistributedError as err:
        return str(err)
    return None


def _join(settings: _Settings) -> tuple[dict[int, socket.socket], list]:
    """Any process but 0: reach the coordinator (retrying until the deadline), check in."""
    host, port = _split_address(settings.coordinator or "")
    deadline = time.monotonic() + settings.timeout_s
    last: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedError(
                f"Process {settings.process_id} could not reach the coordinator (process 0) at "
                f"{settings.coordinator} within {settings.timeout_s:g} s "
                f"({_reason(last)}). Fix: start process 0 (it listens there; if it stopped on "
                f"an error, its output says why), check the host "
                f"and port in {ENV_COORDINATOR} and that no firewall blocks them, or raise the "
                f"timeout ({ENV_TIMEOUT}).")
        try:
            sock = socket.create_connection((host, port), timeout=min(left, 5))
            break
        except OSError as err:
            last = err
            time.sleep(min(0.2, max(left, 0)))
    try:
        _send(sock, _hello(settings))
        reply = _read_line(sock, deadline + 5)  # process 0 answers at its own deadline
    except (TimeoutError, OSError) as err:
        sock.close()
        raise DistributedError(f"Process {settings.process_id}: no answer from the coordinator "
                               f"{settings.coordinator} within {settings.timeout_s:g} s "
                               f"({_reason(err)}).") from None
    if reply is None or "ok" not in reply:
        sock.close()
        raise DistributedError(f"Process {settings.process_id}: the coordinator "
                               f"{settings.coordinator} closed the connection without an "
                               f"answer (is it a jmp process 0 of this job?).")
    if not reply["ok"]:
        sock.close()
        raise DistributedError(f"Process 0 stopped the job: {reply.get('error')}")
    return {0: sock}, list(reply.get("hosts") or [])


def _reason(err: BaseException | None) -> str:
    if err is None:
        return "no attempt finished"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused: nothing listens there yet"
    if isinstance(err, TimeoutError | socket.timeout):
        return "connection attempts timed out"
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


# --- JAX's own start, under a watchdog -----------------------------------------------------


def _start_jax(settings: _Settings, heartbeat_s: float) -> None:
    import jax

    watchdog = _Watchdog(settings.timeout_s, f"{settings.where}: JAX's distributed start "
                         f"(coordinator {settings.coordinator}) did not finish within "
                         f"{settings.timeout_s:g} s although every process had checked in; a "
                         f"process stopped, or the network blocks the coordinator's port. "
                         f"Stopping.")
    with watchdog:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator, num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=list(settings.local_device_ids) if settings.local_device_ids
            else None,
            # JAX aborts (exit 134) when its own timeout passes: keep it behind the watchdog's
            initialization_timeout=int(math.ceil(settings.timeout_s)) + 30,
            heartbeat_timeout_seconds=int(math.ceil(heartbeat_s)),
            shutdown_timeout_seconds=int(math.ceil(max(settings.timeout_s, 10))))
        jax.devices()  # starts the backend: the processes exchange their devices here


class _Watchdog:
    """Print ``message`` and exit the process if the block has not finished in ``seconds``."""

    def __init__(self, seconds: float, message: str) -> None:
        self.timer = threading.Timer(seconds, _die, args=(message, EXIT_TIMEOUT))
        self.timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()


def _verify(settings: _Settings, expected: Any, hosts: list) -> Cluster:
    import jax

    n, local, total = jax.process_count(), jax.local_device_count(), jax.device_count()
    problems = []
    if n != settings.num_processes or jax.process_index() != settings.process_id:
        problems.append(f"JAX sees process {jax.process_index()} of {n}")
    if settings.local_devices is not None and local != settings.local_devices:
        problems.append(f"{local} local devices ({jax.local_devices()[0].platform}) instead of "
                        f"{settings.local_devices}; on GPUs, CUDA_VISIBLE_DEVICES or the "
                        f"scheduler's GPU binding decides")
    if problems:
        raise DistributedError(f"{settings.where}: " + "; ".join(problems) + ".")
    if expected is not None:
        _check_total(expected, total, f"the {n} processes' {total} devices", n)
    return Cluster(settings.process_id or 0, n, local, total, settings.coordinator,
                   tuple(hosts))


# --- the peer guard: a lost process stops the others, with its name -----------------------


class _PeerGuard:
    """Watches the rendezvous sockets; a peer that vanishes, or fails, stops this process.

    Process 0 watches every other process and relays a loss to the rest; the others watch
    process 0. A peer that exits normally sends ``bye`` first (at interpreter exit); if this
    process is still running ``grace_s`` later, that peer left too early and this one stops.
    """

    def __init__(self, me: int, peers: dict[int, socket.socket], hosts: list,
                 grace_s: float) -> None:
        self.me, self.peers, self.hosts, self.grace_s = me, peers, hosts, grace_s
        self.exiting = False
        self.bye: dict[int, float] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="jmp-peer-guard", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def announce(self, message: dict[str, Any]) -> None:
        with self.lock:
            for sock in self.peers.values():
                with contextlib.suppress(OSError):
                    _send(sock, message)

    def at_exit(self) -> None:
        self.exiting = True
        self.announce({"bye": self.me})

    def _name(self, pid: int) -> str:
        host = self.hosts[pid] if pid < len(self.hosts) else "?"
        return f"process {pid} ({host})"

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        buffers: dict[int, bytes] = {}
        for pid, sock in self.peers.items():
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, pid)
            buffers[pid] = b""
        while True:
            for key, _ in sel.select(timeout=0.5):
                pid = key.data
                try:
                    chunk = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fileobj)
                    self._closed(pid)
                    continue
                buffers[pid] += chunk
                *lines, buffers[pid] = buffers[pid].split(b"\n")
                for line in lines:
                    self._message(pid, line)
            self._check_bye()

    def _message(self, pid: int, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if "bye" in msg:
            self.bye.setdefault(pid, time.monotonic())
        elif "fail" in msg:
            self._stop(f"{self._name(pid)} failed: {msg['fail']}")
        elif "lost" in msg:
            self._stop(str(msg.get("reason") or f"process {msg['lost']} was lost"))

    def _closed(self, pid: int) -> None:
        if self.exiting:
            return
        if pid in self.bye:
            return  # it said goodbye: _check_bye decides whether it left too early
        self._stop(f"{self._name(pid)} disconnected without finishing: it was killed or "
                   f"crashed (see its output).")

    def _check_bye(self) -> None:
        now = time.monotonic()
        for pid, since in list(self.bye.items()):
            if not self.exiting and now - since > self.grace_s:
                self._stop(f"{self._name(pid)} exited {now - since:.0f} s ago while this "
                           f"process is still running: it stopped early (see its output).")

    def _stop(self, reason: str) -> None:
        if self.exiting:
            return
        if self.me == 0:
            self.announce({"lost": -1, "reason": reason})
        _die(f"{reason} Stopping process {self.me} too.", EXIT_PEER_LOST)


def _start_guard(settings: _Settings, peers: dict[int, socket.socket], hosts: list) -> None:
    global _guard
    _guard = _PeerGuard(settings.process_id or 0, peers, hosts, grace_s=settings.timeout_s)
    _guard.start()
    # registered after JAX's own exit hook, so it runs first: peers hear "bye" before this
    # process waits in JAX's shutdown barrier
    atexit.register(_guard.at_exit)
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        if _guard is not None and not issubclass(kind, SystemExit):
            abort(130 if issubclass(kind, KeyboardInterrupt) else 1, f"{kind.__name__}: {value}")

    sys.excepthook = excepthook


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _die(message: str, code: int) -> NoReturn:
    _flush()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"jmp: error: {message}\n")
        sys.stderr.flush()
    os._exit(code)
