"""The analytic planner: memory, communication, FLOPs and time of a GPT train step, per device.

Modules, one concept each, imported one way (``search -> estimate -> pipeline_costs -> the cost
terms -> terms -> params``, ``estimate -> hardware``):

- :mod:`~jmp.plan.hardware`: :class:`Device`, the presets :data:`DEVICES`, :func:`get_device`.
- :mod:`~jmp.plan.params`: the model's parameter arrays (:func:`param_arrays`) and their
  layouts under a strategy's rules.
- :mod:`~jmp.plan.terms`: what every cost term reads (the step) and returns (:class:`Comm`).
- the cost terms of the non-pipeline strategies, indexed by :mod:`~jmp.plan.costs`:
  :mod:`~jmp.plan.tensor_costs` (tp, and sp's reduce-scatters and all-gathers),
  :mod:`~jmp.plan.batch_costs` (dp, fsdp, the gradient norm), :mod:`~jmp.plan.context_costs`
  (cp), :mod:`~jmp.plan.moe_costs` (ep), :mod:`~jmp.plan.compute_costs` (activations, FLOPs).
- :mod:`~jmp.plan.pipeline_costs`: the same for the pipeline strategies (``pp*``), per tick
  (:func:`pipeline_arrays`).
- :mod:`~jmp.plan.estimate`: :func:`estimate` checks the inputs, sums the cost terms into an
  :class:`Estimate` and turns them into a roofline step time.
- :mod:`~jmp.plan.search`: :func:`search` over :func:`candidate_shapes` and strategies, ranked
  by step time; :func:`format_table` renders the ranking.
- :mod:`~jmp.plan.compare`: :func:`compare` plans any Flax NNX model from its compiled train
  step (abstract shapes, nothing allocated): one :class:`Candidate` per (strategy, mesh), ranked
  by step time; :func:`format_comparison` renders them.

Every public name is re-exported here, so ``jmp.plan.X`` does not depend on which module X
lives in.

Example:
    >>> est = jmp.plan.estimate(GPTConfig.named("7b"), {"data": 8, "model": 8}, "fsdp_tp",
    ...                         batch_size=64, device="h100")
    >>> est.fits, est.comm_bytes["model"], f"{est.mfu:.0%}"
    (False, 34896806536, '25%')
    >>> ranked = jmp.plan.search(GPTConfig.named("7b"), 64, "h100", batch_size=256)
    >>> table = jmp.plan.format_table(ranked[:5])      # rich.print(table)
"""

from jmp.plan.compare import Candidate, compare, format_comparison
from jmp.plan.estimate import PIPELINE_SCHEDULES, STRATEGIES, Estimate, estimate
from jmp.plan.hardware import DEVICES, Device, GiB, MiB, get_device
from jmp.plan.params import ParamArray, param_arrays
from jmp.plan.pipeline_costs import STAGE_AXIS, pipeline_arrays
from jmp.plan.search import candidate_shapes, format_table, longest_sequence, search
from jmp.plan.terms import Comm

__all__ = [
    "DEVICES",
    "PIPELINE_SCHEDULES",
    "STAGE_AXIS",
    "STRATEGIES",
    "Candidate",
    "Comm",
    "Device",
    "Estimate",
    "GiB",
    "MiB",
    "ParamArray",
    "candidate_shapes",
    "compare",
    "estimate",
    "format_comparison",
    "format_table",
    "get_device",
    "longest_sequence",
    "param_arrays",
    "pipeline_arrays",
    "search",
]
