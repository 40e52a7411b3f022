"""Pipeline schedules as tables: which microbatch each stage works on at each tick.

:func:`make_schedule` builds the ``'gpipe'`` or ``'1f1b'`` plan for S stages and M
microbatches as a :class:`Schedule`: two ``(ticks, stages)`` integer arrays of microbatch ids
(``-1`` idle), one for forwards and one for backwards. Stage s runs microbatch m's forward at
tick ``m + s``; GPipe runs every backward after every forward, 1F1B interleaves them so a stage
keeps at most ``2(S - 1 - s) + 1`` microbatches in flight whatever M.

The tables are plain NumPy, built before tracing: :mod:`jmp.pipeline.run` scans over their
rows inside ``jax.shard_map``, and the same tables answer questions before anything compiles
(the bubble, the peak in flight, a picture to print): kept apart from the execution, they need
neither JAX nor devices, so benchmarks and tests read them directly.

Example:
    >>> plan = make_schedule("1f1b", 4, 8)
    >>> print(plan.render())        # one row per stage, one column per tick
    stage 0:    F0    F1    F2    F3    F4    F5  F6B0  F7B1    B2    B3    B4    B5    B6    B7
    stage 1:    ..    F0    F1    F2    F3  F4B0  F5B1  F6B2  F7B3    B4    B5    B6    B7    ..
    stage 2:    ..    ..    F0    F1  F2B0  F3B1  F4B2  F5B3  F6B4  F7B5    B6    B7    ..    ..
    stage 3:    ..    ..    ..  F0B0  F1B1  F2B2  F3B3  F4B4  F5B5  F6B6  F7B7    ..    ..    ..
    >>> plan.in_flight()            # 2(S - 1 - s) + 1 stage inputs kept on stage s
    array([7, 5, 3, 1])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from jmp import strategies
from jmp.errors import ConfigError

ScheduleName = Literal["gpipe", "1f1b"]
SCHEDULES = strategies.PIPELINE_SCHEDULES


@dataclass(frozen=True, eq=False)
class Schedule:
    """Which microbatch each stage works on at each tick: the plan the pipeline executes.

    Attributes:
        forward: ``(ticks, stages)`` microbatch ids whose forward runs then, ``-1`` when idle.
        backward: the same for backwards (GPipe's are autodiff's mirror of its forwards).
    """

    name: str
    num_stages: int
    num_microbatches: int
    forward: np.ndarray
    backward: np.ndarray

    @property
    def ticks(self) -> int:
        return int(self.forward.shape[0])

    def tick_costs(self, fwd_cost: float = 1.0, bwd_cost: float = 2.0) -> np.ndarray:
        """Duration of each tick in lockstep: forward and/or backward, if any stage has one."""
        # np.any(x, axis=1), not x.any(1): numpy's stubs type the method's result as maybe a scalar
        return (
            np.any(self.forward >= 0, axis=1) * fwd_cost
            + np.any(self.backward >= 0, axis=1) * bwd_cost
        )

    def idle_fraction(self, fwd_cost: float = 1.0, bwd_cost: float = 2.0) -> float:
        """Share of stage-time spent idle (the bubble), counting the executed ticks.

        Theory for both schedules: ``(S - 1) / (M + S - 1)``.
        """
        useful = (self.forward >= 0).sum() * fwd_cost + (self.backward >= 0).sum() * bwd_cost
        return float(1 - useful / (self.num_stages * self.tick_costs(fwd_cost, bwd_cost).sum()))

    def in_flight(self) -> np.ndarray:
        """Per stage, the most microbatches whose forward ran and backward has not yet."""
        peak = np.zeros(self.num_stages, int)
        for s in range(self.num_stages):
            live = 0
            for f, b in zip(self.forward[:, s], self.backward[:, s], strict=True):
                live += int(f >= 0)
                peak[s] = max(peak[s], live)
                live -= int(b >= 0)
        return peak

    def phases(self) -> list[tuple[int, int, bool, bool]]:
        """``(first tick, end tick, any forward, any backward)`` of each run of like ticks."""
        has_f: list[bool] = np.any(self.forward >= 0, axis=1).tolist()
        has_b: list[bool] = np.any(self.backward >= 0, axis=1).tolist()
        out: list[tuple[int, int, bool, bool]] = []
        for t, key in enumerate(zip(has_f, has_b, strict=True)):
            if out and out[-1][2:] == key:
                out[-1] = (out[-1][0], t + 1, *key)
            else:
                out.append((t, t + 1, *key))
        return out

    def render(self) -> str:
        """The schedule as text: one row per stage, ``F3``/``B3``/``..`` per tick."""
        rows = []
        for s in range(self.num_stages):
            cells = []
            for f, b in zip(self.forward[:, s], self.backward[:, s], strict=True):
                cell = (f"F{f}" if f >= 0 else "") + (f"B{b}" if b >= 0 else "")
                cells.append(cell or "..")
            rows.append(f"stage {s}: " + " ".join(f"{c:>5}" for c in cells))
        return "\n".join(rows)


def make_schedule(name: str, num_stages: int, num_microbatches: int, /) -> Schedule:
    """The ``'gpipe'`` or ``'1f1b'`` plan for ``num_stages`` stages and that many microbatches.

    Stage s runs microbatch m's forward at tick ``m + s``. GPipe then runs every backward, in
    reverse. 1F1B runs m's backward at tick ``m + 2(S - 1) - s``: the last stage does a
    microbatch's forward and backward in the same tick, and each stage holds at most
    ``2(S - 1 - s) + 1`` microbatches' inputs (never more than ``M``), whatever ``M``.
    """
    S, M = num_stages, num_microbatches
    if name not in SCHEDULES:
        raise ConfigError(f"schedule={name!r} must be one of {SCHEDULES}.")
    if not (isinstance(M, int) and M >= 1 and isinstance(S, int) and S >= 1):
        raise ConfigError(f"num_stages={S!r} and num_microbatches={M!r} must be positive ints.")
    t = np.arange(M + S - 1)[:, None]
    s = np.arange(S)[None, :]
    fwd = np.where((t - s >= 0) & (t - s < M), t - s, -1)
    if name == "gpipe":
        idle = np.full_like(fwd, -1)
        return Schedule(name, S, M, np.concatenate([fwd, idle]), np.concatenate([idle, fwd[::-1]]))
    t = np.arange(M + 2 * S - 2)[:, None]
    f = t - s
    b = t - (2 * S - 2 - s)
    return Schedule(
        name, S, M, np.where((f >= 0) & (f < M), f, -1), np.where((b >= 0) & (b < M), b, -1)
    )
