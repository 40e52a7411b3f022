"""The cost terms of the non-pipeline strategies, one module per concept, and their index.

:func:`jmp.plan.estimate` sums these terms into memory, collectives and FLOPs of one GPT train
step per device; the pipeline strategies have their own in :mod:`jmp.plan.pipeline_costs`.
Every collective is a :class:`Comm` with the same accounting as :func:`jmp.inspect.collectives`
(``Collective.bytes * count`` summed per axis; ``bytes`` is the result's size on one device).
The collectives are the ones XLA emits for jmp's model, checked against compiled steps on 8
simulated CPU devices (``tests/test_plan.py``, ``test_plan_cp.py``, ``test_plan_moe.py``,
``test_plan_sp.py``) for every strategy:

- :mod:`jmp.plan.params`: the model's parameter arrays (:func:`param_arrays`) and their
  layouts on a mesh, resolved strictly with jmp's rules.
- :mod:`jmp.plan.terms`: what every term reads (the step, ``_Ctx``) and returns (:class:`Comm`).
- :mod:`jmp.plan.tensor_costs`: the tensor axis (``tp``): Megatron's activation all-reduces,
  the vocabulary-parallel embedding and loss; under sequence parallelism (``sp``) the
  reduce-scatters and all-gathers that replace them (ring steps of collective-permutes with
  ``mode='collective'``), the gradients partial over the sequence split.
- :mod:`jmp.plan.batch_costs`: the batch axes (``dp``, ``fsdp``): gradient reductions, FSDP
  gathers, the loss mean, the global gradient norm, the gathered weights alive at once.
- :mod:`jmp.plan.context_costs`: the context axis (``cp``): ring or all-gather attention's K/V,
  the balanced layout's return, the gradients summed over the context split.
- :mod:`jmp.plan.moe_costs`: a mixture of experts (``ep``): slot buffers, dispatch and combine
  all-to-alls, routing statistics, the batch axes of an ep strategy.
- :mod:`jmp.plan.compute_costs`: activations alive at the backward pass, and FLOPs.

Each name stays importable from here (``from jmp.plan.costs import Comm``).

Example:
    >>> [a.path for a in param_arrays(GPTConfig.named("tiny"))][:3]
    ['embed/embedding', 'position', 'blocks/0/norm1/scale']
"""

from __future__ import annotations

from jmp.plan.batch_costs import _batch_comms as _batch_comms
from jmp.plan.batch_costs import _gathered_bytes as _gathered_bytes
from jmp.plan.batch_costs import _gathers as _gathers
from jmp.plan.batch_costs import _norm_comms as _norm_comms
from jmp.plan.compute_costs import _activation_bytes as _activation_bytes
from jmp.plan.compute_costs import _flops as _flops
from jmp.plan.context_costs import _context_comms as _context_comms
from jmp.plan.moe_costs import _expert_batch_comms as _expert_batch_comms
from jmp.plan.moe_costs import _moe_comms as _moe_comms
from jmp.plan.moe_costs import expert_capacity as expert_capacity
from jmp.plan.moe_costs import expert_slots as expert_slots
from jmp.plan.params import ParamArray as ParamArray
from jmp.plan.params import _Layout as _Layout
from jmp.plan.params import _layouts as _layouts
from jmp.plan.params import param_arrays as param_arrays
from jmp.plan.tensor_costs import _sequence_comms as _sequence_comms
from jmp.plan.tensor_costs import _tensor_comms as _tensor_comms
from jmp.plan.terms import Comm as Comm
from jmp.plan.terms import _Ctx as _Ctx
from jmp.plan.terms import _one_axis as _one_axis
from jmp.plan.terms import _ring_factor as _ring_factor
from jmp.plan.terms import expert_axis as expert_axis
