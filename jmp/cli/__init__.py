"""The ``jmp`` command: train, generate, inspect, plan, launch; one module per command.

Every error a user can cause ends with one line on stderr and exit code 2, never a traceback.
Importing this package is light: each command imports what it needs when it runs.

Example:
    $ jmp train --strategy dp_tp --mesh data=2,model=4 --steps 200
    $ jmp generate --run runs/latest --prompt "def "
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jmp.cli import generate, inspect, plan, train
from jmp.runtime.launch import add_launch_parser, cmd_launch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jmp", description="JAX model parallelism.")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parser(sub)
    inspect.add_parser(sub)
    plan.add_parser(sub)
    add_launch_parser(sub)
    generate.add_parser(sub)
    return parser


COMMANDS = {
    "train": train.cmd_train,
    "generate": generate.cmd_generate,
    "inspect": inspect.cmd_inspect,
    "plan": plan.cmd_plan,
    "launch": cmd_launch,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jmp.errors import JmpError

    try:
        return COMMANDS[args.command](args)
    except JmpError as err:
        print(f"jmp {args.command}: error: {err}", file=sys.stderr)
        return _exit_code(2, str(err))
    except KeyboardInterrupt:
        print(f"jmp {args.command}: interrupted", file=sys.stderr)
        return _exit_code(130, "interrupted")


def _exit_code(code: int, reason: str) -> int:
    """In a multi-process job, stop now and tell the others (not in JAX's exit barrier)."""
    import jmp.runtime.distributed

    cluster = jmp.runtime.distributed.cluster()
    if cluster is not None and cluster.num_processes > 1:
        jmp.runtime.distributed.abort(code, reason)
    return code


if __name__ == "__main__":
    sys.exit(main())
