"""Rematerialization: what a block keeps from its forward pass for the backward pass.

A model's ``remat`` field (GPT, Llama, and any :mod:`jmp.pipeline` block stack) names a
policy; what is not kept is recomputed in the backward pass, trading FLOPs for memory:

- ``'none'`` (``False``): keep every intermediate; no recompute, the most memory.
- ``'full'`` (``True``): keep only each block's input; recompute the whole block
  (``jax.checkpoint_policies.nothing_saveable``), the least memory, about a third more FLOPs.
- ``'dots'``: keep every matmul's output, recompute the elementwise work between them
  (norms, activations, softmax) (``dots_saveable``).
- ``'dots_no_batch'``: keep the matmuls against weights (no batch dimension), recompute the
  attention's batched products and the elementwise work (``dots_with_no_batch_dims_saveable``,
  MaxText's ``minimal``).
- ``'offload'``: like ``'dots_no_batch'``, but the kept values wait in the host's pinned
  memory instead of the device's (``offload_dot_with_no_batch_dims``); a GPU's copy engines move
  them while it computes.

Every policy computes the same loss and gradients (tests/test_remat.py); they differ in the
compiled program's temporaries and FLOPs (``benchmarks/remat.py``). The planner
(:mod:`jmp.plan`) models ``'full'`` for any policy but ``'none'``.

Example:
    >>> normalize_remat("full"), normalize_remat("none"), normalize_remat("dots")
    (True, False, 'dots')
    >>> f = checkpointed(lambda x: jnp.sin(x) @ x, "dots")
    >>> float(jax.grad(lambda x: f(x).sum())(jnp.eye(2))[0, 0]) == float(
    ...     jax.grad(lambda x: (jnp.sin(x) @ x).sum())(jnp.eye(2))[0, 0])
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx

from jmp.strategies import REMAT_POLICIES as REMAT_POLICIES  # their one home: light to import

#: A model's ``remat`` field: a name of :data:`REMAT_POLICIES`, or a bool (full or none).
Remat = bool | str

F = TypeVar("F", bound=Callable[..., Any])


def normalize_remat(value: Remat, /) -> Remat:
    """``'none'`` -> False, ``'full'`` -> True, the other names as they are (a config stores
    this: runs from before the policies existed read the same)."""
    if value == "none":
        return False
    if value == "full":
        return True
    return value


def remat_problems(value: object, /) -> list[str]:
    """What is wrong with a ``remat`` value, in words (empty: nothing)."""
    if isinstance(value, bool) or value in REMAT_POLICIES:
        return []
    return [f"remat={value!r} must be True, False or one of {REMAT_POLICIES}"]


def _policy(remat: Remat) -> Callable[..., bool] | None:
    policies = jax.checkpoint_policies
    return {
        True: None,  # jax.checkpoint's default: save nothing but the inputs
        "dots": policies.dots_saveable,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "offload": policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }[normalize_remat(remat)]


def checkpointed(fn: F, remat: Remat, /, *, module: bool = False) -> F:
    """``fn`` rematerialized under the policy ``remat`` (``fn`` itself for ``'none'``).

    ``module=True`` for a function whose arguments include Flax NNX modules (``nnx.remat``);
    else ``jax.checkpoint``.
    """
    if not normalize_remat(remat):
        return fn
    wrap = nnx.remat if module else jax.checkpoint
    return wrap(fn, policy=_policy(remat))  # type: ignore[return-value]
