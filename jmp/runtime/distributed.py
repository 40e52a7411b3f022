"""Several processes, one mesh: a checked start of ``jax.distributed``, and a guard while it runs.

One process per host (or, on one machine, per group of simulated CPU devices); together they
see every device, and a mesh spans all of them. :func:`initialize` wraps
``jax.distributed.initialize`` with what it lacks:

- **Checks before the network**: processes x local devices must equal the devices the mesh
  needs; ids, counts and the coordinator address are validated with the fix in the message.
- **A rendezvous with names** (:mod:`jmp.runtime.rendezvous`): before JAX's coordinator
  starts, every
  process checks in with process 0, so a process that never comes, or an unreachable
  coordinator, is a :class:`DistributedError` naming it after ``timeout_s``, instead of JAX's
  abort (exit 134, ``DEADLINE_EXCEEDED``) a few seconds after its timeout.
- **A watchdog** on ``jax.distributed.initialize`` itself: should it still hang after the
  rendezvous, the process prints a clear line and exits with :data:`EXIT_TIMEOUT`.
- **A peer guard** (:mod:`jmp.runtime.rendezvous`) while the job runs: when a process dies or fails,
  its peers exit at once with :data:`EXIT_PEER_LOST`, naming it, instead of waiting in a
  collective for JAX's heartbeat timeout or minutes in JAX's shutdown barrier.

The launcher (:mod:`jmp.runtime.launch`) and cluster jobs pass the settings as environment
variables:
``JMP_COORDINATOR`` (``host:port`` of process 0), ``JMP_NUM_PROCESSES``, ``JMP_PROCESS_ID``,
``JMP_LOCAL_DEVICES`` and ``JMP_TIMEOUT``; ``JMP_DISTRIBUTED=auto`` lets JAX detect SLURM,
Open MPI and the other clusters it knows.

Usage, in each process of a two-process job (not run as a doctest: it needs the peer process
and starts JAX's runtime; tests/test_distributed.py runs it for real, with two processes)::

    import jmp, jmp.runtime.distributed
    cluster = jmp.runtime.distributed.initialize(
        coordinator_address="10.0.0.1:61234", num_processes=2, process_id=0,  # 1 on the other
        local_device_count=4, expected_devices="data=2,model=4")
    mesh = jmp.make_mesh("data=2,model=4")   # spans both processes' devices

The checks that come before the network run without it:
    >>> from jmp.runtime.distributed import DistributedError, initialize
    >>> try:
    ...     initialize(coordinator_address="10.0.0.1", num_processes=2, process_id=0)
    ... except DistributedError as e:
    ...     print(str(e).split(" is not")[0])
    Invalid distributed settings: coordinator_address='10.0.0.1'
"""

from __future__ import annotations

import functools
import math
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, cast

from jmp.runtime import rendezvous

# Defined in jmp.runtime.rendezvous (its messages name them; it must not import this
# module), public here: `from jmp.runtime.distributed import ENV_COORDINATOR` is how the
# launcher and users get them.
from jmp.runtime.rendezvous import (
    ENV_AUTO,
    ENV_COORDINATOR,
    ENV_LOCAL_DEVICES,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ENV_TIMEOUT,
    DistributedError,
)
from jmp.runtime.rendezvous import EXIT_PEER_LOST as EXIT_PEER_LOST

DEFAULT_TIMEOUT_S = 60.0
EXIT_TIMEOUT = 4


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


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    timeout_s: float | None = None,
    expected_devices: Any = None,
    heartbeat_timeout_s: float | None = None,
) -> Cluster:
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
    settings = _Settings.resolve(
        coordinator_address, num_processes, process_id, local_device_count, timeout_s
    )
    settings.check_devices(expected_devices)
    if _cluster is not None:
        return _already(settings)
    _check_backend_not_started()
    from jmp.devices import use_gpu_xla_flags

    use_gpu_xla_flags()  # where a GPU may be: collectives overlapping compute
    if settings.local_devices is not None:
        from jmp.devices import simulate_cpu_devices

        simulate_cpu_devices(settings.local_devices)
    if settings.num_processes == 1:
        _cluster = _finish_single(settings, expected_devices)
        return _cluster
    me = settings.member()
    check = (
        None if expected_devices is None else functools.partial(_counts_problem, expected_devices)
    )
    peers, hosts = rendezvous.check_in(me, check_counts=check)
    hb = max(10.0, heartbeat_timeout_s or settings.timeout_s)
    _start_jax(settings, hb)
    _cluster = _verify(settings, expected_devices, hosts)
    # A hung peer is named at half JAX's heartbeat timeout: before JAX aborts (a C++ trace).
    rendezvous.start_guard(
        me.process_id, peers, hosts, grace_s=me.timeout_s, silence_s=max(3.0, hb / 2)
    )
    return _cluster


