"""The trainer for any Flax NNX model: ``jmp.fit``.

``fit`` takes a model factory, a loss, batches and an optax transformation, and gives what
``jmp train`` gives: parameters born sharded (:func:`jmp.shard_init`), one compiled step
(:func:`jmp.train.make_step`), a rich progress bar, ``metrics.jsonl``, ``loss.png``, periodic
asynchronous orbax checkpoints, exact resume onto any mesh or strategy, evaluation, and the
non-finite guard. jmp's own GPT trains through it (:mod:`jmp.train.loop`).

Example:
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    ...         self.up = nnx.Linear(8, 32, kernel_init=init, use_bias=False, rngs=rngs)
    ...         down = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("mlp", "embed"))
    ...         self.down = nnx.Linear(32, 1, kernel_init=down, use_bias=False, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.down(jax.nn.relu(self.up(x)))
    >>> def loss_fn(model, batch):
    ...     return ((model(batch["x"]) - batch["y"]) ** 2).mean()
    >>> def batches(k):
    ...     x = np.random.default_rng(k).normal(size=(16, 8)).astype(np.float32)
    ...     return {"x": x, "y": x.sum(-1, keepdims=True)}
    >>> result = fit(MLP, loss_fn, batches, mesh=mesh, strategy="dp_tp",
    ...              optimizer=optax.adam(1e-2), steps=30, progress=False)
    >>> result.history[-1]["loss"] < result.history[0]["loss"]
    True
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jmp.errors import ConfigError, JmpError
from jmp.layers.moe import EXPERT_LOAD
from jmp.rules import Rules, check_batch, preset
from jmp.runtime.distributed import barrier
from jmp.sharding import param_table, shard_init
from jmp.train.checkpoint import Checkpointer, CheckpointError
from jmp.train.data import local_rows
from jmp.train.observe import RunLog
from jmp.train.progress import ProgressBar, expert_load_table, make_console, plot_losses, say
from jmp.train.run_folder import RunFolder, check_new_run, move_aside
from jmp.train.speed import Speedometer, device_peak
from jmp.train.step import Batch, LossFn, TrainState, make_eval_step, make_step, merge_params


class NonFiniteError(JmpError):
    """The loss or gradient norm became NaN or infinite."""


@dataclass
class FitResult:
    """What a training run produced: the trained model and one metrics row per step."""

    model: nnx.Module
    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)
    val_loss: float = math.nan
    train_loss: float = math.nan
    tokens_per_s: float = math.nan
    skipped: int = 0
    resumed_from: int | None = None  # the checkpoint step a resumed run started from


#: What :func:`fit` itself writes into ``out_dir``: a folder holding any is a run.
FIT_FILES = ("metrics.jsonl", "checkpoints")

#: A source of batches: ``step -> batch`` (exact on resume) or an iterable of batches.
Batches = Callable[[int], Batch] | Iterable[Batch]


def _is_main() -> bool:
    return jax.process_index() == 0


def place_batch(batch: Batch, sharding: NamedSharding, /) -> Batch:
    """Put a host batch on the mesh, its leading dim split as ``sharding`` says.

    Leaves that are already ``jax.Array`` pass through. A NumPy leaf is the *global* batch:
    each process keeps the rows its devices hold (``jax.make_array_from_process_local_data``).
    """

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        rows = local_rows(sharding, x.shape)
        return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)

    return jax.tree.map(one, batch)


def _check_batch(batch: Batch, microbatches: int, mesh: Mesh, rules: Rules) -> None:
    """Every leaf has the same leading (batch) dim, and it splits over the mesh."""
    shapes = [np.shape(x) for x in jax.tree.leaves(batch)]
    sizes = {s[0] if s else None for s in shapes}
    if not shapes or None in sizes or len(sizes) > 1:
        raise ConfigError(
            f"A batch must be a pytree of arrays sharing one leading (batch) dim; its leaves "
            f"have shapes {shapes}. Fix: stack examples along axis 0 in every leaf."
        )
    check_batch(shapes[0][0], microbatches, mesh, rules)


def _batch_source(batches: Batches, start: int) -> Callable[[int], Batch]:
    """``step -> batch``; an iterable is advanced past the ``start`` batches already trained."""
    if callable(batches):
        return batches
    it = itertools.islice(iter(batches), start, None)

    def next_batch(step: int) -> Batch:
        try:
            return next(it)
        except StopIteration:
            raise ConfigError(
                f"The batches ran out at step {step + 1}. Fix: give at least "
                f"`steps` batches, or a function step -> batch."
            ) from None

    return next_batch


def _resolve_rules(mesh: Mesh, strategy: str | None, rules: Rules | None) -> Rules:
    if (strategy is None) == (rules is None):
        raise ConfigError(
            "fit needs exactly one of strategy= (a name, e.g. 'fsdp_tp') or "
            f"rules= (a jmp.Rules); got strategy={strategy!r}, rules={rules!r}."
        )
    return preset(strategy, mesh) if strategy is not None else rules  # type: ignore[return-value]


def fit(
    make_model: Callable[[nnx.Rngs], nnx.Module] | nnx.Module,
    loss_fn: LossFn,
    batches: Batches,
    /,
    *,
    mesh: Mesh,
    strategy: str | None = None,
    rules: Rules | None = None,
    optimizer: optax.GradientTransformation,
    steps: int,
    out_dir: str | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    show_params: bool = False,
    microbatches: int = 1,
    eval_batches: Callable[[int], Batch] | Sequence[Batch] | None = None,
    num_eval_batches: int = 4,
    eval_every: int | None = None,
    eval_loss_fn: LossFn | None = None,
    skip_nonfinite: bool = False,
    max_consecutive_skips: int = 10,
    progress: Any = True,
    meta: dict[str, Any] | None = None,
    schedule: optax.Schedule | None = None,
    tokens_per_batch: int | None = None,
    tensorboard: bool = False,
    profile: tuple[int, int] | None = None,
) -> FitResult:
    """Train ``make_model(rngs)`` on ``mesh``; write metrics and checkpoints under ``out_dir``.

    Args:
        make_model: ``rngs -> nnx.Module``; every parameter carries logical axis names. Or
            a module already built and sharded on ``mesh`` (:func:`jmp.shard_init`,
            :func:`jmp.hf.load`): training starts from its parameter values (a fresh run;
            ``resume`` still restores the checkpoint), and ``seed`` builds nothing.
        loss_fn: ``(model, batch) -> scalar`` loss.
        batches: ``step -> batch`` (batch k the same on every run: resume is exact), or an
            iterable of batches (for an exact resume it must yield the same sequence each
            time: the first ``start`` items are skipped). A batch is any pytree of arrays
            whose leading dim is the batch; NumPy leaves are the global batch.
        mesh, strategy, rules: the device mesh and exactly one of a strategy name
            (:mod:`jmp.strategies`) or :class:`~jmp.Rules`.
        optimizer: an optax transformation (its state is sharded like the parameters).
        steps: the total number of steps (a resumed run counts the steps already done).
        resume: continue from the latest checkpoint in ``out_dir`` (any mesh or strategy);
            if it does not restore, from the newest one that does (saying so).
        overwrite: a new run (no ``resume``) into an ``out_dir`` that already holds one moves
            the old run aside to ``<out_dir>.replaced-<time>``; without it that is refused
            (two runs never mix in one folder).
        show_params: print the parameter table (:func:`jmp.param_table`) of the sharded model.
        eval_batches: ``i -> batch`` (``num_eval_batches`` of them) or a sequence; the mean
            loss is logged as ``val_loss`` every ``eval_every`` steps and at the end.
        skip_nonfinite: skip (do not apply) NaN/inf updates instead of stopping; stops anyway
            after ``max_consecutive_skips`` in a row.
        progress: show a rich progress bar (True), or a ``rich.console.Console`` to print on.
        meta: JSON-able facts saved with each checkpoint (e.g. configs); on resume a
            different ``meta["model"]`` than the checkpoint's is refused.
        schedule: the learning-rate schedule, to log ``lr``.
        tokens_per_batch: to log ``tokens_per_s``.
        tensorboard: also write every metric as TensorBoard scalars in ``out_dir/tensorboard``.
        profile: ``(START, END)``: a ``jax.profiler`` trace of those steps (1-based) in
            ``out_dir/profile``.

    Each row of ``history`` (and ``metrics.jsonl``) has the step's ``loss``, ``grad_norm``
    (and ``lr``, ``val_loss``), and from the second step on the speed so far (compilation
    and evaluation excluded): ``step_time_s``, ``tokens_per_s``, ``flops_per_s`` (model
    FLOPs, :mod:`jmp.train.speed`), ``mfu`` where the devices' peak is known, and
    ``memory_gib`` where the backend reports it. The loop dispatches step k+1 before it reads
    step k's metrics, so the host prepares the next batch while the devices compute.

    Returns:
        A :class:`FitResult`: ``.model`` (trained, sharded), ``.history`` (one dict a step).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be a positive int.")
    if checkpoint_every is not None and (
        not isinstance(checkpoint_every, int) or checkpoint_every < 0
    ):
        raise ConfigError(f"checkpoint_every={checkpoint_every!r} must be an int >= 0.")
    rules = _resolve_rules(mesh, strategy, rules)
    console = make_console(progress)
    if out_dir and not resume:  # before anything is built: a refusal costs nothing
        folder = RunFolder(out_dir)
        check_new_run(folder, overwrite=overwrite, files=FIT_FILES)
        barrier("run folder checked")  # by every process, before process 0 moves or writes
        if overwrite and _is_main() and folder.holds_run(FIT_FILES):
            moved = move_aside(folder)
            say(console, f"moved the run in {folder.path} aside to {moved}")
    # a module is the start itself (e.g. loaded weights); a factory is initialized sharded
    model = (
        make_model
        if isinstance(make_model, nnx.Module)
        else shard_init(make_model, mesh, rules, seed=seed)
    )
    step_fn = make_step(
        model, optimizer, mesh, rules, microbatches=microbatches, loss_fn=loss_fn, schedule=schedule
    )
    eval_step = make_eval_step(model, mesh, rules, loss_fn=eval_loss_fn or loss_fn)
    meta = {**(meta or {})}
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints")) if out_dir else None
    if show_params and console is not None and _is_main():
        param_table(model).print(console)
    state, start, history = _initial_state(step_fn, ckpt, resume, meta, out_dir, console)
    next_batch = _batch_source(batches, start)
    evaluate = _evaluator(eval_step, eval_batches, num_eval_batches, step_fn.batch_sharding)
    result = FitResult(model, state, history, resumed_from=start if resume else None)
    log = RunLog(out_dir if _is_main() else None, tensorboard=tensorboard, profile=profile)
    speed = Speedometer(None, tokens_per_batch, device_peak(list(mesh.devices.flat)))
    in_a_row, pending = 0, None

    def finish(k: int, metrics: dict[str, Any], with_state: bool) -> None:
        """Read step k's metrics (it has run): guard, speed, evaluation, log, checkpoint."""
        nonlocal in_a_row
        row: dict[str, Any] = {"step": k + 1, **{n: _number(v) for n, v in metrics.items()}}
        bad = next((m for m in ("loss", "grad_norm") if not math.isfinite(row[m])), None)
        if bad:
            in_a_row += 1
            if not skip_nonfinite or in_a_row > max_consecutive_skips:
                raise NonFiniteError(_nonfinite_message(bad, row, k + 1, ckpt, in_a_row))
            result.skipped += 1
            row["skipped"] = result.skipped
        else:
            in_a_row = 0
        row.update(log.clock.lap(speed))
        if with_state and evaluate and _evaluates(k, steps, eval_every):
            with log.clock.paused():  # throughput is training only
                row["val_loss"] = evaluate(state.params)
            if EXPERT_LOAD in row and console is not None and _is_main():
                say(console, expert_load_table(row[EXPERT_LOAD], step=k + 1))
        history.append(row)
        log.write(row, state)
        if with_state and ckpt and _checkpoints(k, checkpoint_every):
            _check_finite_params(state, k + 1, ckpt)
            ckpt.save(k + 1, state, meta=_checkpoint_meta(meta, k + 1))
        advance(row)

    try:
        with ProgressBar(console, steps, start, enabled=_is_main()) as advance:
            for k in range(start, steps):
                if ckpt:  # a save that failed in the background stops the run now
                    ckpt.check()
                host = next_batch(k)  # prepared while the previous step runs on the devices
                if k == start:  # a clear error before the compiler's: the batch must split
                    _check_batch(host, microbatches, mesh, rules)
                    speed.flops_per_step = step_fn.model_flops(host)
                    log.said_peak(console, speed)
                log.before(k + 1)
                state, metrics = step_fn(state, place_batch(host, step_fn.batch_sharding))
                # Step k is dispatched; read step k-1's metrics now, one step late, so the host
                # never waits for the devices between steps. Evaluation and checkpoints need
                # this step's state: their steps are read at once.
                if pending:
                    finish(*pending, with_state=False)
                pending = None
                if (evaluate and _evaluates(k, steps, eval_every)) or (
                    ckpt and _checkpoints(k, checkpoint_every)
                ):
                    finish(k, metrics, with_state=True)
                else:
                    pending = (k, metrics)
            if pending:
                finish(*pending, with_state=False)
        if ckpt and steps > start and ckpt.latest_step() != steps:
            _check_finite_params(state, steps, ckpt)
            ckpt.save(steps, state, meta=_checkpoint_meta(meta, steps))
    finally:
        failing = sys.exc_info()[1] is not None
        log.close()
        if ckpt:
            try:
                ckpt.wait()
            except CheckpointError:
                if not failing:  # else the first error is the one to report
                    raise
            finally:
                ckpt.close()
    result.state, result.model = state, merge_params(model, state.params)
    _summarize(result)
    if out_dir and _is_main():
        plot_losses(result.history, os.path.join(out_dir, "loss.png"))
    return result


