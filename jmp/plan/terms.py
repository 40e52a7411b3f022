"""What every cost term reads and returns: the step being planned (``_Ctx``) and :class:`Comm`.

A cost term is a function of ``_Ctx`` (the model, the mesh sizes, the parameter layouts, the
batch axes, this device's rows and tokens, remat, the bytes values travel in, and the options of
the kinds that change the program: context and sequence parallelism) returning a list of
:class:`Comm`, with the same accounting as :func:`jmp.inspect.collectives`
(``Collective.bytes * count`` summed per axis: ``bytes`` is the result's size on one device).

Example:
    >>> Comm("all-reduce", "model", 1024, 3, "three sums").total_bytes
    3072
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from jmp.errors import ConfigError
from jmp.models.gpt import GPTConfig
from jmp.plan.params import _Layout


class Comm(NamedTuple):
    """One predicted collective: result bytes per device of one op, executions per step."""

    kind: str  # all-reduce | all-gather | reduce-scatter | all-to-all | collective-permute
    axis: str
    bytes: int
    count: int  # pyright: ignore[reportIncompatibleMethodOverride] (shadows tuple.count)
    what: str

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count


def _ring_factor(kind: str, n: int) -> float:
    """Bytes each device sends per result byte, for a ring of n devices."""
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1, "collective-permute": 1.0}.get(
        kind, (n - 1) / n
    )


class _Ctx(NamedTuple):
    """One train step as the cost terms see it (per device; see the module docstring)."""

    cfg: GPTConfig
    mesh: dict[str, int]
    layouts: list[_Layout]
    batch_axes: tuple[str, ...]
    rows: int  # rows of one microbatch on one device
    seq: int
    micro: int
    remat: bool
    wire: int  # bytes per activation element as it travels
    pwire: int  # bytes per gradient/parameter element as it travels
    reduce_scatter: bool
    context: str | None = None  # cp: the mesh axis (size > 1) splitting the sequence
    cp: int = 1  # its size
    cp_impl: str = "ring"
    balanced: bool = True  # cp: the load-balanced layout (chunks i and 2c-1-i)
    seq_split: bool = False  # sp: the residual stream's sequence split over the tensor axis
    ring: bool = False  # sp with mode='collective': its gathers and scatters as ring steps
    moments: int = 2  # optimizer state arrays per parameter (AdamW: 2, SGD: 0)

    @property
    def tokens(self) -> int:
        """Tokens of one microbatch on one device (the sequence is split over the context)."""
        return self.rows * self.seq // self.cp

    def tensor_split(self, role: str) -> tuple[str | None, int]:
        """The tensor axis (not a batch axis) splitting ``role``'s array, and its ways."""
        lay = next((x for x in self.layouts if x.array.role == role), None)
        axes = set() if lay is None else lay.split_axes - set(self.batch_axes)
        if not axes:
            return None, 1
        axis = _one_axis(axes, f"the {role} split")
        return axis, self.mesh[axis]


def _one_axis(axes: Iterable[str], what: str) -> str:
    axes = tuple(axes)
    if len(axes) != 1:
        raise ConfigError(f"The planner models {what} over exactly one mesh axis; got {axes}.")
    return axes[0]


def expert_axis(c: _Ctx) -> str | None:
    """The mesh axis (size > 1) splitting the experts (ep), if any."""
    axes = {a for x in c.layouts if x.array.role == "expert" for a in x.axes[0]}
    return _one_axis(axes, "the experts") if axes else None
