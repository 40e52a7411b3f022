"""``jmp generate``: sample text from a trained run's latest checkpoint.

Example:
    $ jmp generate --run runs/latest --prompt "def "
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from jmp.cli.common import fits, start_devices


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("--run", required=True, help="run folder written by jmp train")
    gen.add_argument("--prompt", default="def ")
    gen.add_argument("--tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--devices", type=int, default=8)
    return gen


def cmd_generate(args: argparse.Namespace) -> int:
    import jax

    import jmp
    from jmp.models import GPTConfig
    from jmp.models.generate import generate
    from jmp.train import TrainConfig, make_optimizer, make_step, merge_params
    from jmp.train.checkpoint import Checkpointer
    from jmp.train.loop import build_model

    run = os.path.abspath(args.run)
    config_path = os.path.join(run, "config.json")
    if not os.path.exists(config_path):
        raise jmp.JmpError(
            f"{run!r} is not a run folder (no config.json). Fix: pass the --out of a jmp train run."
        )
    with open(config_path) as f:
        saved = json.load(f)
    start_devices(args.devices)
    cfg, train_cfg = GPTConfig(**saved["model"]), TrainConfig(**saved["train"])
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
    model = build_model(cfg, mesh, rules, seed=0)
    step = make_step(model, make_optimizer(train_cfg), mesh, rules)
    ckpt = Checkpointer(os.path.join(run, "checkpoints"), create=False)
    latest = ckpt.latest_step()
    if latest is None:
        raise jmp.JmpError(f"No checkpoint in {run!r}. Fix: train it first.")
    target = step.abstract_state()
    state = ckpt.restore(latest, target=target)
    text = generate(
        merge_params(model, state.params),
        args.prompt,
        mesh=mesh,
        rules=rules,
        max_new_tokens=args.tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(text)
    return 0
