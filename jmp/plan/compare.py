"""Compare: plan any Flax NNX model from its compiled train step, one candidate at a time.

Where :func:`jmp.plan.estimate` predicts a GPT's step from formulas, :func:`compare` asks the
compiler about any model: for each ``(strategy, mesh)`` candidate it builds the abstract model
(``nnx.eval_shape``: nothing is allocated), compiles ``jmp.train.make_step`` on abstract state
and batch, and reads from the program the bytes each mesh axis carries
(:func:`jmp.inspect.collectives`), the memory per device (:func:`jmp.inspect.memory`) and the
FLOPs per device (:func:`jmp.inspect.flops`). A device preset (:func:`jmp.plan.get_device`)
turns them into a roofline time with :func:`~jmp.plan.estimate`'s convention, and the
candidates are ranked: those that fit in memory by step time, then those that do not, then
those jmp rejects (a strategy that does not fit the mesh, a dimension its mesh axes do not
divide, a batch that does not split), each with the one-line reason.

The figures are the program compiled for the local backend: on CPU, XLA all-reduces FSDP
gradients (no reduce-scatter) and computes in float32, so bytes and memory are the CPU
program's; only the time and the fit come from the chosen device.

Example:
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         part = lambda names: nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
    ...         self.up = nnx.Linear(16, 64, kernel_init=part(("embed", "mlp")),
    ...                              use_bias=False, rngs=rngs)
    ...         self.down = nnx.Linear(64, 16, kernel_init=part(("mlp", "embed")),
    ...                                use_bias=False, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.down(jax.nn.gelu(self.up(x)))
    >>> def loss(model, batch):
    ...     return ((model(batch["x"]) - batch["y"]) ** 2).mean()
    >>> batch = {"x": jax.ShapeDtypeStruct((16, 16), jnp.float32),
    ...          "y": jax.ShapeDtypeStruct((16, 16), jnp.float32)}
    >>> ranked = compare(MLP, loss, batch, device="h100", candidates=[
    ...     ("dp", "data=8"), ("tp", "model=8"), ("fsdp_tp", "data=4,model=2"), ("tp", "data=8")])
    >>> [(c.strategy, c.mesh, c.fits) for c in ranked]  # doctest: +NORMALIZE_WHITESPACE
    [('tp', 'model=8', True), ('fsdp_tp', 'data=4,model=2', True), ('dp', 'data=8', True),
     ('tp', 'data=8', False)]
    >>> ranked[0].comm_bytes, ranked[0].reason.split(",")[0]
    ({'model': 1032}, 'tp on model=8: 8.9 KiB/device of 59.7 GiB usable (fits)')
    >>> ranked[-1].rejected, ranked[-1].reason[:42]
    (True, "Strategy 'tp' does not fit mesh data=8: it")
    >>> table = format_comparison(ranked)   # a rich Table: rich.print(table)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from jmp.errors import ConfigError, JmpError
from jmp.inspect import Collective, Memory, collectives, flops, memory
from jmp.mesh import MeshSpec, format_mesh_shape, make_mesh
from jmp.plan.hardware import Device, get_device
from jmp.plan.terms import _ring_factor
from jmp.rules import Rules, check_batch, preset
from jmp.sharding import _nnx_init
from jmp.train.step import TrainConfig, make_optimizer, make_step
from jmp.units import human_bytes

#: One candidate: a strategy name of :func:`jmp.rules.preset` and a mesh (``"data=4,model=2"``,
#: ``{"data": 8}``, or a ``Mesh``).
CandidateSpec = tuple[str, MeshSpec | Mesh]


@dataclass(frozen=True)
class Candidate:
    """One compared (strategy, mesh): what its compiled train step costs per device.

    ``comm_bytes`` sums ``bytes * count`` of the program's collectives per mesh axis (a
    collective over several axes is keyed by their names joined with ``,``); ``memory_bytes``
    is arguments + temporaries + outputs not aliased to the donated state (everything live at
    once: at least the peak); ``flops`` is XLA's count. Times are seconds: ``step_time =
    compute_time + comm_time`` at the device's assumed efficiencies and nothing
    overlapping, as in :func:`jmp.plan.estimate`, and ``mfu`` is ``flops / (step_time *
    peak)``: XLA counts every FLOP the program runs (recomputation too), so it is an upper
    bound. A rejected candidate has ``rejected=True``, zero costs and jmp's message as
    ``reason``.
    """

    strategy: str
    mesh: str
    device: Device
    comm_bytes: dict[str, int] = field(default_factory=dict)
    memory_bytes: int = 0
    flops: float = 0.0
    compute_time: float = 0.0
    comm_time: float = 0.0
    step_time: float = 0.0
    mfu: float = 0.0
    fits: bool = False
    rejected: bool = False
    reason: str = ""
    memory: Memory | None = None
    collectives: tuple[Collective, ...] = ()


def compare(
    make_model: Callable[[nnx.Rngs], nnx.Module],
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    example_batch: Any,
    /,
    *,
    candidates: Sequence[CandidateSpec],
    optimizer: optax.GradientTransformation | None = None,
    device: Device | str = "h100",
    microbatches: int = 1,
) -> list[Candidate]:
    """Compile the train step of each candidate from abstract shapes, and rank them.

    Args:
        make_model: ``rngs -> nnx.Module`` whose parameters carry logical names
            (``nnx.with_partitioning``); it is only traced, never run on real arrays.
        loss_fn: ``(model, batch) -> scalar``, as :func:`jmp.train.make_step` takes it.
        example_batch: a pytree of arrays or ``jax.ShapeDtypeStruct``; only shapes and dtypes
            are read, and every leaf's leading dimension is the global batch.
        candidates: ``[("fsdp", "data=8"), ("fsdp_tp", "data=4,model=2"), ...]``.
        optimizer: default ``jmp.train.make_optimizer(TrainConfig())`` (AdamW with clipping).
        device: a :class:`~jmp.plan.Device` or a preset name: peak FLOP/s, link bandwidth and
            usable memory of the roofline.
        microbatches: gradient accumulation steps inside the train step.

    Returns:
        One :class:`Candidate` per candidate: those that fit by step time, then those that do
        not fit (by step time), then the rejected ones in the order given.

    Raises:
        ConfigError: an unknown device, no candidates, ``microbatches`` < 1, or a batch whose
            leaves do not share one leading dimension. A bad candidate is not an error: it is
            returned rejected, with the reason.

    Example:
        >>> mlp = lambda rngs: nnx.Linear(4, 8, rngs=rngs, kernel_init=nnx.with_partitioning(
        ...     nnx.initializers.lecun_normal(), ("embed", "mlp")))
        >>> loss = lambda model, batch: model(batch).mean()
        >>> [out] = compare(mlp, loss, jax.ShapeDtypeStruct((8, 4), jnp.float32),
        ...                 candidates=[("dp_fsdp", "data=8")])
        >>> out.rejected, out.reason[:39]
        (True, "Unknown strategy 'dp_fsdp': dp and fsdp")
    """
    dev = get_device(device)
    rows = _batch_rows(example_batch)
    if not candidates:
        raise ConfigError("compare() needs candidates=[(strategy, mesh), ...]; got none.")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ConfigError(f"microbatches={microbatches!r} must be a positive int.")
    if optimizer is None:
        optimizer = make_optimizer(TrainConfig())
    found = [
        _evaluate(make_model, loss_fn, example_batch, rows, s, m, optimizer, dev, microbatches)
        for s, m in candidates
    ]
    # sorted() is stable: rejected candidates keep the order they were given in
    return sorted(found, key=lambda c: (c.rejected, not c.fits, c.step_time, c.memory_bytes))


def _batch_rows(batch: Any) -> int:
    shapes = [tuple(getattr(x, "shape", ())) for x in jax.tree.leaves(batch)]
    sizes = {s[0] if s else None for s in shapes}
    if not shapes or None in sizes or len(sizes) > 1:
        raise ConfigError(
            f"example_batch must be a pytree of arrays (or jax.ShapeDtypeStruct) sharing one "
            f"leading (batch) dim; its leaves have shapes {shapes}. Fix: give every leaf the "
            f"global batch as its first dimension."
        )
    rows = sizes.pop()
    assert rows is not None
    return rows


def _mesh_text(spec: MeshSpec | Mesh) -> str:
    if isinstance(spec, Mesh):
        return format_mesh_shape(dict(spec.shape))
    return format_mesh_shape(spec) if isinstance(spec, Mapping) else str(spec)


def _evaluate(
    make_model: Callable[[nnx.Rngs], nnx.Module],
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    batch: Any,
    rows: int,
    strategy: str,
    spec: MeshSpec | Mesh,
    optimizer: optax.GradientTransformation,
    dev: Device,
    microbatches: int,
) -> Candidate:
    try:
        mesh = spec if isinstance(spec, Mesh) else make_mesh(spec)
        rules = preset(strategy, mesh)
        check_batch(rows, microbatches, mesh, rules)
        model = _abstract_model(make_model, mesh, rules)
        step = make_step(model, optimizer, mesh, rules, microbatches=microbatches, loss_fn=loss_fn)
        compiled = step.lower(step.abstract_state(), step.abstract_batch_like(batch)).compile()
    except JmpError as err:
        # jmp's messages may list several problems on indented lines: keep them on one line
        reason = " ".join(str(err).split())
        return Candidate(strategy, _mesh_text(spec), dev, rejected=True, reason=reason)
    return _measure(strategy, mesh, dev, compiled)


def _abstract_model(
    make_model: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh, rules: Rules
) -> nnx.Module:
    """The model as shapes, dtypes and shardings: shard_init's init, traced and never run."""
    graphdef, init = _nnx_init(make_model, mesh, rules, 0)  # raises ShardingError strictly
    others = nnx.split_state(jax.eval_shape(init), nnx.RngState, ...)[1]
    # random keys (dropout) are values, not shapes: the step folds its index into them. A jit
    # that returns only them computes nothing else (XLA drops the unused parameter inits).
    keys = jax.jit(lambda: nnx.split_state(init(), nnx.RngState, ...)[0])()
    return nnx.merge(graphdef, keys, others)


