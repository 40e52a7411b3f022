"""The ``jmp`` command: train, generate, export, inspect, plan, launch, data; one module each.

Every error a user can cause ends with one line on stderr and exit code 2, never a traceback.
Importing this package is light: each command imports what it needs when it runs.

Example:
    $ jmp train --strategy dp_tp --mesh data=2,model=4 --steps 200
    $ jmp generate --run runs/latest --prompt "def "
    $ jmp train --init hf:models/llama --steps 100 --out runs/llama
    $ jmp export --run runs/llama --hf models/llama-trained
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from jmp.cli import data, export, generate, inspect, plan, train
from jmp.cli.common import CommandParser
from jmp.runtime.launch import add_launch_parser, cmd_launch


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="jmp", description="JAX model parallelism.")
    # every command's parser is a CommandParser: defaults in --help, one-line errors
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    train.add_parser(sub)
    inspect.add_parser(sub)
    plan.add_parser(sub)
    add_launch_parser(sub)
    generate.add_parser(sub)
    export.add_parser(sub)
    data.add_parser(sub)
    return parser


COMMANDS = {
    "train": train.cmd_train,
    "generate": generate.cmd_generate,
    "export": export.cmd_export,
    "inspect": inspect.cmd_inspect,
    "plan": plan.cmd_plan,
    "launch": cmd_launch,
    "data": data.cmd_data,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jmp.errors import JmpError

    try:
        return COMMANDS[args.command](args)
    except JmpError as err:
        print(f"jmp {args.command}: error: {err}", file=sys.stderr)
        return _exit_code(2, str(err))
    except (RuntimeError, MemoryError) as err:
        line = out_of_memory_line(err)
        if line is None:
            raise  # not the user's to fix: a bug, with its traceback
        print(f"jmp {args.command}: error: {line}", file=sys.stderr)
        return _exit_code(2, line)
    except KeyboardInterrupt:
        print(f"jmp {args.command}: interrupted", file=sys.stderr)
        return _exit_code(130, "interrupted")


_OOM_FIX = (
    "Fix: run `jmp plan` (with your --model, --devices, --batch) to pick a strategy and mesh "
    "that fit, add --remat, or use a smaller --batch."
)
# how XLA states the size it asked for: "allocating 123 bytes", "(123B)", "1.50GiB", "12.3 MiB"
_BYTES = re.compile(r"(\d+)\s*bytes\b|\((\d+)B\)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTP])i?B\b")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def out_of_memory_line(err: BaseException) -> str | None:
    """One line for running out of memory, or None for any other error.

    Device memory: a ``jax.errors.JaxRuntimeError`` whose message holds ``RESOURCE_EXHAUSTED``
    (what XLA raises when an allocation or a compiled program does not fit). Host memory: a
    ``MemoryError`` (numpy's "Unable to allocate ..."). The line says how much was asked for
    when the message tells, and how to fit.

    Example:
        >>> out_of_memory_line(ValueError("RESOURCE_EXHAUSTED")) is None
        True
    """
    message = " ".join(str(err).split())
    if isinstance(err, MemoryError):
        detail = f" ({message})" if message else ""
        return f"out of host memory{detail}. {_OOM_FIX}"
    jax = sys.modules.get("jax")  # a JaxRuntimeError can only come from an imported jax
    if jax is None or not isinstance(err, jax.errors.JaxRuntimeError):
        return None
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    asked = requested_bytes(message)
    from jmp.units import human_bytes

    size = f" of {human_bytes(asked)} ({asked:,} bytes)" if asked is not None else ""
    if len(message) > 300:
        message = message[:300] + "..."
    return f"out of device memory: an allocation{size} did not fit (XLA: {message}). {_OOM_FIX}"


def requested_bytes(message: str) -> int | None:
    """The allocation size an XLA out-of-memory message states, in bytes (None if it does not).

    Example:
        >>> requested_bytes("RESOURCE_EXHAUSTED: Out of memory allocating 1024 bytes.")
        1024
        >>> requested_bytes("Failed to allocate request for 1.50GiB (1610612736B) on device")
        1610612736
        >>> requested_bytes("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.00GiB.")
        2147483648
    """
    exact = _BYTES.search(message)
    if exact:
        return int(exact.group(1) or exact.group(2))
    sized = _SIZE.search(message)
    if sized:
        return round(float(sized.group(1)) * _UNITS[sized.group(2)])
    return None


def _exit_code(code: int, reason: str) -> int:
    """In a multi-process job, stop now and tell the others (not in JAX's exit barrier)."""
    import jmp.runtime.distributed

    cluster = jmp.runtime.distributed.cluster()
    if cluster is not None and cluster.num_processes > 1:
        jmp.runtime.distributed.abort(code, reason)
    return code


if __name__ == "__main__":
    sys.exit(main())
