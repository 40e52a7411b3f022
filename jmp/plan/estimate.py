"""The estimate: memory, communication, FLOPs and time of one GPT train step, per device.

``estimate`` predicts, for a :class:`~jmp.models.gpt.GPTConfig`, a mesh shape and a strategy of
:func:`jmp.rules.preset`, what ``jmp.train.make_step`` compiles to: per-device bytes of parameters,
gradients, optimizer state and activations, and every collective of the step. It checks the
inputs, resolves the strategy's rules strictly (as ``shard_init`` would), and sums the cost
terms (indexed by :mod:`jmp.plan.costs`; :mod:`jmp.plan.pipeline_costs` for ``pp*``) into an
:class:`Estimate`.

Modelled: dp, fsdp, tp and their compositions, sequence parallelism (``tp_sp``, ``dp_tp_sp``,
``fsdp_tp_sp``: reduce-scatters and all-gathers over ``'model'`` instead of all-reduces, or
with ``cfg.mode='collective'`` their ring steps; the residual stream's activations split over
``'model'``), pipelines (``pp*``), context parallelism (``cp*``: ``cfg.cp_impl`` ring or
allgather, ``cfg.cp_load_balance``) and, for a mixture of experts (``cfg.n_experts``), ``dp``,
``ep``, ``dp_ep`` and ``fsdp_ep`` (:data:`MOE_STRATEGIES`; model FLOPs count active
parameters, memory every expert, split over ``'expert'``). Not modelled: FSDP or context
parallelism inside pipeline stages. Each :class:`Estimate`'s
``reason`` starts with what limits the candidate: memory (its largest term), compute, or
communication (the mesh axis that takes the most time).

What depends on the backend comes from :class:`~jmp.plan.hardware.Device` (``platform``): GPUs
reduce-scatter FSDP gradients, CPUs all-reduce them and send 16-bit values as float32.

Time is a roofline, not a simulation: compute runs at a stated share of the device's peak
FLOP/s (``Device.matmul_efficiency``, 60% by default), each collective moves its ring volume at
a share of ``link_bandwidth`` (``link_efficiency``, 75%; one figure for every axis: an axis that
crosses nodes is slower in reality), and nothing overlaps (:meth:`Device.assumptions` says it in
words). MFU is model FLOPs over the raw peak, as published MFUs are.

Example:
    >>> est = estimate(GPTConfig.named("7b", dtype="bfloat16"), {"data": 8, "model": 8},
    ...                "fsdp_tp", batch_size=64, device="h100")
    >>> est.fits, est.comm_bytes["model"], f"{est.mfu:.0%}"
    (True, 17448501896, '34%')
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from jax.sharding import AbstractMesh

from jmp import strategies
from jmp.errors import ConfigError
from jmp.mesh import format_mesh_shape
from jmp.models.gpt import GPTConfig
from jmp.plan.batch_costs import _batch_comms, _gathered_bytes, _norm_comms
from jmp.plan.compute_costs import _activation_bytes, _flops
from jmp.plan.context_costs import _context_comms
from jmp.plan.hardware import Device, get_device
from jmp.plan.moe_costs import _expert_batch_comms, _moe_comms, expert_capacity, expert_slots
from jmp.plan.params import _layouts
from jmp.plan.pipeline_costs import (
    STAGE_AXIS,
    _pipeline_activations,
    _pipeline_comms,
    _pipeline_flops,
    pipeline_arrays,
)
from jmp.plan.tensor_costs import _tensor_comms
from jmp.plan.terms import Comm, _Ctx, _ring_factor
from jmp.rules import check_batch, preset
from jmp.units import human_bytes

#: The kinds the cost terms model: every kind of the registry. A strategy with a kind outside
#: this list would not be estimated (:func:`jmp.plan.compare` reads the compiled program of any)
#: rather than estimated wrongly.
MODELLED_KINDS = ("dp", "fsdp", "tp", "sp", "pp", "cp", "ep")
#: The strategies modelled for a mixture of experts (``n_experts > 0``): expert parallelism
#: without a tensor axis, and plain data parallelism (every device holds every expert).
MOE_STRATEGIES = ("dp", "ep", "dp_ep", "fsdp_ep")
#: Kinds with no cost terms inside pipeline stages yet.
_NOT_IN_STAGES = {"fsdp", "cp"}


def _modelled(name: str) -> bool:
    kinds = {k.name for k in strategies.parse(name).kinds}
    return kinds <= set(MODELLED_KINDS) and not ("pp" in kinds and kinds & _NOT_IN_STAGES)


#: The strategies the cost model covers: those of the registry (:mod:`jmp.strategies`) made of
#: modelled kinds, but FSDP and context parallelism inside pipeline stages, which have no cost
#: terms yet. The pipeline ones (``pp*``) stack the blocks over ``'stage'`` (``jmp.pipeline``)
#: and run the rest within a stage.
STRATEGIES = tuple(s for s in strategies.names() if _modelled(s))
_NEEDS = {s: strategies.axes(s) for s in STRATEGIES}  # strategy -> the mesh axes it splits
PIPELINE_SCHEDULES = strategies.PIPELINE_SCHEDULES
CONTEXT_AXIS = strategies.KINDS_BY_NAME["cp"].axis
TENSOR_AXIS = strategies.KINDS_BY_NAME["tp"].axis  # sp splits the sequence over it


@dataclass(frozen=True)
class Estimate:
    """Predicted per-device cost of one train step (see :func:`estimate`).

    Memory fields are bytes per device; ``comm`` lists every collective; ``comm_bytes`` sums
    ``bytes * count`` per mesh axis; times are seconds (``step_time = compute_time + comm_time``:
    no overlap of compute and communication is assumed, so it is an upper bound).
    """

    strategy: str
    mesh_shape: dict[str, int]
    device: Device
    batch_size: int
    seq_len: int
    microbatches: int
    remat: bool
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    gathered_bytes: int  # FSDP: whole-over-data copies of parameters alive at the peak
    total_bytes: int
    comm: tuple[Comm, ...]
    comm_bytes: dict[str, int]
    flops: float  # model FLOPs per device per step (remat's recompute not counted)
    compute_time: float
    comm_time: float
    step_time: float
    mfu: float
    fits: bool
    reason: str
    schedule: str | None = None  # pipeline strategies: '1f1b' or 'gpipe'
    bubble: float = 0.0  # pipeline idle share of the compute: (S - 1) / (M + S - 1)
    cp_impl: str | None = None  # context-parallel strategies: 'ring' or 'allgather'

    @property
    def mesh(self) -> str:
        return format_mesh_shape(self.mesh_shape)

    @property
    def state_bytes(self) -> int:
        """What the compiled step takes as its state argument: params, optimizer, step counter."""
        return self.params_bytes + self.optimizer_bytes + 4

    def comm_report(self) -> str:
        """The predicted collectives, one per line, and the per-axis totals."""
        lines = [
            f"  {c.kind:14s} {c.axis:6s} {c.bytes:>12,d} B x{c.count:<4d} {c.what}"
            for c in self.comm
        ]
        lines += [f"  total over {a!r}: {b:,d} B" for a, b in self.comm_bytes.items()]
        return "\n".join(lines)


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def _check_inputs(
    cfg: GPTConfig,
    strategy: str,
    mesh_shape: Mapping[str, int],
    batch_size: int,
    seq_len: int,
    microbatches: int,
    optimizer: str,
    schedule: str,
) -> None:
    problems = []
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"Strategy {strategy!r} is not in the planner's cost model, which "
            f"covers {', '.join(STRATEGIES)}."
        )
    if cfg.n_experts and strategy not in MOE_STRATEGIES:
        raise ConfigError(
            f"Strategy {strategy!r} is not in the planner's cost model for a mixture of experts "
            f"(n_experts={cfg.n_experts}), which covers {', '.join(MOE_STRATEGIES)}."
        )
    activation = getattr(cfg, "expert_activation", "swiglu")
    if cfg.n_experts and activation != "swiglu":
        raise ConfigError(
            f"expert_activation={activation!r} is not in the planner's cost model, which "
            f"covers SwiGLU experts ('swiglu')."
        )
    if not cfg.n_experts and "ep" in strategy.split("_"):
        raise ConfigError(
            f"Strategy {strategy!r} splits experts over 'expert', but the model has none "
            f"(n_experts=0). Fix: a mixture of experts (n_experts > 0), or a strategy without ep."
        )
    if schedule not in PIPELINE_SCHEDULES:
        problems.append(f"schedule={schedule!r} must be one of {PIPELINE_SCHEDULES}")
    if strategy.startswith("pp") and isinstance(mesh_shape.get(STAGE_AXIS), int):
        from jmp.pipeline.split import check_stages

        problems += check_stages(cfg, mesh_shape[STAGE_AXIS])
    if not mesh_shape or any(not isinstance(n, int) or n < 1 for n in mesh_shape.values()):
        problems.append(f"mesh_shape={dict(mesh_shape)!r} must map axis names to sizes >= 1")
    for name, value in (
        ("batch_size", batch_size),
        ("microbatches", microbatches),
        ("seq_len", seq_len),
    ):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r} must be a positive int")
    if not problems and seq_len > cfg.seq_len:
        problems.append(f"seq_len={seq_len} exceeds the model's seq_len={cfg.seq_len}")
    ways = mesh_shape.get(CONTEXT_AXIS, 1) if "cp" in strategy.split("_") else 1
    if not problems and isinstance(ways, int) and ways > 1:
        chunks = 2 * ways if cfg.cp_load_balance else ways
        if seq_len % chunks:
            problems.append(
                f"seq_len={seq_len} does not split into {chunks} chunks over "
                f"{CONTEXT_AXIS}={ways}"
                + (" (load balanced: 2 per device)" if chunks > ways else "")
            )
    ways = mesh_shape.get(TENSOR_AXIS, 1) if "sp" in strategy.split("_") else 1
    if not problems and isinstance(ways, int) and seq_len % ways:
        problems.append(
            f"seq_len={seq_len} does not split over {TENSOR_AXIS}={ways} (sequence parallel: "
            f"a multiple of {ways})"
        )
    if not problems and batch_size % microbatches:
        problems.append(f"microbatches={microbatches} must divide batch_size={batch_size}")
    if optimizer not in ("adamw", "sgd"):
        problems.append(f"optimizer={optimizer!r} must be 'adamw' or 'sgd'")
    if problems:
        raise ConfigError("Invalid plan input: " + "; ".join(problems) + ".")


def estimate(
    cfg: GPTConfig,
    mesh_shape: Mapping[str, int],
    strategy: str,
    /,
    *,
    batch_size: int,
    seq_len: int | None = None,
    microbatches: int = 1,
    remat: bool | None = None,
    device: Device | str = "cpu",
    param_bytes: int | None = None,
    compute_bytes: int | None = None,
    optimizer: str = "adamw",
    schedule: str = "1f1b",
) -> Estimate:
    """Predict memory, collectives, FLOPs and time per device of one train step.

    Args:
        cfg: the model.
        mesh_shape: ``{'data': 2, 'model': 4}``.
        strategy: one of ``jmp.rules.STRATEGIES``; the mesh must suit it (as ``preset`` checks).
        batch_size: global batch (sequences) per step, split into ``microbatches``.
        seq_len: tokens per sequence (default ``cfg.seq_len``).
        remat: recompute blocks in the backward pass (default ``cfg.remat``).
        device: a :class:`Device` or a preset name.
        param_bytes, compute_bytes: bytes per parameter / activation value (default from
            ``cfg.param_dtype`` / ``cfg.dtype``).
        optimizer: ``'adamw'`` (two moments in the parameters' dtype, as optax keeps them, and
            two int32 counts) or ``'sgd'`` (no state).
        schedule: pipeline strategies (``pp*``): ``'1f1b'`` or ``'gpipe'``, as
            ``jmp.pipeline.make_loss_fn`` runs it; ``microbatches`` is then the pipeline's M
            (``jmp.train.loop`` passes ``TrainConfig.microbatches``), not gradient accumulation.

    Raises:
        ConfigError: unknown strategy or device, bad sizes, a batch the batch axes do not divide.
        ShardingError: the mesh does not suit the strategy, or a parameter dimension is not
            divisible by its mesh axes (jmp's strict resolution, as ``shard_init`` would fail).

    Example:
        >>> est = estimate(GPTConfig.named("tiny"), {"model": 8}, "tp", batch_size=8)
        >>> est.comm_bytes
        {'model': 1316912}
    """
    seq = cfg.seq_len if seq_len is None else seq_len
    _check_inputs(cfg, strategy, mesh_shape, batch_size, seq, microbatches, optimizer, schedule)
    dev = get_device(device)
    # any policy but none is modelled as full remat (every block recomputed)
    remat = bool(cfg.remat) if remat is None else remat
    pb = param_bytes or _itemsize(cfg.param_dtype)
    cb = compute_bytes or _itemsize(cfg.dtype)
    amesh = AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    rules = preset(strategy, amesh)
    pipe = strategy.startswith("pp")
    S = mesh_shape[STAGE_AXIS] if pipe else 1
    layouts = _layouts(cfg, rules, amesh, pipeline_arrays(cfg, S) if pipe else None)
    batch_axes, rows = check_batch(batch_size, microbatches, amesh, rules)
    batch_axes = tuple(a for a in batch_axes if amesh.shape[a] > 1)
    sizes = dict(mesh_shape)
    cpu = dev.platform == "cpu"  # XLA:CPU upcasts 16-bit collectives and has no reduce-scatter
    cp_ways = sizes.get(CONTEXT_AXIS, 1) if "cp" in strategy.split("_") else 1
    sp = "sp" in strategy.split("_") and sizes.get(TENSOR_AXIS, 1) > 1
    ctx = _Ctx(
        cfg,
        sizes,
        layouts,
        batch_axes,
        rows,
        seq,
        microbatches,
        remat,
        max(cb, 4) if cpu else cb,
        max(pb, 4) if cpu else pb,
        not cpu,
        CONTEXT_AXIS if cp_ways > 1 else None,
        cp_ways,
        cfg.cp_impl,
        cfg.cp_load_balance,
        sp,
        sp and cfg.mode == "collective",
        2 if optimizer == "adamw" else 0,
    )
    if pipe:
        comm = tuple(c for c in _pipeline_comms(ctx, S, schedule) if c.count)
    else:
        batch = _expert_batch_comms if "ep" in strategy.split("_") else _batch_comms
        comm = tuple(
            _tensor_comms(ctx)
            + batch(ctx)
            + _moe_comms(ctx)
            + _context_comms(ctx)
            + _norm_comms(ctx)
        )
    comm_bytes: dict[str, int] = defaultdict(int)
    for c in comm:
        comm_bytes[c.axis] += c.total_bytes
    local = sum(math.prod(x.array.shape) // x.split(sizes) for x in layouts) * pb
    opt = 2 * local + 8 if optimizer == "adamw" else 0
    if pipe:  # gradients accumulate over the ticks: the running sum + this tick's
        acts, gathered, grads = _pipeline_activations(ctx, S, schedule, ctx.wire), 0, 2 * local
        model_flops, executed = _pipeline_flops(cfg, batch_size * seq, seq, remat, S, schedule)
    else:
        acts = _activation_bytes(ctx, ctx.wire, flash=not cpu and cb == 2)  # CPU computes f32
        gathered = _gathered_bytes(ctx, pb)
        grads = local * (2 if microbatches > 1 else 1)  # accumulated + this microbatch's
        slots = expert_slots(ctx) if cfg.n_experts and expert_capacity(ctx) else None
        model_flops, executed = _flops(
            cfg, batch_size * seq, seq, remat, ctx.context is not None, slots
        )
    total = local + grads + opt + 4 + acts + gathered
    n_dev = math.prod(sizes.values())
    # the bubble: a stage works M of its M + S - 1 ticks (forward and backward alike)
    bubble = (S - 1) / (microbatches + S - 1) if pipe else 0.0
    compute_time = executed / n_dev / dev.achieved_flops / (1 - bubble)
    comm_time = sum(c.total_bytes * _ring_factor(c.kind, _axis_size(sizes, c.axis)) for c in comm)
    comm_time /= dev.achieved_bandwidth
    step_time = compute_time + comm_time
    mfu = model_flops / n_dev / (step_time * dev.peak_flops) if step_time else 0.0
    fits = total <= dev.usable_bytes
    mesh = format_mesh_shape(sizes)
    memory = {"parameters": local, "gradients": grads, "optimizer state": opt}
    memory |= {"activations": acts, "FSDP-gathered weights": gathered}
    axis_time = defaultdict(float)
    for c in comm:
        axis_time[c.axis] += c.total_bytes * _ring_factor(c.kind, _axis_size(sizes, c.axis))
    limit = _limit(fits, memory, compute_time, comm_time, dict(axis_time), dev)
    reason = (
        f"{strategy} on {mesh}: {limit}; {human_bytes(total)}/device of "
        f"{human_bytes(dev.usable_bytes)} usable ({'fits' if fits else 'does not fit'}), "
        f"{human_bytes(sum(comm_bytes.values()))} communicated per step, step "
        f"{_fmt_time(step_time)} ({_fmt_time(compute_time)} compute + "
        f"{_fmt_time(comm_time)} comm), MFU {mfu:.0%}"
    )
    if ctx.context:
        reason += f", cp_impl={cfg.cp_impl} over {CONTEXT_AXIS}={cp_ways}"
    if sp:
        reason += (
            f", sequence parallel over {TENSOR_AXIS}={sizes[TENSOR_AXIS]} (mode={cfg.mode}: "
            + ("ring steps of collective-permutes)" if ctx.ring else "reduce-scatter/all-gather)")
        )
    if pipe:
        reason += (
            f", {schedule} with {microbatches} microbatches over {S} stages: bubble "
            f"{bubble:.0%} of the compute ((S-1)/(M+S-1))"
        )
    return Estimate(
        strategy,
        sizes,
        dev,
        batch_size,
        seq,
        microbatches,
        remat,
        local,
        grads,
        opt,
        acts,
        gathered,
        total,
        comm,
        dict(comm_bytes),
        model_flops / n_dev,
        compute_time,
        comm_time,
        step_time,
        mfu,
        fits,
        reason,
        schedule if pipe else None,
        bubble,
        cfg.cp_impl if ctx.context else None,
    )


def _limit(
    fits: bool,
    memory: Mapping[str, int],
    compute: float,
    comm: float,
    axis_time: Mapping[str, float],
    dev: Device,
) -> str:
    """What limits a candidate, in words: memory (its largest term), or the larger of compute
    and communication (then the mesh axis whose collectives take the most time)."""
    if not fits:
        name, size = max(memory.items(), key=lambda kv: kv[1])
        return f"limited by memory ({name} {human_bytes(size)} is the largest term)"
    if comm > compute:
        axis = max(axis_time, key=lambda a: axis_time[a])
        share = axis_time[axis] / dev.achieved_bandwidth / (compute + comm)
        return f"limited by communication ({share:.0%} of the step over {axis!r})"
    return f"limited by compute ({compute / (compute + comm):.0%} of the step)"


def _axis_size(sizes: Mapping[str, int], axis: str) -> int:
    """The devices of one collective's group: ``'data,expert'`` runs over both axes."""
    return math.prod(sizes[a] for a in axis.split(","))


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype]
