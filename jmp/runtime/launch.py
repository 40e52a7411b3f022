"""``jmp launch``: several processes of one job on this machine, as a cluster would start them.

Each process gets the ``JMP_*`` environment of :mod:`jmp.runtime.distributed` (a free port on
127.0.0.1 for the coordinator, its id, its device count) and runs ``python -m jmp.cli ARGS``
(or ``python SCRIPT ARGS``). Their output is streamed with a ``[p0]``, ``[p1]`` prefix. If one
fails, the others get a few seconds to stop by themselves (jmp's peer guard stops them, naming
the lost one), then are terminated; the launcher exits non-zero, naming the process that failed.

Example:
    $ jmp launch -n 2 --local-devices 4 -- train --strategy dp_tp --mesh data=2,model=4
    $ python -m jmp.runtime.launch -n 2 --local-devices 4 --script my_train.py -- --steps 10
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from jmp.errors import ConfigError
from jmp.runtime.distributed import (
    DEFAULT_TIMEOUT_S,
    ENV_COORDINATOR,
    ENV_LOCAL_DEVICES,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ENV_TIMEOUT,
    EXIT_PEER_LOST,
)

GRACE_S = 5.0  # after a failure, how long the others may take to stop by themselves
KILL_AFTER_S = 5.0  # after SIGTERM, before SIGKILL


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(
    process_id: int,
    *,
    num_processes: int,
    local_devices: int,
    coordinator: str,
    timeout_s: float,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` (default ours) plus the JMP_* vars."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            ENV_COORDINATOR: coordinator,
            ENV_NUM_PROCESSES: str(num_processes),
            ENV_PROCESS_ID: str(process_id),
            ENV_LOCAL_DEVICES: str(local_devices),
            ENV_TIMEOUT: f"{timeout_s:g}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # one process's simulated devices come from JMP_LOCAL_DEVICES, not an inherited flag
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def launch(
    argv: Sequence[str],
    /,
    *,
    num_processes: int,
    local_devices: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    script: str | None = None,
    out: IO[str] | None = None,
) -> int:
    """Run ``python -m jmp.cli *argv`` (or ``python script *argv``) as ``num_processes`` processes.

    Args:
        argv: the command's arguments, e.g. ``["train", "--mesh", "data=2,model=4"]``.
        num_processes: how many processes to start.
        local_devices: devices per process (simulated CPU devices on a CPU-only machine).
        timeout_s: how long the processes wait for each other at start, and how long a lost
            peer may go unnoticed (``JMP_TIMEOUT``).
        script: run this Python file instead of ``jmp.cli``.
        out: where the prefixed output goes (default ``sys.stdout``).

    Returns:
        0 when every process succeeded; otherwise the exit code of the first that failed
        (128 + signal number if a signal killed it), after a line naming it.
    """
    if num_processes < 1 or local_devices < 1 or not timeout_s > 0:
        raise ConfigError(
            f"Launching needs -n >= 1, --local-devices >= 1 and --timeout > 0; "
            f"got {num_processes}, {local_devices}, {timeout_s}."
        )
    # declared: typeshed's sys.stdout is `TextIO | Any`, which would keep `None` in out's type
    sink: IO[str] = out or sys.stdout
    coordinator = f"127.0.0.1:{free_port()}"
    program = [sys.executable, "-u", script] if script else [sys.executable, "-u", "-m", "jmp.cli"]
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    try:
        for i in range(num_processes):
            env = process_env(
                i,
                num_processes=num_processes,
                local_devices=local_devices,
                coordinator=coordinator,
                timeout_s=timeout_s,
            )
            proc = subprocess.Popen(
                [*program, *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(proc)
            # one pipe per stream: C++ logging on stderr cannot split a line of stdout
            for stream in (proc.stdout, proc.stderr):
                pump = threading.Thread(
                    target=_pump, args=(stream, f"[p{i}] ", sink, lock), daemon=True
                )
                pump.start()
                pumps.append(pump)
        first, hung = _supervise(procs)
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        _say(sink, lock, "jmp launch: interrupted; stopped every process.")
        return 130
    finally:
        _stop(procs, signal.SIGTERM)
        for pump in pumps:
            pump.join(timeout=5)
    return _report(procs, first, sink, lock, hung=hung)


def _supervise(procs: list[subprocess.Popen]) -> tuple[int | None, bool]:
    """Wait for all; on the first failure, give the rest GRACE_S; return (culprit, hung).

    A process that exits with :data:`EXIT_PEER_LOST` stopped because another was lost: the
    other is named as the cause when it is seen failing too. When every failed process only
    lost a peer and one is still running, that one stopped answering (hung, or SIGSTOP): it
    is the culprit (``hung``), and the launcher then stops it.
    """
    seen: list[int] = []  # failed processes, in the order they were seen
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        seen += [i for i, c in enumerate(codes) if c not in (None, 0) and i not in seen]
        if seen and deadline is None:
            deadline = time.monotonic() + GRACE_S
        if all(c is not None for c in codes) or (deadline and time.monotonic() > deadline):
            break
        time.sleep(0.05)
    if not seen:
        return None, False
    causes = [i for i in seen if procs[i].returncode != EXIT_PEER_LOST]
    alive = [i for i, p in enumerate(procs) if p.poll() is None]
    if not causes and alive:
        return alive[0], True
    return (causes or seen)[0], False


def _stop(procs: list[subprocess.Popen], sig: int) -> None:
    """Signal every live process group we started, then kill those still alive."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + KILL_AFTER_S
    for p in live:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _report(
    procs: list[subprocess.Popen],
    first: int | None,
    out: IO[str],
    lock: threading.Lock,
    *,
    hung: bool = False,
) -> int:
    if first is None:
        return 0
    code = procs[first].returncode
    others = ", ".join(
        f"p{i} {_describe(p.returncode)}"
        for i, p in enumerate(procs)
        if i != first and p.returncode != 0
    )
    if hung:
        what = "stopped answering (hung, or stopped with SIGSTOP) and was killed"
        tail = f"; the others stopped because of it ({others})"
    else:
        what, tail = _describe(code), f"; the others were stopped ({others})" if others else ""
    _say(out, lock, f"jmp launch: process {first} (p{first}) failed: it {what}{tail}.")
    if hung:
        return EXIT_PEER_LOST
    return code if code > 0 else 128 - code


