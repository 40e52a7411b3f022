"""What the compiler did: collectives (kind, mesh axes, bytes, count), memory, FLOPs.

Reads the per-device HLO after SPMD partitioning (``compiled.as_text()``). Each collective's
``replica_groups`` lists the devices that talk to each other; comparing their mesh coordinates
tells which mesh axes it runs over. Collectives inside ``while`` loops are multiplied by the
loop's known trip count.

Example (a sum over a batch split over ``data``: one all-reduce of the 4-byte partial sums):
    >>> x = jax.device_put(jnp.ones((8, 4)), jax.NamedSharding(mesh, jax.P("data")))
    >>> compiled = jax.jit(lambda x: x.sum()).lower(x).compile()
    >>> for c in jmp.inspect.collectives(compiled, mesh):
    ...     print(c.kind, c.axes, c.bytes, c.count)
    all-reduce ('data',) 4 1
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
from jax.sharding import Mesh

from jmp.units import human_bytes

COLLECTIVE_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
)
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_OP = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<kind>" + "|".join(COLLECTIVE_KINDS) + r")(?P<start>-start)?\("
)
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


class Collective(NamedTuple):
    """One collective op of the partitioned program (sizes per device)."""

    kind: str
    axes: tuple[str, ...]
    bytes: int  # size of the op's result on one device
    # executions per step (loop trip counts applied); shadows tuple.count, kept for its name
    count: int  # pyright: ignore[reportIncompatibleMethodOverride]
    group_size: int

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count


def _hlo_text(compiled: Any) -> str:
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    # /*index=5*/ comments inside tuple types would hide computation headers
    return re.sub(r"/\*.*?\*/", "", text)


def _type_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        size = _DTYPE_BYTES.get(dtype, 4)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


def _groups(line: str) -> np.ndarray | None:
    """The replica/device groups of one collective, as an int array (groups x members)."""
    # mesh['a'=2,'b'=4] {'a'}, optionally with a device order: <=[4,2]T(1,0) or, in newer
    # XLA, ", device_ids=([4,2]T(1,0))"
    named = re.search(
        r"replica_groups=mesh\[([^\]]*)\]"
        r"(?:<=\[([\d,]+)\](?:T\(([\d,]+)\))?"
        r"|,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
        r"\s*\{([^}]*)\}",
        line,
    )
    if named:
        axes = re.findall(r"'([^']+)'=(\d+)", named.group(1))
        sizes = [int(n) for _, n in axes]
        ids = np.arange(int(np.prod(sizes)))
        dims, perm = named.group(2) or named.group(4), named.group(3) or named.group(5)
        if dims:
            ids = ids.reshape([int(v) for v in dims.split(",")])
            if perm:
                ids = ids.transpose([int(v) for v in perm.split(",")])
        ids = ids.reshape(sizes)
        chosen = set(re.findall(r"'([^']+)'", named.group(6)))
        inner = [i for i, (a, _) in enumerate(axes) if a in chosen]
        outer = [i for i in range(len(axes)) if i not in inner]
        return ids.transpose(outer + inner).reshape(-1, int(np.prod([sizes[i] for i in inner])))
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        shape = [int(v) for v in iota.group(1).split(",")]
        dims = [int(v) for v in iota.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(v) for v in iota.group(3).split(",")])
        return ids.reshape(shape[0], -1)
    listed = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if listed:
        groups = [
            [int(v) for v in g.split(",") if v]
            for g in re.findall(r"\{([\d,]*)\}", listed.group(1))
        ]
        if groups and groups[0]:
            return np.array(groups)
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if pairs:
        return np.array(
            [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))]
        )
    return None


def _axes_of(groups: np.ndarray | None, mesh: Mesh | None) -> tuple[str, ...]:
    if mesh is None:
        return ()
    names = tuple(mesh.shape)
    if groups is None or groups.size == 0:  # empty groups = all devices
        return tuple(n for n in names if mesh.shape[n] > 1)
    coords = np.stack(np.unravel_index(groups, mesh.devices.shape), axis=-1)  # G x M x ndim
    varies = (coords != coords[:, :1, :]).any(axis=(0, 1))
    return tuple(n for n, v in zip(names, varies, strict=True) if v)


def _multiplicities(text: str) -> dict[str, int]:
    """How many times each computation runs per call of the entry (loop trip counts)."""
    callers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    current, entry = None, None
    for line in text.splitlines():
        header = _COMP_HEADER.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group("name")
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        trip = _TRIP.search(line)
        for key, callee in _CALLS.findall(line):
            callers[callee].append((current, int(trip.group(1)) if key == "body" and trip else 1))
        for branch in _BRANCHES.findall(line):
            for callee in re.findall(r"%?([\w.\-]+)", branch):
                callers[callee].append((current, 1))
    memo: dict[str, int] = {}

    def mult(name: str, depth: int = 0) -> int:
        if name == entry or depth > 50:
            return 1
        if name not in memo:
            memo[name] = sum(mult(c, depth + 1) * n for c, n in callers.get(name, [])) or 1
        return memo[name]

    return {name: mult(name) for name in set(callers) | ({entry} if entry else set())}


def collectives(compiled: Any, mesh: Mesh | None = None, /) -> list[Collective]:
    """Every collective in a compiled program (or its HLO text), with axes, bytes and count.

    Example:
        >>> x = jax.device_put(jnp.ones((8, 4)), jax.NamedSharding(mesh, jax.P("data")))
        >>> [c.kind for c in collectives(jax.jit(jnp.sum).lower(x).compile(), mesh)]
        ['all-reduce']
    """
    text = _hlo_text(compiled)
    mults = _multiplicities(text)  # (text is already free of comments)
    found: list[Collective] = []
    current = None
    for line in text.splitlines():
        header = _COMP_HEADER.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group("name")
            continue
        op = _OP.search(line)
        if not op:
            continue
        groups = _groups(line)
        shapes = [f"{dtype}[{dims}]" for dtype, dims in _SHAPE.findall(op.group("type"))]
        if op.group("start") and len(shapes) > 1:
            shapes = shapes[-1:]  # async start: (operand, result); the result is what moves
        # XLA's combiners fuse independent collectives into one tuple-shaped op: report each
        # operand as its own collective, so counts match the program's logical all-reduces.
        # An all-to-all without split dimensions is one exchange written as a tuple of one
        # chunk per peer (XLA:CPU's form): one collective of all the chunks' bytes.
        sizes = [_type_bytes(shape) for shape in shapes]
        if op.group("kind") == "all-to-all" and "dimensions=" not in line:
            sizes = [sum(sizes)]
        for size in sizes:
            found.append(
                Collective(
                    op.group("kind"),
                    _axes_of(groups, mesh),
                    size,
                    mults.get(current, 1) if current else 1,
                    int(groups.shape[1]) if groups is not None else 0,
                )
            )
    return found


def count(
    found: Iterable[Collective], /, kind: str | None = None, axes: tuple[str, ...] | None = None
) -> int:
    """Executions per step of collectives matching ``kind`` and exactly ``axes``."""
    return sum(
        c.count
        for c in found
        if (kind is None or c.kind == kind) and (axes is None or c.axes == axes)
    )


def summary(found: Iterable[Collective], /) -> dict[tuple[str, tuple[str, ...]], dict[str, int]]:
    """``{(kind, axes): {'count': n, 'bytes': b}}`` per step."""
    out: dict[tuple[str, tuple[str, ...]], Counter] = defaultdict(Counter)
    for c in found:
        out[(c.kind, c.axes)]["count"] += c.count
        out[(c.kind, c.axes)]["bytes"] += c.total_bytes
    return {k: dict(v) for k, v in out.items()}


class Memory(NamedTuple):
    """Per-device memory of a compiled program, from ``memory_analysis()``."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    peak: int


