"""The cost terms of the pipeline strategies (``pp``, ``pp_dp``, ``pp_tp``, ``pp_dp_tp``).

:mod:`jmp.pipeline` with ``microbatches`` as its M and ``schedule`` '1f1b' or 'gpipe', checked
against compiled steps: each stage holds its ``n_layers / S`` stacked blocks, the embedding,
position, final norm and head are replicated over ``'stage'`` (so is their optimizer state). Per
step a stage runs ``M + S - 1`` forward and as many backward ticks; every stage computes the
embedding and head every tick. Over ``'stage'``: one collective-permute of a microbatch's
activations per tick and direction (1F1B: less the sends XLA finds dead once it inlines a one-tick
phase, i.e. the last backward send when S = 2), one all-reduce of the replicated ends' gradients,
the loss and the norm sums. Within a stage the tensor axis adds the Megatron all-reduces per forward
(1F1B: forward ticks plus the recompute in its backward ticks) and backward, and the batch axis
all-reduces every gradient once per backward tick (not once per step); with the vocabulary whole the
embedding's gradient is an all-gather of the output gradient and the ids instead. Memory: GPipe
keeps ``M + S - 1`` ticks' activations, 1F1B ``min(M, 2S - 1)`` stage inputs and one microbatch's
activations. Time: ``compute * (M + S - 1) / M + comm``; the ``reason`` states the bubble.

A separate module because the accounting differs in kind, not degree: per tick rather than per
microbatch, stacked ``(stage, layers, ...)`` arrays, a stash instead of the whole forward's
activations. It reuses :mod:`jmp.plan.params`' arrays, :class:`~jmp.plan.terms.Comm`, the
gradient norm of :mod:`jmp.plan.batch_costs` and the FLOPs of :mod:`jmp.plan.compute_costs`.

Example:
    >>> [a.shape for a in pipeline_arrays(GPTConfig.named("tiny"), 2)][2]  # blocks/norm1/scale
    (2, 1, 64)
"""

from __future__ import annotations

import math

from jmp import strategies
from jmp.models.gpt import GPTConfig
from jmp.plan.batch_costs import _norm_comms
from jmp.plan.compute_costs import _flops
from jmp.plan.params import ParamArray, param_arrays
from jmp.plan.terms import Comm, _Ctx, _one_axis

STAGE_AXIS = strategies.STAGE_AXIS


def pipeline_arrays(cfg: GPTConfig, num_stages: int, /) -> list[ParamArray]:
    """The parameter arrays of ``PipelinedGPT(cfg, num_stages=S)``: each block parameter stacked
    ``(stage, layers, ...)`` (one array per role, path ``blocks/...``); the ends as in ``GPT``."""
    per = cfg.n_layers // num_stages
    out = []
    for arr in param_arrays(cfg):
        if arr.layer is None:
            out.append(arr)
        elif arr.layer == 0:
            out.append(
                ParamArray(
                    "blocks/" + arr.path.split("/", 2)[2],
                    (num_stages, per, *arr.shape),
                    ("stage", "layers", *arr.names),
                    arr.role,
                )
            )
    return out


def _pipeline_sends(schedule: str, S: int, M: int) -> int:
    """Collective-permutes of one stage per step: one per tick and direction, less the dead ones.

    GPipe: the forward scan sends every tick, its transpose sends back every tick. 1F1B runs one
    ``scan`` per phase (warm-up, steady, cool-down); XLA inlines a scan of one tick, and then a
    send whose result no later phase reads is dead code (with S = 2 the cool-down's last send of
    an input gradient). In a scan of more ticks the send stays in the loop body.
    """
    from jmp.pipeline.schedule import make_schedule

    plan = make_schedule(schedule, S, M)
    if schedule == "gpipe":
        return 2 * (M + S - 1)
    phases = plan.phases()
    sends = 0
    for i, (lo, hi, do_f, do_b) in enumerate(phases):
        later_f = any(p[2] for p in phases[i + 1 :])
        later_b = any(p[3] for p in phases[i + 1 :])
        for does, later in ((do_f, later_f), (do_b, later_b)):
            if does:
                sends += hi - lo if hi - lo > 1 or later else 0
    return sends


