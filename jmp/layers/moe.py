"""Mixture of experts: a top-k router, SwiGLU or GELU experts, shared experts, expert parallelism.

Each token's router picks ``top_k`` of ``n_experts`` MLPs (softmax over the experts, the
chosen probabilities renormalized to sum to 1); the token's output is their weighted sum, plus
the output of the shared experts every token uses (DeepSeek-MoE). Two auxiliary losses keep the
router healthy: the Switch Transformer load-balancing loss and the ST-MoE router z-loss.

The experts are SwiGLU MLPs ``down(silu(x @ gate) * (x @ up))`` (``activation="swiglu"``, the
default: Mixtral's, Llama's), or GELU MLPs ``down(gelu(x @ up))`` (``activation="gelu"``, GPT's
dense MLP: tanh-approximated GELU, no biases); a GELU expert has no ``gate`` kernel.

How the experts run:

- **Dropless** (the default, ``capacity_factor=None``) on devices that hold every expert: each
  device sorts its tokens by expert and multiplies each expert's contiguous rows with one grouped
  matmul (``jax.lax.ragged_dot``); no token is dropped.
- **Capacity** (``capacity_factor=c``): expert ``e`` takes at most
  ``C = ceil(c * n * top_k / n_experts)`` of a device's ``n`` tokens, first choices before
  second choices, earlier tokens first; the rest are dropped (counted in :class:`MoEAux`).
- **Expert parallelism**, when the active rules map the logical name ``'expert'`` to a mesh axis:
  the experts are split over that axis and the tokens over the batch axes, which must include
  it. Inside ``jax.shard_map`` each device packs its tokens into one slot buffer per expert,
  sends each buffer to the device holding that expert with **one all-to-all**, runs its experts,
  and sends the results back with **one all-to-all**. ``ragged_all_to_all`` is not implemented
  on XLA:CPU, so the buffers have a fixed size: dropless means ``C = n`` slots per expert (no
  token can be dropped, at ``n_experts / top_k`` times the ideal traffic); a capacity factor
  shrinks them.

Example:
    >>> moe = MoE(16, 32, n_experts=4, top_k=2, rngs=nnx.Rngs(0))
    >>> y, aux = moe(jnp.ones((2, 3, 16)), return_aux=True)
    >>> y.shape, aux.expert_load.shape, int(aux.dropped)
    ((2, 3, 16), (4,), 0)
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jmp.context import activation_spec, current_mesh_shape, param_axis, sequence_parallel
from jmp.errors import ConfigError
from jmp.layers.base import (
    Initializer,
    Mode,
    check_mode,
    default_kernel_init,
    model_rows,
    named_param,
)
from jmp.layers.mlp import GatedMLP, ParallelMLP
from jmp.rules import axes_tuple

EXPERT = "expert"  # the logical name of the experts' dim; its rule picks the expert-parallel axis
# fan-in over the input dim of each expert's (in, out) matrix, as lecun_normal does for a dense one
_expert_init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))


#: The experts' MLPs :class:`MoE` builds: ``activation=`` one of these.
Activation = Literal["swiglu", "gelu"]
ACTIVATIONS: tuple[Activation, ...] = ("swiglu", "gelu")


#: Why a MoE layer refuses sequence parallelism (the layer and ``jmp train`` raise it).
SEQUENCE_PARALLEL_REFUSAL = (
    "A mixture of experts does not run under sequence parallelism (sp) yet: its dispatch "
    "expects whole sequences. Fix: the strategy without sp (tp, dp_tp, fsdp_tp, ep_tp, ...)."
)


class MoEAux(NamedTuple):
    """What a training loop adds to its loss and logs, from one MoE layer's forward.

    Attributes:
        loss: ``aux_loss_weight * load_balancing_loss + z_loss_weight * z_loss``.
        load_balancing_loss: Switch's ``n_experts * sum_e f_e * p_e``, with ``f_e`` the fraction
            of routed (token, choice) pairs sent to expert ``e`` and ``p_e`` the mean router
            probability of ``e``; 1 when perfectly balanced. (Hugging Face's Mixtral loss
            is ``top_k`` times this.)
        z_loss: the mean over tokens of ``logsumexp(router logits) ** 2``.
        expert_load: ``f_e`` per expert, shape ``(n_experts,)``, summing to 1.
        dropped: how many (token, choice) pairs the capacity dropped (0 when dropless), over
            the tokens of this call (all devices': the count is summed over the token axes).
    """

    loss: jax.Array
    load_balancing_loss: jax.Array
    z_loss: jax.Array
    expert_load: jax.Array
    dropped: jax.Array


def route(
    logits: jax.Array, top_k: int, *, normalize: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax over experts, the ``top_k`` largest, their weights (renormalized if asked).

    Returns:
        ``(probs, experts, weights)``: ``(..., E)`` probabilities, ``(..., k)`` expert ids
        (best first), ``(..., k)`` weights.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, experts = jax.lax.top_k(probs, top_k)
    weights = top / top.sum(-1, keepdims=True) if normalize else top
    return probs, experts, weights


def slot_positions(experts: jax.Array, n_experts: int) -> jax.Array:
    """Each (token, choice)'s place in its expert's queue: first choices first, then by token.

    ``experts`` is ``(n, k)``; the result is ``(n, k)``, counting from 0 per expert.
    """
    n, k = experts.shape
    onehot = jax.nn.one_hot(experts.T.reshape(-1), n_experts, dtype=jnp.int32)  # (k * n, E)
    before = jnp.cumsum(onehot, axis=0) - onehot  # earlier pairs in the same expert's queue
    return jnp.sum(before * onehot, axis=-1).reshape(k, n).T


def _experts_mlp(x, kernels, activation, matmul):
    """Each expert's MLP on its rows; ``matmul(rows, kernel)`` multiplies each expert's rows by
    its own slice of a stacked ``(E, in, out)`` kernel. ``kernels``: (gate, up, down) for
    SwiGLU, (up, down) for GELU."""
    if activation == "swiglu":
        gate, up, down = kernels
        h = jax.nn.silu(matmul(x, gate)) * matmul(x, up)
    else:
        up, down = kernels
        h = jax.nn.gelu(matmul(x, up))  # tanh-approximated, as GPT's dense MLP
    return matmul(h, down)


def _per_slot(x, kernels, activation):
    """Per expert: ``x (E, S, D)`` with ``(E, D, F)`` and ``(E, F, D)`` kernels."""
    return _experts_mlp(x, kernels, activation, lambda a, w: jnp.einsum("esd,edf->esf", a, w))


def _dropless(x, experts, weights, kernels, activation):
    """Sort the (token, choice) rows by expert, one grouped matmul per projection, unsort."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]  # the token of each sorted (token, choice) pair
    sizes = jnp.bincount(flat, length=kernels[0].shape[0]).astype(jnp.int32)
    y = _experts_mlp(rows, kernels, activation, lambda a, w: jax.lax.ragged_dot(a, w, sizes))
    out = jnp.zeros_like(rows).at[order].set(y)
    return jnp.einsum("nkd,nk->nd", out.reshape(n, k, -1), weights.astype(x.dtype))


def _with_slots(x, experts, weights, kernels, activation, *, capacity, n_experts, expert_axis):
    """Dispatch into ``(E, C, D)`` slot buffers, run the experts (remote ones through two
    all-to-alls over ``expert_axis``), gather the results back. Returns (y, dropped pairs)."""
    n, k = experts.shape
    pos = slot_positions(experts, n_experts)
    rows = jnp.broadcast_to(x[:, None], (n, k, x.shape[-1]))
    # a slot index >= capacity falls outside the buffer: mode='drop' is the capacity's cut
    buf = jnp.zeros((n_experts, capacity, x.shape[-1]), x.dtype)
    buf = buf.at[experts, pos].add(rows, mode="drop")
    # the buffers hold n_experts * capacity rows per device, n * k of them routed pairs
    rows_scope = model_rows(min(n * k, n_experts * capacity), n_experts * capacity)
    if expert_axis is None:
        with rows_scope:
            out = _per_slot(buf, kernels, activation)
    else:
        local = kernels[0].shape[0]  # the experts this device holds
        n_ep = n_experts // local
        buf = buf.reshape(n_ep, local, capacity, -1)  # [device holding the expert, its expert]
        buf = jax.lax.all_to_all(buf, expert_axis, 0, 0)  # now [source device, my expert]
        with rows_scope:
            mine = buf.swapaxes(0, 1).reshape(local, n_ep * capacity, -1)
            out = _per_slot(mine, kernels, activation)
        out = out.reshape(local, n_ep, capacity, -1).swapaxes(0, 1)
        out = jax.lax.all_to_all(out, expert_axis, 0, 0).reshape(n_experts, capacity, -1)
    got = out.at[experts, pos].get(mode="fill", fill_value=0)  # (n, k, D); dropped pairs: 0
    y = jnp.einsum("nkd,nk->nd", got, weights.astype(x.dtype))
    return y, jnp.sum(pos >= capacity)


class MoE(nnx.Module):
    """Top-k mixture of SwiGLU (or GELU) experts, optional shared experts, expert parallel when
    asked.

    Parameters: ``router`` ``(embed, n_experts)`` (replicated over the experts' axis), ``gate``
    (SwiGLU only; None for GELU) and ``up`` ``(expert, embed, mlp)``, ``down``
    ``(expert, mlp, embed)``, and a ``shared`` MLP of width ``n_shared_experts * hidden``: a
    :class:`~jmp.layers.GatedMLP` for SwiGLU, a bias-free GELU
    :class:`~jmp.layers.ParallelMLP` (``up``, ``down``) for GELU.

    Args:
        features: the model width (``embed``).
        hidden: each expert's hidden width.
        n_experts: routed experts.
        top_k: experts per token (``1 <= top_k <= n_experts``).
        n_shared_experts: experts every token uses (fused into one MLP); 0 for none.
        capacity_factor: None for dropless, else the per-expert capacity factor (> 0).
        activation: ``"swiglu"`` (gate, up, down) or ``"gelu"`` (up, down) experts.
        normalize_weights: renormalize the chosen probabilities to sum to 1 (Mixtral); False
            keeps the raw probabilities (Switch's top-1, whose router then learns from the output).
        aux_loss_weight, z_loss_weight: the weights of the two losses in ``MoEAux.loss``.
        mode: the shared experts' collective mode (the routed experts always use shard_map).

    Calling it returns ``y``, or ``(y, aux)`` with ``return_aux=True``; the :class:`MoEAux` is
    also sown as an ``nnx.Intermediate`` under ``nnx.capture`` (see :func:`captured_aux`).

    Example:
        >>> moe = MoE(16, 32, n_experts=4, top_k=1, n_shared_experts=1, rngs=nnx.Rngs(0))
        >>> moe.gate.shape, moe.shared.up.kernel.shape
        ((4, 16, 32), (16, 32))
        >>> gelu = MoE(16, 32, n_experts=4, activation="gelu", rngs=nnx.Rngs(0))
        >>> gelu.gate is None, gelu.up.shape
        (True, (4, 16, 32))
    """

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        n_experts: int,
        top_k: int = 2,
        n_shared_experts: int = 0,
        capacity_factor: float | None = None,
        activation: Activation = "swiglu",
        normalize_weights: bool = True,
        aux_loss_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        mode: Mode = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        check_mode(mode)
        _check_config(
            features, hidden, n_experts, top_k, n_shared_experts, capacity_factor, activation
        )
        _check_expert_axis(n_experts)  # inside jmp.shard_init the mesh is known already
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.normalize_weights, self.activation = normalize_weights, activation
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.dtype = dtype
        e, d, f = n_experts, features, hidden
        self.router = named_param(kernel_init(rngs.params(), (d, e), param_dtype), ("embed", None))
        # SwiGLU draws gate, up, down in this order (its checkpoints keep their names and values)
        self.gate = (
            named_param(_expert_init(rngs.params(), (e, d, f), param_dtype), _IN_NAMES)
            if activation == "swiglu"
            else None
        )
        self.up = named_param(_expert_init(rngs.params(), (e, d, f), param_dtype), _IN_NAMES)
        self.down = named_param(_expert_init(rngs.params(), (e, f, d), param_dtype), _OUT_NAMES)
        # the shared experts fused into one MLP of the experts' kind
        mlp = GatedMLP if activation == "swiglu" else partial(ParallelMLP, use_bias=False)
        self.shared: GatedMLP | ParallelMLP | None = (
            mlp(
                d,
                hidden * n_shared_experts,
                mode=mode,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kernel_init,
                rngs=rngs,
            )
            if n_shared_experts
            else None
        )

    def _kernels(self) -> list[nnx.Param]:
        """The experts' stacked kernels in the order the MLP takes them."""
        if self.gate is None:
            return [self.up, self.down]
        return [self.gate, self.up, self.down]

    def __call__(
        self, x: jax.Array, *, return_aux: bool = False
    ) -> jax.Array | tuple[jax.Array, MoEAux]:
        if sequence_parallel(param_axis("mlp")):
            raise ConfigError(SEQUENCE_PARALLEL_REFUSAL)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        kernels = [w[...].astype(dtype) for w in self._kernels()]
        y, sums = self._routed(x, self.router[...], kernels)
        if self.shared is not None:
            y = y + self.shared(x)
        n_tokens = math.prod(x.shape[:-1])  # over all devices: the sums are already joined
        load = sums["count"] / (n_tokens * self.top_k)
        balance = self.n_experts * jnp.sum(load * sums["prob"] / n_tokens)
        z = sums["z"] / n_tokens
        loss = self.aux_loss_weight * balance + self.z_loss_weight * z
        aux = MoEAux(loss, balance, z, load, sums["dropped"])
        if hasattr(self, "__captures__"):  # inside nnx.capture (sowing outside it is deprecated)
            self.sow(nnx.Intermediate, "moe_aux", aux)
        return (y, aux) if return_aux else y

    def _routed(self, x, router, kernels):
        """Route and run the experts on each device's own tokens (in shard_map over the axes
        splitting them); return the output and the routing statistics summed over devices."""
        expert_axis = _check_expert_axis(self.n_experts)
        token_axes = _token_axes(x.shape[0], expert_axis)
        n = x.shape[0] // math.prod(current_mesh_shape()[a] for a in token_axes)
        n *= math.prod(x.shape[1:-1])  # this device's tokens
        capacity = None  # dropless through ragged_dot
        if self.capacity_factor is not None or expert_axis is not None:
            capacity = n  # an expert takes a token at most once: n slots drop nothing
            if self.capacity_factor is not None:
                wanted = math.ceil(self.capacity_factor * n * self.top_k / self.n_experts)
                capacity = min(n, wanted)

        def local(x, router, *kernels):
            shape = x.shape
            x = x.reshape(-1, shape[-1])
            # the router is per token: routing here, on local tokens, needs no communication
            logits = x.astype(jnp.float32) @ router
            probs, experts, weights = route(logits, self.top_k, normalize=self.normalize_weights)
            if capacity is None:
                y = _dropless(x, experts, weights, kernels, self.activation)
                dropped = jnp.int32(0)
            else:
                y, dropped = _with_slots(
                    x,
                    experts,
                    weights,
                    kernels,
                    self.activation,
                    capacity=capacity,
                    n_experts=self.n_experts,
                    expert_axis=expert_axis,
                )
            sums = {
                "count": jax.nn.one_hot(experts, self.n_experts, dtype=jnp.float32).sum((0, 1)),
                "prob": probs.sum(0),
                "z": jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2),
                "dropped": dropped,
            }
            if token_axes:  # one small all-reduce per statistic
                sums = jax.lax.psum(sums, token_axes)
            return y.reshape(shape), sums

        if not token_axes:
            return local(x, router, *kernels)
        tokens = P(token_axes[0] if len(token_axes) == 1 else token_axes)
        kernel = P(expert_axis)
        return jax.shard_map(
            local,
            mesh=jax.sharding.get_abstract_mesh(),
            in_specs=(tokens, P(), *[kernel] * len(kernels)),
            out_specs=(tokens, P()),
            axis_names=set(token_axes),
        )(x, router, *kernels)


