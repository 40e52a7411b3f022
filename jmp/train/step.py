"""The compiled train step: one ``jax.jit`` (what pjit became) over (state, batch).

``make_step`` splits an NNX model into a pure function, gives the jit explicit
``in_shardings``/``out_shardings`` (parameters and optimizer state sharded alike) and donates the
state, so it compiles once and updates in place. Gradient accumulation over microbatches runs
inside the step with ``lax.scan``.

Example:
    >>> step = make_step(model, make_optimizer(TrainConfig()), mesh, rules)
    >>> state = step.init_state()
    >>> state, metrics = step(state, batch)
    >>> sorted(metrics), int(state.step)
    (['grad_norm', 'loss'], 1)

``model`` may also be abstract (``nnx.eval_shape``): ``step.lower(step.abstract_state(),
step.abstract_batch(b, s))`` then compiles a 7B model's step for inspection without allocating.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jmp.context import activate
from jmp.errors import ConfigError
from jmp.layers.context_parallel import context_axis_of
from jmp.layers.moe import MoE
from jmp.rules import Rules, axes_tuple
from jmp.rules import check_batch as check_batch  # re-exported: jmp.train.check_batch
from jmp.sharding import named_shardings
from jmp.train.clipping import clip_by_global_norm
from jmp.train.data import batch_sharding
from jmp.train.loss import COUNT_METRICS, Batch, LossFn, split_loss
from jmp.train.loss import next_token_loss as next_token_loss  # re-exported: its home is loss.py


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings; validated on creation.

    The default optimizer is AdamW with linear warmup, cosine decay to ``lr * min_lr_ratio``,
    and global-norm gradient clipping.
    """

    steps: int = 300
    batch_size: int = 16
    microbatches: int = 1
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4

    def __post_init__(self) -> None:
        floats = ("lr", "min_lr_ratio", "weight_decay", "clip_norm")
        # inf and nan pass comparisons like `lr > 0` (or fail them with a misleading message)
        nonfinite = [
            f"{n}={getattr(self, n)!r} must be a finite number"
            for n in floats
            if not isinstance(getattr(self, n), (int, float)) or not math.isfinite(getattr(self, n))
        ]
        if nonfinite:
            raise ConfigError("Invalid TrainConfig: " + "; ".join(nonfinite) + ".")
        problems = [
            f"{n}={getattr(self, n)!r} must be a positive int"
            for n in ("steps", "batch_size", "microbatches", "eval_every", "eval_batches")
            if not isinstance(getattr(self, n), int) or getattr(self, n) < 1
        ]
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            problems.append(f"seed={self.seed!r} must be an int in [0, 2**32)")
        if not self.lr > 0:
            problems.append(f"lr={self.lr!r} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        for name in ("warmup_steps", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.clip_norm <= 0:
            problems.append(f"clip_norm={self.clip_norm!r} must be > 0")
        if not problems and self.batch_size % self.microbatches:
            problems.append(
                f"microbatches={self.microbatches} must divide batch_size={self.batch_size}"
            )
        if problems:
            raise ConfigError("Invalid TrainConfig: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_schedule(cfg: TrainConfig, /) -> optax.Schedule:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(warmup, 1), max(cfg.steps, 2), end_value=cfg.lr * cfg.min_lr_ratio
    )


def make_optimizer(cfg: TrainConfig, /) -> optax.GradientTransformation:
    """Global-norm clipping (by the step's own norm: :mod:`jmp.train.clipping`), then AdamW on
    :func:`lr_schedule`."""
    return optax.chain(
        clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr_schedule(cfg), b1=0.9, b2=0.95, weight_decay=cfg.weight_decay),
    )


