"""Rotary position embedding (RoPE) in Hugging Face's layout, with Llama 3's frequency scaling.

Each head vector is split in two halves ``x1 = x[..., :D/2]``, ``x2 = x[..., D/2:]`` and pair
``(x1[j], x2[j])`` is rotated by the angle ``position * inv_freq[j]``, with
``inv_freq[j] = theta ** (-2j / D)``. This is the ``rotate_half`` layout of Hugging Face's Llama,
Mistral and Qwen2, so their ``q_proj``/``k_proj`` weights load without a permutation (the
original Meta checkpoints interleave the pairs instead). A rotation depends only on the
position, so the dot product of a rotated query and key depends only on their distance.

Example:
    >>> cos, sin = rope_cos_sin(jnp.arange(5)[None], 8, theta=10000.0)
    >>> cos.shape                                   # (batch, seq, head_dim)
    (1, 5, 8)
    >>> apply_rope(jnp.ones((1, 5, 2, 8)), cos, sin).shape   # (batch, seq, heads, head_dim)
    (1, 5, 2, 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jmp.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency scaling (Hugging Face ``rope_type: "llama3"``, as in Llama 3.1).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are slowed
    down by ``factor``, those shorter than ``original / high_freq_factor`` are kept, and the
    band between is interpolated smoothly: the model then reads positions past its original
    context without retraining its high frequencies.

    Example:
        >>> s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        ...                 original_max_position_embeddings=8192)
        >>> inverse_frequencies(128, theta=500000.0, scaling=s).shape
        (64,)
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)!r} must be a finite number > 0"
            for name in ("factor", "low_freq_factor", "high_freq_factor")
            if not isinstance(getattr(self, name), int | float)
            or not math.isfinite(getattr(self, name))
            or getattr(self, name) <= 0
        ]
        orig = self.original_max_position_embeddings
        if not isinstance(orig, int) or isinstance(orig, bool) or orig < 1:
            problems.append(f"original_max_position_embeddings={orig!r} must be a positive int")
        if not problems and self.high_freq_factor <= self.low_freq_factor:
            problems.append(
                f"high_freq_factor={self.high_freq_factor} must exceed low_freq_factor="
                f"{self.low_freq_factor} (the band between them is interpolated)"
            )
        if problems:
            raise ConfigError("Invalid RopeScaling: " + "; ".join(problems) + ".")


def inverse_frequencies(
    head_dim: int, /, *, theta: float, scaling: RopeScaling | None = None
) -> np.ndarray:
    """``inv_freq[j] = theta ** (-2j / head_dim)`` for ``j < head_dim / 2``, then scaled.

    Computed in float64 on the host (a constant of the compiled program) and returned as
    float32, the precision Hugging Face computes them in.
    """
    if head_dim % 2:
        raise ConfigError(f"head_dim={head_dim} must be even for rotary embeddings.")
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is not None:
        inv = _llama3_scale(inv, scaling)
    return inv.astype(np.float32)


def _llama3_scale(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    wavelen = 2 * np.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    slow = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * slow / s.factor + smooth * slow
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, slow)


def rope_cos_sin(
    positions: jax.Array,
    head_dim: int,
    /,
    *,
    theta: float,
    scaling: RopeScaling | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Cosines and sines ``(..., head_dim)`` (float32) of the angles at integer ``positions``.

    Both halves of the head dim share the frequencies (``concat(freqs, freqs)``), as in
    Hugging Face's rotary embedding.
    """
    inv = jnp.asarray(inverse_frequencies(head_dim, theta=theta, scaling=scaling))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, /) -> jax.Array:
    """Rotate ``x (batch, seq, heads, head_dim)`` by ``cos``/``sin`` ``(batch, seq, head_dim)``.

    ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``, in float32, cast back to ``x``'s dtype.
    """
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # the same angle for every head
    return (x32 * cos + rotated * sin).astype(x.dtype)
