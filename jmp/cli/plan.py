"""``jmp plan``: rank strategies and mesh shapes for a model, analytically (nothing compiled).

Example:
    $ jmp plan --model 7b --devices 64 --device h100
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from jmp import strategies
from jmp.cli.common import fraction, positive_int


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    plan = sub.add_parser("plan", help="rank strategies and mesh shapes for a model")
    plan.add_argument("--model", default="7b", help="tiny | small | medium | 1b | 7b | 13b | 70b")
    plan.add_argument(
        "--devices", type=positive_int, default=8, help="number of devices to plan for"
    )
    plan.add_argument("--device", default="h100", help="h100 | h200 | a100 | cpu")
    plan.add_argument(
        "--batch", type=positive_int, default=None, help="global batch (default 8/device)"
    )
    plan.add_argument(
        "--seq", type=positive_int, default=None, help="sequence length (default per model)"
    )
    plan.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPUs)")
    plan.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")
    plan.add_argument(
        "--microbatches",
        type=positive_int,
        default=1,
        help="gradient accumulation; for pp_* strategies the pipeline's M (the "
        "bubble is (S-1)/(M+S-1))",
    )
    plan.add_argument(
        "--schedule",
        default="1f1b",
        choices=strategies.PIPELINE_SCHEDULES,
        help="pipeline schedule for pp_* strategies",
    )
    plan.add_argument(
        "--mem-fraction",
        type=fraction,
        default=None,
        help="usable share of device memory, in (0, 1] (default: the --device preset's; "
        "JAX's default on GPUs is 0.75)",
    )
    plan.add_argument("--top", type=positive_int, default=10, help="candidates to list")
    plan.add_argument("--all", action="store_true", help="also list what does not fit")

    return plan


def cmd_plan(args: argparse.Namespace) -> int:
    """Analytic: nothing is compiled or allocated, so any model and device count works."""
    from rich.console import Console

    from jmp import plan
    from jmp.errors import ConfigError
    from jmp.models import GPTConfig

    device = plan.get_device(args.device)
    if args.mem_fraction is not None:
        device = dataclasses.replace(device, memory_fraction=args.mem_fraction)
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    overrides = {"dtype": dtype, "remat": args.remat}
    if args.seq is not None:  # 0 is refused, never read as "the default"
        overrides["seq_len"] = args.seq
    cfg = GPTConfig.named(args.model, **overrides)
    batch = 8 * args.devices if args.batch is None else args.batch
    if batch % args.microbatches:  # else every candidate is dropped: "nothing fits", wrongly
        raise ConfigError(
            f"--microbatches {args.microbatches} does not divide the batch of {batch}. Fix: a "
            f"--batch that is a multiple of {args.microbatches}, or other --microbatches."
        )
    ranked = plan.search(
        cfg,
        args.devices,
        device,
        batch_size=batch,
        microbatches=args.microbatches,
        include_unfit=args.all,
        schedule=args.schedule,
    )
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(
        f"[bold]jmp plan[/] model={args.model} ({cfg.num_params() / 1e9:.2f}B params, "
        f"{dtype} compute) devices={args.devices}x{device.name} batch={batch}x"
        f"{cfg.seq_len}"
    )
    console.print(f"step times {device.assumptions()}", highlight=False)
    if not ranked:
        console.print(
            "No strategy fits in memory. Try --remat, more --devices, a smaller "
            "--batch, or --all to see the closest candidates."
        )
        return 1
    console.print(plan.format_table(ranked[: args.top]))
    for i, e in enumerate(ranked[: args.top], 1):
        console.print(f"{i:>2}. {e.reason}", highlight=False)
    return 0
