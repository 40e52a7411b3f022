"""Row- and column-parallel linear layers: **y = sum_i W_i x_i + b** and its column twin.

Example:
    >>> layer = RowParallelLinear(32, 16, rngs=nnx.Rngs(0))
    >>> layer(jax.numpy.ones((2, 32))).shape
    (2, 16)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jmp.context import (
    batch_axes,
    check_sequence_split,
    constrain,
    current_mesh_shape,
    param_axis,
    sequence_parallel,
)
from jmp.errors import ConfigError
from jmp.layers.base import (
    Initializer,
    Mode,
    activation_names,
    check_mode,
    default_kernel_init,
    named_param,
    residual_names,
)
from jmp.rules import MeshAxes, axes_tuple


class SequenceSplit(NamedTuple):
    """How sequence parallelism splits a ``(batch, seq, ..., features)`` operand."""

    batch: MeshAxes  # the batch's mesh axes, manual in the region too
    ways: int  # the tensor axis's size: the sequence's chunks


def explicit_collectives(mode: Mode, axis: MeshAxes) -> bool:
    """Whether a layer split over ``axis`` writes its collectives in a ``shard_map``: in the
    manual modes, and under sequence parallelism in every mode (given only the annotations,
    XLA:CPU's partitioner all-reduces and slices where a reduce-scatter belongs)."""
    return axis is not None and (mode != "auto" or sequence_parallel(axis))


def sequence_split(x: jax.Array, n_contract: int, axis: MeshAxes) -> SequenceSplit | None:
    """Under sequence parallelism, how ``x``'s sequence (dim 1) is split over ``axis``; else
    None.

    The region is then manual over the batch axes too: in a region manual over 'model' only,
    XLA's partitioner gathers the whole batch around every sequence all-gather/reduce-scatter.
    """
    if x.ndim - n_contract < 2 or not sequence_parallel(axis):
        return None
    check_sequence_split(x.shape[1], axis)
    return SequenceSplit(batch_axes(), math.prod(current_mesh_shape()[a] for a in axes_tuple(axis)))


def _ring(mode: Mode, axes: tuple[str, ...]) -> bool:
    """Whether to write a sequence collective as a collective matmul (one axis: a ring)."""
    return mode == "collective" and len(axes) == 1


def _varying_once(w: jax.Array, batch: MeshAxes) -> jax.Array:
    """``w`` marked as varying over the region's batch axes once.

    Each product with a batch-split operand would otherwise mark it anew, and each mark's
    transpose is its own all-reduce of the weight's gradient over the batch axes: one per
    ring step instead of one per matmul.
    """
    axes = axes_tuple(batch)
    return jax.lax.pcast(w, axes, to="varying") if axes else w


def _gather_then_matmul(
    x_i: jax.Array, w_i: jax.Array, n_contract: int, axis: str, split: SequenceSplit
) -> jax.Array:
    """``tensordot(all_gather(x_i, seq), w_i)`` as a collective matmul: ``ways`` products of
    the sequence chunk in hand while the next one travels one step around the ring (``ways -
    1`` collective-permutes), the results put back in sequence order."""
    here, ways = jax.lax.axis_index(axis), split.ways
    w_i = _varying_once(w_i, split.batch)
    from_next = [(j, (j - 1) % ways) for j in range(ways)]
    chunk, outs = x_i, []
    for step in range(ways):  # at this step the chunk in hand is chunk (here + step) % ways
        # the next chunk is sent for before this one's product: the two can overlap
        incoming = jax.lax.ppermute(chunk, axis, from_next) if step < ways - 1 else chunk
        outs.append(jnp.tensordot(chunk, w_i, n_contract))
        chunk = incoming
    # slot k holds chunk (here + k) % ways: rolling by `here` puts chunk c in slot c
    y = jnp.roll(jnp.stack(outs, axis=1), here, axis=1)
    return y.reshape(y.shape[0], -1, *y.shape[3:])


def _matmul_then_scatter(
    x_i: jax.Array, w_i: jax.Array, n_contract: int, axis: str, split: SequenceSplit
) -> jax.Array:
    """``psum_scatter(tensordot(x_i, w_i), seq)`` as a collective matmul: a running sum travels
    around the ring (``ways - 1`` collective-permutes); each device adds its partial product
    of the chunk the sum is for, the next product computed while the sum travels. After the
    last step device i holds the whole sum of sequence chunk i."""
    here, ways = jax.lax.axis_index(axis), split.ways
    w_i = _varying_once(w_i, split.batch)
    to_next = [(j, (j + 1) % ways) for j in range(ways)]
    chunks = x_i.reshape(x_i.shape[0], ways, -1, *x_i.shape[2:])
    total = None
    for step in range(ways):  # the sum arriving at this step is for chunk here - 1 - step
        chunk = jax.lax.dynamic_index_in_dim(chunks, (here + ways - 1 - step) % ways, 1, False)
        part = jnp.tensordot(chunk, w_i, n_contract)
        total = part if total is None else total + part
        if step < ways - 1:
            total = jax.lax.ppermute(total, axis, to_next)
    assert total is not None
    return total


def row_parallel_matmul(
    x: jax.Array, w: jax.Array, /, *, n_contract: int, axis: MeshAxes, mode: Mode
) -> jax.Array:
    """Contract the last ``n_contract`` dims of ``x`` with the first of ``w``, split over ``axis``.

    The first contracted dim is split over ``axis``; the partial products are summed with one
    all-reduce (``psum``) over it, so the result is whole on every device of that axis. Under
    sequence parallelism (``sp``) the sum is a reduce-scatter (``psum_scatter``) over the
    sequence instead: the same sum, each device keeping its slice of the sequence (with
    ``mode='collective'``, a collective matmul), written out in every mode
    (:func:`explicit_collectives`).
    """
    if not explicit_collectives(mode, axis):
        return jnp.tensordot(x, w, n_contract)
    lead = x.ndim - n_contract
    x_spec = P(*(None,) * lead, axis)
    w_spec = P(axis)
    axes = axes_tuple(axis)
    split = sequence_split(x, n_contract, axis)

    def block(x_i: jax.Array, w_i: jax.Array) -> jax.Array:
        if split is None:
            return jax.lax.psum(jnp.tensordot(x_i, w_i, n_contract), axes)
        if _ring(mode, axes):
            return _matmul_then_scatter(x_i, w_i, n_contract, axes[0], split)
        partial = jnp.tensordot(x_i, w_i, n_contract)
        return jax.lax.psum_scatter(partial, axes, scatter_dimension=1, tiled=True)

    out_spec, names = P(), set(axes)
    if split is not None:  # x's sequence is whole, its batch split: P(batch, None, ..., axis)
        x_spec = P(split.batch, *x_spec[1:])
        out_spec = P(split.batch, axis)
        names |= set(axes_tuple(split.batch))
    return jax.shard_map(
        block,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(x_spec, w_spec),
        out_specs=out_spec,
        axis_names=names,
    )(x, w)


def column_parallel_matmul(
    x: jax.Array,
    w: jax.Array,
    /,
    *,
    n_contract: int,
    axis: MeshAxes,
    mode: Mode,
    split_dim: int | None = None,
) -> jax.Array:
    """Contract like :func:`row_parallel_matmul`, with an output dim of ``w`` split instead.

    Each device computes its block of output features: no communication in the forward pass
    (the backward pass sums the input's gradient over ``axis``: one all-reduce). Under sequence
    parallelism (``sp``) the input arrives split over the sequence and is all-gathered first
    (its gradient's sum is then a reduce-scatter); with ``mode='collective'`` the gather and
    the product are one collective matmul.

    Args:
        split_dim: the dim of ``w`` split over ``axis`` (default: its first output dim).
    """
    if not explicit_collectives(mode, axis):
        return jnp.tensordot(x, w, n_contract)
    split_dim = n_contract if split_dim is None else split_dim
    w_spec = P(*(None,) * split_dim, axis)
    y_spec = P(*(None,) * (x.ndim - n_contract + split_dim - n_contract), axis)
    axes = axes_tuple(axis)
    split = sequence_split(x, n_contract, axis)

    def block(x_: jax.Array, w_i: jax.Array) -> jax.Array:
        if split is not None and _ring(mode, axes):
            return _gather_then_matmul(x_, w_i, n_contract, axes[0], split)
        if split is not None:
            x_ = jax.lax.all_gather(x_, axes, axis=1, tiled=True)
        return jnp.tensordot(x_, w_i, n_contract)

    x_spec, names = P(), set(axes)
    if split is not None:  # x arrives split over its batch and sequence
        x_spec = P(split.batch, axis)
        y_spec = P(split.batch, *y_spec[1:])
        names |= set(axes_tuple(split.batch))
    return jax.shard_map(
        block,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(x_spec, w_spec),
        out_specs=y_spec,
        axis_names=names,
    )(x, w)


class _Linear(nnx.Module):
    """Shared state of the two parallel linears: kernel ``(in, out)`` and bias ``(out,)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: tuple[str, str],
        use_bias: bool,
        mode: Mode,
        dtype: jnp.dtype | None,
        param_dtype: jnp.dtype,
        kernel_init: Initializer,
        rngs: nnx.Rngs,
    ) -> None:
        check_mode(mode)
        if in_features < 1 or out_features < 1:
            raise ConfigError(
                f"features must be positive, got in={in_features}, out={out_features}."
            )
        self.in_features, self.out_features = in_features, out_features
        self.names = names
        self.mode: Mode = mode
        self.dtype = dtype
        self.kernel = named_param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype), names
        )
        self.bias = (
            named_param(jnp.zeros((out_features,), param_dtype), names[1:]) if use_bias else None
        )

    def _operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        dtype = self.dtype or x.dtype
        return x.astype(dtype), self.kernel[...].astype(dtype)

    def _add_bias(self, y: jax.Array) -> jax.Array:
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class ColumnParallelLinear(_Linear):
    """``y = x W + b`` with W split over output features; the output stays split (no comms).

    Args:
        names: logical names of the kernel's (input, output) dims; the output name's rule picks
            the tensor axis (default ``('embed', 'mlp')``: ``'mlp'`` -> ``'model'`` under tp).
        mode: ``'auto'`` (annotations) or ``'manual'`` (``jax.shard_map``).

    Example:
        >>> layer = ColumnParallelLinear(64, 256, rngs=nnx.Rngs(0))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        names: tuple[str, str] = ("embed", "mlp"),
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            names=names,
            use_bias=use_bias,
            mode=mode,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x, w = self._operands(x)
        y = column_parallel_matmul(
            x, w, n_contract=1, axis=param_axis(self.names[1]), mode=self.mode
        )
        return constrain(self._add_bias(y), activation_names(y.ndim, self.names[1]))


class RowParallelLinear(_Linear):
    """``y = sum_i W_i x_i + b``: W split over input features, one psum, the bias added once.

    The input is expected split over its features (as a column-parallel layer leaves it).

    Args:
        names: logical names of the kernel's (input, output) dims; the input name's rule picks
            the tensor axis (default ``('mlp', 'embed')``).
        mode: ``'auto'`` (XLA inserts the all-reduce) or ``'manual'`` (explicit ``psum``).

    Example:
        >>> layer = RowParallelLinear(256, 64, rngs=nnx.Rngs(0))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        names: tuple[str, str] = ("mlp", "embed"),
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            names=names,
            use_bias=use_bias,
            mode=mode,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x, w = self._operands(x)
        x = constrain(x, activation_names(x.ndim, self.names[0]))
        y = row_parallel_matmul(x, w, n_contract=1, axis=param_axis(self.names[0]), mode=self.mode)
        # whole over the tensor axis (split over the sequence under sp)
        y = constrain(y, residual_names(y.ndim, self.names[1]))
        return self._add_bias(y)  # after the psum: added once, not once per shard
