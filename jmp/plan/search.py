"""Search: every (strategy, mesh shape) on ``n`` devices, estimated and ranked by step time.

:func:`search` enumerates :func:`candidate_shapes` per strategy, drops the candidates jmp would
reject (mesh, divisibility, batch split, stages), runs :func:`jmp.plan.estimate` on the rest and
ranks those that fit; :func:`format_table` renders the ranking with ``rich``.

Example:
    >>> ranked = search(GPTConfig.named("7b", dtype="bfloat16", remat=True), 64, "h100",
    ...                 batch_size=256)
    >>> ranked[0].strategy, ranked[0].mesh
    ('dp_tp', 'data=32,model=2')
    >>> table = format_table(ranked[:5], title="7B on 64 x H100")   # a rich Table to print
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from jmp.errors import ConfigError, JmpError
from jmp.layers.context_parallel import CP_IMPLS, layout_chunks
from jmp.mesh import fitting_shapes
from jmp.models.gpt import GPTConfig
from jmp.plan.estimate import (
    _NEEDS,
    MOE_STRATEGIES,
    STRATEGIES,
    Estimate,
    _fmt_time,
    estimate,
)
from jmp.plan.hardware import Device, get_device
from jmp.units import human_bytes


def candidate_shapes(strategy: str, n_devices: int, /) -> list[dict[str, int]]:
    """Mesh shapes for ``strategy`` on ``n_devices``, every axis it uses of size > 1."""
    if strategy not in _NEEDS:
        raise ConfigError(
            f"Strategy {strategy!r} is not in the planner's cost model, which "
            f"covers {', '.join(STRATEGIES)}."
        )
    shapes = fitting_shapes(_NEEDS[strategy], n_devices)
    return [s for s in shapes if n_devices == 1 or all(v > 1 for v in s.values())]


def search(
    cfg: GPTConfig,
    n_devices: int,
    device: Device | str,
    /,
    *,
    batch_size: int,
    seq_len: int | None = None,
    strategies: Sequence[str] = STRATEGIES,
    microbatches: int = 1,
    remat: bool | None = None,
    include_unfit: bool = False,
    schedule: str = "1f1b",
    cp_impls: Sequence[str] | None = None,
) -> list[Estimate]:
    """Every (strategy, mesh shape) jmp accepts on ``n_devices``, fitting ones ranked by step time.

    A candidate is dropped when ``jmp.rules.preset`` rejects the mesh, a parameter dimension is
    not divisible by its mesh axes, the batch does not split, or (pipelines) the ``'stage'``
    size does not divide ``n_layers``; then it is kept if it fits in memory (or always, after
    the fitting ones, with ``include_unfit``). Pipeline strategies use ``microbatches`` as their
    M and ``schedule``; their ``reason`` states the bubble. Context-parallel strategies are
    estimated once per attention implementation in ``cp_impls`` (default: ``cfg.cp_impl``
    only), each a candidate of its own; a mixture of experts (``cfg.n_experts``) is planned
    with the strategies the cost model covers for it (``MOE_STRATEGIES``), a dense model
    without ``ep`` (it has no experts to split).

    Example:
        >>> best = search(GPTConfig.named("7b", dtype="bfloat16"), 64, "h100", batch_size=256)[0]
        >>> best.reason.split(":")[0]  # sp: tp's ring bytes, less activation memory
        'fsdp_tp_sp on data=32,model=2'
    """
    dev = get_device(device)
    if not isinstance(n_devices, int) or n_devices < 1:
        raise ConfigError(f"n_devices={n_devices!r} must be a positive int.")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(
            f"Strategies {unknown} are not in the planner's cost model. Planned "
            f"strategies: "
            f"{', '.join(STRATEGIES)}."
        )
    impls = tuple(cp_impls or (cfg.cp_impl,))
    bad = [i for i in impls if i not in CP_IMPLS]
    if bad:
        raise ConfigError(f"cp_impls {bad} are not context-parallel attentions; use {CP_IMPLS}.")
    found = []
    for strategy in strategies:
        kinds = strategy.split("_")
        if (cfg.n_experts and strategy not in MOE_STRATEGIES) or (
            not cfg.n_experts and "ep" in kinds
        ):
            continue  # not modelled for a mixture of experts / no experts to split
        configs = [replace(cfg, cp_impl=i) for i in impls] if "cp" in kinds else [cfg]
        for shape, model in itertools.product(candidate_shapes(strategy, n_devices), configs):
            try:
                found.append(
                    estimate(
                        model,
                        shape,
                        strategy,
                        batch_size=batch_size,
                        seq_len=seq_len,
                        microbatches=microbatches,
                        remat=remat,
                        device=dev,
                        schedule=schedule,
                    )
                )
            except JmpError:
                continue  # the strategy does not apply to this shape: not a candidate
    found.sort(key=lambda e: (not e.fits, e.step_time, e.total_bytes))
    return found if include_unfit else [e for e in found if e.fits]


def _sequence_unit(cfg: GPTConfig, mesh_shape: dict[str, int], strategy: str) -> int:
    """The sequence lengths a strategy accepts are the multiples of this: the context layout's
    chunks (2c load balanced, else c) under cp, the tensor axis under sp."""
    kinds = strategy.split("_")
    unit = 1
    if "cp" in kinds:
        ways = mesh_shape.get("context", 1)
        unit = math.lcm(unit, layout_chunks(ways, balanced=cfg.cp_load_balance))
    if "sp" in kinds:
        unit = math.lcm(unit, mesh_shape.get("model", 1))
    return unit


def longest_sequence(
    cfg: GPTConfig,
    mesh_shape: dict[str, int],
    strategy: str,
    /,
    *,
    batch_size: int,
    device: Device | str,
    limit: int = 2**24,
    **options: Any,
) -> int:
    """The longest sequence (tokens) whose train step, ``batch_size`` sequences of it, fits in
    each device's memory on this mesh (0: none; at most ``limit``).

    A bisection over the lengths the strategy accepts (:func:`_sequence_unit`), the model
    planned at each (its position table grows with it); ``options`` go to
    :func:`jmp.plan.estimate` (``remat``, ``microbatches``...).

    Example (a 7B model, 8 sequences per step on 64 H100s, blocks recomputed):
        >>> cfg, shape = GPTConfig.named("7b", dtype="bfloat16"), {"data": 8, "model": 8}
        >>> options = dict(batch_size=8, device="h100", remat=True)
        >>> longest_sequence(cfg, shape, "fsdp_tp", **options)
        160104
        >>> longest_sequence(cfg, shape, "fsdp_tp_sp", **options)  # the residual stream split
        452560
    """
    unit = _sequence_unit(cfg, mesh_shape, strategy)

    def fits(k: int) -> bool:
        seq = k * unit
        try:
            return estimate(
                replace(cfg, seq_len=seq),
                mesh_shape,
                strategy,
                batch_size=batch_size,
                seq_len=seq,
                device=device,
                **options,
            ).fits
        except JmpError:
            return False

    if not fits(1):
        return 0
    lo, hi = 1, 2  # fits(lo), and hi is the next length to try
    while hi * unit <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    if hi * unit > limit:
        return lo * unit
    while hi - lo > 1:  # fits(lo) and not fits(hi): memory grows with the sequence
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * unit


def format_table(estimates: Sequence[Estimate], /, *, title: str = "plan") -> Any:
    """A ``rich.table.Table``: one row per estimate, in the given order."""
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "#",
        "strategy",
        "mesh",
        "memory/device",
        "fits",
        "comm/step",
        "compute",
        "comm",
        "step",
        "MFU",
    ):
        table.add_column(col, justify="left" if col in ("strategy", "mesh") else "right")
    for i, e in enumerate(estimates, 1):
        table.add_row(
            str(i),
            e.strategy + (f" ({e.cp_impl})" if e.cp_impl else ""),
            e.mesh,
            human_bytes(e.total_bytes),
            "yes" if e.fits else "no",
            human_bytes(sum(e.comm_bytes.values())),
            _fmt_time(e.compute_time),
            _fmt_time(e.comm_time),
            _fmt_time(e.step_time),
            f"{e.mfu:.0%}",
        )
    return table