def abort(code: int, message: str = "") -> NoReturn:
    """Tell the other processes this one failed, and exit now with ``code``.

    Use it where a multi-process program stops on an error it handled (the CLI's error path):
    exiting normally would wait in JAX's shutdown barrier for peers that wait in a collective.
    """
    rendezvous.fail(code, message)


def barrier(name: str, /) -> None:
    """Wait until every process reaches the barrier ``name`` (all must call it; no-op alone).

    What it is for: every process checks a run folder before any process writes to it, so a
    slow process never finds the files a fast one has just written (and refuses its own run).
    """
    if _cluster is None or _cluster.num_processes == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


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
    buf[4 : 4 + len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    n = int.from_bytes(out[:4].tobytes(), "little")
    return out[4 : 4 + n].tobytes().decode()


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
    def resolve(
        cls,
        coordinator: str | None,
        num_processes: int | None,
        process_id: int | None,
        local_devices: int | None,
        timeout_s: float | None,
    ) -> _Settings:
        env = os.environ
        coordinator = coordinator or env.get(ENV_COORDINATOR) or None
        num_processes = _pick(num_processes, ENV_NUM_PROCESSES, "num_processes")
        process_id = _pick(process_id, ENV_PROCESS_ID, "process_id")
        local_devices = _pick(local_devices, ENV_LOCAL_DEVICES, "local_device_count")
        timeout = (
            timeout_s
            if timeout_s is not None
            else float(_pick(None, ENV_TIMEOUT, "timeout_s", kind=float) or DEFAULT_TIMEOUT_S)
        )
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
                None, None, None, None, None, int(self.timeout_s)
            )
        except Exception as err:  # noqa: BLE001 - any failure means "not detected"
            raise DistributedError(
                f"Cluster detection failed ({type(err).__name__}: {err}). Fix: {_HOW_TO_SET}"
            ) from None
        if coord is None or n is None or pid is None:
            raise DistributedError(
                f"No cluster detected (no SLURM, Open MPI or other job "
                f"environment JAX knows) and no {ENV_COORDINATOR}. Fix: "
                f"{_HOW_TO_SET}"
            )
        return _Settings(
            coord,
            int(n),
            int(pid),
            self.local_devices,
            self.timeout_s,
            tuple(ids) if ids is not None else None,
        )

    def _validate(self) -> None:
        problems = []
        missing = [
            name
            for name, v in (
                ("coordinator_address", self.coordinator),
                ("num_processes", self.num_processes),
                ("process_id", self.process_id),
            )
            if v is None
        ]
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
                rendezvous.split_address(self.coordinator)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise DistributedError(
                "Invalid distributed settings: " + "; ".join(problems) + f". Fix: {_HOW_TO_SET}"
            )

    def check_devices(self, expected: Any) -> None:
        """Processes x local devices against the devices (or mesh) asked for, before starting."""
        if expected is None or self.local_devices is None or self.num_processes is None:
            return
        _check_total(
            expected,
            self.num_processes * self.local_devices,
            f"{self.num_processes} processes x {self.local_devices} local devices",
            self.num_processes,
        )

    def member(self) -> rendezvous.Member:
        """This process for the rendezvous (validated: only ``local_devices`` may be None)."""
        return rendezvous.Member(
            self.coordinator or "",
            self.process_id or 0,
            self.num_processes or 1,
            self.local_devices,
            self.timeout_s,
        )

    @property
    def where(self) -> str:
        return f"process {self.process_id} of {self.num_processes}"


_HOW_TO_SET = (
    f"pass coordinator_address='host:port', num_processes and process_id, or set "
    f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} (and "
    f"{ENV_LOCAL_DEVICES}) in every process's environment, or start the job with "
    f"`jmp launch` (one machine) or srun with {ENV_AUTO}=auto (SLURM)."
)


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
        raise DistributedError(
            f"Environment variable {env_name}={text!r} is not "
            f"{'an integer' if kind is int else 'a number'}."
        ) from None


