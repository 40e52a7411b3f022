"""The Megatron MLP: a column-parallel up-projection, GELU, a row-parallel down-projection.

Example:
    >>> mlp = ParallelMLP(16, 64, rngs=nnx.Rngs(0))
    >>> mlp(jax.numpy.ones((2, 3, 16))).shape
    (2, 3, 16)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jmp.layers.base import (
    Initializer,
    Mode,
    default_kernel_init,
)
from jmp.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
)


class ParallelMLP(nnx.Module):
    """Megatron MLP: column-parallel up-projection, activation, row-parallel down-projection.

    One all-reduce forward (after the down-projection) and one backward (the input's gradient).

    Example:
        >>> mlp = ParallelMLP(64, 256, rngs=nnx.Rngs(0))
    """

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        activation: Callable = jax.nn.gelu,
        use_bias: bool = True,
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        self.activation = activation
        self.up = ColumnParallelLinear(
            features,
            hidden,
            names=("embed", "mlp"),
            use_bias=use_bias,
            mode=mode,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )
        self.down = RowParallelLinear(
            hidden,
            features,
            names=("mlp", "embed"),
            use_bias=use_bias,
            mode=mode,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.activation(self.up(x)))