def memory(compiled: Any, /) -> Memory:
    """Per-device bytes: arguments, outputs, temporaries, aliased (donated), peak."""
    m = compiled.memory_analysis()
    return Memory(
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.temp_size_in_bytes),
        int(m.alias_size_in_bytes),
        int(getattr(m, "peak_memory_in_bytes", 0) or 0),
    )


def flops(compiled: Any, /) -> float:
    """Per-device FLOPs XLA counted for the compiled program."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))


def collectives_table(found: Iterable[Collective], /, *, title: str = "collectives") -> Any:
    """A rich table: one row per (kind, mesh axes) with ops per step and bytes per device."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("kind", "mesh axes", "ops / step", "bytes / step / device"):
        table.add_column(col, justify="left" if col in ("kind", "mesh axes") else "right")
    rows = summary(found)
    for (kind, axes), row in sorted(rows.items()):
        table.add_row(kind, ",".join(axes) or "-", str(row["count"]), human_bytes(row["bytes"]))
    if not rows:
        table.add_row("(none)", "", "0", "0 B")
    return table


def memory_table(
    mem: Memory, /, *, flops_per_device: float | None = None, title: str = "memory per device"
) -> Any:
    """A rich table of :class:`Memory` (and FLOPs, when given)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("what")
    table.add_column("per device", justify="right")
    for name in Memory._fields:
        table.add_row(name, human_bytes(getattr(mem, name)))
    if flops_per_device is not None:
        table.add_row("FLOPs / step", f"{flops_per_device:.3e}")
    return table
