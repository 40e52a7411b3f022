"""Rules: from logical axis names (``'embed'``, ``'mlp'``...) to mesh axes, strictly.

A model names the role of each dimension of each parameter (``kernel: ('embed', 'mlp')``); a
:class:`Rules` object says which mesh axis splits each role. Parameters and activations have
separate tables, because FSDP splits weights at rest over ``data`` while activations are split
over ``data`` along the batch instead.

Resolution is strict, unlike Flax linen (which silently replicates an unknown name): a name with
no rule, a mesh axis used twice in one spec, a rule pointing to an axis the mesh lacks, or a
dimension the mesh axes do not divide are all errors, collected and raised together.

Example:
    >>> import jmp
    >>> mesh = jmp.make_mesh("data=2,model=4")
    >>> rules = jmp.rules.preset("dp_tp", mesh)
    >>> rules.param_spec(("embed", "mlp"), shape=(64, 256), mesh=mesh)
    P(None, 'model')
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from jmp import strategies
from jmp.errors import ConfigError, MeshError, ShardingError

MeshAxes = strategies.MeshAxes
RuleTable = tuple[tuple[str, MeshAxes], ...]

LOGICAL_NAMES = strategies.LOGICAL_NAMES  # the logical names jmp's layers and models use


def _freeze(
    table: Mapping[str, MeshAxes] | Iterable[tuple[str, MeshAxes]], what: str = "params"
) -> RuleTable:
    items = table.items() if isinstance(table, Mapping) else _pairs(table, what)
    out: dict[str, MeshAxes] = {}
    for name, axes in items:
        if isinstance(axes, list):
            axes = tuple(axes)
        if not (
            axes is None
            or isinstance(axes, str)
            or (isinstance(axes, tuple) and all(isinstance(a, str) for a in axes))
        ):
            raise ShardingError(
                f"Rule for logical name {name!r} must be a mesh axis name, a tuple of them, or "
                f"None (replicated); got {axes!r}."
            )
        out[str(name)] = axes
    return tuple(out.items())


def _pairs(table: object, what: str) -> list[tuple[str, MeshAxes]]:
    """A table given as (logical name, mesh axes) pairs, or a ShardingError naming the value."""
    fix = (
        "Fix: pass a dict such as Rules({'embed': None, 'mlp': 'model'}), or take a named "
        "strategy's rules with jmp.rules.preset('dp_tp', mesh)."
    )
    if isinstance(table, str | bytes) or not isinstance(table, Iterable):
        raise ShardingError(
            f"Rules {what} must be a dict from logical name to mesh axes (or None), got "
            f"{type(table).__name__} {_short(table)}. {fix}"
        )
    pairs = list(table)
    for item in pairs:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise ShardingError(
                f"Rules {what}: {_short(item)} is not a (logical name, mesh axes) pair. {fix}"
            )
    return [(name, axes) for name, axes in pairs]


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, init=False)
class Rules:
    """Two frozen tables: logical name -> mesh axis (or tuple of axes, or None = replicated).

    Args:
        params: the table for parameters (and so gradients and optimizer state).
        activations: the table for activations; defaults to ``params``.

    Example:
        >>> rules = Rules(params={"embed": None, "mlp": "model"},
        ...               activations={"batch": "data", "embed": None, "mlp": "model"})
        >>> rules.params_dict["mlp"]
        'model'
    """

    params: RuleTable
    activations: RuleTable

    def __init__(
        self,
        params: Mapping[str, MeshAxes] | Iterable[tuple[str, MeshAxes]],
        activations: Mapping[str, MeshAxes] | None = None,
    ) -> None:
        object.__setattr__(self, "params", _freeze(params))
        object.__setattr__(
            self,
            "activations",
            self.params if activations is None else _freeze(activations, "activations"),
        )

    @property
    def params_dict(self) -> dict[str, MeshAxes]:
        return dict(self.params)

    @property
    def activations_dict(self) -> dict[str, MeshAxes]:
        return dict(self.activations)

    @property
    def param_axes(self) -> frozenset[str]:
        """The mesh axes some parameter rule splits over (tensor, FSDP, expert, stage axes)."""
        return frozenset(a for _, entry in self.params for a in axes_tuple(entry))

    def replace(
        self,
        *,
        params: Mapping[str, MeshAxes] | None = None,
        activations: Mapping[str, MeshAxes] | None = None,
    ) -> Rules:
        """A copy with some entries of each table overridden."""
        return Rules(
            {**self.params_dict, **(params or {})}, {**self.activations_dict, **(activations or {})}
        )

    def param_spec(
        self,
        names: Sequence[str | None],
        /,
        *,
        shape: Sequence[int] | None = None,
        mesh: Mesh | AbstractMesh | None = None,
        path: str = "<param>",
    ) -> PartitionSpec:
        """Resolve a parameter's logical names into a ``PartitionSpec``, or raise."""
        spec, problems = resolve(names, self.params_dict, shape=shape, mesh=mesh, path=path)
        raise_problems(problems, what="parameter")
        return spec

    def activation_spec(
        self,
        names: Sequence[str | None],
        /,
        *,
        shape: Sequence[int] | None = None,
        mesh: Mesh | AbstractMesh | None = None,
        path: str = "<activation>",
    ) -> PartitionSpec:
        """Resolve an activation's logical names into a ``PartitionSpec``, or raise."""
        spec, problems = resolve(names, self.activations_dict, shape=shape, mesh=mesh, path=path)
        raise_problems(problems, what="activation")
        return spec


def axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    """A rule's value as a tuple of mesh axes: None -> (), 'model' -> ('model',)."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def check_batch(
    batch_size: int, microbatches: int, mesh: Mesh | AbstractMesh, rules: Rules
) -> tuple[tuple[str, ...], int]:
    """The mesh axes that split the batch and the rows of one microbatch on each device.

    Raises:
        ConfigError: a batch or microbatch count that is not a positive int, microbatches that
            do not divide the batch, or a (micro)batch that does not split evenly over those axes.
    """
    bad = [
        f"{n}={v!r} must be a positive int"
        for n, v in (("batch_size", batch_size), ("microbatches", microbatches))
        if not isinstance(v, int) or isinstance(v, bool) or v < 1
    ]
    if bad:
        raise ConfigError("Invalid batch: " + "; ".join(bad) + ".")
    if batch_size % microbatches:
        raise ConfigError(
            f"microbatches={microbatches} does not divide the batch of {batch_size} rows. Fix: "
            f"a batch size that is a multiple of {microbatches}, or other microbatches."
        )
    spec = rules.activation_spec(("batch",), mesh=mesh)
    axes = axes_tuple(spec[0] if len(spec) else None)
    ways = math.prod(mesh.shape[a] for a in axes)
    micro = batch_size // microbatches
    if micro % ways:
        raise ConfigError(
            f"Batch of {batch_size} in {microbatches} microbatch(es) gives {micro} rows, which "
            f"the batch axes {axes} of size {ways} do not divide. Fix: use a batch size that is "
            f"a multiple of {ways * microbatches}."
        )
    return axes, micro // ways


def resolve(
    names: Sequence[str | None],
    table: Mapping[str, MeshAxes],
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    path: str = "<array>",
) -> tuple[PartitionSpec, list[str]]:
    """Resolve logical ``names`` with ``table``; return the spec and every problem found.

    A ``None`` logical name means "replicated" without needing a rule. Problems are strings,
    each naming the path, shape, logical names, mesh axis and size, and a fix.
    """
    where = f"{path} shape={tuple(shape) if shape is not None else '?'} names={tuple(names)}"
    problems: list[str] = []
    if shape is not None and len(names) != len(shape):
        return PartitionSpec(), [
            f"{where}: {len(names)} logical names for {len(shape)} "
            f"dimensions. Fix: give one name (or None) per dimension."
        ]
    entries: list[MeshAxes] = []
    seen: dict[str, str] = {}
    for dim, name in enumerate(names):
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            problems.append(
                f"{where}: logical name {name!r} has no rule. Fix: add "
                f"{name!r}: <mesh axis or None> to the rules (known: "
                f"{sorted(table)})."
            )
            entries.append(None)
            continue
        axes = axes_tuple(table[name])
        for axis in axes:
            if mesh is not None and axis not in mesh.shape:
                problems.append(
                    f"{where}: rule {name!r} -> {axis!r}, but the mesh has no axis "
                    f"{axis!r} (mesh axes: {dict(mesh.shape)}). Fix: map {name!r} "
                    f"to one of {tuple(mesh.shape)} or None."
                )
            elif axis in seen:
                problems.append(
                    f"{where}: mesh axis {axis!r} is used twice, by {seen[axis]!r} "
                    f"and {name!r}. Fix: map one of them to another axis or None."
                )
            seen.setdefault(axis, name)
        if mesh is not None and shape is not None and all(a in mesh.shape for a in axes):
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % size:
                ok = [d for d in range(1, shape[dim] + 1) if shape[dim] % d == 0 and d <= 64]
                problems.append(
                    f"{where}: dimension {dim} ({name!r}, size {shape[dim]}) is not divisible by "
                    f"mesh axis {table[name]!r} of size {size}. Fix: make the size a multiple "
                    f"of {size}, map {name!r} to None, or use a mesh where that axis has size "
                    f"in {ok}."
                )
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:
        entries.pop()  # P('model', None) and P('model') mean the same; keep one spelling
    return PartitionSpec(*entries), problems


def raise_problems(problems: Sequence[str], *, what: str) -> None:
    """Raise one :class:`ShardingError` listing every problem, or return if there are none."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ShardingError(f"{len(problems)} {what} sharding problem(s):\n{lines}")