_IN_NAMES = (EXPERT, "embed", "mlp")
_OUT_NAMES = (EXPERT, "mlp", "embed")


def captured_aux(intermediates: nnx.State, /) -> list[MoEAux]:
    """The :class:`MoEAux` of every MoE layer, from what ``nnx.capture`` collected.

    Example (add ``sum(a.loss for a in aux)`` to the training loss):
        >>> moe = MoE(16, 32, n_experts=4, rngs=nnx.Rngs(0))
        >>> y, found = nnx.capture(moe, nnx.Intermediate)(jnp.ones((2, 3, 16)))
        >>> [float(a.load_balancing_loss) >= 1 for a in captured_aux(found)]
        [True]
    """
    leaves = jax.tree.leaves(intermediates, is_leaf=lambda v: isinstance(v, MoEAux))
    return [leaf for leaf in leaves if isinstance(leaf, MoEAux)]


#: The names of the metrics :func:`aux_metrics` reports (``metrics.jsonl``, the progress line).
AUX_LOSS, BALANCE_LOSS, Z_LOSS, EXPERT_LOAD, DROPPED = (
    "moe_aux_loss",
    "moe_balance_loss",
    "moe_z_loss",
    "expert_load",
    "moe_dropped",
)


def aux_metrics(aux: list[MoEAux], /) -> tuple[jax.Array, dict[str, jax.Array]]:
    """What a training loss adds (the sum of every layer's ``aux.loss``) and the metrics to log.

    Metrics: ``moe_aux_loss`` (that sum), ``moe_balance_loss`` and ``moe_z_loss`` (means over
    the MoE layers), ``expert_load`` (``(n_moe_layers, n_experts)``: each layer's fraction of
    routed (token, choice) pairs per expert) and ``moe_dropped`` (the (token, choice) pairs
    the capacity dropped, summed over the layers: a count over this forward's tokens). A train
    step (:func:`jmp.train.make_step`) reports ``moe_dropped`` as the total over its whole
    batch, all microbatches together (:data:`jmp.train.loss.COUNT_METRICS`), and the others as
    means over the microbatches; the capacity applies to each microbatch's forward.

    Example:
        >>> moe = MoE(16, 32, n_experts=4, rngs=nnx.Rngs(0))
        >>> _, found = nnx.capture(moe, nnx.Intermediate)(jnp.ones((2, 3, 16)))
        >>> term, metrics = aux_metrics(captured_aux(found))
        >>> metrics["expert_load"].shape, bool(term == metrics["moe_aux_loss"])
        ((1, 4), True)
    """

    # a scanned stack of blocks gives one MoEAux whose fields are stacked (layers, ...)
    def per_layer(field: str) -> jax.Array:
        return jnp.concatenate([jnp.reshape(getattr(a, field), (-1,)) for a in aux])

    total = jnp.sum(per_layer("loss"))
    load = jnp.concatenate([jnp.reshape(a.expert_load, (-1, a.expert_load.shape[-1])) for a in aux])
    return total, {
        AUX_LOSS: total,
        BALANCE_LOSS: jnp.mean(per_layer("load_balancing_loss")),
        Z_LOSS: jnp.mean(per_layer("z_loss")),
        EXPERT_LOAD: load,
        DROPPED: jnp.sum(per_layer("dropped")).astype(jnp.float32),
    }


