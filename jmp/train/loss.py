"""The loss a train step differentiates, and what it may report beside it.

A loss function is ``loss_fn(model, batch) -> loss`` or ``-> (loss, metrics)`` (:data:`LossFn`);
:func:`split_loss` reads either form. :func:`next_token_loss` is the language models' one: the
vocabulary-parallel cross-entropy of the next token, over packed documents too, plus a mixture
of experts' auxiliary losses.

Example:
    >>> loss, metrics = split_loss(next_token_loss(model, batch))
    >>> bool(loss > 0), metrics
    (True, {})
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx

from jmp.errors import ConfigError
from jmp.layers import Mode, MoE, aux_metrics, captured_aux
from jmp.layers.moe import DROPPED
from jmp.losses import token_losses

#: A batch is any pytree of arrays whose leading dimension is the batch (split as the
#: activation rule for the logical name ``'batch'`` says), e.g. ``(tokens, targets)`` or a dict.
Batch = Any
#: A loss function: ``loss_fn(model, batch)`` returns the scalar loss, or ``(loss, metrics)``
#: with ``metrics`` a dict of arrays (scalars or small vectors, e.g. a MoE layer's expert load)
#: that the step reports beside ``loss``: means over the microbatches (and over the devices
#: that split the batch, where the step accumulates per device), except :data:`COUNT_METRICS`.
LossFn = Callable[[nnx.Module, Batch], jax.Array | tuple[jax.Array, dict[str, jax.Array]]]
#: The metrics every step reports itself; a loss function's metrics may not reuse these names.
STEP_METRICS = ("loss", "grad_norm", "lr")
#: A loss function's metrics that count events over its batch (``moe_dropped``: the (token,
#: choice) pairs a MoE capacity dropped): the step sums them over its microbatches (and the
#: devices that split the batch), so they are totals over the step's whole batch, as without
#: gradient accumulation.
COUNT_METRICS = frozenset({DROPPED})


def split_loss(out: Any, /) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A loss function's result as ``(loss, metrics)`` (metrics ``{}`` for a plain loss).

    Example:
        >>> split_loss(jnp.float32(2.0))
        (Array(2., dtype=float32), {})
    """
    if not isinstance(out, tuple):
        return out, {}
    loss, metrics = out
    clash = sorted(set(metrics) & set(STEP_METRICS))
    if clash:
        raise ConfigError(
            f"the loss function's metrics {clash} clash with the step's own {STEP_METRICS}. "
            f"Fix: rename them."
        )
    return loss, dict(metrics)


#: What a packed batch (:mod:`jmp.train.data`'s loader) gives the model besides the tokens.
PACKING_KEYS = ("segment_ids", "positions")


def next_token_loss(
    model: nnx.Module, batch: Batch, /, *, aux: bool = True
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of the model's logits against the targets (vocabulary-parallel).

    ``batch`` is ``(inputs, targets)``, or a dict with ``inputs`` and ``targets`` and, for
    packed documents, ``segment_ids`` and ``positions`` (passed to the model) and
    ``loss_mask`` (1 for a token that counts: the mean is over those only, so padding and
    each document's last token, which has no next token, do not count).

    A model with :class:`~jmp.layers.MoE` layers (and ``aux``) adds their auxiliary losses:
    the result is ``(cross_entropy + aux_loss, metrics)``, with ``metrics`` the cross-entropy
    (``ce_loss``) and :func:`jmp.layers.aux_metrics`'. ``aux=False``: the cross-entropy only
    (validation).
    """
    # any model: the mode is read off a GPTConfig-like .cfg when it has one
    mode = cast(Mode, getattr(getattr(model, "cfg", None), "mode", "auto"))
    if isinstance(batch, dict):
        inputs, targets = batch["inputs"], batch["targets"]
        extra = {k: batch[k] for k in PACKING_KEYS if k in batch}
    else:
        (inputs, targets), extra = batch, {}
    routed = aux and any(isinstance(m, MoE) for _, m in nnx.iter_modules(model))
    found = nnx.State({})
    if routed:  # the MoE layers sow their auxiliary losses only under nnx.capture
        logits, found = nnx.capture(model, nnx.Intermediate)(inputs, **extra)
    else:
        logits = model(inputs, **extra)
    losses = token_losses(logits, targets, mode=mode)
    if isinstance(batch, dict) and "loss_mask" in batch:
        mask = batch["loss_mask"].astype(losses.dtype)
        loss = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    else:
        loss = jnp.mean(losses)
    if not routed:
        return loss
    term, metrics = aux_metrics(captured_aux(found))
    return loss + term, {"ce_loss": loss, **metrics}
