"""The batch axes' terms: gradient reductions, FSDP gathers, the loss mean, the global
gradient norm's partial sums and the FSDP-gathered weights alive at once.

- batch axis: one reduction of every gradient (whole over the batch axis, split over the tensor
  axis) and of the loss's mean: once per step when the batch axis splits no parameter (dp:
  each device accumulates its microbatches' gradients first), once per microbatch under FSDP
  (XLA keeps it inside the accumulation loop) or sequence parallelism (the layers' regions are
  manual over the batch axes: the reduction is their transpose).
- FSDP (``embed`` split over the batch axis): each split parameter is all-gathered once forward
  (outside the microbatch loop) and kept for the backward pass; norm scales are gathered again
  for the backward pass; with remat every block's kernels (and its norm scales, attention bias)
  are gathered again to recompute. The embedding table of pure ``fsdp`` (vocabulary whole) is
  never gathered: the token ids are all-gathered, each device looks up its embedding columns and
  two all-to-alls (forward, backward) move them to the batch layout. Under sequence parallelism
  the position table's rows are this device's sequence chunk: gathered and reduced alone.
- the global gradient norm: one float per parameter array and mesh axis that splits it,
  all-reduced over that axis once (the step's norm serves the metric, the non-finite guard and
  :func:`jmp.train.clipping.clip_by_global_norm`). Under sequence parallelism the position
  table's gradient is split over the tensor axis too; with FSDP and one microbatch the arrays
  the tensor axis splits come out of their regions whole over the batch axis (no partial sum).

Example:
    >>> from jmp.plan.estimate import estimate
    >>> est = estimate(GPTConfig.named("tiny"), {"data": 8}, "fsdp", batch_size=8)
    >>> sorted({c.kind for c in est.comm})
    ['all-gather', 'all-reduce', 'all-to-all']
"""

from __future__ import annotations

import math
from collections import defaultdict

from jmp.plan.terms import Comm, _Ctx, _one_axis, expert_axis


def _gathers(
    role: str,
    layer: int | None,
    remat: bool,
    cp: bool = False,
    micro: int = 1,
    sp: bool = False,
) -> int:
    """How many times XLA all-gathers an FSDP-split array per step (see module docstring).

    In a context-parallel region (``cp``) the matmul kernels and the head are gathered again
    for the backward pass, with or without remat (the region's transpose does not reuse the
    forward's gathers); with remat the recompute's gathers stay in the microbatch loop, as they
    do under sequence parallelism (``sp``)."""
    in_block = layer is not None
    if (cp or sp) and remat and in_block:
        per_micro = {"norm": 2, "qkv": 1, "out": 1, "up": 1, "down": 1, "out_bias": 1}
        return 1 + per_micro.get(role, 0) * micro
    if role == "norm":
        return 3 if remat and in_block else 2
    if cp and role in ("qkv", "out", "up", "down", "head"):
        return 2
    if role in ("qkv", "out", "up", "down") or (role == "out_bias" and remat):
        return 2 if remat else 1
    return 1


