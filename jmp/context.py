"""The active mesh and rules that parallel layers read while they trace.

Layers do not take a mesh argument (no config object threaded through every layer): they read
the mesh that ``jax.set_mesh`` made current and the :class:`~jmp.rules.Rules` made current by
:func:`activate`. With nothing active, a layer computes the plain dense product, which is also the
single-device reference the tests compare against.

Example (a row-parallel layer: under ``dp_tp`` its input features are split over 'model'):
    >>> layer = jmp.layers.RowParallelLinear(8, 4, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((8, 8))
    >>> with jmp.activate(mesh, rules):
    ...     y = jax.jit(lambda x: layer(x))(x)  # traced here: one psum joins the blocks
    ...     jmp.context.param_axis("mlp")
    'model'
    >>> jmp.context.current_rules() is None    # nothing active outside the block
    True
    >>> bool(jnp.allclose(y, layer(x), atol=1e-6))  # the dense product, the reference
    True
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from jmp.errors import ConfigError, MeshError
from jmp.rules import MeshAxes, Rules, axes_tuple, raise_problems, resolve

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("jmp_rules", default=None)
# The mesh's axis sizes while a model is built by jmp.shard_init (no jax mesh is set then).
_BUILD_SHAPE: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "jmp_build_shape", default=None
)


def activate(mesh: Mesh, rules: Rules, /) -> contextlib.AbstractContextManager[None]:
    """Make ``mesh`` (via ``jax.set_mesh``) and ``rules`` current for the layers inside.

    Jitted functions capture the rules at trace time: trace them inside this context. Inside a
    jitted function (where ``jax.set_mesh`` is not allowed) it only sets the rules, provided the
    same mesh is already current.

    Raises:
        MeshError: ``mesh`` is not a ``jax.sharding.Mesh`` (e.g. the text ``"data=8"``).
        ConfigError: ``rules`` is not a :class:`~jmp.rules.Rules` (e.g. a plain dict).
    """
    _check_activate_args(mesh, rules)
    return _activate(mesh, rules)


def _check_activate_args(mesh: object, rules: object) -> None:
    if not isinstance(mesh, Mesh | AbstractMesh):
        hint = f"jmp.make_mesh({mesh!r})" if isinstance(mesh, str) else "jmp.make_mesh(...)"
        raise MeshError(
            f"activate() needs a jax.sharding.Mesh first, got {type(mesh).__name__} "
            f"{_short(mesh)}. Fix: pass {hint}."
        )
    if not isinstance(rules, Rules):
        hint = (
            f"jmp.Rules({_short(dict(rules))}) (one table for parameters and activations) or "
            f"jmp.Rules(params=..., activations=...)"
            if isinstance(rules, Mapping)
            else "jmp.Rules(params=..., activations=...)"
        )
        raise ConfigError(
            f"activate() needs jmp.Rules, got {type(rules).__name__} {_short(rules)}. Fix: pass "
            f"{hint}, or a named strategy's jmp.rules.preset('dp_tp', mesh)."
        )


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    token = _RULES.set(rules)
    try:
        if jax.sharding.get_abstract_mesh() == mesh.abstract_mesh:
            yield
        else:
            with jax.set_mesh(mesh):
                yield
    finally:
        _RULES.reset(token)


@contextlib.contextmanager
def building(mesh: Mesh, rules: Rules, /) -> Iterator[None]:
    """The rules and the mesh's axis sizes, current while a model is constructed.

    :func:`jmp.shard_init` builds models inside it, so a constructor can ask
    :func:`param_axis` how a dimension will be split (grouped-query attention replicates its
    kv heads when the tensor axis does not divide them). No jax mesh is set: Flax would then
    shard variables by its own rules.
    """
    rules_token, shape_token = _RULES.set(rules), _BUILD_SHAPE.set(dict(mesh.shape))
    try:
        yield
    finally:
        _RULES.reset(rules_token)
        _BUILD_SHAPE.reset(shape_token)


def current_rules() -> Rules | None:
    """The rules made current by :func:`activate`, or None."""
    return _RULES.get()


def current_mesh_shape() -> dict[str, int]:
    """Axis sizes of the mesh in context, or of the one a model is being built for
    (:func:`building`); empty when there is neither."""
    mesh = jax.sharding.get_abstract_mesh()
    return dict(mesh.shape) if not mesh.empty else dict(_BUILD_SHAPE.get() or {})


def param_axis(name: str | None, /) -> MeshAxes:
    """Mesh axes (of size > 1) that split a parameter dimension called ``name``; None if none.

    This is how a layer learns its tensor-parallel axis: a row-parallel kernel's input dim
    ``'mlp'`` maps to ``'model'`` under ``tp`` and to None under ``dp``.
    """
    rules, shape = current_rules(), current_mesh_shape()
    if rules is None or not shape or name is None:
        return None
    axes = tuple(a for a in axes_tuple(rules.params_dict.get(name)) if shape.get(a, 1) > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def sequence_parallel(axis: MeshAxes, /) -> bool:
    """Whether the current rules also split the residual stream's ``'seq'`` dim over the
    tensor-parallel ``axis`` (sequence parallelism, the ``sp`` kind).

    A tensor-parallel layer on ``axis`` then all-gathers its input's sequence (column-parallel)
    or reduce-scatters its output over the sequence (row-parallel) instead of all-reducing it.
    """
    rules, shape = current_rules(), current_mesh_shape()
    if rules is None or axis is None:
        return False
    seq = tuple(a for a in axes_tuple(rules.activations_dict.get("seq")) if shape.get(a, 1) > 1)
    return bool(seq) and seq == axes_tuple(axis)


def batch_axes() -> MeshAxes:
    """The mesh axes (not manual here) that the current rules split the ``'batch'`` activation
    dim over; None when none or nothing is active."""
    spec = activation_spec(("batch",))
    return spec[0] if spec is not None and len(spec) else None


def check_sequence_split(seq: int, axis: MeshAxes, /) -> None:
    """Raise a one-line :class:`~jmp.ConfigError` unless ``axis`` divides a ``seq``-token
    sequence (sequence parallelism splits it over ``axis``)."""
    ways = 1
    for a in axes_tuple(axis):
        ways *= current_mesh_shape().get(a, 1)
    if seq % ways:
        where = " x ".join(repr(a) for a in axes_tuple(axis))
        raise ConfigError(
            f"sequence of {seq} tokens does not split over {where} of size {ways} "
            f"(sequence parallelism, sp). Fix: a sequence length that is a multiple of {ways}, "
            f"or the strategy without sp."
        )


def activation_spec(names: Sequence[str | None], /) -> PartitionSpec | None:
    """Strictly resolve activation names with the current rules; None when nothing is active."""
    rules = current_rules()
    if rules is None or not current_mesh_shape():
        return None
    spec, problems = resolve(names, rules.activations_dict)
    raise_problems(problems, what="activation")
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
    if manual:  # inside a shard_map those axes are already split: the spec names the others
        spec = PartitionSpec(*(_without(entry, manual) for entry in spec))
    return spec


def _without(entry: MeshAxes, manual: set[str]) -> MeshAxes:
    kept = tuple(a for a in axes_tuple(entry) if a not in manual)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def constrain(x: jax.Array, names: Sequence[str | None], /) -> jax.Array:
    """Pin ``x`` to the sharding its logical ``names`` resolve to (no-op with nothing active)."""
    spec = activation_spec(names)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)
