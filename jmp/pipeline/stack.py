"""A stack of identical blocks laid out for pipelining: parameters ``(stage, layers, ...)``.

Any model is pipelinable (by :mod:`jmp.pipeline.run`) when it has

- ``blocks``: one block module whose every parameter is stacked with two leading dims
  ``(num_stages, layers_per_stage)`` named ``('stage', 'layers')``, as :func:`stack_blocks`
  builds it from the user's own block class;
- ``embed_inputs(batch) -> x``: what the first stage feeds the blocks (one array, e.g.
  ``(rows, seq, d_model)``), from a microbatch (the batch's pytree, fewer rows);
- ``head_loss(x, batch) -> scalar``: the last stage's mean loss of the blocks' output;
- optionally ``remat``: a policy of :mod:`jmp.layers.remat` (``True``: recompute each block
  in the backward).

That is the :class:`Pipelinable` protocol. The ``'stage'`` rule (strategies ``pp_*``) shards
the blocks over the mesh's stage axis, so each stage holds only its own blocks; everything else
is replicated over ``'stage'``. Each block is called as ``block(x) -> x`` (same shape).

Example:
    >>> class Block(nnx.Module):
    ...     def __init__(self, rngs):
    ...         init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    ...         self.up = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)
    ...     def __call__(self, x):
    ...         return x + self.up(x).sum(-1, keepdims=True)
    >>> class Stack(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.blocks = stack_blocks(Block, num_layers=6, num_stages=2, rngs=rngs)
    >>> pp_mesh = jmp.make_mesh("stage=2,data=4")
    >>> blocks = jmp.shard_init(Stack, pp_mesh, jmp.rules.preset("pp_dp", pp_mesh)).blocks
    >>> blocks.up.kernel.shape, blocks.up.kernel.get_metadata()["out_sharding"]
    ((2, 3, 8, 16), ('stage', 'layers', 'embed', 'mlp'))
    >>> run_stack(blocks, jnp.ones((4, 8))).shape       # all six blocks in order
    (4, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from jmp import strategies
from jmp.errors import ConfigError
from jmp.layers.remat import Remat, checkpointed

#: The mesh axis (and logical axis name) the stages are split over.
STAGE = strategies.STAGE_AXIS


@runtime_checkable
class Pipelinable(Protocol):
    """What :mod:`jmp.pipeline.run` needs of a model (see the module docstring)."""

    blocks: nnx.Module

    def embed_inputs(self, batch: Any, /) -> jax.Array: ...

    def head_loss(self, x: jax.Array, batch: Any, /) -> jax.Array: ...


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layers(num_layers: int, num_stages: int) -> list[str]:
    """Problems (empty if none) with splitting ``num_layers`` blocks into ``num_stages``."""
    n = num_layers
    if not isinstance(num_stages, int) or num_stages < 1:
        return [f"num_stages={num_stages!r} must be a positive int"]
    if num_stages > n:
        return [
            f"{num_stages} stages exceed n_layers={n} (every stage needs a block). Fix: use "
            f"a 'stage' mesh axis of size in {divisors(n)}"
        ]
    if n % num_stages:
        # Why not run the uneven (balanced) split: the stages run in lockstep, one SPMD
        # program, with each stage's blocks one stacked array of one shape. Uneven counts
        # would pad every stage to the largest count and run the padding too, so a tick would
        # take as long as on the padded uniform split: nothing gained over ceil(n/S) each.
        return [
            f"n_layers={n} is not divisible by the {num_stages} stages (the 'stage' mesh axis "
            f"size): the stages run in lockstep and hold their blocks as one stacked array, so "
            f"every stage needs the same block count (an uneven split would run padding blocks "
            f"and be no faster). Fix: use a 'stage' axis of size in {divisors(n)}, or n_layers "
            f"a multiple of {num_stages} (e.g. {n + (-n) % num_stages})"
        ]
    return []


def stack_states(states: list[nnx.State], num_stages: int, /) -> nnx.State:
    """Blocks' states -> one state with leaves ``(stage, layers, ...)`` named accordingly.

    Block i lands at ``(i // L, i % L)`` with ``L = len(states) // num_stages``.
    """
    problems = check_layers(len(states), num_stages)
    if problems:
        raise ConfigError("Cannot stack the blocks: " + "; ".join(problems) + ".")

    def stack(*vs: nnx.Variable) -> nnx.Variable:
        value = jnp.stack([v.get_value() for v in vs])
        value = value.reshape(num_stages, len(vs) // num_stages, *value.shape[1:])
        names = tuple(vs[0].get_metadata().get("out_sharding") or (None,) * (value.ndim - 2))
        return vs[0].replace(value, out_sharding=(STAGE, "layers") + names)

    return jax.tree.map(stack, *states, is_leaf=_is_var)


def unstack_states(state: nnx.State, /) -> list[nnx.State]:
    """The inverse of :func:`stack_states`: one state per block, in order."""
    leaves = jax.tree.leaves(state, is_leaf=_is_var)
    stages, per = leaves[0].get_value().shape[:2]

    def one(v: nnx.Variable, i: int) -> nnx.Variable:
        names = tuple(v.get_metadata()["out_sharding"])[2:]
        return v.replace(v.get_value()[i // per, i % per], out_sharding=names)

    return [
        jax.tree.map(lambda v, i=i: one(v, i), state, is_leaf=_is_var) for i in range(stages * per)
    ]


def stack_blocks(
    make_block: Callable[[nnx.Rngs], nnx.Module],
    /,
    *,
    num_layers: int,
    num_stages: int,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """``num_layers`` blocks ``make_block(rngs)``, stacked ``(stage, layers, ...)``.

    The blocks are created one after another from ``rngs`` (the same values as a plain list of
    blocks built in order), then stacked; each parameter keeps its logical names after
    ``('stage', 'layers')``. Call it inside the model's ``__init__`` (under
    :func:`jmp.shard_init` the stacked parameters are born sharded).
    """
    problems = check_layers(num_layers, num_stages)
    if problems:
        raise ConfigError("Cannot stack the blocks: " + "; ".join(problems) + ".")
    blocks = [make_block(rngs) for _ in range(num_layers)]
    graphdef = nnx.graphdef(blocks[0])
    return nnx.merge(graphdef, stack_states([nnx.state(b) for b in blocks], num_stages))


def is_stacked(model: Any, /) -> bool:
    """Whether ``model`` is :class:`Pipelinable` with ``blocks`` stacked by :func:`stack_blocks`."""
    if not isinstance(model, Pipelinable) or not isinstance(model.blocks, nnx.Module):
        return False
    variables = jax.tree.leaves(nnx.state(model.blocks, nnx.Param), is_leaf=_is_var)
    return bool(variables) and all(
        tuple(v.get_metadata().get("out_sharding") or ())[:2] == (STAGE, "layers")
        for v in variables
    )


def num_stages_of(blocks: nnx.Module, /) -> int:
    """The leading (stage) dim of a stacked block."""
    leaves = jax.tree.leaves(nnx.state(blocks))
    if not leaves:
        raise ConfigError("The model's `blocks` hold no parameters to pipeline.")
    return int(leaves[0].shape[0])


def run_blocks(
    graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, /, *, remat: Remat = False
) -> jax.Array:
    """Apply blocks whose parameters are stacked on a leading ``layers`` dim, in order;
    ``remat`` is a policy of :mod:`jmp.layers.remat`."""

    def one(layer: nnx.State, h: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, layer)(h)

    one = checkpointed(one, remat)
    return jax.lax.scan(lambda h, layer: (one(layer, h), None), x, state)[0]


def run_stack(blocks: nnx.Module, x: jax.Array, /, *, remat: Remat = False) -> jax.Array:
    """Every block of a :func:`stack_blocks` stack in order on one program (no pipeline).

    The reference a pipeline is tested against, and how a pipelinable model's ``__call__``
    runs outside the pipeline.
    """
    graphdef, state = nnx.split(blocks)
    for s in range(num_stages_of(blocks)):
        x = run_blocks(graphdef, jax.tree.map(lambda a, s=s: a[s], state), x, remat=remat)
    return x