def _number(value: Any) -> float | list:
    """A metric as JSON has it: a float, or nested lists of floats (a MoE's expert load)."""
    value = np.asarray(value)
    return float(value) if value.ndim == 0 else value.astype(float).tolist()


def _evaluates(k: int, steps: int, eval_every: int | None) -> bool:
    """Whether step k (0-based) ends with an evaluation: every ``eval_every``, and the last."""
    return bool(eval_every and (k + 1) % eval_every == 0) or k + 1 == steps


def _checkpoints(k: int, every: int | None) -> bool:
    return bool(every) and (k + 1) % every == 0


def _kept(ckpt: Checkpointer | None) -> str:
    """What is left on disk after a stop, stated only when true."""
    return ckpt.kept() if ckpt else "no checkpoint was written"


def _nonfinite_message(
    bad: str, row: dict, step: int, ckpt: Checkpointer | None, in_a_row: int
) -> str:
    kept = _kept(ckpt)
    what = (
        f"{in_a_row} non-finite updates in a row (the last: {bad}={row[bad]} at step {step})"
        if in_a_row > 1
        else f"Non-finite {bad}={row[bad]} at step {step}"
    )
    return (
        f"{what}; stopped, {kept}. Fix: lower the learning rate (--lr), or skip such "
        f"updates (skip_nonfinite=True, --skip-nonfinite)."
    )