def _batch_comms(c: _Ctx) -> list[Comm]:
    """Gradient reductions, FSDP gathers and the loss mean over the batch axis."""
    if not c.batch_axes:
        return []
    data = _one_axis(c.batch_axes, "the batch split")
    n = c.mesh[data]
    # A batch axis that splits no parameter (dp) sums the microbatches' gradients on each
    # device and reduces them once per step (jmp.train.step.reduce_once_axes); under FSDP the
    # reductions stay in the accumulation loop, one per microbatch.
    fsdp = any(data in lay.split_axes for lay in c.layouts)
    reductions = c.micro if fsdp or c.seq_split else 1
    out: list[Comm] = [Comm("all-reduce", data, 4, reductions, "mean loss over the batch split")]
    act = c.tokens * c.cfg.d_model * c.wire
    ids = c.rows * n * c.seq // c.cp * 4
    for lay in c.layouts:
        arr, sharded = lay.array, data in lay.split_axes
        whole = math.prod(arr.shape) // lay.split(c.mesh, lay.split_axes - {data}) * c.pwire
        if arr.role == "position" and not c.context:  # only the rows in use
            whole = whole * c.seq // arr.shape[0]
            if c.seq_split:  # and of those, this device's sequence chunk
                whole //= c.tensor_split("qkv")[1]
        where = arr.path
        if sharded and arr.role == "embedding" and not lay.split_axes - {data}:
            # vocabulary whole: jnp.take on a table split by columns, never gathered (in a cp
            # region the ids are gathered again for the backward pass)
            out += [
                Comm(
                    "all-gather",
                    data,
                    ids,
                    c.micro * (2 if c.context else 1),
                    "token ids for the column-split embedding lookup",
                ),
                Comm("all-to-all", data, act, c.micro, "embedding columns -> batch forward"),
                Comm("all-to-all", data, act, c.micro, "embedding gradient -> columns"),
            ]
            continue
        if sharded:
            out.append(
                Comm(
                    "all-gather",
                    data,
                    whole,
                    _gathers(arr.role, arr.layer, c.remat, bool(c.context), c.micro, c.seq_split),
                    f"{where} FSDP gather",
                )
            )
        if c.context and (
            arr.role == "position" or (arr.role == "embedding" and not lay.split_axes)
        ):
            # in a cp region a whole table's lookup (jnp.take) is transposed into a scatter-add
            # of the gathered output gradient and ids, not a reduction of the table's gradient
            what = "position" if arr.role == "position" else "embedding"
            out += [
                Comm("all-gather", data, act * n, c.micro, f"{what} output gradient (scatter-add)"),
                # the positions are the same every microbatch: XLA hoists their gather
                Comm("all-gather", data, ids, 1 if what == "position" else c.micro, f"{what} ids"),
            ]
            continue
        if sharded and c.reduce_scatter:
            out.append(
                Comm(
                    "reduce-scatter", data, whole // n, c.micro, f"{where} gradient reduce-scatter"
                )
            )
        else:
            out.append(Comm("all-reduce", data, whole, reductions, f"{where} gradient all-reduce"))
    return out


def _norm_comms(c: _Ctx) -> list[Comm]:
    """Global gradient norm: a float32 partial sum per array and splitting axis, computed once."""
    per_axis: dict[str, int] = defaultdict(int)
    whole_over = set(c.batch_axes) - {expert_axis(c)}
    tensor = c.tensor_split("qkv")[0] if c.seq_split else None
    for lay in c.layouts:
        for a in lay.split_axes:
            # a MoE's router and experts get their gradients from its shard_map over the token
            # axes whole over the data axis: their norms need no partial sums over it; nor do
            # sp's tensor-split arrays with FSDP and one microbatch (see the module docstring)
            manual = lay.array.role in ("router", "expert") or (
                tensor in lay.split_axes and c.micro == 1
            )
            if not (manual and a in whole_over):
                per_axis[a] += 1
        if tensor and lay.array.role == "position":  # its gradient: this device's rows
            per_axis[tensor] += 1
    return [
        Comm("all-reduce", a, 4, k, f"gradient norm partial sums ({k} arrays)")
        for a, k in per_axis.items()
    ]


def _gathered_bytes(c: _Ctx, param_bytes: int) -> int:
    """FSDP: whole copies of split weights alive at once (all of them without remat: the
    backward pass reuses the forward's gathers; with remat one block's, plus those outside)."""
    extra = 0
    gathered_over = set(c.batch_axes) - {expert_axis(c)}  # ep splits experts for good
    for lay in c.layouts:
        ways = lay.split(c.mesh, gathered_over)
        if ways == 1 or (c.remat and (lay.array.layer or 0) > 0):
            continue
        extra += math.prod(lay.array.shape) // lay.split(c.mesh) * (ways - 1) * param_bytes
    return extra
