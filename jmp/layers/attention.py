"""Causal self-attention with its heads split over the tensor axis.

Example:
    >>> attn = ParallelAttention(16, num_heads=4, rngs=nnx.Rngs(0))
    >>> attn(jax.numpy.ones((2, 5, 16))).shape
    (2, 5, 16)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from jmp.context import constrain, current_mesh_shape, current_rules, param_axis
from jmp.errors import ConfigError
from jmp.layers import context_parallel
from jmp.layers.base import (
    Initializer,
    Mode,
    activation_names,
    check_mode,
    default_kernel_init,
    named_param,
    residual_names,
)
from jmp.layers.linear import (
    column_parallel_matmul,
    row_parallel_matmul,
)
from jmp.layers.rope import RopeScaling, apply_rope, rope_cos_sin
from jmp.rules import Rules, axes_tuple


def segment_mask(segment_ids: jax.Array | None, /) -> jax.Array | None:
    """``(batch, 1, q, k)``: True where query and key tokens are in the same segment (document).

    Example:
        >>> segment_mask(jnp.array([[0, 0, 1]]))[0, 0].astype(int)
        Array([[1, 1, 0],
               [1, 1, 0],
               [0, 0, 1]], dtype=int32)
    """
    if segment_ids is None:
        return None
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


class ParallelAttention(nnx.Module):
    """Multi-head attention with heads split over the tensor axis.

    Q, K, V come from one column-parallel ``(embed, 3, heads, kv)`` kernel, so each device
    attends with its own heads; the output projection ``(heads, kv, embed)`` is row-parallel
    (one psum).
    Attention itself is ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs);
    inside a context-parallel region (:mod:`jmp.layers.context_parallel`) it is the ring or
    all-gather attention named by ``cp_impl``.

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
        cp_impl: context_parallel.CpImpl = "ring",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        check_mode(mode)
        context_parallel.check_impl(cp_impl)
        self.cp_impl: context_parallel.CpImpl = cp_impl
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

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """``x (batch, seq, features)``; with ``segment_ids (batch, seq)`` (packed documents) a
        token attends only to earlier tokens of its own segment."""
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        axis = param_axis("heads")
        qkv = column_parallel_matmul(
            x, self.qkv[...].astype(dtype), n_contract=1, axis=axis, mode=self.mode, split_dim=2
        )
        qkv = constrain(qkv, activation_names(qkv.ndim, None, "heads", "kv"))
        q, k, v = (qkv[..., i, :, :] for i in range(3))
        if context_parallel.current_region() is not None:  # the sequence is split: cp
            o = context_parallel.attention(
                q, k, v, impl=self.cp_impl, segment_ids=segment_ids, causal=self.causal
            )
        else:
            o = jax.nn.dot_product_attention(
                q, k, v, mask=segment_mask(segment_ids), is_causal=self.causal
            )
        y = row_parallel_matmul(
            o, self.out[...].astype(dtype), n_contract=2, axis=axis, mode=self.mode
        )
        y = constrain(y, residual_names(y.ndim, "embed"))
        return y if self.out_bias is None else y + self.out_bias[...].astype(y.dtype)


def kv_heads_name(
    num_kv_heads: int, /, *, mesh: Mesh | AbstractMesh | None = None, rules: Rules | None = None
) -> str | None:
    """The logical name of the key/value heads dim: ``'kv_heads'``, or None when it cannot split.

    When the mesh axes that ``rules`` map ``'kv_heads'`` to do not divide ``num_kv_heads`` (2 kv
    heads on a model axis of 4), the k/v weights are replicated instead (None) and each device
    computes the kv heads its own query heads need (Megatron's rule for grouped-query
    attention). ``mesh`` and ``rules`` default to those active (:func:`jmp.activate`); with
    none, the name is ``'kv_heads'``.

    Example:
        >>> kv_heads_name(8, mesh=mesh, rules=rules), kv_heads_name(2, mesh=mesh, rules=rules)
        ('kv_heads', None)
    """
    if (mesh is None) != (rules is None):
        raise ConfigError("kv_heads_name needs both mesh= and rules=, or neither. Fix: pass both.")
    if mesh is None or rules is None:
        shape, axis = current_mesh_shape(), param_axis("kv_heads")
    else:
        shape, axis = dict(mesh.shape), rules.params_dict.get("kv_heads")
    ways = math.prod(shape.get(a, 1) for a in axes_tuple(axis))
    return "kv_heads" if num_kv_heads % ways == 0 else None


