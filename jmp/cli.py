"""The ``jmp`` command: train, generate, inspect, plan.

Every error a user can cause ends with one line on stderr and exit code 2, never a traceback.

Example:
    $ jmp train --strategy dp_tp --mesh data=2,model=4 --steps 200
    $ jmp generate --run runs/latest --prompt "def "
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from jmp.launch import add_launch_parser, cmd_launch

DEFAULT_MESH = {"dp": "data=-1", "fsdp": "data=-1", "tp": "model=-1", "dp_tp": "data=2,model=-1",
                "fsdp_tp": "data=2,model=-1", "pp": "stage=-1", "pp_dp": "stage=4,data=-1",
                "pp_tp": "stage=4,model=-1", "pp_dp_tp": "stage=2,data=2,model=-1"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jmp", description="JAX model parallelism.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a GPT on a device mesh")
    _add_model_args(train)
    train.add_argument("--steps", type=int, default=600)
    train.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    train.add_argument("--microbatches", type=int, default=1,
                       help="gradient accumulation; with a pp_* strategy, the pipeline's M")
    train.add_argument("--schedule", default="1f1b", choices=("1f1b", "gpipe"),
                       help="pipeline schedule for pp_* strategies")
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--data", nargs="+", default=None,
                       help="text files, folders or globs (default: Python stdlib sources)")
    train.add_argument("--out", default=None, help="run folder (default runs/<time>)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int, default=100)
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument("--skip-nonfinite", action="store_true",
                       help="skip NaN/inf updates instead of stopping")
    train.add_argument("--sample", type=int, default=200, help="bytes of text to sample at the end")

    ins = sub.add_parser("inspect", help="compile a train step and show what XLA did")
    _add_model_args(ins)
    ins.add_argument("--batch", type=int, default=16)
    ins.add_argument("--microbatches", type=int, default=1)

    plan = sub.add_parser("plan", help="rank strategies and mesh shapes for a model")
    plan.add_argument("--model", default="7b", help="tiny | small | medium | 1b | 7b | 13b | 70b")
    plan.add_argument("--devices", type=int, default=8, help="number of devices to plan for")
    plan.add_argument("--device", default="h100", help="h100 | h200 | a100 | cpu")
    plan.add_argument("--batch", type=int, default=None, help="global batch (default 8/device)")
    plan.add_argument("--seq", type=int, default=None)
    plan.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPUs)")
    plan.add_argument("--remat", action="store_true")
    plan.add_argument("--microbatches", type=int, default=1,
                      help="gradient accumulation; for pp_* strategies the pipeline's M (the "
                           "bubble is (S-1)/(M+S-1))")
    plan.add_argument("--schedule", default="1f1b", choices=("1f1b", "gpipe"),
                      help="pipeline schedule for pp_* strategies")
    plan.add_argument("--mem-fraction", type=float, default=None,
                      help="usable share of device memory (JAX's default on GPUs: 0.75)")
    plan.add_argument("--top", type=int, default=10)
    plan.add_argument("--all", action="store_true", help="also list what does not fit")

    add_launch_parser(sub)
    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("--run", required=True, help="run folder written by jmp train")
    gen.add_argument("--prompt", default="def ")
    gen.add_argument("--tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--devices", type=int, default=8)
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="dp_tp",
                   help="dp | fsdp | tp | dp_tp | fsdp_tp | pp | pp_dp | pp_tp | pp_dp_tp")
    p.add_argument("--mesh", default=None, help="e.g. data=2,model=4 (default per strategy)")
    p.add_argument("--devices", type=int, default=8,
                   help="CPU devices to simulate when no accelerator is present")
    p.add_argument("--model", default="small", help="tiny | small | medium | ...")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default per model)")
    p.add_argument("--mode", default="auto", choices=("auto", "manual"))
    p.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16")
    p.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")


def _start_devices(n: int) -> None:
    """Simulate ``n`` CPU devices unless an accelerator is present (set before JAX starts)."""
    import jax

    import jmp.distributed
    from jmp.devices import simulate_cpu_devices

    if jmp.distributed.is_initialized():
        return  # every process's devices are started, and checked against the mesh
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        simulate_cpu_devices(n)
    jax.devices()


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    import jmp
    from jmp.models import GPTConfig

    _start_devices(args.devices)
    if args.strategy not in jmp.rules.STRATEGIES:
        raise jmp.ConfigError(f"Unknown strategy {args.strategy!r}. Known: "
                              f"{', '.join(jmp.rules.STRATEGIES)}.")
    mesh_text = args.mesh or DEFAULT_MESH[args.strategy]
    mesh = jmp.make_mesh(mesh_text)
    rules = jmp.rules.preset(args.strategy, mesh)
    overrides = {"mode": args.mode, "dtype": args.dtype, "remat": args.remat}
    if args.seq:
        overrides["seq_len"] = args.seq
    cfg = GPTConfig.named(args.model, **overrides)
    return mesh, rules, cfg, mesh_text


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    import jmp
    import jmp.distributed
    from jmp.data import TextData
    from jmp.generate import generate
    from jmp.loop import build_model, run_training
    from jmp.train import TrainConfig

    cluster = _start_distributed(args)
    main_process = cluster is None or cluster.is_main
    mesh, rules, cfg, _ = _setup(args)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch,
                            microbatches=args.microbatches, lr=args.lr, seed=args.seed,
                            eval_every=args.eval_every)
    out = os.path.abspath(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    out = jmp.distributed.same_on_all(out)  # the processes may start a second apart
    if args.resume and not os.path.isdir(out):
        raise jmp.JmpError(f"--resume: run folder {out!r} does not exist. Fix: pass the --out "
                           f"of an earlier run.")
    os.makedirs(out, exist_ok=True)
    console = Console(width=None if sys.stdout.isatty() else 120, quiet=not main_process)
    shape = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    where = f"{mesh.devices.flat[0].platform}" + (
        f", {cluster.num_processes} processes" if cluster else "")
    console.print(f"[bold]jmp train[/] strategy={args.strategy} mesh={shape} "
                  f"devices={mesh.size} ({where}) model={args.model} "
                  f"({cfg.num_params():,} params) out={out}")
    data = TextData.from_paths(args.data)
    _check_same_data(data)
    meta = {"strategy": args.strategy, "mesh": shape}
    if main_process:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"model": cfg.to_dict(), "train": train_cfg.to_dict(), **meta}, f,
                      indent=2)
    jmp.param_table(build_model(cfg, mesh, rules, seed=args.seed)).print(console)
    result = run_training(cfg, train_cfg, mesh, rules, data, out_dir=out, console=console,
                          resume=args.resume, checkpoint_every=args.checkpoint_every,
                          skip_nonfinite=args.skip_nonfinite, meta=meta,
                          schedule=args.schedule)
    console.print(f"train loss {result.train_loss:.3f}  validation loss {result.val_loss:.3f} "
                  f"nats/byte  {result.tokens_per_s:,.0f} tokens/s"
                  + (f"  skipped updates {result.skipped}" if result.skipped else ""))
    if args.sample:
        text = generate(result.model, "def ", mesh=mesh, rules=rules,
                        max_new_tokens=args.sample, temperature=0.7, seed=args.seed)
        console.print("[bold]sample[/] (temperature 0.7, prompt 'def '):")
        console.print(text, markup=False, highlight=False)
    if main_process:
        _link_latest(out)
    return 0


def _start_distributed(args: argparse.Namespace) -> Any:
    """Join the other processes when `jmp launch` or a cluster job (JMP_* variables) started us."""
    import jmp.distributed

    if not jmp.distributed.requested():
        return None
    return jmp.distributed.initialize(expected_devices=args.mesh or DEFAULT_MESH[args.strategy])


def _check_same_data(data: Any) -> None:
    """Every process must read the same bytes (hosts may hold other files under one path)."""
    import hashlib

    import jmp.distributed

    digest = hashlib.sha256(data.train.tobytes() + data.val.tobytes()).hexdigest()
    if jmp.distributed.same_on_all(digest) != digest:
        raise jmp.distributed.DistributedError(
            "This process read other training data than process 0 (the files under --data, or "
            "the Python standard library's sources, differ between hosts). Fix: pass --data "
            "with files on a filesystem every host shares.")


def _link_latest(out: str) -> None:
    link = os.path.join(os.path.dirname(out), "latest")
    try:
        if os.path.islink(link):
            os.remove(link)
        if not os.path.exists(link):
            os.symlink(os.path.basename(out), link)
    except OSError:
        pass  # a convenience only


def cmd_generate(args: argparse.Namespace) -> int:
    import jax

    import jmp
    from jmp.checkpoint import Checkpointer
    from jmp.generate import generate
    from jmp.loop import build_model
    from jmp.models import GPTConfig
    from jmp.train import TrainConfig, make_optimizer, make_step, merge_params

    run = os.path.abspath(args.run)
    config_path = os.path.join(run, "config.json")
    if not os.path.exists(config_path):
        raise jmp.JmpError(f"{run!r} is not a run folder (no config.json). Fix: pass the --out "
                           f"of a jmp train run.")
    with open(config_path) as f:
        saved = json.load(f)
    _start_devices(args.devices)
    cfg, train_cfg = GPTConfig(**saved["model"]), TrainConfig(**saved["train"])
    if _fits(saved["mesh"], jax.device_count()):
        mesh = jmp.make_mesh(saved["mesh"])
        rules = jmp.rules.preset(saved["strategy"], mesh)
    elif saved["strategy"].startswith("pp"):
        raise jmp.JmpError(f"This pipelined run was trained on {saved['mesh']}, which does not "
                           f"fit {jax.device_count()} devices. Fix: pass --devices to match.")
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
    text = generate(merge_params(model, state.params), args.prompt, mesh=mesh, rules=rules,
                    max_new_tokens=args.tokens, temperature=args.temperature, seed=args.seed)
    print(text)
    return 0


def _fits(mesh_text: str, n: int) -> bool:
    import math

    from jmp.mesh import parse_mesh_spec

    return math.prod(parse_mesh_spec(mesh_text).values()) == n


def cmd_inspect(args: argparse.Namespace) -> int:
    """Compile (not run) the train step from abstract shapes: works for models of any size."""
    from flax import nnx
    from rich.console import Console

    import jmp
    from jmp.models import GPT
    from jmp.train import TrainConfig, check_batch, make_optimizer, make_step

    mesh, rules, cfg, mesh_text = _setup(args)
    check_batch(args.batch, args.microbatches, mesh, rules)
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(f"[bold]jmp inspect[/] model={args.model} ({cfg.num_params():,} params) "
                  f"strategy={args.strategy} mesh={mesh_text} batch={args.batch}x{cfg.seq_len}")
    step = make_step(abstract, make_optimizer(TrainConfig()), mesh, rules,
                     microbatches=args.microbatches)
    start = time.perf_counter()
    compiled = step.lower(step.abstract_state(),
                          step.abstract_batch(args.batch, cfg.seq_len)).compile()
    console.print(f"compiled in {time.perf_counter() - start:.1f} s")
    rows = jmp.param_table(step.abstract_state().params)
    console.print(f"parameters: {rows.bytes_total / 2**20:.2f} MiB in all, "
                  f"{rows.bytes_per_device / 2**20:.2f} MiB per device")
    console.print(jmp.inspect.collectives_table(jmp.inspect.collectives(compiled, mesh)))
    console.print(jmp.inspect.memory_table(jmp.inspect.memory(compiled),
                                           flops_per_device=jmp.inspect.flops(compiled)))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Analytic: nothing is compiled or allocated, so any model and device count works."""
    from rich.console import Console

    from jmp import plan
    from jmp.models import GPTConfig

    device = plan.get_device(args.device)
    if args.mem_fraction is not None:
        device = dataclasses.replace(device, memory_fraction=args.mem_fraction)
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    overrides = {"dtype": dtype, "remat": args.remat}
    if args.seq:
        overrides["seq_len"] = args.seq
    cfg = GPTConfig.named(args.model, **overrides)
    batch = args.batch or 8 * args.devices
    ranked = plan.search(cfg, args.devices, device, batch_size=batch,
                         microbatches=args.microbatches, include_unfit=args.all,
                         schedule=args.schedule)
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(f"[bold]jmp plan[/] model={args.model} ({cfg.num_params() / 1e9:.2f}B params, "
                  f"{dtype} compute) devices={args.devices}x{device.name} batch={batch}x"
                  f"{cfg.seq_len}")
    if not ranked:
        console.print("No strategy fits in memory. Try --remat, more --devices, a smaller "
                      "--batch, or --all to see the closest candidates.")
        return 1
    console.print(plan.format_table(ranked[:args.top]))
    for i, e in enumerate(ranked[:args.top], 1):
        console.print(f"{i:>2}. {e.reason}", highlight=False)
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "inspect": cmd_inspect,
            "plan": cmd_plan, "launch": cmd_launch}


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
    import jmp.distributed

    cluster = jmp.distributed.cluster()
    if cluster is not None and cluster.num_processes > 1:
        jmp.distributed.abort(code, reason)
    return code


if __name__ == "__main__":
    sys.exit(main())