def _evaluator(
    eval_step: Any, eval_batches: Any, count: int, sharding: NamedSharding
) -> Callable[[nnx.State], float] | None:
    if eval_batches is None:
        return None
    items = (
        list(eval_batches)
        if not callable(eval_batches)
        else [eval_batches(i) for i in range(count)]
    )

    def evaluate(params: nnx.State) -> float:
        # float() right away: one multi-device program in flight at a time. Several at once can
        # starve XLA:CPU's collective rendezvous on a 2-core machine (seen: a 40 s abort).
        return float(np.mean([float(eval_step(params, place_batch(b, sharding))) for b in items]))

    return evaluate


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    # One compiled program: eager per-array checks would put dozens of small multi-device
    # programs in flight at once, which can deadlock XLA:CPU's collectives.
    return jax.numpy.all(
        jax.numpy.stack([jax.numpy.isfinite(x).all() for x in jax.tree.leaves(tree)])
    )


def _check_finite_params(state: TrainState, step: int, ckpt: Checkpointer | None = None) -> None:
    """Refuse to checkpoint non-finite parameters (finite gradients can still overflow them).

    The step itself never applies a non-finite loss or gradient; this catches the rarer
    overflow in the update, once per checkpoint rather than in every step.
    """
    if not bool(_all_finite(state.params)):
        raise NonFiniteError(
            f"Non-finite parameters at step {step} (an update overflowed); not "
            f"checkpointed, {_kept(ckpt)}. Fix: lower the learning rate (--lr)."
        )


