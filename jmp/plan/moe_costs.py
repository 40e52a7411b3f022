"""The mixture of experts' terms (:mod:`jmp.layers.moe`): expert buffers, the dispatch and
combine all-to-alls, the routing statistics, and the batch axes of an ep strategy.

Under ep the dispatch and combine all-to-alls of the ``(n_experts, capacity, d)`` slot buffers
over ``'expert'`` (4 per MoE block: forward and transposed), the routing statistics all-reduced
over the batch axes, the gradients of everything but the experts all-reduced over the joint
batch axes (``'data,expert'``), the experts' over ``'data'``.

Example:
    >>> from jmp.plan.estimate import estimate
    >>> moe = GPTConfig.named("tiny", n_experts=8, top_k=2)
    >>> est = estimate(moe, {"expert": 8}, "ep", batch_size=8)
    >>> [c.count for c in est.comm if c.kind == "all-to-all"]
    [8]
"""

from __future__ import annotations

import math

from jmp.plan.batch_costs import _gathers
from jmp.plan.terms import Comm, _Ctx, _one_axis, expert_axis

__all__ = ["expert_axis", "expert_capacity", "expert_slots"]


def expert_capacity(c: _Ctx) -> int | None:
    """Slots per expert in a device's buffers (None: dropless grouped matmuls, no buffers).

    As :class:`jmp.layers.MoE` sizes them: ``n`` (the device's tokens, so that dropless
    routing drops nothing) under expert parallelism, or ``min(n, ceil(cf * n * k / E))``.
    """
    cfg, n = c.cfg, c.tokens
    if cfg.capacity_factor is None and expert_axis(c) is None:
        return None
    if cfg.capacity_factor is None:
        return n
    return min(n, math.ceil(cfg.capacity_factor * n * cfg.top_k / cfg.n_experts))


def expert_slots(c: _Ctx) -> float:
    """Expert rows computed per token: ``top_k`` when dropless (``ragged_dot``), else every
    slot of the ``(n_experts, capacity)`` buffers."""
    cap = expert_capacity(c)
    return c.cfg.top_k if cap is None else c.cfg.n_experts * cap / c.tokens


def _moe_comms(c: _Ctx) -> list[Comm]:
    """A MoE block's collectives (:mod:`jmp.layers.moe`), per microbatch: under ep the
    dispatch and combine all-to-alls of the ``(n_experts, capacity, d)`` slot buffers over the
    expert axis (forward, and their transposes backward: 4; remat recomputes the forward's 2),
    and the routing statistics (expert counts and probabilities, z, dropped) summed over the
    batch axes."""
    cfg = c.cfg
    moe = cfg.moe_layers(cfg.n_layers)
    if not moe:
        return []
    out: list[Comm] = []
    ep, cap = expert_axis(c), expert_capacity(c)
    if ep and cap is not None:
        buffer = cfg.n_experts * cap * cfg.d_model * c.wire
        count = moe * c.micro * (6 if c.remat else 4)
        out.append(Comm("all-to-all", ep, buffer, count, "MoE dispatch / combine (fwd, bwd)"))
    if c.batch_axes:
        joint = ",".join(a for a in c.mesh if a in c.batch_axes)
        stats = moe * c.micro
        out += [
            Comm("all-reduce", joint, cfg.n_experts * 4, 2 * stats, "MoE expert counts, probs"),
            Comm("all-reduce", joint, 4, 2 * stats, "MoE router z and dropped pairs"),
        ]
    return out


def _expert_batch_comms(c: _Ctx) -> list[Comm]:
    """Gradient reductions, FSDP gathers and the loss over the batch axes of an ep strategy
    (the tokens split over ``('data', 'expert')``, or ``'expert'`` alone).

    A parameter the experts' axis does not split is reduced over every batch axis at once
    (one all-reduce over the joint axes), the experts' kernels over the data axis only. Under
    FSDP XLA reduces the auto-sharded matmul kernels (qkv, out, head) in two steps instead:
    whole over the data axis, then this device's shard over the expert axis.
    """
    ep = expert_axis(c)
    order = [a for a in c.mesh if a in c.batch_axes]
    joint = ",".join(order)
    rest = [a for a in order if a != ep]
    data = _one_axis(rest, "the batch split besides the experts'") if rest else None
    n = c.mesh[data] if data else 1
    fsdp = data is not None and any(data in x.split_axes for x in c.layouts)
    reductions = c.micro  # the expert axis splits parameters: reduced per microbatch
    out = [Comm("all-reduce", joint, 4, reductions, "mean loss over the batch split")]
    for lay in c.layouts:
        arr = lay.array
        whole = math.prod(arr.shape) // lay.split(c.mesh, lay.split_axes - {data}) * c.pwire
        if arr.role == "position":
            whole = whole * c.seq // arr.shape[0]
        if fsdp and data in lay.split_axes:
            out.append(
                Comm(
                    "all-gather",
                    data,
                    whole,
                    _gathers(arr.role, arr.layer, c.remat),
                    f"{arr.path} FSDP gather",
                )
            )
        if arr.role == "expert":
            if data:
                out.append(Comm("all-reduce", data, whole, reductions, f"{arr.path} gradient"))
        elif fsdp and data and ep and arr.role in ("qkv", "out", "head"):
            out += [
                Comm("all-reduce", data, whole, reductions, f"{arr.path} gradient (whole)"),
                Comm("all-reduce", ep, whole // n, reductions, f"{arr.path} gradient (shard)"),
            ]
        else:
            out.append(Comm("all-reduce", joint, whole, reductions, f"{arr.path} gradient"))
    return out