class TrainState(NamedTuple):
    """Everything a step reads and writes: a pytree of (sharded) arrays."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


class Step:
    """A compiled train step bound to a mesh: call it on (state, batch).

    Attributes:
        jitted: the ``jax.jit`` function (``.lower(state, batch)`` for inspection).
        state_shardings: shardings of :class:`TrainState`, the jit's in and out shardings.
    """

    def __init__(
        self,
        jitted: Any,
        mesh: Mesh,
        init_state: Callable[[], TrainState],
        abstract_state: Callable[[], TrainState],
        state_shardings: TrainState,
        batch_sharding: NamedSharding,
        forward: Callable[[nnx.State, Batch], jax.Array],
    ) -> None:
        self.jitted, self.mesh = jitted, mesh
        self.init_state, self.abstract_state = init_state, abstract_state
        self.state_shardings, self.batch_sharding = state_shardings, batch_sharding
        self.forward = forward  # the loss of (params, batch), no gradient: for model_flops

    def model_flops(self, batch: Batch, /) -> float:
        """Model FLOPs of one step on ``batch`` (:func:`jmp.train.speed.model_flops`)."""
        from jmp.train.speed import model_flops

        params = self.abstract_state().params
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), batch)
        with jax.set_mesh(self.mesh):
            return model_flops(self.forward, params, abstract)

    def abstract_batch(
        self,
        batch_size: int,
        seq_len: int,
    ) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of a token batch, for :meth:`lower` without data."""
        spec = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=self.batch_sharding)
        return spec, spec

    def abstract_batch_like(self, batch: Batch, /) -> Batch:
        """Shapes and dtypes of ``batch`` (arrays or ``ShapeDtypeStruct``) with the batch sharding.

        Example:
            >>> step = make_step(model, make_optimizer(TrainConfig()), mesh, rules)
            >>> b = step.abstract_batch_like({"image": np.zeros((8, 32, 32, 3), np.float32),
            ...                               "label": np.zeros((8,), np.int32)})
            >>> b["label"].shape, b["label"].sharding.spec
            ((8,), P('data',))
        """
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.batch_sharding), batch
        )

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh):  # manual layers read the mesh from context at trace time
            return self.jitted(state, batch)

    def lower(self, state: TrainState, batch: Batch) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(state, batch)


def fold_keys(keys: nnx.State, index: jax.Array | int, /) -> nnx.State:
    """The model's random keys (its ``nnx.RngState``: dropout and the like) for step ``index``.

    A functional step cannot advance the model's ``Rngs`` (the update would be lost), so each
    step folds its index into the keys the model was built with: the random draws are a pure
    function of (seed, step), as the batches are, and a resumed run draws the same ones.

    Example:
        >>> keys = nnx.state(nnx.Dropout(0.5, rngs=nnx.Rngs(0)), nnx.RngState)
        >>> key_of = lambda state: nnx.split_state(state, nnx.RngKey, ...)[0]
        >>> a, b = (jax.tree.leaves(key_of(fold_keys(keys, i)))[0] for i in (1, 2))
        >>> bool((jax.random.key_data(a) != jax.random.key_data(b)).any())
        True
    """

    def fold(x: jax.Array) -> jax.Array:
        is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        return jax.random.fold_in(x, index) if is_key else x  # RngCount: as it is

    return jax.tree.map(fold, keys)


def _accumulate(
    grad_fn: Callable,
    params: nnx.State,
    batch: Batch,
    microbatches: int,
    rngs: nnx.State,
    *,
    varying: tuple[str, ...] = (),
) -> tuple[tuple[jax.Array, dict], nnx.State]:
    """Mean loss, metrics and gradients over ``microbatches`` slices of the batch (a
    ``lax.scan``); ``grad_fn`` returns ``((loss, metrics), grads)``. The counts
    (:data:`~jmp.train.loss.COUNT_METRICS`) are summed instead: totals over the batch."""
    if microbatches == 1:
        return grad_fn(params, batch, rngs)
    # Strided: microbatch i takes rows i, i+m, i+2m...: every data shard contributes its own
    # rows to every microbatch, so no activation moves between devices (a contiguous split
    # would put each microbatch on only some devices).
    split = jax.tree.map(lambda a: a.reshape(-1, microbatches, *a.shape[1:]).swapaxes(0, 1), batch)

    def body(carry: tuple, micro: tuple[Batch, jax.Array]) -> tuple[tuple, None]:
        rows, i = micro
        out, grads = grad_fn(params, rows, fold_keys(rngs, i))  # other draws per microbatch
        return jax.tree.map(jnp.add, carry, (out, grads)), None

    # the sums start at zero, the loss and metrics in the shapes of one microbatch's
    first = jax.tree.map(lambda a: a[0], split)
    shapes = jax.eval_shape(lambda *a: grad_fn(*a)[0], params, first, rngs)
    out = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    if varying:  # inside _accumulate_once's shard_map each device sums its own results
        out = jax.lax.pcast(out, varying, to="varying")
    zeros = (out, jax.tree.map(jnp.zeros_like, params))
    ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, (split, jnp.arange(microbatches)))
    metrics = {k: v if k in COUNT_METRICS else v / microbatches for k, v in metrics.items()}
    mean = jax.tree.map(lambda a: a / microbatches, (loss, grads))
    return (mean[0], metrics), mean[1]