def _say(out: IO[str], lock: threading.Lock, line: str) -> None:
    with lock:
        out.write(line + "\n")
        out.flush()


def _pump(stream: IO[bytes] | None, prefix: str, out: IO[str], lock: threading.Lock) -> None:
    """Copy a process's output, line by line, each line prefixed."""
    if stream is None:
        return
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", errors="replace").rstrip("\n")
        for part in text.split("\r"):  # progress bars redraw with \r: keep each state a line
            if part.strip():
                _say(out, lock, prefix + part)
    stream.close()


# --- command line --------------------------------------------------------------------------


def add_launch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``launch`` to the ``jmp`` command's subparsers."""
    p = subparsers.add_parser(
        "launch",
        help="run a jmp command as several processes on this machine",
        description="Start N processes of `jmp ARGS` (or `python --script FILE ARGS`) that form "
        "one JAX job, as a cluster would; stream their output prefixed [p0], "
        "[p1], ...; stop all when one fails.",
    )
    _add_args(p)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--num-processes", type=int, default=2, help="processes to start")
    p.add_argument(
        "--local-devices",
        type=int,
        default=4,
        help="devices per process: simulated CPU devices here",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds the processes wait for each other at start, and to notice a "
        "lost one (default: %(default)g)",
    )
    p.add_argument("--script", default=None, help="run `python SCRIPT ARGS` instead of `jmp ARGS`")
    p.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        help="after --: the command, e.g. -- train --mesh data=2,model=4",
    )


def cmd_launch(args: argparse.Namespace) -> int:
    """``jmp launch``: the arguments after ``--`` are one process's command line."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv and not args.script:
        raise ConfigError(
            "No command given. Example: jmp launch -n 2 "
            "--local-devices 4 -- train --mesh data=2,model=4"
        )
    if argv and argv[0] == "launch":
        raise ConfigError(
            "`jmp launch -- launch ...` would launch launchers: give the "
            "command to run, e.g. -- train ..."
        )
    return launch(
        argv,
        num_processes=args.num_processes,
        local_devices=args.local_devices,
        timeout_s=args.timeout,
        script=args.script,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jmp.runtime.launch ...``: the same as ``jmp launch ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m jmp.runtime.launch",
        description=add_launch_parser.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_launch(args)
    except ConfigError as err:
        print(f"jmp launch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