# --- presets -------------------------------------------------------------------------------


def preset(strategy: str, mesh: Mesh | AbstractMesh, /) -> Rules:
    """The rules of a named strategy (see :mod:`jmp.strategies`), checked against ``mesh``.

    A strategy is parallelism kinds joined by ``_``; each kind adds its rule entries:

    ================  ==============================  =================================
    kind              parameters                      activations
    ================  ==============================  =================================
    ``dp``            replicated                      batch over ``data``
    ``fsdp``          ``embed`` dim over ``data``     batch over ``data``
    ``tp``            mlp/heads/vocab over ``model``  mlp/heads/vocab over ``model``
    ``sp`` (with tp)  as ``tp``                       the residual's ``seq`` over ``model``
    ``pp``            ``stage`` dim over ``stage``    ``stage`` over ``stage``
    ``cp``            replicated                      ``seq`` over ``context``
    ``ep``            ``expert`` dim over ``expert``  batch over ``expert`` too
    ================  ==============================  =================================

    Two kinds that split the same logical name join their axes (``dp_ep``: the batch over
    ``('data', 'expert')``).

    Raises:
        ConfigError: an unknown or invalid strategy name (listing the valid ones).
        ShardingError: a mesh missing an axis the strategy needs, or a mesh axis of size > 1
            that the strategy would leave idle (devices doing duplicate work).

    Example:
        >>> preset("fsdp", jmp.make_mesh("data=8")).params_dict["embed"]
        'data'
    """
    _check_preset_args(strategy, mesh)
    chosen = strategies.parse(strategy)
    params, activations = chosen.tables()
    needs = set(chosen.axes)
    missing = sorted(needs - set(mesh.shape))
    idle = sorted(a for a, n in mesh.shape.items() if a not in needs and n > 1)
    if missing or idle:
        shape = ",".join(f"{a}={n}" for a, n in mesh.shape.items())
        msg = [f"Strategy {strategy!r} does not fit mesh {shape}:"]
        if missing:
            msg.append(f"it needs mesh axes {missing}, which the mesh lacks.")
        if idle:
            msg.append(f"mesh axes {idle} would hold identical copies doing duplicate work.")
        msg.append(
            f"Fix: use a mesh over {list(chosen.axes)} (e.g. "
            f"'{chosen.default_mesh()}') or pick a strategy that uses "
            f"{sorted(mesh.shape)}."
        )
        raise ShardingError(" ".join(msg))
    return Rules(params, activations)


def _check_preset_args(strategy: object, mesh: object) -> None:
    if isinstance(strategy, Mesh | AbstractMesh) and isinstance(mesh, str):
        raise ConfigError(
            f"preset() takes the strategy first, then the mesh: got preset(<mesh>, {mesh!r}). "
            f"Fix: jmp.rules.preset({mesh!r}, mesh)."
        )
    if not isinstance(strategy, str):
        raise ConfigError(
            f"preset() needs a strategy name such as 'dp_tp', got {type(strategy).__name__} "
            f"{_short(strategy)}."
        )
    if isinstance(mesh, str):
        raise MeshError(
            f"preset({strategy!r}, {mesh!r}) needs a Mesh, got the string {mesh!r}. Fix: pass "
            f"jmp.make_mesh({mesh!r})."
        )
    if not isinstance(mesh, Mesh | AbstractMesh):
        raise MeshError(
            f"preset({strategy!r}, ...) needs a Mesh, got {type(mesh).__name__} {_short(mesh)}. "
            f"Fix: pass jmp.make_mesh('data=2,model=4') (or your mesh spec)."
        )


#: Every strategy name :func:`preset` accepts (from the registry, :mod:`jmp.strategies`).
STRATEGIES = strategies.names()
