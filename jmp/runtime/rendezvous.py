"""Who is there, and who left: the processes of a job find each other, then watch each other.

Two halves of one conversation over plain TCP sockets, held by :mod:`jmp.runtime.distributed` (which
settles the settings and starts JAX; this module knows nothing of JAX or meshes):

- **Check-in** (:func:`check_in`), before JAX's coordinator starts: process 0 listens on the
  coordinator's own port and every other process checks in (id, host, pid, devices) with one
  JSON line. A process that never comes is named (``waiting for process(es) 1 of 2``), an
  unreachable coordinator is reported as such, both as a :class:`DistributedError` after
  ``timeout_s``, instead of JAX's abort (exit 134, ``DEADLINE_EXCEEDED``) after its timeout.
- **The peer guard** (:func:`start_guard`), while the job runs: the check-in sockets stay open
  (gRPC shares the port), so when a process dies its peers know at once (the kernel closes its
  sockets, even on SIGKILL) and exit with :data:`EXIT_PEER_LOST`, naming it, instead of waiting
  in a collective for JAX's heartbeat timeout. A process that fails (:func:`fail`, or an
  uncaught exception) tells its peers first.

The names both modules share (:class:`DistributedError`, the ``JMP_*`` variables, the exit
code) are defined here, the lower module, so that the imports point one way
(``distributed -> rendezvous``); :mod:`jmp.runtime.distributed` re-exports them as their
public home.

Example (two processes' halves, played by two threads of this one; a real job runs
``check_in`` once in each process, then ``start_guard(me.process_id, peers, hosts,
grace_s=me.timeout_s)`` to watch the others while it trains):
    >>> import socket
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> with socket.socket() as probe:                 # a free port for the coordinator
    ...     probe.bind(("127.0.0.1", 0))
    ...     address = f"127.0.0.1:{probe.getsockname()[1]}"
    >>> members = [Member(address, process_id=i, num_processes=2, local_devices=4,
    ...                   timeout_s=30.0) for i in (0, 1)]
    >>> with ThreadPoolExecutor(2) as pool:
    ...     (peers_of_0, hosts), (peers_of_1, _) = pool.map(check_in, members)
    >>> sorted(peers_of_0), sorted(peers_of_1), len(hosts)  # 0 holds a socket to 1, and back
    ([1], [0], 2)
    >>> for sock in (*peers_of_0.values(), *peers_of_1.values()):
    ...     sock.close()
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, cast

from jmp.errors import JmpError

# The environment a job's processes are started with (by `jmp launch`, or a cluster script).
# They belong to jmp.runtime.distributed's settings; they live here because check-in errors
# name them.
ENV_COORDINATOR = "JMP_COORDINATOR"
ENV_NUM_PROCESSES = "JMP_NUM_PROCESSES"
ENV_PROCESS_ID = "JMP_PROCESS_ID"
ENV_LOCAL_DEVICES = "JMP_LOCAL_DEVICES"
ENV_TIMEOUT = "JMP_TIMEOUT"
ENV_AUTO = "JMP_DISTRIBUTED"
# A process stopped because another was lost: the launcher blames the other one, not this.
EXIT_PEER_LOST = 3
# Bumped when the check-in's JSON changes, so that a stale client is ignored, not misread.
_PROTOCOL = 1


class DistributedError(JmpError):
    """Processes could not be started together, or do not fit the mesh asked for."""


@dataclass(frozen=True)
class Member:
    """This process, as it checks in: where the coordinator is, who it is, how long to wait."""

    coordinator: str
    process_id: int
    num_processes: int
    local_devices: int | None
    timeout_s: float


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` as ``(host, port)``; ``ValueError`` naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"coordinator_address={address!r} is not 'host:port' (e.g. '10.0.0.1:61234')"
        )
    return host.strip("[]"), int(port)  # brackets: an IPv6 literal, "[::1]:61234"


# --- check-in: who is there, before JAX's coordinator starts -------------------------------


def check_in(
    me: Member, *, check_counts: Callable[[list[int]], str | None] | None = None
) -> tuple[dict[int, socket.socket], list]:
    """Meet the job's other processes at the coordinator; every process calls it.

    Args:
        me: this process.
        check_counts: process 0 only: given every process's local device count (in id order),
            a problem that stops the whole job, as text, or ``None``. Others hear it too.

    Returns:
        The open sockets to the peers (process 0: to every other process; the others: to
        process 0), kept for :func:`start_guard`, and the host of every process, by id.

    Raises:
        DistributedError: a process did not check in, the coordinator could not be reached or
            did not answer within ``timeout_s``, or process 0 stopped the job (the message
            names the process and the fix).
    """
    if me.process_id == 0:
        return _serve(me, check_counts)
    return _join(me)


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


def _hello(me: Member) -> dict[str, Any]:
    return {
        "jmp": _PROTOCOL,
        "process_id": me.process_id,
        "num_processes": me.num_processes,
        "local_devices": me.local_devices,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _listen(me: Member) -> socket.socket:
    _, port = split_address(me.coordinator)
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(
                ("", port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=False
            )
        return socket.create_server(("", port))
    except OSError as err:
        raise DistributedError(
            f"Process 0 cannot listen on port {port} of the coordinator "
            f"address {me.coordinator!r}: {err.strerror}. Fix: choose "
            f"a free port (`jmp launch` picks one), or stop the program "
            f"that holds it."
        ) from None


def _serve(
    me: Member, check_counts: Callable[[list[int]], str | None] | None
) -> tuple[dict[int, socket.socket], list]:
    """Process 0: wait for every other process to check in; tell them all the outcome."""
    n = me.num_processes
    hellos: dict[int, dict[str, Any]] = {0: _hello(me)}
    socks: dict[int, socket.socket] = {}
    deadline = time.monotonic() + me.timeout_s
    problem = None
    with _listen(me) as server:
        while len(hellos) < n and problem is None and time.monotonic() < deadline:
            server.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            problem = _admit(conn, me, hellos, socks, deadline)
    if problem is None and len(hellos) < n:
        problem = _missing_message(me, hellos)
    if problem is None and check_counts is not None:
        counts = [hellos[i].get("local_devices") for i in sorted(hellos)]
        said: list[int] = [c for c in counts if c is not None]
        if len(said) == len(counts):  # a process that did not say cannot be checked
            problem = check_counts(said)
    hosts = [hellos[i]["host"] for i in sorted(hellos)]
    for sock in socks.values():
        with contextlib.suppress(OSError):
            _send(sock, {"ok": problem is None, "error": problem, "hosts": hosts})
    if problem is not None:
        for sock in socks.values():
            sock.close()
        raise DistributedError(problem)
    return socks, hosts


def _admit(
    conn: socket.socket,
    me: Member,
    hellos: dict[int, dict[str, Any]],
    socks: dict[int, socket.socket],
    deadline: float,
) -> str | None:
    """Read one process's hello; a problem that stops the whole job is returned as text."""
    try:
        hello = _read_line(conn, min(deadline, time.monotonic() + 10))
    except (TimeoutError, OSError):
        hello = None
    if not hello or hello.get("jmp") != _PROTOCOL:
        conn.close()  # a port scanner or a stale client: not one of ours
        return None
    # every hello tagged with our protocol carries its process_id (see _hello)
    pid, n = cast(int, hello.get("process_id")), hello.get("num_processes")
    who = f"process {pid} ({hello.get('host')}, pid {hello.get('pid')})"
    if n != me.num_processes:
        problem = (
            f"{who} was started with num_processes={n}, process 0 with "
            f"{me.num_processes}. Fix: give every process the same count."
        )
    elif pid in hellos:
        problem = (
            f"Two processes claim process_id={pid}: {who} and one on "
            f"{hellos[pid].get('host')} with pid {hellos[pid].get('pid')}. Fix: give each "
            f"process its own id, 0..{me.num_processes - 1}."
        )
    else:
        hellos[pid], socks[pid] = hello, conn
        return None
    socks[-1 - len(socks)] = conn  # so that it hears the outcome too
    return problem


