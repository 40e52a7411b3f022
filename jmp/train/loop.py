"""The training loop: sharded init, compiled step, validation, progress, metrics, checkpoints.

Example:
    >>> result = run_training(GPTConfig.named("tiny"), TrainConfig(steps=100), mesh, rules,
    ...                       TextData.from_paths(None), out_dir="runs/demo")
    >>> result.val_loss
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jmp.errors import JmpError
from jmp.models.gpt import GPT, GPTConfig
from jmp.rules import Rules
from jmp.sharding import shard_init
from jmp.train.checkpoint import Checkpointer, CheckpointError, abstract_like
from jmp.train.data import TextData
from jmp.train.step import (
    TrainConfig,
    TrainState,
    check_batch,
    lr_schedule,
    make_eval_step,
    make_optimizer,
    make_step,
    merge_params,
)

if TYPE_CHECKING:  # jmp.pipeline is imported only when a mesh has a 'stage' axis
    from jmp.pipeline import ScheduleName


class NonFiniteError(JmpError):
    """The loss or gradient norm became NaN or infinite."""


@dataclass
class RunResult:
    """What a training run produced."""

    model: GPT  # a PipelinedGPT (a GPT subclass) when the mesh has a 'stage' axis
    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)
    val_loss: float = math.nan
    train_loss: float = math.nan
    tokens_per_s: float = math.nan
    skipped: int = 0


def _is_main() -> bool:
    return jax.process_index() == 0


def evaluate(
    eval_step: Any,
    params: nnx.State,
    data: TextData,
    *,
    cfg: TrainConfig,
    seq_len: int,
    mesh: Mesh,
    rules: Rules,
) -> float:
    """Mean validation loss over ``cfg.eval_batches`` fixed batches."""
    # float() right away: one multi-device program in flight at a time. Several at once can
    # starve XLA:CPU's collective rendezvous on a 2-core machine (seen: a 40 s abort).
    losses = [
        float(
            eval_step(
                params,
                data.batch(
                    i,
                    batch_size=cfg.batch_size,
                    seq_len=seq_len,
                    mesh=mesh,
                    rules=rules,
                    seed=cfg.seed,
                    split="val",
                ),
            )
        )
        for i in range(cfg.eval_batches)
    ]
    return float(np.mean(losses))


def run_training(
    model_cfg: GPTConfig,
    cfg: TrainConfig,
    mesh: Mesh,
    rules: Rules,
    data: TextData,
    /,
    *,
    out_dir: str | None = None,
    console: Any = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    skip_nonfinite: bool = False,
    meta: dict[str, Any] | None = None,
    schedule: ScheduleName = "1f1b",
) -> RunResult:
    """Train a GPT; write ``metrics.jsonl``, ``loss.png`` and checkpoints under ``out_dir``.

    With ``resume``, the latest checkpoint in ``out_dir`` is restored onto ``mesh`` (any mesh or
    strategy) and training continues from its step with the very batches it would have seen.
    A mesh with a ``stage`` axis pipelines the blocks over it (``schedule``: '1f1b' or 'gpipe',
    ``cfg.microbatches`` microbatches).
    """
    check_batch(cfg.batch_size, cfg.microbatches, mesh, rules)
    data.check(model_cfg.seq_len)
    model, step_fn, eval_step = _build(model_cfg, cfg, mesh, rules, schedule)
    meta = {"model": model_cfg.to_dict(), "train": cfg.to_dict(), **(meta or {})}
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints")) if out_dir else None
    state, start, history = _initial_state(step_fn, ckpt, resume, model_cfg, out_dir)
    result = RunResult(model, state, history)
    metrics_file = (
        open(os.path.join(out_dir, "metrics.jsonl"), "a")
        # noqa: SIM115
        if (out_dir and _is_main())
        else None
    )
    tokens = cfg.batch_size * model_cfg.seq_len
    t_start, timed_steps, eval_seconds = None, 0, 0.0
    try:
        with _progress(console, cfg.steps, start) as advance:
            for k in range(start, cfg.steps):
                batch = data.batch(
                    k,
                    batch_size=cfg.batch_size,
                    seq_len=model_cfg.seq_len,
                    mesh=mesh,
                    rules=rules,
                    seed=cfg.seed,
                )
                state, metrics = step_fn(state, batch)  # a non-finite update is not applied
                row = {"step": k + 1, **{n: float(v) for n, v in metrics.items()}}
                bad = next((m for m in ("loss", "grad_norm") if not math.isfinite(row[m])), None)
                if bad:
                    if not skip_nonfinite:
                        raise NonFiniteError(
                            f"Non-finite {bad}={row[bad]} at step {k + 1}; stopped. The last "
                            f"good checkpoint is kept. Fix: lower --lr, or pass "
                            f"--skip-nonfinite to skip such updates."
                        )
                    result.skipped += 1
                    row["skipped"] = result.skipped
                if t_start is None:  # the first step includes compilation: not timed
                    t_start = time.perf_counter()
                else:
                    timed_steps += 1
                    elapsed = time.perf_counter() - t_start - eval_seconds
                    row["tokens_per_s"] = tokens * timed_steps / elapsed
                if (k + 1) % cfg.eval_every == 0 or k + 1 == cfg.steps:
                    t_eval = time.perf_counter()
                    row["val_loss"] = evaluate(
                        eval_step,
                        state.params,
                        data,
                        cfg=cfg,
                        seq_len=model_cfg.seq_len,
                        mesh=mesh,
                        rules=rules,
                    )
                    eval_seconds += time.perf_counter() - t_eval  # throughput is training only
                history.append(row)
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if ckpt and checkpoint_every and (k + 1) % checkpoint_every == 0:
                    _check_finite_params(state, k + 1)
                    ckpt.save(k + 1, state, meta=_checkpoint_meta(meta, k + 1))
                advance(row)
        if ckpt and cfg.steps > start and ckpt.latest_step() != cfg.steps:
            _check_finite_params(state, cfg.steps)
            ckpt.save(cfg.steps, state, meta=_checkpoint_meta(meta, cfg.steps))
    finally:
        if ckpt:
            ckpt.wait()
            ckpt.close()
        if metrics_file:
            metrics_file.close()
    result.state, result.model = state, merge_params(model, state.params)
    _summarize(result)
    if out_dir and _is_main():
        plot_losses(result.history, os.path.join(out_dir, "loss.png"))
    return result


def build_model(model_cfg: GPTConfig, mesh: Mesh, rules: Rules, *, seed: int) -> GPT:
    """A sharded GPT, or a PipelinedGPT when the mesh has a 'stage' axis of size > 1."""
    stages = mesh.shape.get("stage", 1)
    if stages == 1:
        return shard_init(lambda rngs: GPT(model_cfg, rngs=rngs), mesh, rules, seed=seed)
    from jmp.pipeline import PipelinedGPT

    return shard_init(
        lambda rngs: PipelinedGPT(model_cfg, num_stages=stages, rngs=rngs), mesh, rules, seed=seed
    )


def _build(
    model_cfg: GPTConfig, cfg: TrainConfig, mesh: Mesh, rules: Rules, schedule: ScheduleName
) -> tuple[GPT, Any, Any]:
    """Model, train step and eval step; a 'stage' mesh axis pipelines the blocks over it."""
    model = build_model(model_cfg, mesh, rules, seed=cfg.seed)
    if mesh.shape.get("stage", 1) == 1:
        step = make_step(
            model,
            make_optimizer(cfg),
            mesh,
            rules,
            microbatches=cfg.microbatches,
            schedule=lr_schedule(cfg),
        )
        return model, step, make_eval_step(model, mesh, rules)
    from jmp.pipeline import make_loss_fn

    # the pipeline splits the batch into cfg.microbatches itself: no accumulation around it
    step = make_step(
        model,
        make_optimizer(cfg),
        mesh,
        rules,
        schedule=lr_schedule(cfg),
        loss_fn=make_loss_fn(mesh=mesh, num_microbatches=cfg.microbatches, schedule=schedule),
    )
    evaluate = make_loss_fn(mesh=mesh, num_microbatches=cfg.microbatches, schedule="gpipe")
    return model, step, make_eval_step(model, mesh, rules, loss_fn=evaluate)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    # One compiled program: eager per-array checks would put dozens of small multi-device
    # programs in flight at once, which can deadlock XLA:CPU's collectives.
    return jax.numpy.all(
        jax.numpy.stack([jax.numpy.isfinite(x).all() for x in jax.tree.leaves(tree)])
    )


def _check_finite_params(state: TrainState, step: int) -> None:
    """Refuse to checkpoint non-finite parameters (finite gradients can still overflow them).

    The step itself never applies a non-finite loss or gradient; this catches the rarer
    overflow in the update, once per checkpoint rather than in every step.
    """
    if not bool(_all_finite(state.params)):
        raise NonFiniteError(
            f"Non-finite parameters at step {step} (an update overflowed); not "
            f"checkpointed, the last good checkpoint is kept. Fix: lower --lr."
        )


def _checkpoint_meta(meta: dict[str, Any], step: int) -> dict[str, Any]:
    # Batches and any randomness are pure functions of (seed, step): the next batch index and
    # the seed (in meta["train"]) are the whole data position and RNG state.
    return {**meta, "step": step, "data_position": step}


def _initial_state(
    step_fn: Any, ckpt: Checkpointer | None, resume: bool, model_cfg: GPTConfig, out_dir: str | None
) -> tuple[TrainState, int, list[dict[str, float]]]:
    state = step_fn.init_state()
    if not resume:
        return state, 0, []
    if ckpt is None:
        raise CheckpointError("resume needs an out_dir holding checkpoints.")
    step = ckpt.latest_step()
    if step is None:  # killed before its first checkpoint was committed: start over, exactly
        return state, 0, _read_history(out_dir, 0)
    saved = ckpt.meta(step).get("model")
    if saved != model_cfg.to_dict():
        raise CheckpointError(
            f"Checkpoint step {step} in {out_dir!r} is of another model "
            f"config ({saved}) than requested ({model_cfg.to_dict()}). Fix: "
            f"pass the same --model/--seq, or a new --out."
        )
    state = ckpt.restore(step, target=abstract_like(state, step_fn.state_shardings))
    return state, step, _read_history(out_dir, step)


def _read_history(out_dir: str | None, upto: int) -> list[dict[str, float]]:
    path = os.path.join(out_dir or "", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # a killed run may have logged steps past its last checkpoint: those are redone
    rows = [r for r in rows if r["step"] <= upto]
    if _is_main():  # one writer, also on a filesystem the hosts share
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def _summarize(result: RunResult) -> None:
    for row in reversed(result.history):
        if "val_loss" in row:
            result.val_loss = row["val_loss"]
            break
    if result.history:
        result.train_loss = result.history[-1]["loss"]
        speeds = [r["tokens_per_s"] for r in result.history if "tokens_per_s" in r]
        result.tokens_per_s = speeds[-1] if speeds else math.nan


class _progress:
    """A rich progress bar showing loss and throughput (silent without a console)."""

    def __init__(self, console: Any, total: int, start: int) -> None:
        self.console, self.total, self.start = console, total, start
        self.bar: Any = None

    def __enter__(self) -> Any:
        if self.console is None or not _is_main():
            return lambda row: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        task = self.bar.add_task("train", total=self.total, completed=self.start, info="")
        self.bar.start()

        def advance(row: dict[str, float]) -> None:
            info = f"loss {row['loss']:.3f}"
            if "val_loss" in row:
                info += f" | val {row['val_loss']:.3f}"
            if "tokens_per_s" in row:
                info += f" | {row['tokens_per_s']:,.0f} tok/s"
            self.bar.update(task, advance=1, info=info)

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def plot_losses(history: list[dict[str, float]], path: str, /) -> None:
    """Train and validation loss against step, as a PNG."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train")
    val = [r for r in history if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