def _pipeline_comms(c: _Ctx, S: int, schedule: str) -> list[Comm]:
    """Every collective of a pipelined step (``jmp.pipeline.make_loss_fn`` in ``make_step``).

    Each stage runs ``ticks = M + S - 1`` forward ticks and as many backward ticks (GPipe's are
    autodiff's transpose of its forward scan; 1F1B's recompute the stage's forward inside a
    ``jax.vjp``). Every stage computes the embedding and the head every tick (SPMD: a select
    keeps the first's and the last's), so their collectives run every tick too.
    """
    cfg, M = c.cfg, c.micro
    ticks, per = M + S - 1, cfg.n_layers // S
    by_role = {x.array.role: x for x in c.layouts if not x.array.path.startswith("norm")}
    act = c.rows * c.seq * cfg.d_model * c.wire
    out = [
        Comm(
            "collective-permute",
            STAGE_AXIS,
            act,
            _pipeline_sends(schedule, S, M),
            "stage activations forward / input gradients backward (neighbours only)",
        ),
        Comm("all-reduce", STAGE_AXIS, 4, 1, "loss summed over stages"),
    ]
    for lay in c.layouts:
        if STAGE_AXIS not in lay.split_axes:
            local = math.prod(lay.array.shape) // lay.split(c.mesh) * c.pwire
            out.append(
                Comm(
                    "all-reduce",
                    STAGE_AXIS,
                    local,
                    1,
                    f"{lay.array.path} gradient summed over stages (replicated end)",
                )
            )

    def tensor_axis(role: str) -> str | None:
        axes = by_role[role].split_axes - set(c.batch_axes) - {STAGE_AXIS}
        return _one_axis(axes, f"the {role} split") if axes else None

    vocab, heads, mlp = tensor_axis("head"), tensor_axis("qkv"), tensor_axis("up")
    # forward computations of a stage per step: GPipe once per tick; 1F1B in its forward ticks
    # and again (recomputed) in its backward ticks. Losses and backwards: once per tick.
    fwd = ticks * (2 if schedule == "1f1b" else 1)
    for axis, n_fwd, n_bwd, what in ((heads, 1 + c.remat, 1, "attention"), (mlp, 1, 1, "MLP")):
        if axis:
            out += [
                Comm(
                    "all-reduce",
                    axis,
                    act,
                    per * fwd * n_fwd,
                    f"{what} row-parallel output forward, {per} layer(s)"
                    + (" (+ remat recompute)" if n_fwd > 1 else ""),
                ),
                Comm(
                    "all-reduce",
                    axis,
                    act,
                    per * ticks * n_bwd,
                    f"{what} column-parallel input gradient backward, {per} layer(s)",
                ),
            ]
    if vocab:
        tok = c.rows * c.seq * 4
        out += [
            Comm("all-reduce", vocab, act, fwd, "embedding vocab-parallel lookup forward"),
            Comm("all-reduce", vocab, act, ticks, "head input gradient backward"),
            Comm(
                "all-reduce",
                vocab,
                tok,
                3 * ticks,
                "cross-entropy max, sum of exp, target logit over the split vocabulary",
            ),
        ]
    if c.batch_axes:
        data = _one_axis(c.batch_axes, "the batch split")
        ways = c.mesh[data]
        out.append(Comm("all-reduce", data, 4, ticks, "mean loss over the batch split"))
        for lay in c.layouts:
            arr = lay.array
            local = math.prod(arr.shape) // lay.split(c.mesh) * c.pwire
            if arr.role == "position":
                local = local * c.seq // arr.shape[0]
            if arr.role == "embedding" and not lay.split_axes:
                # jnp.take's transpose (a scatter-add) on a batch-split cotangent: XLA gathers
                # the cotangent and the ids over the batch axis instead of reducing the table
                out += [
                    Comm(
                        "all-gather",
                        data,
                        c.rows * ways * c.seq * cfg.d_model * c.wire,
                        ticks,
                        "embedding output gradient gathered for the scatter-add",
                    ),
                    Comm(
                        "all-gather",
                        data,
                        c.rows * ways * c.seq * 4,
                        ticks,
                        "token ids gathered for the embedding scatter-add",
                    ),
                ]
                continue
            layers = arr.shape[1] if STAGE_AXIS in lay.split_axes else 1
            out.append(
                Comm(
                    "all-reduce",
                    data,
                    local // layers,
                    ticks * layers,
                    f"{arr.path} gradient all-reduce every backward tick"
                    + (f", per layer ({layers})" if layers > 1 else ""),
                )
            )
    return out + _norm_comms(c)


def _pipeline_activations(c: _Ctx, S: int, schedule: str, cb: int) -> int:
    """Activations alive at the peak on one stage (see :mod:`jmp.pipeline.run`).

    GPipe keeps what autodiff saves for each of the ``M + S - 1`` ticks of its forward scan (a
    stage's blocks, and the embedding and head every stage computes); with remat only the block
    inputs. 1F1B keeps ``min(M, 2S - 1)`` stage inputs (its stash) plus one microbatch's
    activations inside the ``jax.vjp`` being pulled back.
    """
    cfg = c.cfg
    by_role = {x.array.role: x for x in c.layouts if not x.array.path.startswith("norm")}
    d, f, h, per = cfg.d_model, cfg.hidden, cfg.n_heads, cfg.n_layers // S
    t_h, t_f, t_v = (
        by_role[r].split(c.mesh, by_role[r].split_axes - set(c.batch_axes) - {STAGE_AXIS})
        for r in ("qkv", "up", "head")
    )
    tokens = c.rows * c.seq
    x = tokens * d * cb
    block = tokens * cb * (4 * d + (4 * d + h * c.seq) // t_h + 2 * f // t_f)
    ends = tokens * cfg.vocab_size // t_v * (cb + 4 + (cb if t_v > 1 else 0)) + x
    one = (x * per + block if c.remat else block * per) + ends
    if schedule == "gpipe":
        return (c.micro + S - 1) * one
    return min(c.micro, 2 * S - 1) * x + one


def _pipeline_flops(
    cfg: GPTConfig, tokens: int, seq: int, remat: bool, S: int, schedule: str
) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs): every stage also runs the head (S - 1 wasted copies), and
    1F1B recomputes each stage's forward (blocks and head) inside its ``jax.vjp``."""
    model, executed = _flops(cfg, tokens, seq, remat)
    head = 2 * cfg.d_model * cfg.vocab_size * tokens  # one forward of the head
    executed += 3 * head * (S - 1)
    if schedule == "1f1b":
        blocks = (model - 3 * head) / 3  # one forward of the blocks
        executed += blocks + head * S
    return model, executed