def _missing_message(me: Member, hellos: dict[int, dict[str, Any]]) -> str:
    n = me.num_processes
    missing = [i for i in range(n) if i not in hellos]
    arrived = ", ".join(f"{i} ({h['host']})" for i, h in sorted(hellos.items()))
    names = ", ".join(map(str, missing))
    return (
        f"Timed out after {me.timeout_s:g} s waiting for process(es) {names} of "
        f"{n} to reach the coordinator {me.coordinator} (checked in: {arrived}). Fix: "
        f"start every process with the same {ENV_COORDINATOR}/{ENV_NUM_PROCESSES} and its "
        f"own {ENV_PROCESS_ID}; check that they can reach this host and port (a process "
        f"that stopped on an error of its own says so in its output); or raise the "
        f"timeout ({ENV_TIMEOUT})."
    )


def _join(me: Member) -> tuple[dict[int, socket.socket], list]:
    """Any process but 0: reach the coordinator (retrying until the deadline), check in."""
    host, port = split_address(me.coordinator)
    deadline = time.monotonic() + me.timeout_s
    last: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedError(
                f"Process {me.process_id} could not reach the coordinator (process 0) at "
                f"{me.coordinator} within {me.timeout_s:g} s "
                f"({_reason(last)}). Fix: start process 0 (it listens there; if it stopped on "
                f"an error, its output says why), check the host "
                f"and port in {ENV_COORDINATOR} and that no firewall blocks them, or raise the "
                f"timeout ({ENV_TIMEOUT})."
            )
        try:
            sock = socket.create_connection((host, port), timeout=min(left, 5))
            break
        except OSError as err:  # process 0 may simply not listen yet: retry
            last = err
            time.sleep(min(0.2, max(left, 0)))
    try:
        _send(sock, _hello(me))
        reply = _read_line(sock, deadline + 5)  # process 0 answers at its own deadline
    except (TimeoutError, OSError) as err:
        sock.close()
        raise DistributedError(
            f"Process {me.process_id}: no answer from the coordinator "
            f"{me.coordinator} within {me.timeout_s:g} s "
            f"({_reason(err)})."
        ) from None
    if reply is None or "ok" not in reply:
        sock.close()
        raise DistributedError(
            f"Process {me.process_id}: the coordinator "
            f"{me.coordinator} closed the connection without an "
            f"answer (is it a jmp process 0 of this job?)."
        )
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