def _measure(strategy: str, mesh: Mesh, dev: Device, compiled: Any) -> Candidate:
    sizes = dict(mesh.shape)
    found = tuple(c for c in collectives(compiled, mesh) if c.axes)  # () moves nothing
    comm_bytes: dict[str, int] = defaultdict(int)
    comm_time = 0.0
    for c in found:
        comm_bytes[",".join(c.axes)] += c.total_bytes
        comm_time += c.total_bytes * _ring_factor(c.kind, math.prod(sizes[a] for a in c.axes))
    comm_time /= dev.achieved_bandwidth
    mem = memory(compiled)
    total = mem.arguments + mem.temporaries + mem.outputs - mem.aliased
    per_device = flops(compiled)
    compute_time = per_device / dev.achieved_flops
    step_time = compute_time + comm_time
    fits = total <= dev.usable_bytes
    text = format_mesh_shape(sizes)
    reason = (
        f"{strategy} on {text}: {human_bytes(total)}/device of {human_bytes(dev.usable_bytes)} "
        f"usable ({'fits' if fits else 'does not fit'}), "
        f"{human_bytes(sum(comm_bytes.values()))} communicated per step, step "
        f"{_fmt_seconds(step_time)} ({_fmt_seconds(compute_time)} compute + "
        f"{_fmt_seconds(comm_time)} comm)"
    )
    return Candidate(
        strategy,
        text,
        dev,
        comm_bytes=dict(comm_bytes),
        memory_bytes=total,
        flops=per_device,
        compute_time=compute_time,
        comm_time=comm_time,
        step_time=step_time,
        mfu=per_device / (step_time * dev.peak_flops) if step_time else 0.0,
        fits=fits,
        reason=reason,
        memory=mem,
        collectives=found,
    )


