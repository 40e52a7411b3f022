"""Cross-entropy over logits whose vocabulary is split across devices, never gathered.

``log softmax`` needs a max and a sum over the whole vocabulary; with the vocabulary split over
the tensor axis each device reduces its slice and small all-reduces of ``(batch, seq)`` values
join them, so the ``(batch, seq, vocab)`` logits never exist whole on one device.

Example:
    >>> logits = jnp.zeros((2, 3, 256))             # uniform over 256 bytes
    >>> targets = jnp.zeros((2, 3), jnp.int32)
    >>> round(float(cross_entropy(logits, targets)), 4)   # mean over tokens: ln 256 nats
    5.5452
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmp.context import param_axis
from jmp.layers import Mode
from jmp.rules import axes_tuple


def _local_terms(
    logits: jax.Array,
    targets: jax.Array,
    offset: jax.Array | int,
) -> tuple[jax.Array, jax.Array]:
    """(max over this slice, logit of the target if it falls in this slice else 0)."""
    local = targets - offset
    hit = (local >= 0) & (local < logits.shape[-1])
    picked = jnp.take_along_axis(
        logits, jnp.clip(local, 0, logits.shape[-1] - 1)[..., None], axis=-1
    )[..., 0]
    return jnp.max(logits, axis=-1), jnp.where(hit, picked, 0.0)


def token_losses(
    logits: jax.Array, targets: jax.Array, /, *, mode: Mode = "auto", vocab_name: str = "vocab"
) -> jax.Array:
    """Per-token ``logsumexp(logits) - logits[target]`` (nats), computed in float32.

    Args:
        logits: ``(..., vocab)``, possibly split over the tensor axis along ``vocab``.
        targets: integer ids ``(...)``.
        mode: ``'auto'`` (the partitioner reduces the split vocabulary) or ``'manual'``
            (``jax.shard_map`` with explicit ``pmax``/``psum`` over the tensor axis).
    """
    logits = logits.astype(jnp.float32)
    axis = param_axis(vocab_name)
    if axis is None or mode == "auto":
        target_logit = jnp.sum(
            logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1
        )
        return jax.nn.logsumexp(logits, axis=-1) - target_logit
    axes = axes_tuple(axis)

    def block(logits_i: jax.Array, targets_: jax.Array) -> jax.Array:
        offset = jax.lax.axis_index(axes) * logits_i.shape[-1]
        local_max, picked = _local_terms(logits_i, targets_, offset)
        top = jax.lax.pmax(jax.lax.stop_gradient(local_max), axes)  # shift only: no gradient
        total = jax.lax.psum(jnp.sum(jnp.exp(logits_i - top[..., None]), axis=-1), axes)
        return jnp.log(total) + top - jax.lax.psum(picked, axes)

    lead = (None,) * (logits.ndim - 1)
    return jax.shard_map(
        block,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(*lead, axis), P()),
        out_specs=P(),
        axis_names=set(axes),
    )(logits, targets)


def cross_entropy(logits: jax.Array, targets: jax.Array, /, *, mode: Mode = "auto") -> jax.Array:
    """Mean token cross-entropy in nats (see :func:`token_losses`)."""
    return jnp.mean(token_losses(logits, targets, mode=mode))
