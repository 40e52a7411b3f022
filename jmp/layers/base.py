"""What every parallel layer shares: the collective mode, parameter creation, activation names.

Example:
    >>> p = named_param(jax.numpy.zeros((4, 8)), ("embed", "mlp"))
    >>> p.get_metadata()["out_sharding"]
    ('embed', 'mlp')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
from flax import nnx

from jmp.errors import ConfigError

Mode = Literal["auto", "manual"]
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
    if mode not in ("auto", "manual"):
        raise ConfigError(f"mode must be 'auto' or 'manual', got {mode!r}.")


def activation_names(ndim: int, *feature_names: str | None) -> tuple[str | None, ...]:
    """('batch', None, ..., *features): leading dim is the batch, the rest are unsplit."""
    lead = ndim - len(feature_names)
    return (("batch",) + (None,) * (lead - 1) if lead > 0 else ()) + tuple(feature_names)