def _fmt_seconds(s: float) -> str:
    """Three significant digits in s / ms / µs / ns: a small model's step is microseconds."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def format_comparison(results: Sequence[Candidate], /, *, title: str = "compare") -> Any:
    """A ``rich.table.Table``: one row per :class:`Candidate`, in the given order.

    Example:
        >>> table = format_comparison([Candidate("tp", "data=8", jmp.plan.get_device("h100"),
        ...                                      rejected=True, reason="no 'model' axis")])
        >>> table.row_count
        1
    """
    from rich.table import Table

    table = Table(title=title)
    columns = ("#", "strategy", "mesh", "bytes/axis", "memory/device", "GFLOP/device")
    for col in (*columns, "step", "MFU", "fits/reason"):
        left = col in ("strategy", "mesh", "bytes/axis", "fits/reason")
        table.add_column(col, justify="left" if left else "right")
    for i, c in enumerate(results, 1):
        if c.rejected:
            row = (str(i), c.strategy, c.mesh, "-", "-", "-", "-", "-", f"rejected: {c.reason}")
            table.add_row(*row)
            continue
        axes = ", ".join(f"{a} {human_bytes(b)}" for a, b in c.comm_bytes.items()) or "-"
        fit = "yes" if c.fits else f"no: over {human_bytes(c.device.usable_bytes)} usable"
        table.add_row(
            str(i),
            c.strategy,
            c.mesh,
            axes,
            human_bytes(c.memory_bytes),
            f"{c.flops / 1e9:.3g}",
            _fmt_seconds(c.step_time),
            f"{c.mfu:.0%}" if c.mfu >= 0.01 else f"{c.mfu:.2%}",  # a tiny model's is < 1%
            fit,
        )
    return table
