"""Running a schedule: the pipelined loss and gradients of any pipelinable model.

The model is a :class:`~jmp.pipeline.stack.Pipelinable`: stacked ``blocks`` (built with
:func:`~jmp.pipeline.stack.stack_blocks`, e.g. :class:`PipelinedGPT`'s), ``embed_inputs`` and
``head_loss``; the batch is any pytree of arrays with a leading batch dim.

:func:`pipeline_loss` / :func:`pipeline_loss_and_grads` run a :class:`Schedule` from
:mod:`jmp.pipeline.schedule`: GPipe (all forwards, then autodiff does all backwards) or 1F1B
(one forward and one backward per tick, with an explicit ``jax.vjp`` per stage) inside
``jax.shard_map``, manual over ``{'stage'}`` only: ``'data'`` and ``'model'`` stay with the
compiler and the tensor-parallel layers. Stage s holds blocks ``s*L .. (s+1)*L - 1`` and passes
its activations to stage s+1 with ``jax.lax.ppermute``, one microbatch per tick.
:func:`make_loss_fn` wraps this as the ``loss_fn`` of :func:`jmp.train.make_step`.

Where the ends run: inside the pipelined region, once per microbatch, the embedding on the
first stage and the final norm, head and cross-entropy on the last (that is what lets 1F1B
start a microbatch's backward as soon as its forward reaches the end). Their parameters are
replicated over ``'stage'`` (split over ``'model'`` as usual) and their gradients summed over
``'stage'`` once per step (one all-reduce; the other stages contribute zeros). In SPMD every
stage runs the same ops: each computes the embedding and the head and a select keeps the
first's and the last's (a ``lax.cond`` would skip that work, but with tensor-parallel
collectives inside its branches XLA's CPU runtime deadlocked). That costs S - 1 extra
embeddings and heads per tick: small next to the blocks for byte vocabularies, about a block
each for a 32k vocabulary.

Memory: GPipe keeps every tick's activations for autodiff: M + S - 1 microbatches' worth per
stage (only each block's input with ``GPTConfig.remat``). 1F1B keeps only each stage's
*input* per microbatch in flight, at most ``2(S - 1 - s) + 1 <= 2S - 1`` on stage s whatever
M (a lockstep tick moves an activation one stage, so the round trip is 2(S - 1 - s) ticks;
asynchronous PipeDream 1F1B keeps S), and recomputes the stage's forward inside its
``jax.vjp``: about one extra forward per microbatch and stage.

Context parallelism inside the stages (``pp_cp``, ``pp_dp_cp``, ...): the region is manual over
``'context'`` too; every stage takes its own tokens of each microbatch (the layout of
:mod:`jmp.layers.context_parallel`), attention inside the blocks is the ring or all-gather one,
positions are the tokens' true ones, and the loss and gradients are means over the axis. The
activations passed between stages are 1/c of the sequence.

What is not supported: ``GPTConfig.mode='manual'`` inside the pipeline (see
:func:`check_pipeline`), interleaved/virtual stages, and zero-bubble schedules. Gradients of a
data-parallel batch are all-reduced over ``'data'`` by the compiler once per backward tick, not
once per step (as in :mod:`jmp.train`'s gradient accumulation).

The runnable example (a pipelined GPT, its loss and gradients) is the package docstring's,
:mod:`jmp.pipeline`; ``tests/test_pipeline_any.py`` pipelines a plain-NNX model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jmp.context import activation_spec, constrain
from jmp.errors import ConfigError
from jmp.layers import context_parallel as cp
from jmp.pipeline.schedule import SCHEDULES, Schedule, ScheduleName, make_schedule
from jmp.pipeline.stack import STAGE, Pipelinable, is_stacked, num_stages_of, run_blocks
from jmp.rules import axes_tuple

#: A batch: any pytree of arrays sharing a leading batch dim (jmp's GPT: (inputs, targets)).
Batch = Any


def split_microbatches(batch: Batch, num_microbatches: int, /) -> Batch:
    """Each ``(B, ...)`` leaf -> ``(M, B / M, ...)``; microbatch m holds rows m, m + M, ...

    Strided rows keep each device's rows on that device: a device holding a contiguous block
    of the batch holds the same share of every microbatch, so the split moves no data. (The
    mean loss over the batch does not depend on which rows share a microbatch.)
    """
    M = num_microbatches

    def split(a: jax.Array) -> jax.Array:
        a = a.reshape(a.shape[0] // M, M, *a.shape[1:]).swapaxes(0, 1)
        return constrain(a, (None, "batch") + (None,) * (a.ndim - 2))

    return jax.tree.map(split, batch)


def _batch_ways(mesh: Mesh) -> tuple[tuple[str, ...], int]:
    spec = activation_spec(("batch",))
    axes = axes_tuple(spec[0] if spec else None)
    return axes, int(np.prod([mesh.shape[a] for a in axes]))


def check_pipeline(
    model: Any, mesh: Mesh, /, *, num_microbatches: int, batch_size: int | None = None
) -> None:
    """Raise a :class:`~jmp.ConfigError` listing everything that stops this pipeline run."""
    if not is_stacked(model):
        raise ConfigError(
            f"Cannot pipeline a {type(model).__name__}: a pipelined model needs stacked "
            f"`blocks` (jmp.pipeline.stack_blocks), `embed_inputs(batch)` and "
            f"`head_loss(x, batch)`. Fix: add them (see jmp.pipeline.stack), or use a "
            f"strategy without pp."
        )
    S, M = num_stages_of(cast(Pipelinable, model).blocks), num_microbatches
    cfg = getattr(model, "cfg", None)
    n_layers = getattr(cfg, "n_layers", None)
    layers = f"n_layers={n_layers}" if n_layers else "the block count"
    problems = []
    if STAGE not in mesh.shape:
        problems.append(
            f"the mesh {dict(mesh.shape)} has no 'stage' axis. Fix: build one with "
            f"it, e.g. jmp.make_mesh('stage={S},data=-1')"
        )
    elif mesh.shape[STAGE] != S:
        problems.append(
            f"the model has {S} stages but the mesh's 'stage' axis has size "
            f"{mesh.shape[STAGE]}. Fix: build the model with num_stages="
            f"{mesh.shape[STAGE]} ({layers} must be divisible "
            f"by it), or use a mesh with stage={S}"
        )
    if getattr(cfg, "mode", "auto") != "auto":
        problems.append(
            "GPTConfig.mode='manual' is not supported inside the pipeline (the "
            "layers' own shard_map, nested in the stage shard_map, fails to lower "
            "when differentiated). Fix: mode='auto': the compiler then places the "
            "same tensor-parallel collectives"
        )
    if not isinstance(M, int) or M < 1:
        problems.append(f"num_microbatches={M!r} must be a positive int")
    elif batch_size is not None:
        axes, ways = _batch_ways(mesh)
        if batch_size % (M * ways):
            problems.append(
                f"a batch of {batch_size} rows does not split into {M} microbatches "
                f"whose rows split over the batch axes {axes} (size {ways}). Fix: "
                f"use a batch size that is a multiple of {M * ways}"
            )
    if problems:
        raise ConfigError("Cannot run the pipeline: " + "; ".join(problems) + ".")


def _shift(x: jax.Array, num_stages: int, direction: int) -> jax.Array:
    """Send ``x`` to the next (+1) or previous (-1) stage; the end stage receives zeros.

    Only neighbours talk: no wrap-around pair (nothing useful ever flows from the last stage
    to the first), so the compiled collective-permutes pair stage s with s +- 1 only.
    """
    if num_stages == 1:
        return jnp.zeros_like(x)
    pairs = [(i, i + direction) for i in range(num_stages) if 0 <= i + direction < num_stages]
    return jax.lax.ppermute(x, STAGE, perm=pairs)


def _varying(tree: Any) -> Any:
    """``tree`` varying over the region's manual axes ('stage', and 'context' under cp)."""
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)

    def cast(a: jax.Array) -> jax.Array:
        missing = tuple(sorted(manual - jax.typeof(a).manual_axis_type.varying))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