def _check_config(features, hidden, n_experts, top_k, n_shared, capacity_factor, activation):
    problems = [
        f"{name}={value!r} must be an int >= {low}"
        for name, value, low in (
            ("features", features, 1),
            ("hidden", hidden, 1),
            ("n_experts", n_experts, 1),
            ("top_k", top_k, 1),
            ("n_shared_experts", n_shared, 0),
        )
        if not isinstance(value, int) or isinstance(value, bool) or value < low
    ]
    if not problems and top_k > n_experts:
        problems.append(f"top_k={top_k} exceeds n_experts={n_experts} (choose top_k <= n_experts)")
    if capacity_factor is not None and not (
        isinstance(capacity_factor, int | float) and math.isfinite(capacity_factor)
    ):
        problems.append(f"capacity_factor={capacity_factor!r} must be None or a finite number > 0")
    elif capacity_factor is not None and capacity_factor <= 0:
        problems.append(f"capacity_factor={capacity_factor!r} must be None or a finite number > 0")
    if activation not in ACTIVATIONS:
        problems.append(f"activation={activation!r} must be one of {ACTIVATIONS}")
    if problems:
        raise ConfigError("Invalid MoE: " + "; ".join(problems) + ".")


def _check_expert_axis(n_experts: int) -> str | None:
    """The single mesh axis splitting the experts (None if none), checked to divide them."""
    axes = axes_tuple(param_axis(EXPERT))
    if len(axes) > 1:
        raise ConfigError(
            f"The 'expert' rule maps to several mesh axes {axes}; expert parallelism uses one. "
            f"Fix: map 'expert' to a single axis."
        )
    if not axes:
        return None
    size = current_mesh_shape()[axes[0]]
    if n_experts % size:
        raise ConfigError(
            f"n_experts={n_experts} is not divisible by mesh axis {axes[0]!r} of size {size} "
            f"that the 'expert' rule splits them over. Fix: a multiple of {size} experts, or an "
            f"{axes[0]!r} axis whose size divides {n_experts}."
        )
    return axes[0]


def _token_axes(batch: int, expert_axis: str | None) -> tuple[str, ...]:
    """The mesh axes (size > 1) splitting the batch, which must include the experts' axis."""
    spec = activation_spec(("batch",))
    shape = current_mesh_shape()
    axes = tuple(a for a in axes_tuple(spec[0] if spec else None) if shape.get(a, 1) > 1)
    if expert_axis is not None and expert_axis not in axes:
        raise ConfigError(
            f"Expert parallelism over {expert_axis!r} needs the tokens split over it too, but "
            f"the 'batch' activation rule splits them over {axes or 'nothing'}. Fix: add "
            f"{expert_axis!r} to the 'batch' activation rule, e.g. ('data', {expert_axis!r})."
        )
    ways = math.prod(shape[a] for a in axes)
    if batch % ways:
        raise ConfigError(
            f"A batch of {batch} rows does not split over the token axes {axes} of size {ways}. "
            f"Fix: a batch size that is a multiple of {ways}."
        )
    return axes