def reduce_once_axes(mesh: Mesh, rules: Rules, param_shardings: Any, /) -> tuple[str, ...]:
    """The batch's mesh axes that split no parameter: pure data parallelism.

    Over these, gradient accumulation can sum each device's gradients locally and reduce them
    once per step (:func:`_accumulate_once`) instead of once per microbatch. Axes that also
    split parameters (FSDP's) keep the reduction per microbatch: the parameters are gathered
    per microbatch there anyway.
    """
    spec = rules.activation_spec(("batch",), mesh=mesh)
    batch_axes = [a for a in axes_tuple(spec[0] if spec else None) if mesh.shape[a] > 1]
    used = {
        a
        for sharding in jax.tree.leaves(param_shardings)
        for entry in sharding.spec
        for a in axes_tuple(entry)
    }
    return tuple(a for a in batch_axes if a not in used)


def _nests_a_region(model: nnx.Module, mesh: Mesh, rules: Rules, once: tuple[str, ...]) -> bool:
    """Whether the model would run a ``shard_map`` of its own inside :func:`_accumulate_once`'s
    that jax 0.10.2 cannot differentiate there, so the step reduces its gradients per
    microbatch: a context-parallel region ('Expected cotangent type float32[...]{V:data}'),
    sequence parallelism's layers (Shardy: 'must have all manual axes come before free axes'),
    or a MoE layer's dispatch over the batch axes not yet manual (Shardy: 'operates on axis
    "data" which is already bound by a parent sdy.manual_computation')."""
    if context_axis_of(rules, mesh.shape) is not None:
        return True
    seq = axes_tuple(rules.activations_dict["seq"])
    if any(mesh.shape[a] > 1 and a in rules.param_axes for a in seq):
        return True  # sequence parallelism: the sequence split over a parameter's axis
    spec = rules.activation_spec(("batch",), mesh=mesh)
    axes = axes_tuple(spec[0] if spec else None)
    if not any(mesh.shape[a] > 1 and a not in once for a in axes):
        return False  # inside the region the tokens are whole per device: no nested shard_map
    return any(isinstance(m, MoE) for _, m in nnx.iter_modules(model))


def _accumulate_once(
    grad_fn: Callable,
    params: nnx.State,
    batch: Batch,
    microbatches: int,
    rngs: nnx.State,
    mesh: Mesh,
    axes: tuple[str, ...],
) -> tuple[tuple[jax.Array, dict], nnx.State]:
    """:func:`_accumulate`, manual over the pure data axes: one gradient mean per step.

    Left to the partitioner, each microbatch's gradients are all-reduced over the data axes
    inside the loop (m times the bytes). Here each device accumulates the gradients of its own
    rows and one ``pmean`` joins them; other axes (the tensor axis) stay with the compiler.
    Every device holds the same number of rows, so the mean of means is the global mean; the
    counts (:data:`~jmp.train.loss.COUNT_METRICS`), each device's over its own rows, are summed.
    """

    def local(params: nnx.State, rows: Batch, rngs: nnx.State) -> tuple[tuple, nnx.State]:
        # differentiated as a per-device value: the gradient of a replicated (invariant) input
        # would be psummed by shard_map's autodiff in every microbatch
        params = jax.lax.pcast(params, axes, to="varying")
        (loss, metrics), grads = _accumulate(
            grad_fn, params, rows, microbatches, rngs, varying=axes
        )
        metrics = {
            k: jax.lax.psum(v, axes) if k in COUNT_METRICS else jax.lax.pmean(v, axes)
            for k, v in metrics.items()
        }
        return (jax.lax.pmean(loss, axes), metrics), jax.lax.pmean(grads, axes)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(axes), P()),
        out_specs=(P(), P()),
        axis_names=set(axes),
    )(params, batch, rngs)