def _checkpoint_meta(meta: dict[str, Any], step: int) -> dict[str, Any]:
    # Batches and any randomness are pure functions of (seed, step): the next batch index and
    # the seed (in meta["train"]) are the whole data position and RNG state.
    return {**meta, "step": step, "data_position": step}


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


def _initial_state(
    step_fn: Any,
    ckpt: Checkpointer | None,
    resume: bool,
    meta: dict[str, Any],
    out_dir: str | None,
    console: Any = None,
) -> tuple[TrainState, int, list[dict[str, float]]]:
    """The state to start from: fresh, or the newest checkpoint that restores.

    A checkpoint that does not restore (a truncated or deleted file) is skipped for the one
    before it, saying so; it is left on disk untouched (the next save past it replaces it).
    """
    if not resume:
        return step_fn.init_state(), 0, []
    if ckpt is None:
        raise CheckpointError("resume needs an out_dir holding checkpoints.")
    steps = ckpt.all_steps()
    if not steps:  # killed before its first checkpoint was committed: start over, exactly
        return step_fn.init_state(), 0, _read_history(out_dir, 0)
    # the restore target is abstract: no second train state is allocated to learn its shapes
    target = step_fn.abstract_state()
    failed: list[str] = []
    for step in reversed(steps):
        if "model" in meta:
            saved = ckpt.meta(step).get("model")
            if saved != meta["model"]:
                raise CheckpointError(
                    f"Checkpoint step {step} in {out_dir!r} is of another model "
                    f"config ({saved}) than requested ({meta['model']}). Fix: pass "
                    f"the same model settings (--model/--seq), or a new --out."
                )
        try:
            state = ckpt.restore(step, target=target)
        except CheckpointError as err:
            failed.append(f"step {step}: {str(err)[:240]}...")
            continue
        if failed:
            aside = os.path.join(os.path.dirname(ckpt.directory), "unreadable-checkpoints")
            bad = [s for s in steps if s > step]
            for s in bad:
                ckpt.set_aside(s, aside)
            say(
                console,
                f"warning: checkpoint step {steps[-1]} in {ckpt.directory} does not restore "
                f"({failed[0]}); resuming from step {step}, the newest that does. Moved "
                f"step(s) {', '.join(map(str, bad))} into {aside}.",
            )
        return state, step, _read_history(out_dir, step)
    raise CheckpointError(
        f"No checkpoint in {ckpt.directory!r} restores ({'; '.join(failed)}). Fix: start the "
        f"run again with another --out (or --overwrite, which moves this run aside)."
    )


def _summarize(result: FitResult) -> None:
    for row in reversed(result.history):
        if "val_loss" in row:
            result.val_loss = row["val_loss"]
            break
    if result.history:
        result.train_loss = result.history[-1]["loss"]
        speeds = [r["tokens_per_s"] for r in result.history if "tokens_per_s" in r]
        result.tokens_per_s = speeds[-1] if speeds else math.nan
