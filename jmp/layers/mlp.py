"""Megatron MLPs: column-parallel up-projection(s), activation, row-parallel down-projection.

:class:`ParallelMLP` is GPT's (GELU); :class:`GatedMLP` is Llama's SwiGLU.

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

from jmp.context import constrain, param_axis
from jmp.layers.base import (
    Initializer,
    Mode,
    activation_names,
    check_mode,
    default_kernel_init,
)
from jmp.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    column_parallel_matmul,
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


class GatedMLP(nnx.Module):
    """SwiGLU (Llama's MLP): ``down(silu(gate(x)) * up(x))``, gate/up column-, down row-parallel.

    No biases. ``gate`` and ``up`` run as one column-parallel product of their stacked kernels
    (one matmul; one all-reduce of the input's gradient in the backward), ``down`` sums the
    hidden blocks with one all-reduce forward: the Megatron count of :class:`ParallelMLP`.

    Example:
        >>> mlp = GatedMLP(64, 192, rngs=nnx.Rngs(0))
        >>> mlp.gate.kernel.shape, mlp(jnp.ones((2, 3, 64))).shape
        ((64, 192), (2, 3, 64))
    """

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        check_mode(mode)
        self.mode: Mode = mode
        self.dtype = dtype

        def linear(cls: type[ColumnParallelLinear | RowParallelLinear], i: int, o: int, names):
            return cls(
                i,
                o,
                use_bias=False,
                names=names,
                mode=mode,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kernel_init,
                rngs=rngs,
            )

        self.gate = linear(ColumnParallelLinear, features, hidden, ("embed", "mlp"))
        self.up = linear(ColumnParallelLinear, features, hidden, ("embed", "mlp"))
        self.down = linear(RowParallelLinear, hidden, features, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        # (embed, 2, mlp): both kernels are split alike over 'mlp', so stacking moves nothing
        w = jnp.stack([self.gate.kernel[...], self.up.kernel[...]], axis=1).astype(dtype)
        h = column_parallel_matmul(
            x, w, n_contract=1, axis=param_axis("mlp"), mode=self.mode, split_dim=2
        )
        h = constrain(h, activation_names(h.ndim, None, "mlp"))
        return self.down(jax.nn.silu(h[..., 0, :]) * h[..., 1, :])
