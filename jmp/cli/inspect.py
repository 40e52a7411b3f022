"""``jmp inspect``: compile (not run) a train step from abstract shapes and show what XLA did.

Example:
    $ jmp inspect --model 7b --strategy fsdp_tp --mesh data=2,model=4
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from jmp.cli.common import add_model_args, positive_int, setup


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    ins = sub.add_parser("inspect", help="compile a train step and show what XLA did")
    add_model_args(ins)
    ins.add_argument("--batch", type=positive_int, default=16, help="global batch (sequences)")
    ins.add_argument(
        "--microbatches",
        type=positive_int,
        default=1,
        help="gradient accumulation steps inside the step (must divide --batch)",
    )

    return ins


def cmd_inspect(args: argparse.Namespace) -> int:
    """Compile (not run) the train step from abstract shapes: works for models of any size."""
    from flax import nnx
    from rich.console import Console

    import jmp
    from jmp.models import GPT
    from jmp.train import TrainConfig, check_batch, make_optimizer, make_step

    mesh, rules, cfg, mesh_text = setup(args)
    check_batch(args.batch, args.microbatches, mesh, rules)
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    console = Console(width=None if sys.stdout.isatty() else 120)
    active = f", {cfg.num_active_params():,} active per token" if cfg.n_experts else ""
    console.print(
        f"[bold]jmp inspect[/] model={args.model} ({cfg.num_params():,} params{active}) "
        f"strategy={args.strategy} mesh={mesh_text} batch={args.batch}x{cfg.seq_len}"
    )
    step = make_step(
        abstract, make_optimizer(TrainConfig()), mesh, rules, microbatches=args.microbatches
    )
    start = time.perf_counter()
    compiled = step.lower(
        step.abstract_state(), step.abstract_batch(args.batch, cfg.seq_len)
    ).compile()
    console.print(f"compiled in {time.perf_counter() - start:.1f} s")
    rows = jmp.param_table(step.abstract_state().params)
    console.print(
        f"parameters: {rows.bytes_total / 2**20:.2f} MiB in all, "
        f"{rows.bytes_per_device / 2**20:.2f} MiB per device"
    )
    console.print(jmp.inspect.collectives_table(jmp.inspect.collectives(compiled, mesh)))
    console.print(
        jmp.inspect.memory_table(
            jmp.inspect.memory(compiled), flops_per_device=jmp.inspect.flops(compiled)
        )
    )
    return 0