def make_step(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
    /,
    *,
    microbatches: int = 1,
    loss_fn: LossFn = next_token_loss,
    schedule: optax.Schedule | None = None,
) -> Step:
    """Compile-once train step for ``model`` (already sharded, e.g. by :func:`jmp.shard_init`).

    Returns a :class:`Step`; ``step.init_state()`` builds the initial :class:`TrainState` from
    the model's current parameters, with optimizer state sharded like the parameters.
    Metrics: ``loss``, ``grad_norm``, (if ``schedule`` is given) ``lr``, and those the loss
    function returns with its loss (see :data:`LossFn`): means over the microbatches, except
    the counts such as ``moe_dropped``, totals over the step's batch (as with one microbatch).
    An update whose loss or gradient norm is not finite is not applied (parameters and
    optimizer state stay).
    Random draws (dropout) use the model's keys folded with the step (:func:`fold_keys`).
    """
    optimizer = optax.with_extra_args_support(optimizer)  # takes grad_norm=, may ignore it
    graphdef, params, rngs, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    param_shardings = named_shardings(params, rules, mesh)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    # TrainState's pytree shape holding shardings, not arrays: the step's sharding is no Array
    state_shardings = TrainState(cast(Any, replicated), param_shardings, opt_shardings)
    data_sharding = batch_sharding(mesh, rules)
    # accumulate locally, reduce once: only with microbatches, and not with random draws
    # (inside the manual region every device would draw the same dropout mask)
    once = (
        reduce_once_axes(mesh, rules, param_shardings)
        if microbatches > 1 and not jax.tree.leaves(rngs)
        else ()
    )
    if once and _nests_a_region(model, mesh, rules, once):
        once = ()

    def loss_of(params: nnx.State, batch: Batch, rngs: nnx.State) -> tuple[jax.Array, dict]:
        # fresh variables at this trace level: drawing a key advances its RngCount in place,
        # which flax allows only for variables made in the current trace (the update is
        # dropped: the next step's keys come from fold_keys, not from the count)
        rngs = jax.tree.map(lambda x: x, rngs)
        return split_loss(loss_fn(nnx.merge(graphdef, params, rngs, rest), batch))

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        with activate(mesh, rules):
            rngs_now = fold_keys(rngs, state.step)
            if once:
                (loss, extra), grads = _accumulate_once(
                    grad_fn, state.params, batch, microbatches, rngs_now, mesh, once
                )
            else:
                (loss, extra), grads = _accumulate(
                    grad_fn, state.params, batch, microbatches, rngs_now
                )
            # one global norm for the metric, the guard and jmp's clipping (an extra argument
            # the other transformations ignore): each split array's norm is all-reduced once
            grad_norm = optax.tree.norm(grads)

        def update() -> tuple[Any, Any]:  # (parameters, optimizer state)
            updates, opt_state = optimizer.update(
                grads, state.opt_state, state.params, grad_norm=grad_norm
            )
            return optax.apply_updates(state.params, updates), opt_state

        # A NaN/inf update is never applied: the state passes through unchanged (the loop
        # then stops or skips). Done here because the input state was donated. The update is
        # computed inside a cond: an elementwise select over the whole state kept XLA from
        # updating the donated buffers in place (+17% step time on the medium workload), and
        # a cond choosing between the updated and the old state still cost +3-5%.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.lax.cond(finite, update, lambda: (state.params, state.opt_state))
        metrics: dict[str, ArrayLike] = {"loss": loss, "grad_norm": grad_norm, **extra}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(state.step + 1, params, opt_state), metrics

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, data_sharding),  # a prefix: every leaf of the batch
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )

    def fresh(params: nnx.State) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    def init_state() -> TrainState:
        return jax.jit(fresh, out_shardings=state_shardings)(nnx.state(model, nnx.Param))

    def abstract_state() -> TrainState:
        """Shapes, dtypes and shardings of the state; allocates nothing (also for big models)."""
        shapes = jax.eval_shape(fresh, params)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_shardings
        )

    def forward(params: nnx.State, batch: Batch) -> jax.Array:
        with activate(mesh, rules):
            return loss_of(params, batch, rngs)[0]

    return Step(jitted, mesh, init_state, abstract_state, state_shardings, data_sharding, forward)


def make_eval_step(
    model: nnx.Module, mesh: Mesh, rules: Rules, /, *, loss_fn: LossFn = next_token_loss
) -> Callable[[nnx.State, Batch], jax.Array]:
    """Compiled loss of (params, batch), for validation, in eval mode (``Module.eval()``: no
    dropout)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_shardings = named_shardings(params, rules, mesh)
    data_sharding = batch_sharding(mesh, rules)

    def evaluate(params: nnx.State, batch: Batch) -> jax.Array:
        with activate(mesh, rules):
            evaluated = nnx.merge(graphdef, params, rest)
            evaluated.eval()  # deterministic: no dropout (Module.eval sets `deterministic`)
            return split_loss(loss_fn(evaluated, batch))[0]

    jitted = jax.jit(
        evaluate,
        in_shardings=(param_shardings, data_sharding),
        out_shardings=NamedSharding(mesh, P()),
    )

    def run(params: nnx.State, batch: Batch) -> jax.Array:
        with jax.set_mesh(mesh):
            return jitted(params, batch)

    return run


_M = TypeVar("_M", bound=nnx.Module)


def merge_params(model: _M, params: nnx.State, /) -> _M:
    """The model with its parameters replaced by ``params`` (e.g. after training)."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, params, rest)
