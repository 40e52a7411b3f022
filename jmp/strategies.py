"""The strategy registry: every parallelism kind declared once; strategies are compositions.

A *kind* is one way of splitting the work (data parallel, FSDP, tensor parallel, pipeline...).
Each is declared once below as a :class:`Kind`: the mesh axis it uses, the rule entries it
contributes for parameters and for activations, its default share of the devices, and a
one-line description. A *strategy* is kinds joined by ``_`` in the registry's order
(``fsdp_tp``, ``pp_dp_tp``, ``dp_ep``). Where two kinds of a strategy map the same logical name
their axes join, outermost first: under ``dp_ep`` the batch is split over
``('data', 'expert')``. Everything that needs to know strategies reads this module:
:func:`jmp.rules.preset`, the CLI's choices, help and default meshes, the planner, the
benchmarks and the error messages.

Example:
    >>> from jmp import strategies
    >>> strategies.parse("fsdp_tp").axes
    ('data', 'model')
    >>> strategies.default_mesh("pp_dp_tp")
    'stage=2,data=2,model=-1'
    >>> "dp_fsdp" in strategies.names()
    False
    >>> strategies.parse("dp_ep").tables()[1]["batch"]
    ('data', 'expert')
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from jmp.errors import ConfigError

MeshAxes = str | tuple[str, ...] | None

#: The pipeline schedules (:mod:`jmp.pipeline.schedule` implements them; the CLI and the
#: planner offer them).
PIPELINE_SCHEDULES = ("gpipe", "1f1b")

#: What a block keeps for its backward pass (:mod:`jmp.layers.remat` implements them; the
#: models' ``remat`` field and the CLI's ``--remat`` take them).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")

#: How a parallel layer writes its collectives (:mod:`jmp.layers` implements them; the models'
#: ``mode`` field and the CLI's ``--mode`` take them): ``'auto'`` (XLA inserts them from
#: sharding annotations), ``'manual'`` (``jax.shard_map`` with explicit collectives),
#: ``'collective'`` (manual, and under sequence parallelism each all-gather before a matmul and
#: reduce-scatter after one is a collective matmul: ring steps of collective-permutes
#: interleaved with the partial products, which GPUs overlap).
MODES = ("auto", "manual", "collective")

#: The logical axis names jmp's layers and models use; every rule table has an entry for each.
LOGICAL_NAMES = (
    "batch",
    "seq",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "kv",
    "vocab",
    "layers",
    "stage",
    "expert",
)


def _frozen(table: Mapping[str, MeshAxes]) -> Mapping[str, MeshAxes]:
    return MappingProxyType(dict(table))


@dataclass(frozen=True)
class Kind:
    """One way of splitting a model over one mesh axis.

    Attributes:
        name: the short name used in strategy names (``'tp'``).
        axis: the mesh axis it splits over (``'model'``). Two kinds on one axis exclude
            each other (``dp`` and ``fsdp`` both use ``'data'``).
        params: rule entries it adds for parameters (and so gradients and optimizer state).
        activations: rule entries it adds for activations.
        default_size: its axis's size in the default mesh when it is composed with others;
            the last kind of a strategy always takes the rest of the devices (``-1``).
        description: one line for help texts and error messages.
        requires: kinds that must be present in the same strategy.
        excludes: kinds that cannot be in the same strategy.
        refines: the kind whose mesh axis this one reuses instead of adding its own (``sp``
            splits the sequence over tensor parallelism's ``'model'`` axis between the
            tensor-parallel regions); it must be in the same strategy.
    """

    name: str
    axis: str
    params: Mapping[str, MeshAxes] = field(default_factory=dict)
    activations: Mapping[str, MeshAxes] = field(default_factory=dict)
    default_size: int = 2
    description: str = ""
    requires: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    refines: str | None = None


# 'kv_heads' (grouped-query attention's key/value heads) splits like 'heads'; a model whose kv
# heads the axis does not divide names that dim None instead (see jmp.layers.attention).
_TENSOR = {"mlp": "model", "heads": "model", "kv_heads": "model", "vocab": "model"}

#: The kinds, in the order they appear in strategy names and mesh axes (outermost first: the
#: pipeline crosses the slowest links, tensor parallelism stays on the fastest).
KINDS: tuple[Kind, ...] = (
    Kind(
        "pp",
        "stage",
        params={"stage": "stage"},
        activations={"stage": "stage"},
        description="pipeline: blocks split into stages over 'stage', microbatches flow through",
    ),
    Kind(
        "dp",
        "data",
        activations={"batch": "data"},
        description="data parallel: parameters replicated, batch split over 'data'",
    ),
    Kind(
        "fsdp",
        "data",
        params={"embed": "data"},
        activations={"batch": "data"},
        description="fully sharded data parallel (ZeRO-3): parameters and batch over 'data'",
    ),
    Kind(
        "ep",
        "expert",
        params={"expert": "expert"},
        # an expert-parallel device is also a data-parallel one: the tokens split over both
        activations={"batch": "expert"},
        description="expert parallel: MoE experts over 'expert', tokens over it too "
        "(all-to-all dispatch and combine)",
        # both run the model (or its stages) in a shard_map region of their own, which the
        # MoE layer's all-to-all region does not nest in yet
        excludes=("pp", "cp"),
    ),
    Kind(
        "tp",
        "model",
        params=_TENSOR,
        activations=_TENSOR,
        description="tensor parallel (Megatron): mlp, heads and vocab dims over 'model'",
    ),
    Kind(
        "sp",
        "model",
        # only the residual stream names its sequence dim 'seq'; inside the tensor-parallel
        # regions (heads, mlp) the sequence is whole again
        activations={"seq": "model"},
        description="sequence parallel (Megatron, with tp): between the tensor-parallel "
        "regions the sequence over 'model' (reduce-scatter and all-gather, no all-reduce)",
        requires=("tp",),
        refines="tp",
        # the pipeline's stages and context parallelism's region run the model in a shard_map
        # of their own, and the MoE layer's all-to-all region expects whole sequences
        excludes=("pp", "ep", "cp"),
    ),
    Kind(
        "cp",
        "context",
        activations={"seq": "context"},
        description="context parallel: the sequence of every activation over 'context' "
        "(ring or all-gather attention, exact)",
    ),
)
KINDS_BY_NAME: Mapping[str, Kind] = MappingProxyType({k.name: k for k in KINDS})
STAGE_AXIS = KINDS_BY_NAME["pp"].axis  # the mesh axis (and logical name) of pipeline stages


@dataclass(frozen=True)
class Strategy:
    """A composition of kinds, e.g. ``fsdp_tp``; build with :func:`parse`."""

    name: str
    kinds: tuple[Kind, ...]

    @property
    def axes(self) -> tuple[str, ...]:
        """The mesh axes the strategy splits over, outermost first."""
        return tuple(k.axis for k in self.kinds if k.refines is None)

    @property
    def pipelined(self) -> bool:
        return any(k.axis == "stage" for k in self.kinds)

    def tables(self) -> tuple[dict[str, MeshAxes], dict[str, MeshAxes]]:
        """The parameter and activation rule tables: every logical name, then each kind's."""
        params: dict[str, MeshAxes] = dict.fromkeys(LOGICAL_NAMES, None)
        activations: dict[str, MeshAxes] = dict.fromkeys(LOGICAL_NAMES, None)
        for kind in self.kinds:
            _join(params, kind.params)
            _join(activations, kind.activations)
        return params, activations

    def default_mesh(self) -> str:
        """The mesh the CLI uses without ``--mesh``: each kind's share, the last takes the rest."""
        own = [k for k in self.kinds if k.refines is None]
        sizes = [k.default_size for k in own[:-1]] + [-1]
        return ",".join(f"{k.axis}={n}" for k, n in zip(own, sizes, strict=True))

    def describe(self) -> str:
        return "; ".join(k.description for k in self.kinds)


