"""Tensor-parallel Flax NNX layers (Megatron-style), each parameter named by logical axes.

The core is the row-parallel product **y = sum_i W_i x_i + b**: device i holds the block W_i of
rows of W and the matching block x_i of the input's features, multiplies them locally, one psum
over the tensor-parallel mesh axis joins the partial sums, and the bias is added once after it.
A column-parallel layer splits W by output features instead and needs no communication.

Every layer has two modes that must give the same numbers and the same collectives:

- ``mode="manual"``: the psum is written out with ``jax.shard_map`` (partial-manual over the
  tensor axis only, so data axes stay with the compiler).
- ``mode="auto"``: only sharding annotations; XLA's partitioner inserts the all-reduce.

The tensor axis is not a layer argument: it is whatever mesh axis the current rules map the
split dimension to (``'mlp'`` -> ``'model'`` under ``tp``; -> nothing under ``dp``). Outside
:func:`jmp.activate`, layers compute the dense product: the single-device reference.

Example (the seed model, ``Linear(10,10) -> ReLU -> Linear(10,1)``, tensor-parallel):
    >>> class Seed(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.up = ColumnParallelLinear(10, 8, rngs=rngs)
    ...         self.down = RowParallelLinear(8, 1, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.down(jax.nn.relu(self.up(x)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jmp.context import constrain, param_axis
from jmp.errors import ConfigError
from jmp.rules import MeshAxes, axes_tuple

Mode = Literal["auto", "manual"]
Initializer = Callable[..., jax.Array]
default_kernel_init = nnx.initializers.lecun_normal()
default_embedding_init = nnx.initializers.normal(0.02)


def named_param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """A parameter carrying logical names, creatable without a mesh.

    Flax's eager sharding would place it at creation using Flax's own (lenient) rules and fail
    without a mesh; jmp places parameters itself (:func:`jmp.shard_init`), so it is off here and
    the same module also builds unsharded, as the single-device reference.
    """
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _check_mode(mode: str) -> None:
    if mode not in ("auto", "manual"):
        raise ConfigError(f"mode must be 'auto' or 'manual', got {mode!r}.")


def _act_names(ndim: int, *feature_names: str | None) -> tuple[str | None, ...]:
    """('batch', None, ..., *features): leading dim is the batch, the rest are unsplit."""
    lead = ndim - len(feature_names)
    return (("batch",) + (None,) * (lead - 1) if lead > 0 else ()) + tuple(feature_names)


def row_parallel_matmul(
    x: jax.Array, w: jax.Array, /, *, n_contract: int, axis: MeshAxes, mode: Mode
) -> jax.Array:
    """Contract the last ``n_contract`` dims of ``x`` with the first of ``w``, split over ``axis``.

    The first contracted dim is split over ``axis``; the partial products are summed with one
    all-reduce (``psum``) over it, so the result is whole on every device of that axis.
    """
    if axis is None or mode == "auto":
        return jnp.tensordot(x, w, n_contract)
    lead = x.ndim - n_contract
    x_spec = P(*(None,) * lead, axis)
    w_spec = P(axis)

    def block(x_i: jax.Array, w_i: jax.Array) -> jax.Array:
        return jax.lax.psum(jnp.tensordot(x_i, w_i, n_contract), axes_tuple(axis))

    return jax.shard_map(
        block,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(x_spec, w_spec),
        out_specs=P(),
        axis_names=set(axes_tuple(axis)),
    )(x, w)


def column_parallel_matmul(
    x: jax.Array,
    w: jax.Array,
    /,
    *,
    n_contract: int,
    axis: MeshAxes,
    mode: Mode,
    split_dim: int | None = None,
) -> jax.Array:
    """Contract like :func:`row_parallel_matmul`, with an output dim of ``w`` split instead.

    Each device computes its block of output features: no communication in the forward pass
    (the backward pass sums the input's gradient over ``axis``: one all-reduce).

    Args:
        split_dim: the dim of ``w`` split over ``axis`` (default: its first output dim).
    """
    if axis is None or mode == "auto":
        return jnp.tensordot(x, w, n_contract)
    split_dim = n_contract if split_dim is None else split_dim
    w_spec = P(*(None,) * split_dim, axis)
    y_spec = P(*(None,) * (x.ndim - n_contract + split_dim - n_contract), axis)
    return jax.shard_map(
        lambda x_, w_i: jnp.tensordot(x_, w_i, n_contract),
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(), w_spec),
        out_specs=y_spec,
        axis_names=set(axes_tuple(axis)),
    )(x, w)


class _Linear(nnx.Module):
    """Shared state of the two parallel linears: kernel ``(in, out)`` and bias ``(out,)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: tuple[str, str],
        use_bias: bool,
        mode: Mode,
        dtype: jnp.dtype | None,
        param_dtype: jnp.dtype,
        kernel_init: Initializer,
        rngs: nnx.Rngs,
    ) -> None:
        _check_mode(mode)
        if in_features < 1 or out_features < 1:
            raise ConfigError(
                f"features must be positive, got in={in_features}, out={out_features}."
            )
        self.in_features, self.out_features = in_features, out_features
        self.names = names
        self.mode: Mode = mode
        self.dtype = dtype
        self.kernel = named_param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype), names
        )
        self.bias = (
            named_param(jnp.zeros((out_features,), param_dtype), names[1:]) if use_bias else None
        )

    def _operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        dtype = self.dtype or x.dtype
        return x.astype(dtype), self.kernel[...].astype(dtype)

    def _add_bias(self, y: jax.Array) -> jax.Array:
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class ColumnParallelLinear(_Linear):
    """``y = x W + b`` with W split over output features; the output stays split (no comms).

    Args:
        names: logical names of the kernel's (input, output) dims; the output name's rule picks
            the tensor axis (default ``('embed', 'mlp')``: ``'mlp'`` -> ``'model'`` under tp).
        mode: ``'auto'`` (annotations) or ``'manual'`` (``jax.shard_map``).

    Example:
        >>> layer = ColumnParallelLinear(64, 256, rngs=nnx.Rngs(0))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        names: tuple[str, str] = ("embed", "mlp"),
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            names=names,
            use_bias=use_bias,
            mode=mode,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x, w = self._operands(x)
        y = column_parallel_matmul(
            x, w, n_contract=1, axis=param_axis(self.names[1]), mode=self.mode
        )
        return constrain(self._add_bias(y), _act_names(y.ndim, self.names[1]))


class RowParallelLinear(_Linear):
    """``y = sum_i W_i x_i + b``: W split over input features, one psum, the bias added once.

    The input is expected split over its features (as a column-parallel layer leaves it).

    Args:
        names: logical names of the kernel's (input, output) dims; the input name's rule picks
            the tensor axis (default ``('mlp', 'embed')``).
        mode: ``'auto'`` (XLA inserts the all-reduce) or ``'manual'`` (explicit ``psum``).

    Example:
        >>> layer = RowParallelLinear(256, 64, rngs=nnx.Rngs(0))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        names: tuple[str, str] = ("mlp", "embed"),
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            names=names,
            use_bias=use_bias,
            mode=mode,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x, w = self._operands(x)
        x = constrain(x, _act_names(x.ndim, self.names[0]))
        y = row_parallel_matmul(x, w, n_contract=1, axis=param_axis(self.names[0]), mode=self.mode)
        y = constrain(y, _act_names(y.ndim, self.names[1]))  # whole over the tensor axis
        return self._add_bias(y)  # after the psum: added once, not once per shard


