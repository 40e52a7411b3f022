"""The context axis's terms (``cp*``, :mod:`jmp.layers.context_parallel`), per microbatch.

Ring attention passes each layer's stacked K/V block ``c - 1`` hops forward and as many
backward (remat: once more forward); allgather attention all-gathers it forward and
reduce-scatters its gradient, after XLA's partitioner has made it whole over the batch and
tensor axes (all-gathers over those axes, forward and backward); the balanced layout returns to
natural order before the head (2 collective-permutes of half the hidden state each way; 1 when
c = 2); every gradient (this device's shard) and the loss are all-reduced over the context
axis. What the cp region changes on the batch axis (a whole table's lookup transposed into an
all-gather of the output gradient and ids; FSDP gathering every kernel again for the backward
pass) is in :mod:`jmp.plan.batch_costs`.

Example:
    >>> from jmp.plan.estimate import estimate
    >>> est = estimate(GPTConfig.named("tiny"), {"context": 8}, "cp", batch_size=8)
    >>> sorted({c.kind for c in est.comm if c.axis == "context"})
    ['all-reduce', 'collective-permute']
"""

from __future__ import annotations

import math

from jmp.plan.terms import Comm, _Ctx, _one_axis


def _context_comms(c: _Ctx) -> list[Comm]:
    """Context parallelism (:mod:`jmp.layers.context_parallel`): attention's K/V over the
    context axis, the balanced layout's return to natural order, and every gradient (and the
    loss) summed over the context axis, once per microbatch (the axis splits tokens)."""
    if not c.context:
        return []
    cfg, ax, n_c, L = c.cfg, c.context, c.cp, c.cfg.n_layers
    heads, t = c.tensor_split("qkv")
    # K and V stacked: (rows, seq/c, 2, heads/t, head_dim), one collective moves both
    block = c.tokens * 2 * cfg.n_heads // t * cfg.head_dim * c.wire
    fwd = c.micro * L * (2 if c.remat else 1)  # block forwards (remat: recomputed once)
    bwd = c.micro * L
    out: list[Comm] = []
    if c.cp_impl == "ring":
        out.append(
            Comm(
                "collective-permute",
                ax,
                block,
                (n_c - 1) * (fwd + bwd),
                "K/V block around the ring (c-1 hops per layer, forward and backward)",
            )
        )
    else:
        # XLA's partitioner makes the operand whole over the axes it handles (heads over the
        # tensor axis, then rows over the batch axis) before the manual context gather
        data = _one_axis(c.batch_axes, "the batch split") if c.batch_axes else None
        n = c.mesh[data] if data else 1
        if heads:
            out += [
                Comm("all-gather", heads, block * t, fwd, "K/V heads made whole (cp allgather)"),
                Comm("all-gather", heads, block * t * n_c, bwd, "K/V gradient heads made whole"),
            ]
        if data:
            out += [
                Comm("all-gather", data, block * t * n, fwd, "K/V rows made whole (cp allgather)"),
                Comm("all-gather", data, block * t * n * n_c, bwd, "K/V gradient rows made whole"),
            ]
        out += [
            Comm("all-gather", ax, block * t * n * n_c, fwd, "K/V of the whole sequence"),
            Comm("reduce-scatter", ax, block * t * n, bwd, "K/V gradient back to its block"),
        ]
    if c.balanced:  # even chunks and odd chunks move (with c = 2 the even ones are home)
        half = c.tokens // 2 * cfg.d_model * c.wire
        moves = 1 if n_c == 2 else 2
        out.append(
            Comm(
                "collective-permute",
                ax,
                half,
                2 * moves * c.micro,
                "balanced layout back to natural order before the head (and its gradient)",
            )
        )
    out.append(Comm("all-reduce", ax, 4, c.micro, "loss summed over the context split"))
    for lay in c.layouts:
        local = math.prod(lay.array.shape) // lay.split(c.mesh) * c.pwire
        out.append(
            Comm("all-reduce", ax, local, c.micro, f"{lay.array.path} gradient over the context")
        )
    return out
