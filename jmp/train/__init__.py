"""Training: the compiled step, the trainer for any model, checkpoints, and data.

- :mod:`~jmp.train.step`: :func:`make_step`, one ``jax.jit`` over (state, batch).
- :mod:`~jmp.train.loop`: the training loop of jmp's GPT (``jmp train``).
- :mod:`~jmp.train.checkpoint`: orbax checkpoints that restore onto any mesh.
- :mod:`~jmp.train.data`: byte-level text batches as pure functions of the step.

The step's names are re-exported here (``jmp.train.make_step``); the loop and checkpoints load
orbax, matplotlib and rich, so they are imported only when used.

Example:
    >>> import jmp
    >>> jmp.train.TrainConfig(steps=10).steps
    10
"""

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

__all__ = [
    "Step",
    "TrainConfig",
    "TrainState",
    "check_batch",
    "lr_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_step",
    "merge_params",
    "next_token_loss",
]