class ParallelEmbed(nnx.Module):
    """Token embedding with the vocabulary split over the tensor axis.

    Each device looks up the ids that fall in its slice of the vocabulary (zeros elsewhere) and
    one psum joins the slices: the table is never gathered.

    Example:
        >>> embed = ParallelEmbed(256, 64, rngs=nnx.Rngs(0)); embed(jnp.array([[1, 2]])).shape
        (1, 2, 64)
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        mode: Mode = "auto",
        names: tuple[str, str] = ("vocab", "embed"),
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        embedding_init: Initializer = default_embedding_init,
        rngs: nnx.Rngs,
    ) -> None:
        _check_mode(mode)
        self.num_embeddings, self.features = num_embeddings, features
        self.mode: Mode = mode
        self.names = names
        self.dtype = dtype
        self.embedding = named_param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype), names
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...].astype(self.dtype or self.embedding[...].dtype)
        axis = param_axis(self.names[0])
        if axis is None:
            y = jnp.take(table, ids, axis=0)
        elif self.mode == "auto":
            # A one-hot contraction over the split vocabulary is a row-parallel product: the
            # partitioner computes local partial sums and all-reduces them (no table gather).
            one_hot = jax.nn.one_hot(ids, self.num_embeddings, dtype=table.dtype)
            y = jnp.tensordot(constrain(one_hot, _act_names(one_hot.ndim, self.names[0])), table, 1)
        else:
            y = _manual_lookup(ids, table, axis)
        return constrain(y, _act_names(y.ndim, self.names[1]))


def _manual_lookup(ids: jax.Array, table: jax.Array, axis: MeshAxes) -> jax.Array:
    axes = axes_tuple(axis)

    def block(ids_: jax.Array, table_i: jax.Array) -> jax.Array:
        start = jax.lax.axis_index(axes) * table_i.shape[0]
        # one_hot of an id outside this slice is a zero row: ids held elsewhere contribute 0.
        # A contraction (not a gather) also keeps the backward a local matmul, no scatter.
        one_hot = jax.nn.one_hot(ids_ - start, table_i.shape[0], dtype=table_i.dtype)
        return jax.lax.psum(jnp.tensordot(one_hot, table_i, 1), axes)

    # Gather the table's other splits (FSDP's 'embed' over 'data') before the manual region:
    # left to the partitioner, it gathers the far larger one-hot activations instead.
    table = jax.lax.with_sharding_constraint(table, P(axis))
    return jax.shard_map(
        block,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(), P(axis)),
        out_specs=P(),
        axis_names=set(axes),
    )(ids, table)


class ParallelMLP(nnx.Module):
    """Megatron MLP: column-parallel up-projection, activation, row-parallel down-projection.

    One all-reduce forward (after the down-projection) and one backward (the input's gradient).

    Example:
        >>> mlp = ParallelMLP(64, 256, rngs=nnx.Rngs(0))
    """

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        activation: Callable = jax.nn.gelu,
        use_bias: bool = True,
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        self.activation = activation
        self.up = ColumnParallelLinear(
            features,
            hidden,
            names=("embed", "mlp"),
            use_bias=use_bias,
            mode=mode,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )
        self.down = RowParallelLinear(
            hidden,
            features,
            names=("mlp", "embed"),
            use_bias=use_bias,
            mode=mode,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.activation(self.up(x)))


class ParallelAttention(nnx.Module):
    """Multi-head attention with heads split over the tensor axis.

    Q, K, V come from one column-parallel ``(embed, 3, heads, kv)`` kernel, so each device
    attends with its own heads; the output projection ``(heads, kv, embed)`` is row-parallel
    (one psum).
    Attention itself is ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs).

    Example:
        >>> attn = ParallelAttention(64, num_heads=4, rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((2, 16, 64))).shape
        (2, 16, 64)
    """

    def __init__(
        self,
        features: int,
        *,
        num_heads: int,
        head_dim: int | None = None,
        causal: bool = True,
        use_bias: bool = True,
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        _check_mode(mode)
        if head_dim is None:
            if features % num_heads:
                raise ConfigError(
                    f"features={features} is not divisible by num_heads="
                    f"{num_heads}; pass head_dim explicitly or change one of them."
                )
            head_dim = features // num_heads
        self.num_heads, self.head_dim, self.causal = num_heads, head_dim, causal
        self.mode: Mode = mode
        self.dtype = dtype
        shape_out = (num_heads, head_dim, features)

        def param(
            shape: Sequence[int], names: tuple[str | None, ...], fn: Initializer
        ) -> nnx.Param:
            return named_param(fn(rngs.params(), shape, param_dtype), names)

        qkv_init = (
            kernel_init
            if kernel_init is not default_kernel_init
            else nnx.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(2, 3), batch_axis=(1,)
            )
        )
        # q, k and v in one kernel: one matmul, and one all-reduce for the input's gradient
        self.qkv = param(
            (features, 3, num_heads, head_dim), ("embed", None, "heads", "kv"), qkv_init
        )
        out_init = (
            kernel_init
            if kernel_init is not default_kernel_init
            else nnx.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
            )
        )
        self.out = param(shape_out, ("heads", "kv", "embed"), out_init)
        self.out_bias = (
            named_param(jnp.zeros((features,), param_dtype), ("embed",)) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        axis = param_axis("heads")
        qkv = column_parallel_matmul(
            x, self.qkv[...].astype(dtype), n_contract=1, axis=axis, mode=self.mode, split_dim=2
        )
        qkv = constrain(qkv, _act_names(qkv.ndim, None, "heads", "kv"))
        q, k, v = (qkv[..., i, :, :] for i in range(3))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        y = row_parallel_matmul(
            o, self.out[...].astype(dtype), n_contract=2, axis=axis, mode=self.mode
        )
        y = constrain(y, _act_names(y.ndim, "embed"))
        return y if self.out_bias is None else y + self.out_bias[...].astype(y.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned ``('embed',)`` scale, computed in float32.

    Example:
        >>> RMSNorm(64, rngs=nnx.Rngs(0))(jnp.ones((2, 64))).shape
        (2, 64)
    """

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-6,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        del rngs  # deterministic init; accepted for a uniform constructor signature
        self.eps = eps
        self.scale = named_param(jnp.ones((features,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)
