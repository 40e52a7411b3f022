"""``jmp train``: train a GPT on a device mesh (the main job).

Example:
    $ jmp train --strategy dp_tp --mesh data=2,model=4 --steps 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, cast

from jmp import strategies
from jmp.cli.common import (
    add_model_args,
    mesh_spec,
    nonnegative_int,
    positive_float,
    positive_int,
    profile_window,
    seed_int,
    setup,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    train = sub.add_parser("train", help="train a GPT on a device mesh")
    add_model_args(train)
    train.add_argument("--steps", type=positive_int, default=600)
    train.add_argument("--batch", type=positive_int, default=16, help="global batch (sequences)")
    train.add_argument(
        "--microbatches",
        type=positive_int,
        default=1,
        help="gradient accumulation; with a pp_* strategy, the pipeline's M",
    )
    train.add_argument(
        "--schedule",
        default="1f1b",
        choices=strategies.PIPELINE_SCHEDULES,
        help="pipeline schedule for pp_* strategies",
    )
    train.add_argument("--lr", type=positive_float, default=3e-3)
    train.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="text files, folders or globs (default: Python stdlib sources)",
    )
    train.add_argument("--out", default=None, help="run folder (default runs/<time>)")
    train.add_argument("--seed", type=seed_int, default=0)
    train.add_argument("--eval-every", type=positive_int, default=100)
    train.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        default=100,
        help="steps between checkpoints (0: only the last step's)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (same settings; the mesh "
        "and strategy may change)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds one, moving the old run aside to "
        "<out>.replaced-<time> (never deleted)",
    )
    train.add_argument(
        "--extend",
        action="store_true",
        help="with --resume: accept a --steps other than the run's (the learning-rate "
        "schedule is recomputed for it)",
    )
    train.add_argument(
        "--skip-nonfinite", action="store_true", help="skip NaN/inf updates instead of stopping"
    )
    train.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the metrics as TensorBoard scalars into <out>/tensorboard",
    )
    train.add_argument(
        "--profile",
        type=profile_window,
        default=None,
        metavar="START:END",
        help="write a jax.profiler trace of steps START..END into <out>/profile "
        "(open it with Perfetto or TensorBoard's profile plugin)",
    )
    train.add_argument(
        "--sample", type=nonnegative_int, default=200, help="bytes of text to sample at the end"
    )

    return train


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    import jmp
    import jmp.runtime.distributed
    from jmp.models.generate import generate
    from jmp.models.gpt import GPT
    from jmp.train import TrainConfig
    from jmp.train.data import TextData
    from jmp.train.loop import run_training
    from jmp.train.run_folder import RunFolder, check_new_run, move_aside, write_config

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
    folder = RunFolder(out)
    data = TextData.from_paths(args.data)
    data.check(cfg.seq_len, cfg.vocab_size)
    digest = _check_same_data(data)
    shape = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    config = {
        "model": cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "data": {
            "sha256": digest,
            "paths": args.data,
            "bytes": int(data.train.size + data.val.size),
        },
        "strategy": args.strategy,
        "mesh": shape,
    }
    # Every check first: until they all pass, nothing in the run folder changes.
    notes: list[str] = []
    if args.resume:
        notes = _check_resume(folder, config, args)
    else:
        check_new_run(folder, overwrite=args.overwrite)
    console = Console(width=None if sys.stdout.isatty() else 120, quiet=not main_process)
    if main_process:
        if args.overwrite and not args.resume and folder.holds_run():
            notes.append(f"moved the run that was in {out} aside to {move_aside(folder)}")
        write_config(folder, config)
    where = f"{mesh.devices.flat[0].platform}" + (
        f", {cluster.num_processes} processes" if cluster else ""
    )
    console.print(
        f"[bold]jmp train[/] strategy={args.strategy} mesh={shape} "
        f"devices={mesh.size} ({where}) model={args.model} "
        f"({cfg.num_params():,} params) out={out}"
    )
    for note in notes:
        console.print(note, markup=False, highlight=False)
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
        tensorboard=args.tensorboard,
        profile=args.profile,
        meta={k: config[k] for k in ("strategy", "mesh", "data")},
        schedule=args.schedule,
        show_params=True,  # from the model being trained: it is built once
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


def _stages(config: dict[str, Any]) -> int:
    """The pipeline stage count of a run (1 without a pipeline): its parameter layout."""
    from jmp.mesh import parse_mesh_spec

    if not str(config["strategy"]).startswith("pp"):
        return 1
    return parse_mesh_spec(config["mesh"]).get("stage", 1)


def _check_resume(folder: Any, config: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Refuse a resume that would train another run than the one in ``folder``.

    Returns what is allowed to change and does (a new mesh or strategy, extended steps), in
    words, to print; raises naming every setting that may not change.
    """
    import jmp
    from jmp.train.run_folder import RunFolderError, run_changes

    if not os.path.isdir(folder.path):
        raise jmp.JmpError(
            f"--resume: run folder {folder.path!r} does not exist. Fix: pass the --out of an "
            f"earlier run."
        )
    saved = folder.read_config()
    if "data" not in saved:  # a run written before data fingerprints: its data is unknown
        saved = {**saved, "data": config["data"]}
    changes = run_changes(saved, config)
    if changes:
        raise RunFolderError(
            f"--resume: these settings differ from the run in {folder.path!r}: "
            f"{'; '.join(changes)}. Fix: pass the run's own settings (see its config.json), "
            f"or start a new run with another --out."
        )
    notes = []
    if _stages(saved) != _stages(config):
        raise RunFolderError(
            f"--resume: the run in {folder.path!r} was trained with {saved['strategy']} on "
            f"{saved['mesh']} ({_stages(saved)} pipeline stage(s)), and its checkpoints hold "
            f"the blocks in that layout; {args.strategy} on {config['mesh']} needs "
            f"{_stages(config)}. Fix: resume with a strategy and mesh of "
            f"{_stages(saved)} stage(s) (any data/model split), or start a new run."
        )
    if (saved["strategy"], saved["mesh"]) != (config["strategy"], config["mesh"]):
        notes.append(
            f"resharding the run from {saved['strategy']} on {saved['mesh']} onto "
            f"{config['strategy']} on {config['mesh']}"
        )
    done = max(folder.checkpoint_steps(), default=None)
    old_steps, new_steps = saved["train"]["steps"], config["train"]["steps"]
    if done is not None and new_steps < done:
        raise RunFolderError(
            f"--resume: --steps {new_steps} is behind the run, whose latest checkpoint is at "
            f"step {done}. Fix: --steps {old_steps} (the run's own), or more with --extend."
        )
    if new_steps != old_steps:
        if not args.extend:
            raise RunFolderError(
                f"--resume: --steps {new_steps} differs from the run's {old_steps}, and the "
                f"learning-rate schedule (warmup, then cosine decay over --steps) depends on "
                f"it. Fix: --steps {old_steps}, or add --extend to continue with the new "
                f"schedule."
            )
        notes.append(
            f"--extend: training to {new_steps} steps instead of {old_steps}; the "
            f"learning-rate schedule is recomputed for {new_steps} steps, so from step "
            f"{(done or 0) + 1} on the run differs from one planned for {old_steps} (and from "
            f"one planned for {new_steps} from the start)"
        )
    return notes


def _start_distributed(args: argparse.Namespace) -> Any:
    """Join the other processes when `jmp launch` or a cluster job (JMP_* variables) started us."""
    import jmp.runtime.distributed

    if not jmp.runtime.distributed.requested():
        return None
    return jmp.runtime.distributed.initialize(expected_devices=mesh_spec(args))


def _check_same_data(data: Any) -> str:
    """Every process must read the same bytes (hosts may hold other files under one path)."""
    import jmp.runtime.distributed

    digest = data.fingerprint()
    if jmp.runtime.distributed.same_on_all(digest) != digest:
        raise jmp.runtime.distributed.DistributedError(
            "This process read other training data than process 0 (the files under --data, or "
            "the Python standard library's sources, differ between hosts). Fix: pass --data "
            "with files on a filesystem every host shares."
        )
    return digest


def _link_latest(out: str) -> None:
    link = os.path.join(os.path.dirname(out), "latest")
    try:
        if os.path.islink(link):
            os.remove(link)
        if not os.path.exists(link):
            os.symlink(os.path.basename(out), link)
    except OSError:
        pass  # a convenience only