# --- the peer guard: who left; a lost process stops the others, with its name -------------


class _PeerGuard:
    """Watches the check-in sockets; a peer that vanishes, or fails, stops this process.

    Process 0 watches every other process and relays a loss to the rest; the others watch
    process 0. A peer that exits normally sends ``bye`` first (at interpreter exit); if this
    process is still running ``grace_s`` later, that peer left too early and this one stops.
    Every process sends a ``beat`` each :data:`BEAT_S`; a peer silent for ``silence_s`` (hung,
    stopped by SIGSTOP, or on a frozen machine: its socket stays open) stops this one too,
    named, before JAX's own heartbeat timeout would abort it with a C++ stack trace.
    """

    def __init__(
        self,
        me: int,
        peers: dict[int, socket.socket],
        hosts: list,
        grace_s: float,
        silence_s: float = math.inf,
    ) -> None:
        self.me, self.peers, self.hosts, self.grace_s = me, peers, hosts, grace_s
        self.silence_s = silence_s
        self.exiting = False
        self.bye: dict[int, float] = {}
        self.heard = dict.fromkeys(peers, time.monotonic())
        self.lock = threading.Lock()  # the main thread (fail, at exit) and the relay both send
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
        last_beat = 0.0
        while True:
            now = time.monotonic()
            if now - last_beat >= BEAT_S:
                self.announce({"beat": self.me})
                last_beat = now
            # a timeout, not a blocking select: a "bye" ages even when nothing more arrives
            for key, _ in sel.select(timeout=min(0.5, BEAT_S)):
                pid = key.data
                self.heard[pid] = time.monotonic()
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
            self._check_silence()

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
        self._stop(
            f"{self._name(pid)} disconnected without finishing: it was killed or "
            f"crashed (see its output)."
        )

    def _check_bye(self) -> None:
        now = time.monotonic()
        for pid, since in list(self.bye.items()):
            if not self.exiting and now - since > self.grace_s:
                self._stop(
                    f"{self._name(pid)} exited {now - since:.0f} s ago while this "
                    f"process is still running: it stopped early (see its output)."
                )

    def _check_silence(self) -> None:
        now = time.monotonic()
        for pid, heard in self.heard.items():
            if self.exiting or pid in self.bye or now - heard <= self.silence_s:
                continue
            self._stop(
                f"{self._name(pid)} stopped answering: nothing heard from it for "
                f"{now - heard:.0f} s (it hangs, was stopped with SIGSTOP, or its machine "
                f"froze)."
            )

    def _stop(self, reason: str) -> None:
        if self.exiting:
            return
        if self.me == 0:  # the others watch only process 0: relay, or they would wait
            self.announce({"lost": -1, "reason": reason})
        die(f"{reason} Stopping process {self.me} too.", EXIT_PEER_LOST)