def axes_of(entry: MeshAxes, /) -> tuple[str, ...]:
    """A rule entry as a tuple of mesh axes (``None``: none)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _join(table: dict[str, MeshAxes], entries: Mapping[str, MeshAxes]) -> None:
    """Add a kind's entries to a rule table; a name two kinds map is split over both axes."""
    for name, axis in entries.items():
        before = table.get(name)
        if before is None:
            table[name] = axis
        else:
            table[name] = axes_of(before) + axes_of(axis)


def _problems(parts: list[str]) -> list[str]:
    unknown = [p for p in parts if p not in KINDS_BY_NAME]
    if unknown:
        return [f"unknown kind(s) {unknown}"]
    problems = []
    if len(set(parts)) != len(parts):
        problems.append("a kind appears twice")
    kinds = [KINDS_BY_NAME[p] for p in parts]
    by_axis: dict[str, list[str]] = {}
    for k in kinds:
        if k.refines is None:  # a refining kind shares the axis of the kind it refines
            by_axis.setdefault(k.axis, []).append(k.name)
    problems += [
        f"{' and '.join(ns)} both use mesh axis {a!r}" for a, ns in by_axis.items() if len(ns) > 1
    ]
    problems += [
        f"{k.name} needs {r} in the same strategy"
        for k in kinds
        for r in k.requires
        if r not in parts
    ]
    problems += [
        f"{k.name} does not compose with {x}" for k in kinds for x in k.excludes if x in parts
    ]
    order = [KINDS.index(k) for k in kinds]
    if not problems and order != sorted(order):
        canonical = "_".join(sorted(parts, key=lambda p: KINDS.index(KINDS_BY_NAME[p])))
        problems.append(f"kinds go in the registry's order: write {canonical!r}")
    return problems


def parse(name: str, /) -> Strategy:
    """The :class:`Strategy` called ``name``, or a :class:`~jmp.ConfigError` listing what is.

    Example:
        >>> parse("dp_fsdp")
        Traceback (most recent call last):
        ...
        jmp.errors.ConfigError: Unknown strategy 'dp_fsdp': dp and fsdp both use mesh axis ...
    """
    parts = name.split("_") if isinstance(name, str) and name else [repr(name)]
    problems = _problems(parts)
    if problems:
        raise ConfigError(
            f"Unknown strategy {name!r}: {'; '.join(problems)}. Known: {', '.join(names())}."
        )
    return Strategy(name, tuple(KINDS_BY_NAME[p] for p in parts))


def _all_names() -> tuple[str, ...]:
    valid = []
    for n in range(1, len(KINDS) + 1):
        for combo in itertools.combinations([k.name for k in KINDS], n):
            if not _problems(list(combo)):
                valid.append("_".join(combo))
    # pipelines last, then by length: the list reads from simple to composite
    return tuple(sorted(valid, key=lambda s: (s.startswith("pp"), s.count("_"))))


_NAMES = _all_names()


def names() -> tuple[str, ...]:
    """Every valid strategy name, simplest first."""
    return _NAMES


def axes(name: str, /) -> tuple[str, ...]:
    """The mesh axes strategy ``name`` splits over."""
    return parse(name).axes


def default_mesh(name: str, /) -> str:
    """The default mesh spec of strategy ``name`` (``'data=2,model=-1'`` for ``dp_tp``)."""
    return parse(name).default_mesh()


def help_text() -> str:
    """One line per kind, for ``--help``: how strategy names are composed."""
    kinds = "; ".join(f"{k.name} = {k.description}" for k in KINDS)
    return f"kinds joined by '_' ({', '.join(names())}). {kinds}"
