"""Pipeline parallelism: any model's stack of blocks split into stages over a ``'stage'`` axis.

Stage s holds blocks ``s*L .. (s+1)*L - 1`` and passes its activations to stage s+1 with
``jax.lax.ppermute``, one microbatch per tick. Five modules, one concept each, imported one
way (``run -> stack``, ``run -> schedule``, ``model -> split -> stack``):

- :mod:`~jmp.pipeline.stack`: the layout. :func:`stack_blocks` stacks a user's block module
  ``(stage, layers, ...)``; a model with such ``blocks``, ``embed_inputs`` and ``head_loss`` is
  :class:`Pipelinable`, whatever else it is.
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

Example (jmp's GPT; tests/test_pipeline_any.py pipelines a plain-NNX model):
    >>> mesh = jmp.make_mesh("stage=2,data=4")
    >>> rules = jmp.rules.preset("pp_dp", mesh)
    >>> model = jmp.shard_init(lambda r: PipelinedGPT(cfg, num_stages=2, rngs=r), mesh, rules)
    >>> tokens = jnp.zeros((8, cfg.seq_len), jnp.int32)
    >>> with jmp.activate(mesh, rules):
    ...     loss, grads = jax.jit(functools.partial(pipeline_loss_and_grads, mesh=mesh,
    ...                                             num_microbatches=2))(model, (tokens, tokens))
    >>> grads["blocks"]["attn"]["qkv"].shape[:2]      # (stage, layers), like the parameters
    (2, 1)
"""

from jmp.pipeline.model import PipelinedGPT, stack_params, unstack_params
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
from jmp.pipeline.stack import (
    STAGE,
    Pipelinable,
    check_layers,
    is_stacked,
    num_stages_of,
    run_blocks,
    run_stack,
    stack_blocks,
    stack_states,
    unstack_states,
)

__all__ = [
    "SCHEDULES",
    "STAGE",
    "Batch",
    "Pipelinable",
    "PipelinedGPT",
    "Schedule",
    "ScheduleName",
    "StageSplit",
    "block_flops",
    "block_params",
    "check_layers",
    "check_pipeline",
    "check_stages",
    "is_stacked",
    "make_loss_fn",
    "make_schedule",
    "num_stages_of",
    "pipeline_loss",
    "pipeline_loss_and_grads",
    "run_blocks",
    "run_stack",
    "split_microbatches",
    "split_stages",
    "stack_blocks",
    "stack_params",
    "stack_states",
    "unstack_params",
    "unstack_states",
]