_guard: _PeerGuard | None = None
FAIL_SETTLE_S = 0.5
BEAT_S = 1.0  # how often each process tells its peers it is alive


def start_guard(
    me: int,
    peers: dict[int, socket.socket],
    hosts: list,
    *,
    grace_s: float,
    silence_s: float = math.inf,
) -> None:
    """Watch ``peers`` (from :func:`check_in`) until this process exits; once per process.

    A peer lost, or failed, exits this process with :data:`EXIT_PEER_LOST`; a peer that said
    goodbye may stay gone ``grace_s`` before this process, still running, concludes the same;
    a peer silent for ``silence_s`` (no heartbeat) is taken as hung, with the same result.
    An uncaught exception here tells the peers (as :func:`fail` does) after it is printed.
    """
    global _guard
    _guard = _PeerGuard(me, peers, hosts, grace_s=grace_s, silence_s=silence_s)
    _guard.start()
    # registered after JAX's own exit hook, so it runs first: peers hear "bye" before this
    # process waits in JAX's shutdown barrier
    atexit.register(_guard.at_exit)
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        if _guard is not None and not issubclass(kind, SystemExit):
            fail(130 if issubclass(kind, KeyboardInterrupt) else 1, f"{kind.__name__}: {value}")

    sys.excepthook = excepthook


def fail(code: int, message: str = "") -> NoReturn:
    """Tell the peers (if guarded) that this process failed, and exit now with ``code``.

    ``os._exit``, not ``sys.exit``: a normal exit would wait in JAX's shutdown barrier for
    peers that themselves wait in a collective for this process.
    """
    if _guard is not None:
        # This failure may be the echo of a peer's (a collective breaks when the peer exits):
        # give the guard thread a moment to read the peer's own "fail" message, in which case
        # it exits first, as EXIT_PEER_LOST naming the peer, and the right process is blamed.
        time.sleep(FAIL_SETTLE_S)
        _guard.announce({"fail": message or f"exit code {code}"})
    _flush()
    os._exit(code)


def die(message: str, code: int) -> NoReturn:
    """Print ``jmp: error: message`` and exit now with ``code`` (from any thread)."""
    _flush()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"jmp: error: {message}\n")
        sys.stderr.flush()
    os._exit(code)


def _flush() -> None:
    # os._exit skips Python's own flush: without this, the last lines of output are lost
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
