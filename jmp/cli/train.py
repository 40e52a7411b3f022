"""``jmp train``: train a GPT on a device mesh (the main job).

Example:
    $ jmp train --strategy dp_tp --mesh data=2,model=4 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, cast

from jmp import strategies
from jmp.cli.common import add_model_args, mesh_spec, setup


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    train = sub.add_parser("train", help="train a GPT on a device mesh")
    add_model_args(train)
    train.add_argument("--steps", type=int, default=600)
    train.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    train.add_argument(
        "--microbatches",
        type=int,
        default=1,
        help="gradient accumulation; with a pp_* strategy, the pipeline's M",
    )
    train.add_argument(
        "--schedule",
        default="1f1b",
        choices=strategies.PIPELINE_SCHEDULES,
        help="pipeline schedule for pp_* strategies",
    )
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="text files, folders or globs (default: Python stdlib sources)",
    )
    train.add_argument("--out", default=None, help="run folder (default runs/<time>)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int, default=100)
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument(
        "--skip-nonfinite", action="store_true", help="skip NaN/inf updates instead of stopping"
    )
    train.add_argument("--sample", type=int, default=200, help="bytes of text to sample at the end")

    return train


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    import jmp
    import jmp.runtime.distributed
    from jmp.models.generate import generate
    from jmp.models.gpt import GPT
    from jmp.train import TrainConfig
    from jmp.train.data import TextData
    from jmp.train.loop import build_model, run_training

    cluster = _start_distributed(args)
    main_process = cluster is None or cluster.is_main
    mesh, rules, cfg, _ = setup(args)
    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        microbatches=args.microbatches,
        lr=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
    )
    out = os.path.abspath(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    out = jmp.runtime.distributed.same_on_all(out)  # the processes may start a second apart
    if args.resume and not os.path.isdir(out):
        raise jmp.JmpError(
            f"--resume: run folder {out!r} does not exist. Fix: pass the --out of an earlier run."
        )
    os.makedirs(out, exist_ok=True)
    console = Console(width=None if sys.stdout.isatty() else 120, quiet=not main_process)
    shape = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    where = f"{mesh.devices.flat[0].platform}" + (
        f", {cluster.num_processes} processes" if cluster else ""
    )
    console.print(
        f"[bold]jmp train[/] strategy={args.strategy} mesh={shape} "
        f"devices={mesh.size} ({where}) model={args.model} "
        f"({cfg.num_params():,} params) out={out}"
    )
    data = TextData.from_paths(args.data)
    _check_same_data(data)
    meta = {"strategy": args.strategy, "mesh": shape}
    if main_process:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"model": cfg.to_dict(), "train": train_cfg.to_dict(), **meta}, f, indent=2)
    jmp.param_table(build_model(cfg, mesh, rules, seed=args.seed)).print(console)
    result = run_training(
        cfg,
        train_cfg,
        mesh,
        rules,
        data,
        out_dir=out,
        console=console,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        skip_nonfinite=args.skip_nonfinite,
        meta=meta,
        schedule=args.schedule,
    )
    console.print(
        f"train loss {result.train_loss:.3f}  validation loss {result.val_loss:.3f} "
        f"nats/byte  {result.tokens_per_s:,.0f} tokens/s"
        + (f"  skipped updates {result.skipped}" if result.skipped else "")
    )
    if args.sample:
        text = generate(
            cast(GPT, result.model),  # run_training trains a GPT
            "def ",
            mesh=mesh,
            rules=rules,
            max_new_tokens=args.sample,
            temperature=0.7,
            seed=args.seed,
        )
        console.print("[bold]sample[/] (temperature 0.7, prompt 'def '):")
        console.print(text, markup=False, highlight=False)
    if main_process:
        _link_latest(out)
    return 0


def _start_distributed(args: argparse.Namespace) -> Any:
    """Join the other processes when `jmp launch` or a cluster job (JMP_* variables) started us."""
    import jmp.runtime.distributed

    if not jmp.runtime.distributed.requested():
        return None
    return jmp.runtime.distributed.initialize(expected_devices=mesh_spec(args))


def _check_same_data(data: Any) -> None:
    """Every process must read the same bytes (hosts may hold other files under one path)."""
    import hashlib

    import jmp.runtime.distributed

    digest = hashlib.sha256(data.train.tobytes() + data.val.tobytes()).hexdigest()
    if jmp.runtime.distributed.same_on_all(digest) != digest:
        raise jmp.runtime.distributed.DistributedError(
            "This process read other training data than process 0 (the files under --data, or "
            "the Python standard library's sources, differ between hosts). Fix: pass --data "
            "with files on a filesystem every host shares."
        )


def _link_latest(out: str) -> None:
    link = os.path.join(os.path.dirname(out), "latest")
    try:
        if os.path.islink(link):
            os.remove(link)
        if not os.path.exists(link):
            os.symlink(os.path.basename(out), link)
    except OSError:
        pass  # a convenience only
