"""Row- and column-parallel linear layers: **y = sum_i W_i x_i + b** and its column twin.

Example:
    >>> layer = RowParallelLinear(32, 16, rngs=nnx.Rngs(0))
    >>> layer(jax.numpy.ones((2, 32))).shape
    (2, 16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jmp.context import constrain, param_axis
from jmp.errors import ConfigError
from jmp.layers.base import (
    Initializer,
    Mode,
    activation_names,
    check_mode,
    default_kernel_init,
    named_param,
)
from jmp.rules import MeshAxes, axes_tuple


def row_parallel_matmul(
    x: jax.Array, w: jax.Array, /, *, n_contract: int, axis: MeshAxes, mode: Mode
) -> jax.Array:
    """Contract the last ``n_contract`` dims of ``x`` with the first of ``w``, split over ``axis``.

    The first contracted dim is split over ``axis``; the partial products are summed with one
    all-reduce (``psum``) over it, so the result is whole on every device of that axis.
    """
    if axis is None or mode == "auto":
        return jnp.tensordot(x, w, n_contract)
    lead = x.ndim - n_contract
    x_spec = P(*(None,) * lead, axis)
    w_spec = P(axis)

    def block(x_i: jax.Array, w_i: jax.Array) -> jax.Array:
        return jax.lax.psum(jnp.tensordot(x_i, w_i, n_contract), axes_tuple(axis))

    return jax.shard_map(
        block,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(x_spec, w_spec),
        out_specs=P(),
        axis_names=set(axes_tuple(axis)),
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
    (the backward pass sums the input's gradient over ``axis``: one all-reduce).

    Args:
        split_dim: the dim of ``w`` split over ``axis`` (default: its first output dim).
    """
    if axis is None or mode == "auto":
        return jnp.tensordot(x, w, n_contract)
    split_dim = n_contract if split_dim is None else split_dim
    w_spec = P(*(None,) * split_dim, axis)
    y_spec = P(*(None,) * (x.ndim - n_contract + split_dim - n_contract), axis)
    return jax.shard_map(
        lambda x_, w_i: jnp.tensordot(x_, w_i, n_contract),
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(), w_spec),
        out_specs=y_spec,
        axis_names=set(axes_tuple(axis)),
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
        y = constrain(y, activation_names(y.ndim, self.names[1]))  # whole over the tensor axis
        return self._add_bias(y)  # after the psum: added once, not once per shard
