"""Sharding a model's state: specs from logical names, sharded init, the parameter table.

Works on Flax NNX modules (or their ``nnx.State``) and on Flax linen variable trees annotated
with ``nn.with_logical_partitioning``; both are resolved by the same strict :class:`Rules`.

Example:
    >>> mesh = jmp.make_mesh("data=2,model=4")
    >>> rules = jmp.rules.preset("dp_tp", mesh)
    >>> model = jmp.shard_init(lambda rngs: jmp.layers.ParallelMLP(64, 256, rngs=rngs),
    ...                        mesh, rules, seed=0)
    >>> rows = jmp.param_table(model)
    >>> [(r.path, str(r.spec), r.bytes_per_device) for r in rows][:2]
    [('down/bias', 'P()', 256), ('down/kernel', "P('model',)", 16384)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jmp.context import building
from jmp.errors import ShardingError
from jmp.rules import Rules, raise_problems, resolve
from jmp.units import human_bytes

_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def logical_names(variable: Any, /) -> tuple[str | None, ...] | None:
    """The logical axis names an NNX variable or a linen box carries, or None if unannotated."""
    if isinstance(variable, nn.Partitioned):
        return tuple(variable.names)
    if isinstance(variable, nnx.Variable):
        meta = variable.get_metadata()
        for key in _NAME_KEYS:
            if meta.get(key) is not None:
                return tuple(meta[key])
    return None


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def _value(leaf: Any) -> Any:
    if isinstance(leaf, nnx.Variable):
        return leaf.get_raw_value()
    if isinstance(leaf, nn.Partitioned):
        return leaf.value
    return leaf


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (nnx.Variable, nn.Partitioned))


def _spec_of(path: str, leaf: Any, rules: Rules, mesh: Mesh, problems: list[str]) -> PartitionSpec:
    value = _value(leaf)
    names = logical_names(leaf)
    shape = tuple(getattr(value, "shape", ()))
    is_param = isinstance(leaf, (nnx.Param, nn.Partitioned)) or path.startswith("params/")
    if names is None:
        if is_param and shape:
            problems.append(
                f"{path} shape={shape}: parameter has no logical axis names. Fix: create it with "
                f"nnx.with_partitioning(init, names) / nnx.Param(..., out_sharding=names), or "
                f"nn.with_logical_partitioning in linen."
            )
        return PartitionSpec()  # non-parameter state (RNG keys, counters) is small: replicate
    spec, found = resolve(names, rules.params_dict, shape=shape, mesh=mesh, path=path)
    problems += found
    return spec


def _state_of(model: Any) -> Any:
    return nnx.state(model) if isinstance(model, nnx.Module) else model


def partition_specs(model: Any, rules: Rules, mesh: Mesh, /) -> Any:
    """A tree of ``PartitionSpec`` matching ``nnx.state(model)`` (or the linen variables).

    Raises:
        ShardingError: listing every parameter whose names cannot be resolved on ``mesh``.
    """
    problems: list[str] = []

    def one(path: Sequence[Any], leaf: Any) -> Any:
        spec = _spec_of(_path_str(path), leaf, rules, mesh, problems)
        return leaf.replace(spec) if isinstance(leaf, nnx.Variable) else spec

    specs = jax.tree_util.tree_map_with_path(one, _state_of(model), is_leaf=_is_leaf)
    raise_problems(problems, what="parameter")
    return specs


def named_shardings(model: Any, rules: Rules, mesh: Mesh, /) -> Any:
    """Like :func:`partition_specs`, with each spec wrapped as a ``NamedSharding`` on ``mesh``."""
    specs = partition_specs(model, rules, mesh)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def _nnx_init(
    make_model: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh, rules: Rules, seed: int
) -> tuple[nnx.GraphDef, jax.stages.Wrapped]:
    graphdef, shardings = abstract_shardings(make_model, mesh, rules, seed=seed)

    def init() -> nnx.State:
        with nnx.use_eager_sharding(False), building(mesh, rules):
            return nnx.split(make_model(nnx.Rngs(seed)))[1]

    return graphdef, jax.jit(init, out_shardings=shardings)


def abstract_shardings(
    make_model: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh, rules: Rules, /, *, seed: int = 0
) -> tuple[nnx.GraphDef, Any]:
    """The graph and the shardings of the model ``make_model`` builds, from abstract shapes
    (nothing allocated): raises every error :func:`shard_init` would (a dim the mesh axis does
    not divide, an unknown logical name), so a caller can check before it writes anything.

    Example:
        >>> graphdef, shardings = abstract_shardings(
        ...     lambda rngs: jmp.layers.ParallelMLP(64, 256, rngs=rngs), mesh, rules)
    """
    # Flax's eager sharding would resolve names with its own (non-strict) rules: turn it off and
    # give every variable its sharding through jit's out_shardings instead.
    # built inside jmp.context.building: a constructor may ask how its dims will be split
    with nnx.use_eager_sharding(False), building(mesh, rules):
        abstract = nnx.eval_shape(lambda: make_model(nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    return graphdef, named_shardings(abstract_state, rules, mesh)


def shard_init(
    make_model: Any,
    mesh: Mesh,
    rules: Rules,
    /,
    *,
    seed: int = 0,
    example_inputs: Sequence[Any] = (),
) -> Any:
    """Create a model whose parameters are born sharded: one jitted init with ``out_shardings``.

    No parameter is ever whole on one device: each device computes only its own shards.

    Args:
        make_model: for Flax NNX, a function ``rngs -> Module``; for Flax linen, the module
            itself (then ``example_inputs`` are passed to ``module.init``).
        mesh: the device mesh.
        rules: how logical names map onto ``mesh`` (e.g. ``jmp.rules.preset("tp", mesh)``).
        seed: the PRNG seed; the same seed gives the same values on any mesh.

    Returns:
        The NNX module, or the linen variables (still boxed with their logical names;
        ``module.apply`` unboxes them).

    Example:
        >>> model = shard_init(lambda rngs: jmp.layers.ParallelMLP(64, 256, rngs=rngs),
        ...                    mesh, rules, seed=0)
    """
    if isinstance(make_model, nn.Module):
        init = _linen_init(make_model, mesh, rules, example_inputs)
        return init(jax.random.key(seed))
    graphdef, init = _nnx_init(make_model, mesh, rules, seed)
    return nnx.merge(graphdef, init())


def _linen_init(
    module: nn.Module, mesh: Mesh, rules: Rules, example_inputs: Sequence[Any]
) -> Callable[[jax.Array], Any]:
    if not example_inputs:
        raise ShardingError(
            f"shard_init of linen module {type(module).__name__} needs "
            f"example_inputs=(x, ...) to trace module.init."
        )
    abstract = jax.eval_shape(lambda k: module.init(k, *example_inputs), jax.random.key(0))
    shardings = named_shardings(abstract, rules, mesh)
    return jax.jit(lambda k: module.init(k, *example_inputs), out_shardings=shardings)


def init_bytes_per_device(
    make_model: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh, rules: Rules, /, *, seed: int = 0
) -> int:
    """Output bytes one device holds after the compiled sharded init (about total / N)."""
    _, init = _nnx_init(make_model, mesh, rules, seed)
    analysis = init.lower().compile().memory_analysis()
    if analysis is None:  # a backend without memory analysis
        raise ShardingError("This backend reports no memory analysis of compiled programs.")
    return int(analysis.output_size_in_bytes)


# --- the parameter table ---------------------------------------------------------------------


class ParamRow(NamedTuple):
    path: str
    shape: tuple[int, ...]
    dtype: str
    names: tuple[str | None, ...] | None
    spec: PartitionSpec | None
    bytes_total: int
    bytes_per_device: int


class ParamTable(list):
    """Rows of :func:`param_table`; prints itself as a rich table."""

    def rich_table(self) -> Any:
        from rich.table import Table

        table = Table(title="parameters")
        table.add_column("path", no_wrap=True)
        for col in ("shape", "dtype", "logical names", "spec", "total", "per device"):
            table.add_column(col, justify="right" if col in ("total", "per device") else "left")
        for r in self:
            table.add_row(
                r.path,
                "×".join(map(str, r.shape)),
                r.dtype,
                _dims(r.names),
                _dims(r.spec),
                human_bytes(r.bytes_total),
                human_bytes(r.bytes_per_device),
            )
        table.add_row(
            "total",
            "",
            "",
            "",
            "",
            human_bytes(self.bytes_total),
            human_bytes(self.bytes_per_device),
            style="bold",
        )
        return table

    @property
    def bytes_total(self) -> int:
        return sum(r.bytes_total for r in self)

    @property
    def bytes_per_device(self) -> int:
        return sum(r.bytes_per_device for r in self)

    def print(self, console: Any = None) -> None:
        from rich.console import Console

        (console or Console()).print(self.rich_table())

    def __rich__(self) -> Any:
        return self.rich_table()


def _dims(entries: Any) -> str:
    """('embed', None) -> 'embed,·' : compact, so the table fits a notebook's width."""
    if entries is None:
        return "-"
    return (
        ",".join(
            "·" if e is None else "+".join(e) if isinstance(e, tuple) else str(e) for e in entries
        )
        or "replicated"
    )


def _itemsize(dtype: Any) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # typed PRNG keys
        return int(getattr(dtype, "itemsize", 8))


def param_table(model: Any, /) -> ParamTable:
    """One row per array of the model's state: path, shape, dtype, names, spec, bytes.

    Example:
        >>> model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules)
        >>> rows = param_table(model)   # rows.print() shows it as a table
        >>> rows.bytes_per_device < rows.bytes_total
        True
    """
    rows = ParamTable()

    def one(path: Sequence[Any], leaf: Any) -> None:
        value = _value(leaf)
        if not hasattr(value, "shape"):
            return
        shape, itemsize = tuple(value.shape), _itemsize(value.dtype)
        sharding = getattr(value, "sharding", None)
        spec = getattr(sharding, "spec", None)
        local = sharding.shard_shape(shape) if sharding is not None else shape
        rows.append(
            ParamRow(
                _path_str(path),
                shape,
                str(value.dtype),
                logical_names(leaf),
                spec,
                math.prod(shape) * itemsize,
                math.prod(local) * itemsize,
            )
        )

    jax.tree_util.tree_map_with_path(one, _state_of(model), is_leaf=_is_leaf)
    return rows
