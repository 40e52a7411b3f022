"""RMSNorm with a scale named by the ``embed`` logical axis.

Example:
    >>> norm = RMSNorm(16, rngs=nnx.Rngs(0))
    >>> norm(jax.numpy.ones((2, 16))).shape
    (2, 16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jmp.layers.base import (
    named_param,
)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned ``('embed',)`` scale, computed in float32.

    ``y = x / sqrt(mean(x^2) + eps) * scale``, as Hugging Face's ``LlamaRMSNorm`` (its
    ``rms_norm_eps`` is ``eps``; Llama 3 and Mistral use 1e-5, Qwen2 1e-6).

    Example:
        >>> RMSNorm(64, rngs=nnx.Rngs(0))(jnp.ones((2, 64))).shape
        (2, 64)
    """

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-6,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        del rngs  # deterministic init; accepted for a uniform constructor signature
        self.eps = eps
        self.scale = named_param(jnp.ones((features,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)
