"""``jmp generate``: sample text from a trained run's latest checkpoint, or a Hugging Face folder.

A run of jmp's GPT reads and writes bytes; a run started with ``--init hf:PATH`` and a Hugging
Face folder (``--hf PATH``) use the folder's ``tokenizer.json`` (bytes without one). Sampling
runs a full forward pass per token, without a KV cache (:mod:`jmp.models.generate`).

Example:
    $ jmp generate --run runs/latest --prompt "def "
    $ jmp generate --hf models/llama --prompt "def " --tokens 20
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jmp.cli.common import (
    fits,
    mesh_text,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    seed_int,
    start_devices,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    gen = sub.add_parser("generate", help="sample text from a trained run or a Hugging Face folder")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder written by jmp train (no default: --run or --hf)")
    source.add_argument(
        "--hf",
        metavar="PATH",
        help="a local Hugging Face Llama/Mistral/Qwen2 folder (no default: --run or --hf)",
    )
    gen.add_argument(
        "--prompt",
        default="def ",
        help="text to continue; a byte model reads bytes, so bytes that are not UTF-8 are "
        "passed through as they are",
    )
    gen.add_argument(
        "--tokens",
        type=nonnegative_int,
        default=200,
        help="tokens to generate (a byte model's are bytes)",
    )
    gen.add_argument(
        "--temperature",
        type=nonnegative_float,
        default=0.0,
        help="sampling temperature, a finite number >= 0 (0 = greedy)",
    )
    gen.add_argument("--seed", type=seed_int, default=0, help="random seed for sampling")
    gen.add_argument(
        "--strategy",
        default=None,
        help="with --hf: how the model is split (default: tp; a run uses its own)",
    )
    gen.add_argument(
        "--mesh",
        type=mesh_text,
        default=None,
        help="with --hf: the mesh (default: the strategy's over every device)",
    )
    gen.add_argument(
        "--devices",
        type=positive_int,
        default=8,
        help="CPU devices to simulate when no accelerator is present",
    )
    return gen


def cmd_generate(args: argparse.Namespace) -> int:
    from jmp.models.generate import generate

    if args.hf is not None:
        model, mesh, rules, tokenizer = _from_folder(args)
    else:
        model, mesh, rules, tokenizer = _from_run(args)
    text = generate(
        model,
        args.prompt,
        mesh=mesh,
        rules=rules,
        max_new_tokens=args.tokens,
        temperature=args.temperature,
        seed=args.seed,
        tokenizer=tokenizer,
    )
    print(text)
    return 0


def _from_folder(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """The folder's model on ``--strategy``/``--mesh``, its window the prompt plus the tokens
    to generate (shorter than the folder's length: a smaller forward pass per token)."""
    import jmp
    import jmp.hf
    from jmp import strategies
    from jmp.models.generate import prompt_bytes

    strategy = args.strategy or "tp"
    spec = args.mesh or strategies.default_mesh(strategy)
    tokenizer = jmp.hf.load_tokenizer(args.hf)
    if tokenizer.kind == "bytes":
        prompt = list(prompt_bytes(args.prompt))
    else:
        prompt = tokenizer.encode(args.prompt)
    longest = jmp.hf.config_of(args.hf).seq_len
    start_devices(args.devices)
    mesh = jmp.make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    window = max(1, min(longest, len(prompt) + args.tokens))
    model = jmp.hf.load(args.hf, mesh, rules, seq_len=window).model
    return model, mesh, rules, tokenizer


def _from_run(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """The run's latest checkpoint on its own mesh (or tensor parallel over the devices here)."""
    import jmp
    from jmp.cli.hf_run import unchanged
    from jmp.train.checkpoint import Checkpointer
    from jmp.train.run_folder import RunFolder

    if args.strategy is not None or args.mesh is not None:
        raise jmp.ConfigError(
            "--strategy and --mesh are for --hf. Fix: leave them out: a run is sampled on its "
            "own mesh (or tensor parallel over the devices here)."
        )
    run = os.path.abspath(args.run)
    if not os.path.exists(os.path.join(run, "config.json")):
        raise jmp.JmpError(
            f"{run!r} is not a run folder (no config.json). Fix: pass the --out of a jmp train run."
        )
    saved = RunFolder(run).read_config()
    tokenizer = unchanged(saved["init"])[1] if "init" in saved else None
    start_devices(args.devices)
    mesh, rules = run_mesh(saved)
    ckpt = Checkpointer(os.path.join(run, "checkpoints"), create=False)
    latest = ckpt.latest_step()
    if latest is None:
        raise jmp.JmpError(f"No checkpoint in {run!r}. Fix: train it first.")
    return restore_model(model_config(saved), mesh, rules, ckpt, latest), mesh, rules, tokenizer


def model_config(saved: dict[str, Any]) -> Any:
    """The model config of a run: a LlamaConfig for runs started with --init, else a GPTConfig."""
    from jmp.models import GPTConfig, LlamaConfig

    return (LlamaConfig if "init" in saved else GPTConfig)(**saved["model"])


def run_mesh(saved: dict[str, Any]) -> tuple[Any, Any]:
    """The run's mesh and rules when its mesh fits the devices here; else (a run without a
    pipeline) tensor parallelism over every device: checkpoints restore onto any mesh."""
    import jax

    import jmp

    if fits(saved["mesh"], jax.device_count()):
        mesh = jmp.make_mesh(saved["mesh"])
        return mesh, jmp.rules.preset(saved["strategy"], mesh)
    if saved["strategy"].startswith("pp"):
        raise jmp.JmpError(
            f"This pipelined run was trained on {saved['mesh']}, which does not "
            f"fit {jax.device_count()} devices. Fix: pass --devices to match."
        )
    mesh = jmp.make_mesh("model=-1")
    return mesh, jmp.rules.preset("tp", mesh)


def restore_model(cfg: Any, mesh: Any, rules: Any, ckpt: Any, step: int) -> Any:
    """The trained model of checkpoint ``step``, its parameters read straight into their
    shardings on ``mesh``: no optimizer state is read or built, no initial values computed.

    ``cfg`` is a GPTConfig (a GPT, or a PipelinedGPT on a 'stage' axis) or a LlamaConfig (a
    Llama, its blocks laid out for the stages the rules split them into).
    """
    import jax
    from flax import nnx

    from jmp.models import LlamaConfig
    from jmp.sharding import named_shardings
    from jmp.train.checkpoint import abstract_like
    from jmp.train.loop import build_model

    if isinstance(cfg, LlamaConfig):
        from jmp.hf.loader import abstract_model, stages_of

        # parameters only (jmp.hf.load refuses any other state): nothing else to build
        abstract = abstract_model(cfg, mesh, rules, num_stages=stages_of(mesh, rules))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    else:  # shapes only: build_model (GPT, or PipelinedGPT on a 'stage' axis) under eval_shape
        abstract = nnx.eval_shape(lambda: build_model(cfg, mesh, rules, seed=0))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(rest):  # state besides parameters (none in jmp's GPTs): make it real
            rest = nnx.split(build_model(cfg, mesh, rules, seed=0), nnx.Param, ...)[2]
    target = abstract_like(params, named_shardings(params, rules, mesh))
    return nnx.merge(graphdef, ckpt.restore_params(step, target=target), rest)
