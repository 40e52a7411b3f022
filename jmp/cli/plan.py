"""``jmp plan``: rank strategies and mesh shapes for a model, analytically (nothing compiled).

Example:
    $ jmp plan --model 7b --devices 64 --device h100
    $ jmp plan --model 7b --seq 131072 --devices 64 --device h100    # context parallelism
    $ jmp plan --model 7b --experts 8 --top-k 2 --devices 64         # expert parallelism
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from jmp import strategies
from jmp.cli.common import (
    _EXPERT_SHAPE,
    expert_overrides,
    fraction,
    nonnegative_int,
    positive_int,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    plan = sub.add_parser("plan", help="rank strategies and mesh shapes for a model")
    plan.add_argument("--model", default="7b", help="tiny | small | medium | 1b | 7b | 13b | 70b")
    plan.add_argument(
        "--devices", type=positive_int, default=8, help="number of devices to plan for"
    )
    plan.add_argument("--device", default="h100", help="h100 | h200 | a100 | cpu")
    plan.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        help="global batch in sequences (default 8/device at the model's sequence length; "
        "a longer --seq keeps the tokens per step: fewer sequences, at least 1)",
    )
    plan.add_argument(
        "--seq",
        type=positive_int,
        default=None,
        help="sequence length (default per model; a longer one plans the model at that length)",
    )
    plan.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPUs)")
    plan.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")
    plan.add_argument(
        "--mode",
        default="auto",
        choices=strategies.MODES,
        help="how the layers write their collectives (as jmp train --mode); collective: the sp "
        "candidates' all-gathers and reduce-scatters as ring steps of collective-permutes",
    )
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
    plan.add_argument(
        "--cp-impl",
        default=None,
        choices=("ring", "allgather"),
        help="context-parallel attention of the cp candidates (default: plan both)",
    )
    plan.add_argument(
        "--experts",
        type=nonnegative_int,
        default=0,
        help="routed experts in each MoE block (0: a dense model); ep strategies split them",
    )
    kinds = {"--top-k": positive_int, "--shared-experts": nonnegative_int}
    for option, (field, default) in _EXPERT_SHAPE.items():  # the options jmp train shares
        plan.add_argument(
            option,
            type=kinds.get(option, positive_int if isinstance(default, int) else str),
            default=default,
            help=f"the MoE's {field} (--experts)",
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
    overrides: dict[str, Any] = {"dtype": dtype, "remat": args.remat, "mode": args.mode}
    if args.seq is not None:  # 0 is refused, never read as "the default"
        overrides["seq_len"] = args.seq
    named_seq = GPTConfig.named(args.model).seq_len
    cfg = GPTConfig.named(args.model, **overrides, **expert_overrides(args))
    if args.batch is None:  # 8 sequences per device at the model's length, as many tokens
        batch = max(1, 8 * args.devices * named_seq // cfg.seq_len)
    else:
        batch = args.batch
    if batch % args.microbatches:  # else every candidate is dropped: "nothing fits", wrongly
        raise ConfigError(
            f"--microbatches {args.microbatches} does not divide the batch of {batch}. Fix: a "
            f"--batch that is a multiple of {args.microbatches}, or other --microbatches."
        )
    options: dict[str, Any] = dict(
        batch_size=batch,
        microbatches=args.microbatches,
        schedule=args.schedule,
        cp_impls=(args.cp_impl,) if args.cp_impl else ("ring", "allgather"),
    )
    ranked = plan.search(cfg, args.devices, device, include_unfit=args.all, **options)
    console = Console(width=None if sys.stdout.isatty() else 140)
    params = f"{cfg.num_params() / 1e9:.2f}B params"
    if cfg.n_experts:
        params += (
            f", {cfg.num_active_params() / 1e9:.2f}B active: {cfg.n_experts} experts, "
            f"top-{cfg.top_k}"
        )
    console.print(
        f"[bold]jmp plan[/] model={args.model} ({params}, "
        f"{dtype} compute) devices={args.devices}x{device.name} batch={batch}x"
        f"{cfg.seq_len}"
    )
    console.print(f"step times {device.assumptions()}", highlight=False)
    code = 0
    if not ranked:
        # still show what comes closest: each strategy's smallest candidate, smallest first,
        # with what limits it
        everything = plan.search(cfg, args.devices, device, include_unfit=True, **options)
        closest: dict[tuple[str, str | None], Any] = {}
        for e in sorted(everything, key=lambda e: e.total_bytes):
            closest.setdefault((e.strategy, e.cp_impl), e)
        ranked = list(closest.values())
        console.print(
            "No strategy fits in memory. Try --remat, more --devices, a smaller --batch"
            + (". The closest candidate of each strategy:" if ranked else ".")
        )
        code = 1
    if ranked:
        console.print(plan.format_table(ranked[: args.top]))
    for i, e in enumerate(ranked[: args.top], 1):
        longest = plan.longest_sequence(
            dataclasses.replace(cfg, cp_impl=e.cp_impl or cfg.cp_impl),
            e.mesh_shape,
            e.strategy,
            batch_size=batch,
            device=device,
            microbatches=args.microbatches,
            schedule=args.schedule,
        )
        console.print(
            f"{i:>2}. {e.reason}; the longest sequence that fits on this mesh: "
            + (f"{longest:,} tokens ({batch} per step)" if longest else "none"),
            highlight=False,
        )
    return code
