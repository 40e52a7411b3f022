"""The tensor axis's collectives: Megatron's activation all-reduces (``tp``), or under sequence
parallelism (``sp``) the reduce-scatters and all-gathers that replace them, and the
vocabulary-parallel loss.

``tp``: 4 activation all-reduces per block (the attention and MLP row-parallel outputs forward,
the qkv and MLP-up input gradients backward), one forward for the vocabulary-parallel embedding
(a one-hot product), one backward for the head's input gradient, 3 small ones for the
cross-entropy over the split vocabulary (max, sum of exponentials, target logit), and with remat
one more per block (the attention output is recomputed; the MLP output is not needed by the
backward pass, so XLA drops its recompute).

``sp`` (:mod:`jmp.layers.linear`, :mod:`jmp.layers.embed`): between the tensor-parallel regions
the residual stream's sequence is split over the tensor axis. Each row-parallel output
(attention, MLP down, the embedding's one-hot product) is reduce-scattered to this device's
sequence chunk instead of all-reduced, and each column-parallel input (qkv, MLP up, the head) is
all-gathered back; backward, each transposes into the other (an all-gather of the output
gradient, a reduce-scatter of the input gradient). Remat recomputes the two gathers of a block
and its attention output's scatter. With ``mode='collective'`` each block's and the head's
gathers and scatters (forward and backward) are ``c - 1`` collective-permutes of one sequence
chunk instead (a collective matmul); the embedding's stay. The gradients computed on a sequence
chunk are partial over the tensor axis: the norm scales' and the row-parallel biases' are
all-reduced over it, per microbatch; the position table's gradient is this device's rows, so
XLA updates those rows alone and all-gathers the new table and its optimizer moments once per
step (one more gradient-norm partial sum). Not modelled: with a sequence shorter than the
position table, XLA also moves the gradient's rows to the devices holding them in the table's
layout (a few collective-permutes over the tensor axis, a small share of its bytes).

Example:
    >>> from jmp.plan.estimate import estimate
    >>> est = estimate(GPTConfig.named("tiny"), {"model": 4}, "tp_sp", batch_size=8)
    >>> sorted({(c.kind, c.bytes) for c in est.comm if c.bytes > 10_000})
    [('all-gather', 16384), ('all-gather', 131072), ('reduce-scatter', 32768)]
"""

from __future__ import annotations

import math

from jmp.plan.terms import Comm, _Ctx


def _tensor_comms(c: _Ctx) -> list[Comm]:
    """Activation all-reduces over the tensor axis (Megatron) and the vocab-parallel loss; under
    sequence parallelism its gathers and scatters instead (:func:`_sequence_comms`)."""
    if c.seq_split:
        return _sequence_comms(c)
    act = c.tokens * c.cfg.d_model * c.wire
    vocab, heads, mlp = (c.tensor_split(r)[0] for r in ("head", "qkv", "up"))
    wanted: list[tuple[str | None, str]] = [
        (vocab, "embedding vocab-parallel lookup (one-hot product) forward")
    ]
    for i in range(c.cfg.n_layers):
        wanted.append((heads, f"layer {i} attention out-proj row-parallel forward"))
        if c.remat:
            wanted.append((heads, f"layer {i} attention out-proj recomputed (remat)"))
        wanted.append((heads, f"layer {i} qkv input gradient (column-parallel) backward"))
        if not c.cfg.is_moe_layer(i):
            wanted.append((mlp, f"layer {i} MLP down row-parallel forward"))
            wanted.append((mlp, f"layer {i} MLP up input gradient (column-parallel) backward"))
    wanted.append((vocab, "head input gradient (column-parallel) backward"))
    # one all-reduce of the activation each, over the axis that splits its layer (if any)
    out = [Comm("all-reduce", axis, act, c.micro, what) for axis, what in wanted if axis]
    return out + (_loss_comms(c, vocab) if vocab else [])


def _loss_comms(c: _Ctx, vocab: str) -> list[Comm]:
    """The cross-entropy over the split vocabulary: 3 float32 values per token summed."""
    tok = c.tokens * 4  # the loss is computed in float32
    return [
        Comm("all-reduce", vocab, tok, c.micro, f"cross-entropy {what} over the split vocabulary")
        for what in ("max", "sum of exp", "target logit")
    ]


def _sequence_comms(c: _Ctx) -> list[Comm]:
    """Sequence parallelism over the tensor axis (see the module docstring), per step."""
    axis, t = c.tensor_split("qkv")
    if axis is None:
        return []
    L, m = c.cfg.n_layers, c.micro
    whole = c.tokens * c.cfg.d_model * c.wire  # this device's rows, the whole sequence
    chunk = whole // t

    def gather(n: int, what: str) -> Comm:
        if c.ring:
            return Comm("collective-permute", axis, chunk, (t - 1) * n, what + " (ring steps)")
        return Comm("all-gather", axis, whole, n, what)

    def scatter(n: int, what: str) -> Comm:
        if c.ring:
            return Comm("collective-permute", axis, chunk, (t - 1) * n, what + " (ring steps)")
        return Comm("reduce-scatter", axis, chunk, n, what)

    out = [
        Comm("reduce-scatter", axis, chunk, m, "embedding lookup (one-hot product) scattered"),
        scatter(2 * L * m, "attention and MLP-down outputs (row-parallel) scattered, forward"),
        gather(2 * L * m, "qkv and MLP-up inputs (column-parallel) gathered, forward"),
        gather(m, "head input gathered, forward"),
        scatter(m, "head input gradient scattered, backward"),
        scatter(2 * L * m, "qkv and MLP-up input gradients scattered, backward"),
        gather(2 * L * m, "attention and MLP-down output gradients gathered, backward"),
        Comm("all-gather", axis, whole, m, "embedding output gradient gathered, backward"),
    ]
    if c.remat:  # the recompute gathers both inputs again and scatters the attention output
        out += [
            gather(2 * L * m, "qkv and MLP-up inputs gathered again (remat)"),
            scatter(L * m, "attention output scattered again (remat)"),
        ]
    out += _loss_comms(c, axis)
    # the norm scales' and row-parallel biases' gradients, (d_model,) each, whole on every device
    partial = [x for x in c.layouts if x.array.role in ("norm", "out_bias", "down_bias")]
    if partial:
        out.append(
            Comm(
                "all-reduce",
                axis,
                c.cfg.d_model * c.pwire,
                len(partial) * m,
                f"norm scale and row-parallel bias gradients over the sequence ({len(partial)})",
            )
        )
    for lay in c.layouts:
        if lay.array.role == "position":  # its rows updated where their gradient is
            table = math.prod(lay.array.shape) // lay.split(c.mesh) * c.pwire
            out.append(
                Comm(
                    "all-gather",
                    axis,
                    table,
                    1 + c.moments,
                    f"position table (and {c.moments} optimizer moments) gathered after the update",
                )
            )
    return out