class _Stage:
    """What one stage computes, as pure functions of (its blocks, the shared parameters).

    Built inside the ``shard_map`` body: ``blocks`` is this stage's ``(layers, ...)`` slice,
    ``batch`` all ``M`` microbatches, each leaf ``(M, rows, ...)``.
    """

    def __init__(self, model: Pipelinable, batch: Batch, blocks: nnx.State, shared: Any) -> None:
        self.graphdef = nnx.graphdef(model)
        self.blocks_def = nnx.graphdef(model.blocks)
        self.S = num_stages_of(model.blocks)
        self.M = jax.tree.leaves(batch)[0].shape[0]
        self.remat = getattr(model, "remat", False)  # a policy of jmp.layers.remat
        self.batch = batch
        self.index = jax.lax.axis_index(STAGE)
        # what flows between stages: the shape and dtype of the first stage's input
        act = jax.eval_shape(lambda: self._model(blocks, shared).embed_inputs(self._micro(0)))
        self.act_shape, self.dtype = act.shape, act.dtype

    def _model(self, blocks: nnx.State, shared: nnx.State) -> Pipelinable:
        return nnx.merge(self.graphdef, blocks, shared)

    def _micro(self, micro: Any) -> Batch:
        return jax.tree.map(lambda a: a[jnp.clip(micro, 0, self.M - 1)], self.batch)

    def zeros(self, *lead: int) -> jax.Array:
        """A stage-varying zero activation (for loop carries), with leading dims ``lead``."""
        return _varying(jnp.zeros((*lead, *self.act_shape), self.dtype))

    def forward(
        self, blocks: nnx.State, shared: nnx.State, x: jax.Array, micro: jax.Array
    ) -> jax.Array:
        """This stage's output for microbatch ``micro`` (the first stage embeds its inputs)."""
        inputs = self._micro(micro)
        # Every stage embeds and only the first keeps it: a select, not a lax.cond. With
        # collectives inside a branch taken by only some devices, XLA's CPU runtime was seen
        # to deadlock; the same ops in the same order on every device is what SPMD is safe with.
        h = jnp.where(self.index == 0, self._model(blocks, shared).embed_inputs(inputs), x)
        return run_blocks(self.blocks_def, blocks, h.astype(self.dtype), remat=self.remat)

    def forward_loss(
        self, blocks: nnx.State, shared: nnx.State, x: jax.Array, micro: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(output, loss): the loss is the last stage's ``head_loss``, 0 on the others."""
        y = self.forward(blocks, shared, x, micro)
        loss = self._model(blocks, shared).head_loss(y, self._micro(micro)).astype(jnp.float32)
        return y, jnp.where(self.index == self.S - 1, loss, 0.0)


def _gpipe_body(model: Pipelinable, schedule: Schedule) -> Callable:
    ticks = schedule.ticks // 2  # the forward half; autodiff runs the backward half

    def body(blocks: nnx.State, shared: nnx.State, batch: Batch) -> jax.Array:
        blocks = jax.tree.map(lambda a: a[0], blocks)
        # Varying from here on: the transpose of this cast is the one psum over 'stage' of the
        # shared parameters' gradients (cast inside the loop, it would be one psum per tick).
        shared = _varying(shared)
        stage = _Stage(model, batch, blocks, shared)

        def tick(carry: tuple, row: jax.Array) -> tuple[tuple, None]:
            x, total = carry
            micro = row[stage.index]
            y, loss = stage.forward_loss(blocks, shared, x, micro)
            return (_shift(y, stage.S, +1), total + jnp.where(micro >= 0, loss, 0.0)), None

        init = (stage.zeros(), _varying(jnp.zeros((), jnp.float32)))
        (_, total), _ = jax.lax.scan(tick, init, jnp.asarray(schedule.forward[:ticks]))
        return jax.lax.psum(total, STAGE) / stage.M

    return body


def _onefoneb_body(model: Pipelinable, schedule: Schedule) -> Callable:
    S, M = schedule.num_stages, schedule.num_microbatches
    slots = min(M, 2 * S - 1)  # stage inputs kept for the backward: 2(S-1-s)+1 on stage s

    def body(
        blocks: nnx.State, shared: nnx.State, batch: Batch
    ) -> tuple[jax.Array, nnx.State, nnx.State]:
        blocks = jax.tree.map(lambda a: a[0], blocks)
        shared = _varying(shared)  # gradients summed over 'stage' once, at the end
        stage = _Stage(model, batch, blocks, shared)
        carry = dict(
            x=stage.zeros(),
            g=stage.zeros(),
            stash=stage.zeros(slots),
            grads=jax.tree.map(jnp.zeros_like, (blocks, shared)),
            loss=_varying(jnp.zeros((), jnp.float32)),
        )

        def forward(c: dict, micro: jax.Array) -> dict:
            y = stage.forward(blocks, shared, c["x"], micro)
            slot = jnp.where(micro >= 0, micro % slots, 0)
            kept = jnp.where(micro >= 0, c["x"], c["stash"][slot])
            return {
                **c,
                "x": _shift(y, S, +1),
                "stash": jax.lax.dynamic_update_index_in_dim(c["stash"], kept, slot, 0),
            }

        def backward(c: dict, micro: jax.Array) -> dict:
            # Recompute this stage's forward from its kept input, then pull the cotangent
            # back through it: only the stage's input is kept between forward and backward.
            x = c["stash"][jnp.where(micro >= 0, micro % slots, 0)]
            (_, loss), vjp = jax.vjp(
                lambda bl, sh, x_: stage.forward_loss(bl, sh, x_, micro), blocks, shared, x
            )
            last = stage.index == S - 1
            dy = jnp.where(last, 0.0, c["g"]).astype(x.dtype)
            g_blocks, g_shared, g_x = vjp((dy, _varying(jnp.where(last, 1.0 / M, 0.0))))
            valid = micro >= 0
            grads = jax.tree.map(
                lambda acc, g: acc + jnp.where(valid, g, 0).astype(acc.dtype),
                c["grads"],
                (g_blocks, g_shared),
            )
            return {
                **c,
                "g": _shift(g_x, S, -1),
                "grads": grads,
                "loss": c["loss"] + jnp.where(valid & last, loss, 0.0),
            }

        # One scan per phase, each doing only what its ticks need: forwards only (warm-up),
        # one forward and one backward (steady state), backwards only (cool-down).
        for lo, hi, do_f, do_b in schedule.phases():

            def tick(c: dict, rows: tuple, do_f: bool = do_f, do_b: bool = do_b) -> tuple:
                c = forward(c, rows[0][stage.index]) if do_f else c
                return (backward(c, rows[1][stage.index]) if do_b else c), None

            rows = (jnp.asarray(schedule.forward[lo:hi]), jnp.asarray(schedule.backward[lo:hi]))
            carry, _ = jax.lax.scan(tick, carry, rows)
        g_blocks, g_shared = carry["grads"]
        return (
            jax.lax.psum(carry["loss"], STAGE) / M,
            jax.tree.map(lambda g: g[None], g_blocks),
            jax.tree.map(lambda g: jax.lax.psum(g, STAGE), g_shared),
        )

    return body


def _run(model: Any, batch: Batch, mesh: Mesh, num_microbatches: int, schedule: str) -> Any:
    """The loss (GPipe) or (loss, block grads, shared grads) (1F1B) of one pipelined run."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    check_pipeline(model, mesh, num_microbatches=num_microbatches, batch_size=rows)
    plan = make_schedule(schedule, num_stages_of(model.blocks), num_microbatches)
    micro = split_microbatches(batch, num_microbatches)
    _, blocks, shared = nnx.split(model, nnx.PathContains("blocks"), ...)
    if schedule == "gpipe":
        body, out_specs = _gpipe_body(model, plan), P()
    else:
        body, out_specs = _onefoneb_body(model, plan), (P(), P(STAGE), P())
    context = cp.context_axis()
    if context is not None:
        body = _with_context(body, model, context, seq=jax.tree.leaves(batch)[0].shape[1])
    # Manual over 'stage' (and 'context' under cp) only: inside, 'data' and 'model' stay with
    # the compiler, so the layers' tensor-parallel collectives and the batch split work as
    # without a pipeline.
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(STAGE), P(), P()),
        out_specs=out_specs,
        axis_names={STAGE} | ({context} if context else set()),
    )(blocks, shared, micro)


def _with_context(body: Callable, model: Any, axis: str, *, seq: int) -> Callable:
    """``body`` with the sequence split over the context ``axis`` (context parallelism).

    Every stage takes its own tokens of each microbatch (the layout of
    :mod:`jmp.layers.context_parallel`: load balanced unless the config says otherwise) and
    runs inside the region, so attention is the ring or all-gather one and positions are the
    tokens' true ones. Each device's loss is the mean over its tokens, all devices hold as
    many: the step's loss and gradients are their means over the axis.
    """
    balanced = getattr(getattr(model, "cfg", None), "cp_load_balance", True)

    def local_body(blocks: nnx.State, shared: nnx.State, batch: Batch) -> Any:
        with cp.entered_for(seq, balanced) as region:
            # microbatch leaves are (M, rows, seq, ...): the sequence is dim 2
            local = jax.tree.map(
                lambda a: cp.local_tokens(a, region, 2) if a.ndim > 2 else a, batch
            )
            # each device's gradients are of its own tokens' loss (1F1B's explicit vjp would
            # otherwise sum the blocks' over the axis); the pmean below makes them the mean
            out = body(_varying(blocks), shared, local)
        return jax.tree.map(lambda a: jax.lax.pmean(a, axis), out)

    return local_body


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r} must be one of {SCHEDULES}.")


def pipeline_loss_and_grads(
    model: nnx.Module,
    batch: Batch,
    /,
    *,
    mesh: Mesh,
    num_microbatches: int,
    schedule: ScheduleName = "1f1b",
) -> tuple[jax.Array, nnx.State]:
    """Mean next-token loss of ``batch`` and its gradients, pipelined over ``'stage'``.

    Call it inside ``jax.jit`` and :func:`jmp.activate` (the layers read the rules from it).

    Args:
        model: a :class:`~jmp.pipeline.stack.Pipelinable` model (e.g. :class:`PipelinedGPT`)
            whose blocks are stacked over ``mesh.shape['stage']`` stages.
        batch: any pytree of arrays with a leading batch dim (PipelinedGPT: ``(inputs,
            targets)``, each ``(batch, seq)`` integer tokens).
        num_microbatches: M; the batch splits into M microbatches of ``batch / M`` rows.
        schedule: ``'gpipe'`` (all forwards, then all backwards by autodiff: every
            microbatch's activations live at once) or ``'1f1b'`` (an explicit per-stage
            ``jax.vjp``: at most ``2S - 1`` microbatches' stage inputs live on a stage, and each
            stage's forward is recomputed in its backward).

    Returns:
        ``(loss, grads)``, ``grads`` an ``nnx.State`` shaped like ``nnx.state(model)``.

    Called as in the package docstring's example (:mod:`jmp.pipeline`).
    """
    _check_schedule(schedule)
    if schedule == "gpipe":
        graphdef, params = nnx.split(model)
        return jax.value_and_grad(
            lambda p: _run(nnx.merge(graphdef, p), batch, mesh, num_microbatches, "gpipe")
        )(params)
    loss, g_blocks, g_shared = _run(model, batch, mesh, num_microbatches, "1f1b")
    return loss, _merge_grads(model, g_blocks, g_shared)


def _merge_grads(model: nnx.Module, g_blocks: nnx.State, g_shared: nnx.State) -> nnx.State:
    return nnx.state(nnx.merge(nnx.graphdef(model), g_blocks, g_shared))


def pipeline_loss(
    model: nnx.Module,
    batch: Batch,
    /,
    *,
    mesh: Mesh,
    num_microbatches: int,
    schedule: ScheduleName = "1f1b",
) -> jax.Array:
    """The pipelined mean loss, differentiable by ``jax.grad`` under either schedule.

    Not differentiated, both run GPipe's forward only. Differentiated, GPipe goes through
    autodiff and 1F1B computes its gradients while it computes the loss (a ``jax.custom_vjp``
    whose backward only scales them), so ``jax.value_and_grad`` costs one 1F1B run. This is
    the ``loss_fn`` for :func:`jmp.train.make_step` (see :func:`make_loss_fn`).
    """
    _check_schedule(schedule)
    if schedule == "gpipe":
        return _run(model, batch, mesh, num_microbatches, "gpipe")
    graphdef, params = nnx.split(model)
    return _onefoneb_loss(graphdef, mesh, num_microbatches, params, batch)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _onefoneb_loss(
    graphdef: nnx.GraphDef, mesh: Mesh, num_microbatches: int, params: nnx.State, batch: Batch
) -> jax.Array:
    return _run(nnx.merge(graphdef, params), batch, mesh, num_microbatches, "gpipe")


def _onefoneb_fwd(
    graphdef: nnx.GraphDef, mesh: Mesh, num_microbatches: int, params: nnx.State, batch: Batch
) -> tuple[jax.Array, nnx.State]:
    model = nnx.merge(graphdef, params)
    loss, g_blocks, g_shared = _run(model, batch, mesh, num_microbatches, "1f1b")
    return loss, _merge_grads(model, g_blocks, g_shared)


def _onefoneb_bwd(
    graphdef: nnx.GraphDef, mesh: Mesh, num_microbatches: int, grads: nnx.State, ct: jax.Array
) -> tuple[nnx.State, None]:
    return jax.tree.map(lambda g: (g * ct).astype(g.dtype), grads), None  # the batch: no grad


_onefoneb_loss.defvjp(_onefoneb_fwd, _onefoneb_bwd)


def make_loss_fn(
    *,
    mesh: Mesh,
    num_microbatches: int,
    schedule: ScheduleName = "1f1b",
) -> Callable[[nnx.Module, Batch], jax.Array]:
    """A ``loss_fn(model, batch)`` for :func:`jmp.train.make_step` that runs the pipeline.

    Example:
        >>> loss_fn = make_loss_fn(mesh=jmp.make_mesh("stage=2,data=4"), num_microbatches=4)
        >>> make_loss_fn(mesh=mesh, num_microbatches=4, schedule="zb")
        Traceback (most recent call last):
        jmp.errors.ConfigError: schedule='zb' must be one of ('gpipe', '1f1b').
    """
    make_schedule(schedule, 1, num_microbatches)  # fail now, not at the first step

    def loss_fn(model: nnx.Module, batch: Batch, /) -> jax.Array:
        return pipeline_loss(
            model,
            batch,
            mesh=mesh,
            num_microbatches=num_microbatches,
            schedule=schedule,
        )

    return loss_fn