def _constrain_param(w: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin a weight built while tracing (a fused kernel) to its logical names' sharding."""
    rules = current_rules()
    if rules is None or not current_mesh_shape():
        return w
    return jax.lax.with_sharding_constraint(w, rules.param_spec(names))


class _Weights(nnx.Module):
    """One projection's kernel (and bias): q, k, v or o of :class:`GroupedQueryAttention`."""

    def __init__(
        self,
        kernel: jax.Array,
        names: tuple[str | None, ...],
        bias: jax.Array | None = None,
        bias_names: tuple[str | None, ...] = (),
    ) -> None:
        self.kernel = named_param(kernel, names)
        self.bias = None if bias is None else named_param(bias, bias_names)


class GroupedQueryAttention(nnx.Module):
    """Causal grouped-query attention with rotary positions (Llama, Mistral, Qwen2).

    ``num_heads`` query heads share ``num_kv_heads`` key/value heads: query head ``h`` reads kv
    head ``h // (num_heads // num_kv_heads)``, as Hugging Face's ``repeat_kv`` does. Weights:
    ``q.kernel (embed, heads, kv)``, ``k.kernel``/``v.kernel (embed, kv_heads, kv)``, optional
    q/k/v biases (Qwen2), ``o.kernel (heads, kv, embed)`` (never a bias).

    Under tensor parallelism over ``m`` devices each holds ``num_heads / m`` query heads. The
    projections run as one column-parallel product over ``lcm(num_kv_heads, m)`` *slots*, each
    one kv head and the query heads that read it (Megatron's query-group layout): when ``m``
    divides the kv heads every device holds its own; otherwise the k/v weights are replicated
    and each device computes only the copies its slots need. So a block costs one all-reduce
    forward (the row-parallel ``o``) and one backward (the input's gradient) either way; with
    replicated k/v the backward also sums their weights' gradients over the copies (small,
    weight-sized collectives).

    ``split_kv_heads``: name the k/v heads dim ``'kv_heads'`` (True) or None (False: replicated);
    None decides with :func:`kv_heads_name` from the rules and mesh active at construction.

    Attention is ``jax.nn.dot_product_attention`` (GQA without materializing repeated k/v),
    causal, optionally within a sliding window (Mistral: a token sees itself and the
    ``sliding_window - 1`` before it) and within documents (``segment_ids``); in a
    context-parallel region, the ``cp_impl`` of :mod:`jmp.layers.context_parallel`.

    Example:
        >>> attn = GroupedQueryAttention(64, num_heads=8, num_kv_heads=2, rngs=nnx.Rngs(0))
        >>> attn.k.kernel.shape
        (64, 2, 8)
        >>> attn(jnp.ones((2, 16, 64))).shape
        (2, 16, 64)
    """

    def __init__(
        self,
        features: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: RopeScaling | None = None,
        sliding_window: int | None = None,
        split_kv_heads: bool | None = None,
        mode: Mode = "auto",
        cp_impl: context_parallel.CpImpl = "ring",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        check_mode(mode)
        context_parallel.check_impl(cp_impl)
        self.cp_impl: context_parallel.CpImpl = cp_impl
        head_dim = head_dim or features // num_heads
        problems = []
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            problems.append(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        if head_dim < 2 or head_dim % 2:
            problems.append(f"head_dim={head_dim} must be even (rotary embedding pairs)")
        if sliding_window is not None and sliding_window < 1:
            problems.append(f"sliding_window={sliding_window} must be >= 1 or None")
        if problems:
            raise ConfigError("Invalid attention: " + "; ".join(problems) + ".")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        self.sliding_window = sliding_window
        self.mode: Mode = mode
        self.dtype = dtype
        H, K, D, d = num_heads, num_kv_heads, head_dim, features
        if split_kv_heads is None:
            kv = kv_heads_name(K)
        else:
            kv = "kv_heads" if split_kv_heads else None

        def init(shape: tuple[int, ...], n_in: int) -> jax.Array:
            # fan-in over the contracted dims only (the heads are outputs, not a receptive field)
            fn = kernel_init or nnx.initializers.variance_scaling(
                1.0,
                "fan_in",
                "truncated_normal",
                in_axis=tuple(range(n_in)),
                out_axis=tuple(range(n_in, len(shape))),
            )
            return fn(rngs.params(), shape, param_dtype)

        def bias(*shape: int) -> jax.Array | None:
            return jnp.zeros(shape, param_dtype) if qkv_bias else None

        self.q = _Weights(init((d, H, D), 1), ("embed", "heads", "kv"), bias(H, D), ("heads", "kv"))
        self.k = _Weights(init((d, K, D), 1), ("embed", kv, "kv"), bias(K, D), (kv, "kv"))
        self.v = _Weights(init((d, K, D), 1), ("embed", kv, "kv"), bias(K, D), (kv, "kv"))
        self.o = _Weights(init((H, D, d), 2), ("heads", "kv", "embed"))

    def _slots(self) -> int:
        """Column-parallel slots: each one kv head with its query heads, split over the axis."""
        shape = current_mesh_shape()
        ways = math.prod(shape[a] for a in axes_tuple(param_axis("heads")))
        return math.lcm(self.num_kv_heads, ways)

    def _fused(self, n: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array | None]:
        """q, k, v weights as one ``(embed, slots, heads_per_slot + 2, kv)`` kernel (and bias)."""
        H, K = self.num_heads, self.num_kv_heads

        def slot_major(q: jax.Array, k: jax.Array, v: jax.Array, lead: int) -> jax.Array:
            q = q.reshape(*q.shape[:lead], n, H // n, q.shape[-1])
            # slot j holds kv head j // (n // K): a kv head the axis cannot split is repeated,
            # so each device computes the copies its query heads need, and no more
            k, v = (jnp.repeat(a, n // K, axis=lead)[..., None, :] for a in (k, v))
            return jnp.concatenate([q, k, v], axis=lead + 1)

        q, k, v = self.q, self.k, self.v
        w = slot_major(q.kernel[...], k.kernel[...], v.kernel[...], 1).astype(dtype)
        w = _constrain_param(w, ("embed", "heads", None, "kv"))
        if q.bias is None or k.bias is None or v.bias is None:
            return w, None
        b = slot_major(q.bias[...], k.bias[...], v.bias[...], 0).astype(dtype)
        return w, _constrain_param(b, ("heads", None, "kv"))

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``x (batch, seq, features)``; ``segment_ids``/``positions`` are ``(batch, seq)`` ints.

        Tokens attend only to earlier tokens of the same segment (document); ``positions``
        (default ``0..seq-1``) are the rotary positions, restarting per packed document.
        """
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        batch, seq = x.shape[:2]
        n, axis = self._slots(), param_axis("heads")
        per_slot = self.num_heads // n
        w, b = self._fused(n, dtype)
        y = column_parallel_matmul(x, w, n_contract=1, axis=axis, mode=self.mode, split_dim=1)
        y = y if b is None else y + b
        y = constrain(y, activation_names(y.ndim, "heads", None, "kv"))
        q = y[..., :per_slot, :].reshape(batch, seq, self.num_heads, self.head_dim)
        k, v = y[..., per_slot, :], y[..., per_slot + 1, :]
        if positions is None:  # a context-parallel region knows its tokens' true positions
            positions = context_parallel.local_positions(batch)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        cos, sin = rope_cos_sin(
            positions, self.head_dim, theta=self.rope_theta, scaling=self.rope_scaling
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        names = activation_names(q.ndim, "heads", "kv")
        q, k, v = constrain(q, names), constrain(k, names), constrain(v, names)
        if context_parallel.current_region() is not None:  # the sequence is split: cp
            # only the kv heads (this device's slots) travel, never the repeated ones
            o = context_parallel.attention(
                q, k, v, impl=self.cp_impl, segment_ids=segment_ids, window=self.sliding_window
            )
        else:
            mask = segment_mask(segment_ids)
            window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
            o = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, local_window_size=window
            )
        out = row_parallel_matmul(
            o, self.o.kernel[...].astype(dtype), n_contract=2, axis=axis, mode=self.mode
        )
        return constrain(out, residual_names(out.ndim, "embed"))
