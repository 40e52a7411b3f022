"""Context parallelism: the sequence split over a ``context`` mesh axis, attention still exact.

Under a ``cp`` strategy the activation rule ``'seq' -> 'context'`` splits every token-wise
activation along the sequence. A model runs its whole forward (embedding, blocks, head) in one
:func:`run_sharded` region: a ``jax.shard_map`` manual over the context axis only (data and
model axes stay with the compiler), where each device holds ``seq / c`` tokens. Everything is
token-wise except attention, which needs every earlier key; two exact implementations:

- ``"allgather"``: all-gather K and V (stacked: one collective) over the axis, attend locally
  (the Llama 3 recipe). Memory: the whole sequence's K/V on every device.
- ``"ring"``: the K/V block travels around the ring with ``ppermute`` (``c - 1`` hops) while
  each device attends to the block it holds; the partial results are merged exactly by their
  log-sum-exp (online softmax). Each hop's transfer is independent of the block's compute, so
  the scheduler overlaps them.

With grouped-query attention only the key/value heads travel. The causal mask is built from
the true index of each token, not its place in the array, so any layout is exact.

Load balancing (``balanced=True``): with a contiguous split device ``c - 1`` attends to the
whole sequence and device 0 to one block. Cut the sequence in ``2c`` chunks and give device
``i`` chunks ``i`` and ``2c-1-i``: every device then has the same causal work. Tokens,
positions (learned or rotary) and segment ids are laid out this way on entry (they arrive
replicated over the axis, so this is a local slice); the hidden state goes back to the natural
order before the head (two collective-permutes of half the local hidden state), so logits and
the loss are exactly those of the unsharded model and the targets need no permutation.

Example (the layout: which true token indices each of 2 devices holds):
    >>> layout_index(8, 2, balanced=True)
    array([[0, 1, 6, 7],
           [2, 3, 4, 5]])
    >>> layout_index(8, 2, balanced=False)
    array([[0, 1, 2, 3],
           [4, 5, 6, 7]])
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jmp.context import activate, current_mesh_shape, current_rules
from jmp.errors import ConfigError
from jmp.rules import Rules, axes_tuple

CpImpl = Literal["ring", "allgather"]
#: The attention implementations of context parallelism (``--cp-impl``).
CP_IMPLS: tuple[str, ...] = ("ring", "allgather")


def check_impl(impl: object) -> None:
    """Raise a one-line :class:`~jmp.ConfigError` unless ``impl`` is one of :data:`CP_IMPLS`."""
    if impl not in CP_IMPLS:
        raise ConfigError(
            f"cp_impl={impl!r} is not a context-parallel attention; use one of {CP_IMPLS}."
        )


def context_axis() -> str | None:
    """The mesh axis (size > 1) the current rules split the ``'seq'`` activation dim over.

    An axis that also splits parameters is not a context axis: that is sequence parallelism
    (``sp``), whose tensor-parallel layers gather and scatter the sequence themselves.
    """
    rules, shape = current_rules(), current_mesh_shape()
    if rules is None or not shape:
        return None
    return context_axis_of(rules, shape)


def context_axis_of(rules: Rules, shape: Mapping[str, int], /) -> str | None:
    """:func:`context_axis` for given ``rules`` and mesh axis sizes (nothing active)."""
    seq = axes_tuple(rules.activations_dict.get("seq"))
    axes = [a for a in seq if shape.get(a, 1) > 1 and a not in rules.param_axes]
    if len(axes) > 1:
        raise ConfigError(f"'seq' may split over one mesh axis, the rules give {tuple(axes)}.")
    return axes[0] if axes else None


def layout_chunks(ways: int, /, *, balanced: bool) -> int:
    """How many equal chunks the sequence is cut into: 2c load balanced, else c (a sequence
    length must be a multiple of it)."""
    return 2 * ways if balanced else ways


def check_layout(seq: int, ways: int, /, *, balanced: bool) -> None:
    """Raise a one-line :class:`~jmp.ConfigError` unless ``seq`` splits into the layout."""
    chunks = layout_chunks(ways, balanced=balanced)
    if seq % chunks:
        how = f"2 x context = {chunks} chunks (load balanced)" if balanced else f"{ways} blocks"
        raise ConfigError(
            f"sequence of {seq} tokens does not split into {how}. Fix: a sequence length that "
            f"is a multiple of {chunks}"
            + (
                ", or cp_load_balance=False / --no-cp-load-balance (multiples of the context size)."
                if balanced
                else "."
            )
        )


def layout_index(seq: int, ways: int, /, *, balanced: bool) -> np.ndarray:
    """``(ways, seq // ways)``: the true index of each token every device holds."""
    check_layout(seq, ways, balanced=balanced)
    if not balanced:
        return np.arange(seq).reshape(ways, -1)
    chunk = np.arange(seq).reshape(2 * ways, -1)
    return np.stack([np.concatenate([chunk[i], chunk[2 * ways - 1 - i]]) for i in range(ways)])


@dataclass(frozen=True)
class Region:
    """What attention needs to know inside :func:`run_sharded` (static: read while tracing)."""

    axis: str
    ways: int
    seq: int  # the whole sequence
    balanced: bool

    def index(self) -> jax.Array:
        """``(ways, seq // ways)`` true token indices per device, a constant."""
        return jnp.asarray(layout_index(self.seq, self.ways, balanced=self.balanced))


_REGION: contextvars.ContextVar[Region | None] = contextvars.ContextVar("jmp_cp", default=None)


def current_region() -> Region | None:
    """The context-parallel region being traced, or None outside one."""
    return _REGION.get()


@contextlib.contextmanager
def _entered(region: Region) -> Iterator[None]:
    token = _REGION.set(region)
    try:
        yield
    finally:
        _REGION.reset(token)


def local_tokens(x: jax.Array, region: Region, seq_dim: int = 1) -> jax.Array:
    """This device's tokens of a ``(batch, seq, ...)`` array that is whole on every device
    (the sequence at ``seq_dim``)."""
    mine = region.index()[jax.lax.axis_index(region.axis)]
    return jnp.take(x, mine, axis=seq_dim)


def local_positions(batch: int, /) -> jax.Array | None:
    """Inside a region, ``(batch, seq/c)``: the true position of each token this device holds
    (what a model without explicit positions needs: learned or rotary); outside, None."""
    region = current_region()
    if region is None:
        return None
    mine = region.index()[jax.lax.axis_index(region.axis)]
    return jnp.broadcast_to(mine, (batch, mine.shape[0]))


@contextlib.contextmanager
def entered_for(seq: int, balanced: bool) -> Iterator[Region]:
    """Enter the region of the context axis (:func:`context_axis`) for a ``seq``-token
    sequence: for a caller that runs the model in a ``shard_map`` manual over that axis itself
    (the pipeline, :mod:`jmp.pipeline.run`). Raises like :func:`check_layout`."""
    region = _region_for(seq, balanced)
    with _entered(region):
        yield region


def _region_for(seq: int, balanced: bool) -> Region:
    """The region of the active cp strategy's context axis for a ``seq``-token sequence."""
    axis = context_axis()
    assert axis is not None, "a context-parallel region needs an active cp strategy"
    ways = current_mesh_shape()[axis]
    check_layout(seq, ways, balanced=balanced)
    return Region(axis, ways, seq, balanced)


def to_natural(h: jax.Array, region: Region, /) -> jax.Array:
    """The balanced layout's ``(batch, seq/c, ...)`` blocks back in natural (contiguous) order.

    Device ``i`` holds chunks ``i`` and ``2c-1-i``; natural order wants chunks ``2j, 2j+1``
    on device ``j``. Exactly one of a device's chunks is even: one ``ppermute`` moves the even
    chunks to their owners, one the odd ones.
    """
    if not region.balanced:
        return h
    c, half = region.ways, h.shape[1] // 2
    first, second = h[:, :half], h[:, half:]
    even_first = jax.lax.axis_index(region.axis) % 2 == 0
    even = jnp.where(even_first, first, second)
    odd = jnp.where(even_first, second, first)
    k_even = [i if i % 2 == 0 else 2 * c - 1 - i for i in range(c)]
    k_odd = [2 * c - 1 - i if i % 2 == 0 else i for i in range(c)]
    even, odd = (
        _move(x, region.axis, [k // 2 for k in ks]) for x, ks in ((even, k_even), (odd, k_odd))
    )
    return jnp.concatenate([even, odd], axis=1)


def _move(x: jax.Array, axis: str, targets: list[int]) -> jax.Array:
    """``ppermute`` device i's ``x`` to ``targets[i]``; no collective when nothing moves."""
    if targets == list(range(len(targets))):  # c = 2: the even chunks are already home
        return x
    return jax.lax.ppermute(x, axis, list(enumerate(targets)))


def check_no_experts(model_cfg: Any, /) -> None:
    """Refuse a mixture of experts under context parallelism (a config with ``n_experts``):
    its routing statistics would be per context shard and its all-to-all region would nest in
    the context one."""
    experts = getattr(model_cfg, "n_experts", 0)
    if experts:
        raise ConfigError(
            f"A mixture of experts (n_experts={experts}) does not run under context "
            f"parallelism yet. Fix: train it with a strategy without cp (ep, dp_ep, "
            f"fsdp_ep, ep_tp, ...)."
        )


def logits(
    model: Any,
    tokens: jax.Array,
    /,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    balanced: bool = True,
) -> jax.Array:
    """``model.logits(model.hidden(tokens, ...))``: over the context axis (:func:`run_sharded`)
    when a cp strategy is active, else as it is. A model with ``hidden`` and ``logits``
    methods (jmp's GPT and Llama) calls this from its ``__call__``."""
    if context_axis() is not None:
        check_no_experts(getattr(model, "cfg", None))
        kind = type(model)
        return run_sharded(
            model,
            kind.hidden,
            kind.logits,
            tokens,
            segment_ids=segment_ids,
            positions=positions,
            balanced=balanced,
        )
    return model.logits(model.hidden(tokens, segment_ids=segment_ids, positions=positions))


def run_sharded(
    model: nnx.Module,
    body: Callable[..., jax.Array],
    head: Callable[[Any, jax.Array], jax.Array],
    tokens: jax.Array,
    /,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    balanced: bool = True,
) -> jax.Array:
    """``head(model, body(model, tokens, segment_ids=, positions=))`` with the sequence split.

    Runs in a ``jax.shard_map`` manual over the context axis (:func:`context_axis`). ``body``
    sees this device's tokens, segment ids and true positions (``positions`` or the token
    index) and returns the hidden state ``(batch, seq/c, d)``; it is put back in natural order
    and ``head`` gives per-token outputs, split over the context axis along ``seq``.

    Raises:
        ConfigError: a sequence that does not split into the layout (see :func:`check_layout`).
    """
    rules, seq = current_rules(), tokens.shape[1]
    assert rules is not None, "run_sharded needs an active cp strategy"
    region = _region_for(seq, balanced)
    axis = region.axis
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
    inner = rules.replace(activations={"seq": None})  # inside, each device's seq is local
    graphdef, state = nnx.split(model)

    def local(state: Any, tokens: jax.Array, segments: Any, positions: jax.Array) -> jax.Array:
        # inside jit, activate only sets the rules (the current abstract mesh is kept)
        here = cast(Mesh, jax.sharding.get_abstract_mesh())
        with activate(here, inner), _entered(region):
            m = nnx.merge(graphdef, state)
            segs = None if segments is None else local_tokens(segments, region)
            h = body(
                m,
                local_tokens(tokens, region),
                segment_ids=segs,
                positions=local_tokens(positions, region),
            )
            return head(m, to_natural(h, region))

    # inputs enter whole over the axis (token ids are small; their batch dim stays split)
    return jax.shard_map(
        local,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(), P(), P(), P()),
        out_specs=P(None, axis),
        axis_names={axis},
        # jax 0.10.2 mis-transposes a manual tensor-parallel shard_map nested in this one when
        # varying-axis checks are on (its weights' cotangents get split over 'context' too);
        # off, the cotangent of every input is summed over the axis, which is what cp needs
        check_vma=False,
    )(state, tokens, segment_ids, positions)


# --- attention ----------------------------------------------------------------------------


def _mask(
    q_index: jax.Array,
    k_index: jax.Array,
    q_segments: jax.Array | None,
    k_segments: jax.Array | None,
    *,
    causal: bool,
    window: int | None,
) -> jax.Array:
    """``(batch or 1, 1, q, k)``: which keys each query sees, from true token indices."""
    seen = jnp.ones((q_index.shape[0], k_index.shape[0]), bool)
    if causal:
        seen &= q_index[:, None] >= k_index[None, :]
    if window is not None:  # a token sees itself and the window - 1 before it
        seen &= q_index[:, None] - k_index[None, :] < window
    seen = seen[None, None]
    if q_segments is not None and k_segments is not None:
        seen = seen & (q_segments[:, None, :, None] == k_segments[:, None, None, :])
    return seen


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    /,
    *,
    impl: CpImpl,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
) -> jax.Array:
    """Exact attention of this device's queries over the whole sequence's keys.

    Call inside :func:`run_sharded`. ``q (batch, seq/c, heads, d)``, ``k``/``v (batch, seq/c,
    kv_heads, d)`` (grouped-query: ``kv_heads`` divides ``heads``); ``segment_ids (batch,
    seq/c)`` of the local tokens; ``window``: a token sees itself and ``window - 1`` before.
    """
    check_impl(impl)
    region = current_region()
    assert region is not None, "context-parallel attention runs inside run_sharded"
    index = region.index()
    me = jax.lax.axis_index(region.axis)
    mask = lambda k_index, k_segments: _mask(  # noqa: E731
        index[me], k_index, segment_ids, k_segments, causal=causal, window=window
    )
    kv = jnp.stack([k, v], axis=2)  # one collective moves both
    if impl == "allgather":
        # Known cost: with a batch axis (data) left to the compiler, XLA's partitioner
        # gathers this operand over it first (also with sharding constraints); the ring's
        # collective-permutes do not have this problem
        kv_all = jax.lax.all_gather(kv, region.axis, axis=1, tiled=True)
        segs = (
            None
            if segment_ids is None
            else jax.lax.all_gather(segment_ids, region.axis, axis=1, tiled=True)
        )
        m = mask(index.reshape(-1), segs)
        return jax.nn.dot_product_attention(q, kv_all[:, :, 0], kv_all[:, :, 1], mask=m)
    return _ring(q, kv, segment_ids, region, mask)


def block_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, /
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention over one key block and its log-sum-exp, both float32 and differentiable.

    ``q (b, t, heads, d)``, ``k``/``v (b, s, kv_heads, d)``, ``mask`` broadcastable to ``(b,
    1, t, s)``; returns ``out (b, t, heads, d)`` and ``lse (b, t, heads)``. (The log-sum-exp
    that ``jax.nn.dot_product_attention(..., return_residual=True)`` returns carries no
    gradient in jax 0.10.2, so merging blocks with it would lose part of the gradient.)
    A row with no visible key gets ``lse = -inf`` and ``out = 0``.

    Example:
        >>> q = k = v = jnp.ones((1, 2, 2, 4))
        >>> out, lse = block_attention(q, k, v, jnp.ones((1, 1, 2, 2), bool))
        >>> round(float(lse[0, 0, 0]), 4)       # log(2 e^(4 / sqrt 4)) = 2 + log 2
        2.6931
    """
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, k.shape[2], groups, d)  # head = kv_head * g + j
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) / np.sqrt(d)
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)  # (b, 1, 1, t, s) over (k, g)
    lse = jax.nn.logsumexp(scores, axis=-1)  # (b, k, g, t)
    # exp(-inf - lse) is 0; a fully masked row has lse -inf: use 0 to keep its weights 0
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32)).reshape(b, t, h, d)
    return out, lse.reshape(b, h, t).transpose(0, 2, 1)


def _ring(
    q: jax.Array,
    kv: jax.Array,
    segment_ids: jax.Array | None,
    region: Region,
    mask: Callable[[jax.Array, jax.Array | None], jax.Array],
) -> jax.Array:
    """The ring: ``c`` blocks, each merged into the running (output, log-sum-exp) exactly."""
    c, index = region.ways, region.index()
    me = jax.lax.axis_index(region.axis)
    ring = [(j, (j + 1) % c) for j in range(c)]
    block = (kv, segment_ids)
    out = lse = None
    for t in range(c):
        # send the block on before using it: the transfer overlaps this step's attention
        following = jax.lax.ppermute(block, region.axis, ring) if t < c - 1 else block
        kv_t, seg_t = block
        source = (me - t) % c  # the device this block started on
        o_t, lse_t = block_attention(q, kv_t[:, :, 0], kv_t[:, :, 1], mask(index[source], seg_t))
        if out is None or lse is None:  # the own block: every query sees itself, lse finite
            out, lse = o_t, lse_t
        else:  # masked-out rows have lse_t = -inf: their weight exp(lse_t - new) is 0
            new = jnp.logaddexp(lse, lse_t)
            out = out * jnp.exp(lse - new)[..., None] + o_t * jnp.exp(lse_t - new)[..., None]
            lse = new
        block = following
    assert out is not None
    return out.astype(q.dtype)
