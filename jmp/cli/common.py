"""What the commands share: model and mesh arguments, device start-up, mesh and rules.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_model_args(p)
    >>> p.parse_args(["--strategy", "tp"]).strategy
    'tp'
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from jmp import strategies


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="dp_tp", help=strategies.help_text())
    p.add_argument(
        "--mesh",
        default=None,
        help="e.g. data=2,model=4 (default per strategy: each kind's share, the last "
        "kind takes the rest of the devices)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=8,
        help="CPU devices to simulate when no accelerator is present",
    )
    p.add_argument("--model", default="small", help="tiny | small | medium | ...")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default per model)")
    p.add_argument("--mode", default="auto", choices=("auto", "manual"))
    p.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16")
    p.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")


def start_devices(n: int) -> None:
    """Simulate ``n`` CPU devices unless an accelerator is present (set before JAX starts)."""
    import jax

    import jmp.runtime.distributed
    from jmp.devices import simulate_cpu_devices

    if jmp.runtime.distributed.is_initialized():
        return  # every process's devices are started, and checked against the mesh
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        simulate_cpu_devices(n)
    jax.devices()


def setup(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    import jmp
    from jmp.models import GPTConfig

    start_devices(args.devices)
    mesh_text = mesh_spec(args)
    mesh = jmp.make_mesh(mesh_text)
    rules = jmp.rules.preset(args.strategy, mesh)
    overrides = {"mode": args.mode, "dtype": args.dtype, "remat": args.remat}
    if args.seq:
        overrides["seq_len"] = args.seq
    cfg = GPTConfig.named(args.model, **overrides)
    return mesh, rules, cfg, mesh_text


def fits(mesh_text: str, n: int) -> bool:
    from jmp.mesh import parse_mesh_spec

    return math.prod(parse_mesh_spec(mesh_text).values()) == n


def mesh_spec(args: argparse.Namespace) -> str:
    """``--mesh``, or the strategy's default mesh (checks the strategy name first)."""
    default = strategies.default_mesh(args.strategy)  # raises ConfigError for a bad name
    return args.mesh or default
