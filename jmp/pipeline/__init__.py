"""Pipeline parallelism: a GPT's blocks split into stages over a ``'stage'`` mesh axis.

Stage s holds blocks ``s*L .. (s+1)*L - 1`` and passes its activations to stage s+1 with
``jax.lax.ppermute``, one microbatch per tick. Four modules, one concept each, imported one
way (``run -> model -> split``, ``run -> schedule``):

- :mod:`~jmp.pipeline.split`: planning. :func:`split_stages` splits the blocks uniformly or
  balanced by parameters or FLOPs and returns a :class:`StageSplit` report.
- :mod:`~jmp.pipeline.model`: :class:`PipelinedGPT`, the GPT with its blocks' parameters
  stacked ``(stage, layers, ...)``, and the converters to and from the plain GPT's layout.
- :mod:`~jmp.pipeline.schedule`: :func:`make_schedule`, the GPipe and 1F1B tick tables as
  NumPy (which microbatch each stage runs at each tick), with their bubble and memory.
- :mod:`~jmp.pipeline.run`: :func:`pipeline_loss` / :func:`pipeline_loss_and_grads` execute a
  schedule inside ``jax.shard_map`` (manual over ``'stage'`` only), and
  :func:`make_loss_fn` hands that to :func:`jmp.train.make_step`.

Every public name is re-exported here, so ``from jmp.pipeline import X`` does not depend on
which module X lives in.

Example:
    >>> mesh = jmp.make_mesh("stage=4,data=2")
    >>> rules = jmp.rules.preset("pp_dp", mesh)
    >>> model = jmp.shard_init(lambda r: PipelinedGPT(cfg, num_stages=4, rngs=r), mesh, rules)
    >>> with jmp.activate(mesh, rules):
    ...     loss, grads = jax.jit(functools.partial(pipeline_loss_and_grads, mesh=mesh,
    ...                                             num_microbatches=8))(model, batch)
"""

from jmp.pipeline.model import (
    STAGE,
    PipelinedGPT,
    run_blocks,
    stack_params,
    unstack_params,
)
from jmp.pipeline.run import (
    Batch,
    check_pipeline,
    make_loss_fn,
    pipeline_loss,
    pipeline_loss_and_grads,
    split_microbatches,
)
from jmp.pipeline.schedule import SCHEDULES, Schedule, ScheduleName, make_schedule
from jmp.pipeline.split import (
    StageSplit,
    block_flops,
    block_params,
    check_stages,
    split_stages,
)

__all__ = [
    "SCHEDULES",
    "STAGE",
    "Batch",
    "PipelinedGPT",
    "Schedule",
    "ScheduleName",
    "StageSplit",
    "block_flops",
    "block_params",
    "check_pipeline",
    "check_stages",
    "make_loss_fn",
    "make_schedule",
    "pipeline_loss",
    "pipeline_loss_and_grads",
    "run_blocks",
    "split_microbatches",
    "split_stages",
    "stack_params",
    "unstack_params",
]
