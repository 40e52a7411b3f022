"""Training: the compiled step, the trainer for any model, checkpoints, and data.

- :mod:`~jmp.train.step`: :func:`make_step`, one ``jax.jit`` over (state, batch).
- :mod:`~jmp.train.clipping`: clipping by the step's own global gradient norm.
- :mod:`~jmp.train.trainer`: :func:`fit`, the training loop for any NNX model.
- :mod:`~jmp.train.loop`: jmp's GPT on byte text through :func:`fit` (``jmp train``).
- :mod:`~jmp.train.checkpoint`: orbax checkpoints that restore onto any mesh.
- :mod:`~jmp.train.data`: byte-level text batches as pure functions of the step, prepared
  (tokenized) corpora, document packing and the grain loader.

The step's names are re-exported here (``jmp.train.make_step``); the loop and checkpoints load
orbax, matplotlib and rich, so they are imported only when used.

Example:
    >>> import jmp
    >>> jmp.train.TrainConfig(steps=10).steps
    10
"""

import importlib
from typing import TYPE_CHECKING, Any

from jmp.train.clipping import clip_by_global_norm
from jmp.train.step import (
    Step,
    TrainConfig,
    TrainState,
    check_batch,
    lr_schedule,
    make_eval_step,
    make_optimizer,
    make_step,
    merge_params,
    next_token_loss,
)

if TYPE_CHECKING:
    from jmp.train.trainer import FitResult, fit

# name -> module: these load orbax (checkpoints), matplotlib and rich, so only when used
_LAZY_NAMES = {"fit": "jmp.train.trainer", "FitResult": "jmp.train.trainer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'jmp.train' has no attribute {name!r}")


__all__ = [
    "FitResult",
    "Step",
    "TrainConfig",
    "TrainState",
    "check_batch",
    "clip_by_global_norm",
    "fit",
    "lr_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_step",
    "merge_params",
    "next_token_loss",
]
