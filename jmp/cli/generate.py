"""``jmp generate``: sample text from a trained run's latest checkpoint.

Example:
    $ jmp generate --run runs/latest --prompt "def "
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from jmp.cli.common import (
    fits,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    seed_int,
    start_devices,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("--run", required=True, help="run folder written by jmp train")
    gen.add_argument(
        "--prompt",
        default="def ",
        help="text to continue; the model reads bytes, so bytes that are not UTF-8 are "
        "passed through as they are",
    )
    gen.add_argument("--tokens", type=nonnegative_int, default=200, help="bytes to generate")
    gen.add_argument(
        "--temperature",
        type=nonnegative_float,
        default=0.0,
        help="sampling temperature, a finite number >= 0 (0 = greedy)",
    )
    gen.add_argument("--seed", type=seed_int, default=0, help="random seed for sampling")
    gen.add_argument(
        "--devices",
        type=positive_int,
        default=8,
        help="CPU devices to simulate when no accelerator is present",
    )
    return gen


def cmd_generate(args: argparse.Namespace) -> int:
    import jax

    import jmp
    from jmp.models import GPTConfig
    from jmp.models.generate import generate
    from jmp.train.checkpoint import Checkpointer

    run = os.path.abspath(args.run)
    config_path = os.path.join(run, "config.json")
    if not os.path.exists(config_path):
        raise jmp.JmpError(
            f"{run!r} is not a run folder (no config.json). Fix: pass the --out of a jmp train run."
        )
    with open(config_path) as f:
        saved = json.load(f)
    start_devices(args.devices)
    cfg = GPTConfig(**saved["model"])
    if fits(saved["mesh"], jax.device_count()):
        mesh = jmp.make_mesh(saved["mesh"])
        rules = jmp.rules.preset(saved["strategy"], mesh)
    elif saved["strategy"].startswith("pp"):
        raise jmp.JmpError(
            f"This pipelined run was trained on {saved['mesh']}, which does not "
            f"fit {jax.device_count()} devices. Fix: pass --devices to match."
        )
    else:  # the checkpoint restores onto any mesh: use tensor parallelism over what is here
        mesh = jmp.make_mesh("model=-1")
        rules = jmp.rules.preset("tp", mesh)
    ckpt = Checkpointer(os.path.join(run, "checkpoints"), create=False)
    latest = ckpt.latest_step()
    if latest is None:
        raise jmp.JmpError(f"No checkpoint in {run!r}. Fix: train it first.")
    text = generate(
        restore_model(cfg, mesh, rules, ckpt, latest),
        args.prompt,
        mesh=mesh,
        rules=rules,
        max_new_tokens=args.tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(text)
    return 0


def restore_model(cfg: Any, mesh: Any, rules: Any, ckpt: Any, step: int) -> Any:
    """The trained model of checkpoint ``step``, its parameters read straight into their
    shardings on ``mesh``: no optimizer state is read or built, no initial values computed."""
    import jax
    from flax import nnx

    from jmp.sharding import named_shardings
    from jmp.train.checkpoint import abstract_like
    from jmp.train.loop import build_model

    # shapes only: build_model (GPT, or PipelinedGPT on a 'stage' axis) under eval_shape
    abstract = nnx.eval_shape(lambda: build_model(cfg, mesh, rules, seed=0))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = abstract_like(params, named_shardings(params, rules, mesh))
    restored = ckpt.restore_params(step, target=target)
    if jax.tree.leaves(rest):  # state besides parameters (none in jmp's GPTs): make it real
        rest = nnx.split(build_model(cfg, mesh, rules, seed=0), nnx.Param, ...)[2]
    return nnx.merge(graphdef, restored, rest)