def _check_total(expected: Any, total: int, how: str, num_processes: int) -> None:
    from jmp.errors import MeshError
    from jmp.mesh import MeshSpec, resolve_mesh_shape

    if isinstance(expected, int) and not isinstance(expected, bool):
        if expected != total:
            raise DistributedError(
                f"{expected} devices were asked for, but {how} give {total}. "
                f"{_fix_counts(expected, num_processes)}"
            )
        return
    # not a count: a mesh spec, or a bad value (a bool too) that parsing the spec rejects
    spec = cast(MeshSpec, expected)
    try:
        resolve_mesh_shape(spec, total)
    except MeshError as err:
        from jmp.mesh import parse_mesh_spec

        sizes = parse_mesh_spec(spec).values()
        need = math.prod(sizes) if -1 not in sizes else None
        fix = (
            _fix_counts(need, num_processes)
            if need
            else ("Fix: change the mesh or the process/device counts.")
        )
        raise DistributedError(f"{err} (Devices: {how} = {total}.) {fix}") from None


def _counts_problem(expected: Any, counts: list[int]) -> str | None:
    """Process 0 at check-in: the processes' own device counts against the mesh, as text."""
    how = " + ".join(map(str, counts)) + " local devices of the processes"
    if len(set(counts)) == 1:
        how = f"{len(counts)} processes x {counts[0]} local devices"
    try:
        _check_total(expected, sum(counts), how, len(counts))
    except DistributedError as err:
        return str(err)  # sent to every process, which raises it: the job stops as one
    return None


def _fix_counts(need: int, num_processes: int) -> str:
    if need % num_processes == 0:
        return (
            f"Fix: give each of the {num_processes} processes {need // num_processes} "
            f"devices (--local-devices {need // num_processes}), or change the mesh."
        )
    return f"Fix: use a process count that divides {need}, or change the mesh."


def _check_backend_not_started() -> None:
    from jmp.devices import backend_started

    if backend_started():
        raise DistributedError(
            "JAX's backend already started in this process, so it can no "
            "longer join other processes. Fix: call "
            "jmp.runtime.distributed.initialize() first, before any JAX "
            "operation "
            "(creating an array, jax.devices(), a jitted call)."
        )


def _already(settings: _Settings) -> Cluster:
    assert _cluster is not None
    same = settings.num_processes in (None, _cluster.num_processes) and settings.process_id in (
        None,
        _cluster.process_id,
    )
    if not same:
        raise DistributedError(
            f"jmp.runtime.distributed.initialize was already called as process "
            f"{_cluster.process_id} of {_cluster.num_processes}; it cannot "
            f"start again as {settings.where}. Fix: call it once."
        )
    return _cluster


def _finish_single(settings: _Settings, expected: Any) -> Cluster:
    import jax

    local = jax.local_device_count()
    if expected is not None:
        _check_total(expected, local, f"1 process with {local} devices", 1)
    return Cluster(0, 1, local, local, None, (socket.gethostname(),))


# --- JAX's own start, under a watchdog -----------------------------------------------------


def _start_jax(settings: _Settings, heartbeat_s: float) -> None:
    import jax

    watchdog = _Watchdog(
        settings.timeout_s,
        f"{settings.where}: JAX's distributed start "
        f"(coordinator {settings.coordinator}) did not finish within "
        f"{settings.timeout_s:g} s although every process had checked in; a "
        f"process stopped, or the network blocks the coordinator's port. "
        f"Stopping.",
    )
    with watchdog:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
            # JAX aborts (exit 134) when its own timeout passes: keep it behind the watchdog's
            initialization_timeout=int(math.ceil(settings.timeout_s)) + 30,
            heartbeat_timeout_seconds=int(math.ceil(heartbeat_s)),
            shutdown_timeout_seconds=int(math.ceil(max(settings.timeout_s, 10))),
        )
        jax.devices()  # starts the backend: the processes exchange their devices here


class _Watchdog:
    """Print ``message`` and exit the process if the block has not finished in ``seconds``."""

    def __init__(self, seconds: float, message: str) -> None:
        # a thread, since the main one is stuck inside JAX; it can only end the process
        self.timer = threading.Timer(seconds, rendezvous.die, args=(message, EXIT_TIMEOUT))
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
        problems.append(
            f"{local} local devices ({jax.local_devices()[0].platform}) instead of "
            f"{settings.local_devices}; on GPUs, CUDA_VISIBLE_DEVICES or the "
            f"scheduler's GPU binding decides"
        )
    if problems:
        raise DistributedError(f"{settings.where}: " + "; ".join(problems) + ".")
    if expected is not None:
        _check_total(expected, total, f"the {n} processes' {total} devices", n)
    return Cluster(settings.process_id or 0, n, local, total, settings.coordinator, tuple(hosts))
