"""A vocabulary-parallel embedding: the table's rows split over the tensor axis.

Example:
    >>> embed = ParallelEmbed(64, 16, rngs=nnx.Rngs(0))
    >>> embed(jax.numpy.zeros((2, 5), jax.numpy.int32)).shape
    (2, 5, 16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jmp.context import constrain, param_axis
from jmp.layers.base import (
    Initializer,
    Mode,
    activation_names,
    check_mode,
    default_embedding_init,
    named_param,
    residual_names,
)
from jmp.layers.linear import explicit_collectives, sequence_split
from jmp.rules import MeshAxes, axes_tuple


class ParallelEmbed(nnx.Module):
    """Token embedding with the vocabulary split over the tensor axis.

    Each device looks up the ids that fall in its slice of the vocabulary (zeros elsewhere) and
    one psum joins the slices: the table is never gathered.

    Example:
        >>> embed = ParallelEmbed(256, 64, rngs=nnx.Rngs(0)); embed(jnp.array([[1, 2]])).shape
        (1, 2, 64)
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        mode: Mode = "auto",
        names: tuple[str, str] = ("vocab", "embed"),
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        embedding_init: Initializer = default_embedding_init,
        rngs: nnx.Rngs,
    ) -> None:
        check_mode(mode)
        self.num_embeddings, self.features = num_embeddings, features
        self.mode: Mode = mode
        self.names = names
        self.dtype = dtype
        self.embedding = named_param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype), names
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...].astype(self.dtype or self.embedding[...].dtype)
        axis = param_axis(self.names[0])
        if axis is None:
            y = jnp.take(table, ids, axis=0)
        elif not explicit_collectives(self.mode, axis):
            # A one-hot contraction over the split vocabulary is a row-parallel product: the
            # partitioner computes local partial sums and all-reduces them (no table gather).
            one_hot = jax.nn.one_hot(ids, self.num_embeddings, dtype=table.dtype)
            y = jnp.tensordot(
                constrain(one_hot, activation_names(one_hot.ndim, self.names[0])), table, 1
            )
        else:
            y = _manual_lookup(ids, table, axis)
        return constrain(y, residual_names(y.ndim, self.names[1]))


def _manual_lookup(ids: jax.Array, table: jax.Array, axis: MeshAxes) -> jax.Array:
    axes = axes_tuple(axis)
    # under sequence parallelism the rows' sum is a reduce-scatter over the sequence, in a
    # region manual over the batch axes too (see sequence_split)
    split = sequence_split(ids, 0, axis)
    scatter = split is not None
    batch = None if split is None else split.batch

    def block(ids_: jax.Array, table_i: jax.Array) -> jax.Array:
        start = jax.lax.axis_index(axes) * table_i.shape[0]
        # one_hot of an id outside this slice is a zero row: ids held elsewhere contribute 0.
        # A contraction (not a gather) also keeps the backward a local matmul, no scatter.
        one_hot = jax.nn.one_hot(ids_ - start, table_i.shape[0], dtype=table_i.dtype)
        rows = jnp.tensordot(one_hot, table_i, 1)
        if scatter:
            return jax.lax.psum_scatter(rows, axes, scatter_dimension=1, tiled=True)
        return jax.lax.psum(rows, axes)

    # Gather the table's other splits (FSDP's 'embed' over 'data') before the manual region:
    # left to the partitioner, it gathers the far larger one-hot activations instead.
    table = jax.lax.with_sharding_constraint(table, P(axis))
    return jax.shard_map(
        block,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(batch), P(axis)),
        out_specs=P(batch, axis) if scatter else P(),
        axis_names=set(axes) | set(axes_tuple(batch)),
    )(ids, table)
