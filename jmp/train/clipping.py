"""Gradient clipping by the global norm that the step has already computed.

The global gradient norm of a sharded model costs one all-reduce of partial sums per
parameter array and mesh axis that splits it. The step needs the norm anyway (the
``grad_norm`` metric and the non-finite guard); optax's ``clip_by_global_norm`` computes it a
second time, and XLA does not merge the two, so every split array's norm was all-reduced
twice. :func:`clip_by_global_norm` takes the step's norm instead (an optax "extra argument",
``grad_norm=``) and computes the same result as optax's, bit for bit.

Example:
    >>> tx = optax.chain(clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> grads = {"w": jnp.array([3.0, 4.0])}                    # norm 5
    >>> updates, _ = tx.update(grads, tx.init(grads), grad_norm=optax.tree.norm(grads))
    >>> updates["w"].round(4)                                    # clipped to norm 1, times -lr
    Array([-0.06, -0.08], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def clip_by_global_norm(max_norm: float, /) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm(max_norm)`` that reuses ``grad_norm=`` when given.

    Without the extra argument (called outside jmp's step) it computes the norm itself, so it
    is a drop-in replacement.
    """

    def update(
        updates: Any, state: Any, params: Any = None, *, grad_norm: Any = None, **extra: Any
    ) -> tuple[Any, Any]:
        del params, extra
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        keep = jnp.squeeze(norm < max_norm)  # optax's own formula: equal results

        def clip(t: jax.Array) -> jax.Array:
            return jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)
