"""Causal self-attention with its heads split over the tensor axis.

Example:
    >>> attn = ParallelAttention(16, num_heads=4, rngs=nnx.Rngs(0))
    >>> attn(jax.numpy.ones((2, 5, 16))).shape
    (2, 5, 16)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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
from jmp.layers.linear import (
    column_parallel_matmul,
    row_parallel_matmul,
)


class ParallelAttention(nnx.Module):
    """Multi-head attention with heads split over the tensor axis.

    Q, K, V come from one column-parallel ``(embed, 3, heads, kv)`` kernel, so each device
    attends with its own heads; the output projection ``(heads, kv, embed)`` is row-parallel
    (one psum).
    Attention itself is ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs).

    Example:
        >>> attn = ParallelAttention(64, num_heads=4, rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((2, 16, 64))).shape
        (2, 16, 64)
    """

    def __init__(
        self,
        features: int,
        *,
        num_heads: int,
        head_dim: int | None = None,
        causal: bool = True,
        use_bias: bool = True,
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        check_mode(mode)
        if head_dim is None:
            if features % num_heads:
                raise ConfigError(
                    f"features={features} is not divisible by num_heads="
                    f"{num_heads}; pass head_dim explicitly or change one of them."
                )
            head_dim = features // num_heads
        self.num_heads, self.head_dim, self.causal = num_heads, head_dim, causal
        self.mode: Mode = mode
        self.dtype = dtype
        shape_out = (num_heads, head_dim, features)

        def param(
            shape: Sequence[int], names: tuple[str | None, ...], fn: Initializer
        ) -> nnx.Param:
            return named_param(fn(rngs.params(), shape, param_dtype), names)

        qkv_init = (
            kernel_init
            if kernel_init is not default_kernel_init
            else nnx.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(2, 3), batch_axis=(1,)
            )
        )
        # q, k and v in one kernel: one matmul, and one all-reduce for the input's gradient
        self.qkv = param(
            (features, 3, num_heads, head_dim), ("embed", None, "heads", "kv"), qkv_init
        )
        out_init = (
            kernel_init
            if kernel_init is not default_kernel_init
            else nnx.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
            )
        )
        self.out = param(shape_out, ("heads", "kv", "embed"), out_init)
        self.out_bias = (
            named_param(jnp.zeros((features,), param_dtype), ("embed",)) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        axis = param_axis("heads")
        qkv = column_parallel_matmul(
            x, self.qkv[...].astype(dtype), n_contract=1, axis=axis, mode=self.mode, split_dim=2
        )
        qkv = constrain(qkv, activation_names(qkv.ndim, None, "heads", "kv"))
        q, k, v = (qkv[..., i, :, :] for i in range(3))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        y = row_parallel_matmul(
            o, self.out[...].astype(dtype), n_contract=2, axis=axis, mode=self.mode
        )
        y = constrain(y, activation_names(y.ndim, "embed"))
        return y if self.out_bias is None else y + self.out_bias[...].astype(y.dtype)
