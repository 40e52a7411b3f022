"""What every parallel layer shares: the collective mode, parameter creation, activation names.

Example:
    >>> p = named_param(jax.numpy.zeros((4, 8)), ("embed", "mlp"))
    >>> p.get_metadata()["out_sharding"]
    ('embed', 'mlp')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import jax
from flax import nnx

from jmp.errors import ConfigError
from jmp.strategies import MODES

Mode = Literal["auto", "manual", "collective"]

Initializer = Callable[..., jax.Array]
default_kernel_init = nnx.initializers.lecun_normal()
default_embedding_init = nnx.initializers.normal(0.02)


def named_param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """A parameter carrying logical names, creatable without a mesh.

    Flax's eager sharding would place it at creation using Flax's own (lenient) rules and fail
    without a mesh; jmp places parameters itself (:func:`jmp.shard_init`), so it is off here and
    the same module also builds unsharded, as the single-device reference.
    """
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")


def activation_names(ndim: int, *feature_names: str | None) -> tuple[str | None, ...]:
    """('batch', None, ..., *features): leading dim is the batch, the rest are unsplit."""
    lead = ndim - len(feature_names)
    return (("batch",) + (None,) * (lead - 1) if lead > 0 else ()) + tuple(feature_names)


def residual_names(ndim: int, feature: str | None) -> tuple[str | None, ...]:
    """('batch', 'seq', None, ..., feature): an activation of the residual stream, whose sequence
    dim (the second) sequence parallelism splits; without a sequence dim, :func:`activation_names`.

    Example:
        >>> residual_names(3, "embed"), residual_names(2, "embed")
        (('batch', 'seq', 'embed'), ('batch', 'embed'))
    """
    if ndim < 3:
        return activation_names(ndim, feature)
    return ("batch", "seq") + (None,) * (ndim - 3) + (feature,)


#: The name scope of matmuls over padded rows: ``model_rows_R_of_P`` says that P rows are
#: computed of which R are real (a mixture of experts' capacity slots). The speed meter
#: (:mod:`jmp.train.speed`) counts R/P of those FLOPs as model FLOPs: padding is work done,
#: not work the model needs.
MODEL_ROWS_SCOPE = "model_rows_"


def model_rows(real: int, padded: int, /) -> AbstractContextManager[Any]:
    """The name scope that marks matmuls over ``padded`` rows of which ``real`` count.

    Example:
        >>> with model_rows(3, 8):
        ...     pass
        >>> model_rows_share("outer/model_rows_3_of_8/dot_general")
        0.375
    """
    return jax.named_scope(f"{MODEL_ROWS_SCOPE}{real}_of_{padded}")


def model_rows_share(name_stack: str, /) -> float:
    """The share of real rows a :func:`model_rows` scope in ``name_stack`` states (else 1)."""
    share = 1.0
    for part in name_stack.split("/"):
        if part.startswith(MODEL_ROWS_SCOPE):
            real, padded = part[len(MODEL_ROWS_SCOPE) :].split("_of_")
            share *= int(real) / int(padded)
    return share
