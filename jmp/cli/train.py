"""``jmp train``: train a GPT, or continue a Hugging Face model, on a device mesh.

Example:
    $ jmp train --strategy dp_tp --mesh data=2,model=4 --steps 200
    $ jmp train --init hf:models/llama --strategy fsdp_tp --mesh data=2,model=4 --seq 256
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, cast

from jmp import strategies
from jmp.cli.common import (
    DEFAULT_MODEL,
    add_model_args,
    expert_overrides,
    gpt_config,
    mesh_spec,
    model_overrides,
    nonnegative_int,
    positive_float,
    positive_int,
    profile_window,
    seed_int,
    setup_mesh,
)
from jmp.cli.hf_run import init_source
from jmp.errors import ConfigError


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    train = sub.add_parser("train", help="train a GPT, or continue a Hugging Face model")
    add_model_args(train, model_default=None)
    train.add_argument(
        "--init",
        type=init_source,
        default=None,
        metavar="hf:PATH",
        help="continue training a local Hugging Face Llama/Mistral/Qwen2 folder (its weights, "
        "config and tokenizer.json; bytes without one) instead of a new GPT (default: none)",
    )
    train.add_argument(
        "--steps", type=positive_int, default=600, help="optimizer steps in the whole run"
    )
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
    train.add_argument(
        "--lr",
        type=positive_float,
        default=3e-3,
        help="peak learning rate of AdamW (linear warmup, then cosine decay)",
    )
    train.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="text files, folders or globs (default: Python stdlib sources), or one corpus "
        "folder made by `jmp data prepare` (packed documents, its tokenizer)",
    )
    train.add_argument("--out", default=None, help="run folder (default runs/<time>)")
    train.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of the initial parameters and the batch order",
    )
    train.add_argument(
        "--eval-every",
        type=positive_int,
        default=100,
        help="steps between validation losses (and at the last step)",
    )
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
        "--sample",
        type=nonnegative_int,
        default=200,
        help="tokens of text to sample at the end (bytes for a GPT)",
    )

    return train


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    import jmp
    import jmp.runtime.distributed
    from jmp.cli.hf_run import Start, token_data
    from jmp.models.generate import generate
    from jmp.train import TrainConfig
    from jmp.train.data import TextData
    from jmp.train.loop import check_model, run_training
    from jmp.train.run_folder import (
        RunFolder,
        check_new_run,
        check_resume,
        move_aside,
        write_config,
    )

    if args.init is not None and args.model is not None:
        raise jmp.ConfigError(
            f"--model {args.model} and --init hf:{args.init} are two starts; give one. Fix: "
            f"--init to continue a Hugging Face model, --model for a new GPT."
        )
    cluster = _start_distributed(args)
    main_process = cluster is None or cluster.is_main
    mesh, rules, _ = setup_mesh(args)
    start = None
    if args.init is not None:
        if expert_overrides(args):  # (refuses --top-k and the like without --experts)
            raise jmp.ConfigError(
                f"--experts {args.experts} makes a new GPT's blocks mixtures of experts; a "
                f"Hugging Face start (--init) keeps its own dense MLPs. Fix: drop --experts, or "
                f"train a new GPT (--model) with it."
            )
        start = Start.read(args.init, dtype=args.dtype, **model_overrides(args))
        start.check_vocab()
    cfg = start.config if start else gpt_config(args)
    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        microbatches=args.microbatches,
        lr=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
    )
    if mesh.shape.get("context", 1) > 1:  # before anything is written: the sequence must split
        from jmp.layers.context_parallel import check_layout, check_no_experts

        check_no_experts(cfg)
        check_layout(cfg.seq_len, mesh.shape["context"], balanced=cfg.cp_load_balance)
    if "sp" in args.strategy.split("_"):  # likewise: the sequence splits over 'model'
        from jmp.context import check_sequence_split
        from jmp.layers.moe import SEQUENCE_PARALLEL_REFUSAL

        if getattr(cfg, "n_experts", 0):
            raise jmp.ConfigError(SEQUENCE_PARALLEL_REFUSAL)
        with jmp.activate(mesh, rules):
            check_sequence_split(cfg.seq_len, jmp.strategies.KINDS_BY_NAME["sp"].axis)
    out = os.path.abspath(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    out = jmp.runtime.distributed.same_on_all(out)  # the processes may start a second apart
    folder = RunFolder(out)
    corpus = _prepared_corpus(args.data)
    if corpus is not None:
        if start is None:  # a new GPT gets the corpus's vocabulary
            cfg = dataclasses.replace(cfg, vocab_size=corpus.vocab_size)
        data: Any = _corpus_loader(corpus, cfg, train_cfg, mesh, rules, start)
        digest = _check_same_data(corpus.fingerprint)
        unit, size = ("bytes" if corpus.tokenizer().kind == "bytes" else "tokens"), corpus.n_tokens
    else:
        data = token_data(args.data, start.tokenizer) if start else TextData.from_paths(args.data)
        data.check(cfg.seq_len, cfg.vocab_size)
        digest = _check_same_data(data.fingerprint())
        unit = "tokens" if start and start.tokenizer.kind != "bytes" else "bytes"  # the ids
        size = data.train.size + data.val.size
    shape = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    config = {
        "model": cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "data": {
            "sha256": digest,
            "paths": args.data,
            unit: int(size),
            # the loader's state but its step: the checkpoint's step is the data position
            **({"corpus": _loader_state(data)} if corpus is not None else {}),
        },
        "strategy": args.strategy,
        "mesh": shape,
        **({"init": start.record()} if start else {}),
    }
    # Every check first: until they all pass, nothing in the run folder changes.
    notes: list[str] = []
    if args.resume:
        notes = check_resume(folder, config, extend=args.extend)
    else:
        check_new_run(folder, overwrite=args.overwrite)
    # the weights last: a folder that does not load is refused before anything is written
    model = start.load(mesh, rules) if start else None
    if model is None:  # a new model: one the mesh cannot split is refused here, not after
        check_model(cfg, train_cfg, mesh, rules, schedule=args.schedule)
    console = Console(width=None if sys.stdout.isatty() else 120, quiet=not main_process)
    jmp.runtime.distributed.barrier("run folder checked")  # by all: then process 0 writes
    if main_process:
        if args.overwrite and not args.resume and folder.holds_run():
            notes.append(f"moved the run that was in {out} aside to {move_aside(folder)}")
        write_config(folder, config)
    where = f"{mesh.devices.flat[0].platform}" + (
        f", {cluster.num_processes} processes" if cluster else ""
    )
    what = f"hf:{start.path} ({start.architecture})" if start else args.model or DEFAULT_MODEL
    console.print(
        f"[bold]jmp train[/] strategy={args.strategy} mesh={shape} "
        f"devices={mesh.size} ({where}) model={what} "
        f"({cfg.num_params():,} params) out={out}"
    )
    if start and start.tokenizer.kind == "bytes":
        notes.append(f"hf:{start.path} has no tokenizer.json: the text is read as bytes")
    for note in notes:
        console.print(note, markup=False, highlight=False)
    result = run_training(
        cfg,
        train_cfg,
        mesh,
        rules,
        data,
        start=model,
        out_dir=out,
        console=console,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        skip_nonfinite=args.skip_nonfinite,
        tensorboard=args.tensorboard,
        profile=args.profile,
        meta={k: config[k] for k in ("strategy", "mesh", "data", "init") if k in config},
        schedule=args.schedule,
        show_params=True,  # from the model being trained: it is built once
    )
    validation = (
        f"validation loss {result.val_loss:.3f}"
        if corpus is None
        else "no validation split (a prepared corpus)"
    )
    console.print(
        f"train loss {result.train_loss:.3f} nats/{unit[:-1]}  {validation}  "
        f"{result.tokens_per_s:,.0f} tokens/s"
        + (f"  skipped updates {result.skipped}" if result.skipped else "")
    )
    sampler = start.tokenizer if start else corpus.tokenizer() if corpus is not None else None
    if args.sample:
        text = generate(
            cast(Any, result.model),  # the GPT or Llama run_training trained
            "def ",
            mesh=mesh,
            rules=rules,
            max_new_tokens=args.sample,
            temperature=0.7,
            seed=args.seed,
            tokenizer=sampler,
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


def _prepared_corpus(paths: list[str] | None) -> Any:
    """The :class:`~jmp.train.data.Corpus` when ``--data`` is one folder made by ``jmp data
    prepare``; None for text files (read as today)."""
    from jmp.train.data.corpus import Corpus, is_corpus

    if paths and len(paths) == 1 and is_corpus(paths[0]):
        return Corpus(paths[0])
    if paths and len(paths) > 1 and any(is_corpus(p) for p in paths):
        raise ConfigError(
            f"--data {' '.join(paths)} mixes a prepared corpus with other paths. Fix: one "
            f"corpus folder, or text files only (prepare them together with `jmp data prepare`)."
        )
    return None


def _corpus_loader(corpus: Any, cfg: Any, train_cfg: Any, mesh: Any, rules: Any, start: Any) -> Any:
    """The grain loader of ``corpus`` for this run, checked against the model and tokenizer."""
    from jmp.train.data import Loader, batch_sharding

    if mesh.shape.get("stage", 1) > 1:
        raise ConfigError(
            "A pipelined model takes (inputs, targets) batches; packed batches (a dict with "
            "segment_ids) are not supported under pp_* strategies: the stages pass one "
            "activation, not the segments. Fix: use a strategy without pp, or text files."
        )
    loader = Loader(
        corpus,
        seq_len=cfg.seq_len,
        batch_size=train_cfg.batch_size,
        seed=train_cfg.seed,
        sharding=batch_sharding(mesh, rules),
    )
    tokenizer = None
    if start is not None:  # the corpus must be tokenized as the Hugging Face model expects
        path = os.path.join(start.path, "tokenizer.json")
        tokenizer = path if os.path.exists(path) else "bytes"
    loader.check(seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, tokenizer=tokenizer)
    return loader


def _loader_state(loader: Any) -> dict[str, Any]:
    return {k: v for k, v in loader.state().items() if k != "step"}


def _check_same_data(digest: str) -> str:
    """Every process must read the same bytes (hosts may hold other files under one path)."""
    import jmp.runtime.distributed

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
