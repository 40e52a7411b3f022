"""The cost terms of the non-pipeline strategies: parameter layouts and the collectives, memory
and FLOPs of one GPT train step, per device.

These are the building blocks :func:`jmp.plan.estimate` sums; the pipeline strategies have their
own in :mod:`jmp.plan.pipeline_costs`. Every collective is a :class:`Comm` with the same
accounting as :func:`jmp.inspect.collectives` (``Collective.bytes * count`` summed per axis).

The collectives are the ones XLA emits for jmp's model, checked against compiled steps on 8
simulated CPU devices (``tests/test_plan.py``) for every strategy:

- tensor axis (``tp``, ``dp_tp``, ``fsdp_tp``): Megatron's 4 activation all-reduces per block (the
  attention and MLP row-parallel outputs forward, the qkv and MLP-up input gradients backward),
  one forward for the vocabulary-parallel embedding (a one-hot product), one backward for the
  head's input gradient, 3 small ones for the cross-entropy over the split vocabulary (max,
  sum of exponentials, target logit), and with remat one more per block (the attention output is
  recomputed; the MLP output is not needed by the backward pass, so XLA drops its recompute).
- batch axis: one reduction of every gradient (whole over the batch axis, split over the tensor
  axis) and of the loss's mean: once per step when the batch axis splits no parameter (dp:
  each device accumulates its microbatches' gradients first), once per microbatch under FSDP
  (XLA keeps it inside the accumulation loop).
- FSDP (``embed`` split over the batch axis): each split parameter is all-gathered once forward
  (outside the microbatch loop) and kept for the backward pass; norm scales are gathered again
  for the backward pass; with remat every block's kernels (and its norm scales, attention bias)
  are gathered again to recompute. The embedding table of pure ``fsdp`` (vocabulary whole) is
  never gathered: the token ids are all-gathered, each device looks up its embedding columns and
  two all-to-alls (forward, backward) move them to the batch layout.
- the global gradient norm: one float per parameter array and mesh axis that splits it,
  all-reduced over that axis once (the step's norm serves the metric, the non-finite guard and
  :func:`jmp.train.clipping.clip_by_global_norm`).

Example:
    >>> [a.path for a in param_arrays(GPTConfig.named("tiny"))][:3]
    ['embed/embedding', 'position', 'blocks/0/norm1/scale']
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from jax.sharding import AbstractMesh

from jmp.errors import ConfigError
from jmp.models.gpt import GPTConfig
from jmp.rules import Rules, raise_problems, resolve

# --- the model's parameters ------------------------------------------------------------------


class ParamArray(NamedTuple):
    """One parameter array of :class:`~jmp.models.gpt.GPT`: path as ``nnx.state`` names it."""

    path: str
    shape: tuple[int, ...]
    names: tuple[str | None, ...]
    role: str  # embedding, position, norm, qkv, out, out_bias, up, up_bias, down, down_bias, head
    layer: int | None = None


def param_arrays(cfg: GPTConfig, /) -> list[ParamArray]:
    """The parameter arrays of ``GPT(cfg)``: shapes and logical names as the model creates them."""
    d, f, h, k, v = cfg.d_model, cfg.hidden, cfg.n_heads, cfg.head_dim, cfg.vocab_size
    out = [
        ParamArray("embed/embedding", (v, d), ("vocab", "embed"), "embedding"),
        ParamArray("position", (cfg.seq_len, d), (None, "embed"), "position"),
    ]
    for i in range(cfg.n_layers):
        p = f"blocks/{i}/"
        out += [
            ParamArray(p + "norm1/scale", (d,), ("embed",), "norm", i),
            ParamArray(p + "attn/qkv", (d, 3, h, k), ("embed", None, "heads", "kv"), "qkv", i),
            ParamArray(p + "attn/out", (h, k, d), ("heads", "kv", "embed"), "out", i),
            ParamArray(p + "attn/out_bias", (d,), ("embed",), "out_bias", i),
            ParamArray(p + "norm2/scale", (d,), ("embed",), "norm", i),
            ParamArray(p + "mlp/up/kernel", (d, f), ("embed", "mlp"), "up", i),
            ParamArray(p + "mlp/up/bias", (f,), ("mlp",), "up_bias", i),
            ParamArray(p + "mlp/down/kernel", (f, d), ("mlp", "embed"), "down", i),
            ParamArray(p + "mlp/down/bias", (d,), ("embed",), "down_bias", i),
        ]
    return out + [
        ParamArray("norm/scale", (d,), ("embed",), "norm"),
        ParamArray("head/kernel", (d, v), ("embed", "vocab"), "head"),
    ]


class _Layout(NamedTuple):
    """How one array is split: mesh axes (size > 1) per dimension."""

    array: ParamArray
    axes: tuple[tuple[str, ...], ...]

    def split(self, mesh: Mapping[str, int], only: Iterable[str] | None = None) -> int:
        keep = None if only is None else set(only)
        return math.prod(mesh[a] for dim in self.axes for a in dim if keep is None or a in keep)

    @property
    def split_axes(self) -> set[str]:
        return {a for dim in self.axes for a in dim}


def _layouts(
    cfg: GPTConfig, rules: Rules, mesh: AbstractMesh, arrays: list[ParamArray] | None = None
) -> list[_Layout]:
    """Resolve every array strictly (jmp's own rules), or raise one ShardingError listing all."""
    problems: list[str] = []
    out = []
    for arr in param_arrays(cfg) if arrays is None else arrays:
        spec, found = resolve(
            arr.names, rules.params_dict, shape=arr.shape, mesh=mesh, path=arr.path
        )
        problems += found
        entries = list(spec) + [None] * (len(arr.shape) - len(spec))
        axes = tuple(
            tuple(a for a in ((e,) if isinstance(e, str) else (e or ())) if mesh.shape[a] > 1)
            for e in entries
        )
        out.append(_Layout(arr, axes))
    raise_problems(problems, what="parameter")
    return out


# --- collectives, memory, FLOPs --------------------------------------------------------------


class Comm(NamedTuple):
    """One predicted collective: result bytes per device of one op, executions per step."""

    kind: str  # all-reduce | all-gather | reduce-scatter | all-to-all
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


def _one_axis(axes: Iterable[str], what: str) -> str:
    axes = tuple(axes)
    if len(axes) != 1:
        raise ConfigError(f"The planner models {what} over exactly one mesh axis; got {axes}.")
    return axes[0]


def _tensor_comms(c: _Ctx) -> list[Comm]:
    """Activation all-reduces over the tensor axis (Megatron) and the vocab-parallel loss."""
    by_role = {x.array.role: x for x in c.layouts}
    out: list[Comm] = []
    act = c.rows * c.seq * c.cfg.d_model * c.wire

    def tensor_axis(role: str) -> str | None:
        axes = by_role[role].split_axes - set(c.batch_axes)
        return _one_axis(axes, f"the {role} split") if axes else None

    vocab, heads, mlp = tensor_axis("head"), tensor_axis("qkv"), tensor_axis("up")
    if vocab:
        out.append(
            Comm(
                "all-reduce",
                vocab,
                act,
                c.micro,
                "embedding vocab-parallel lookup (one-hot product) forward",
            )
        )
    for i in range(c.cfg.n_layers):
        if heads:
            out.append(
                Comm(
                    "all-reduce",
                    heads,
                    act,
                    c.micro,
                    f"layer {i} attention out-proj row-parallel forward",
                )
            )
            if c.remat:
                out.append(
                    Comm(
                        "all-reduce",
                        heads,
                        act,
                        c.micro,
                        f"layer {i} attention out-proj recomputed (remat)",
                    )
                )
            out.append(
                Comm(
                    "all-reduce",
                    heads,
                    act,
                    c.micro,
                    f"layer {i} qkv input gradient (column-parallel) backward",
                )
            )
        if mlp:
            out.append(
                Comm("all-reduce", mlp, act, c.micro, f"layer {i} MLP down row-parallel forward")
            )
            out.append(
                Comm(
                    "all-reduce",
                    mlp,
                    act,
                    c.micro,
                    f"layer {i} MLP up input gradient (column-parallel) backward",
                )
            )
    if vocab:
        out.append(
            Comm(
                "all-reduce", vocab, act, c.micro, "head input gradient (column-parallel) backward"
            )
        )
        tok = c.rows * c.seq * 4  # the loss is computed in float32
        for what in ("max", "sum of exp", "target logit"):
            out.append(
                Comm(
                    "all-reduce",
                    vocab,
                    tok,
                    c.micro,
                    f"cross-entropy {what} over the split vocabulary",
                )
            )
    return out


def _gathers(role: str, layer: int | None, remat: bool) -> int:
    """How many times XLA all-gathers an FSDP-split array per step (see module docstring)."""
    in_block = layer is not None
    if role == "norm":
        return 3 if remat and in_block else 2
    if role in ("qkv", "out", "up", "down") or (role == "out_bias" and remat):
        return 2 if remat else 1
    return 1


def _batch_comms(c: _Ctx) -> list[Comm]:
    """Gradient reductions, FSDP gathers and the loss mean over the batch axis."""
    if not c.batch_axes:
        return []
    data = _one_axis(c.batch_axes, "the batch split")
    n = c.mesh[data]
    # A batch axis that splits no parameter (dp) sums the microbatches' gradients on each
    # device and reduces them once per step (jmp.train.step.reduce_once_axes); under FSDP the
    # reductions stay in the accumulation loop, one per microbatch.
    reductions = c.micro if any(data in lay.split_axes for lay in c.layouts) else 1
    out: list[Comm] = [Comm("all-reduce", data, 4, reductions, "mean loss over the batch split")]
    for lay in c.layouts:
        arr, sharded = lay.array, data in lay.split_axes
        whole = math.prod(arr.shape) // lay.split(c.mesh, lay.split_axes - {data}) * c.pwire
        if arr.role == "position":  # only the rows in use are gathered and reduced
            whole = whole * c.seq // arr.shape[0]
        where = arr.path
        if sharded and arr.role == "embedding" and not lay.split_axes - {data}:
            # vocabulary whole: jnp.take on a table split by columns, never gathered
            act = c.rows * c.seq * c.cfg.d_model * c.wire
            out += [
                Comm(
                    "all-gather",
                    data,
                    c.rows * n * c.seq * 4,
                    c.micro,
                    "token ids for the column-split embedding lookup",
                ),
                Comm("all-to-all", data, act, c.micro, "embedding columns -> batch forward"),
                Comm("all-to-all", data, act, c.micro, "embedding gradient -> columns"),
            ]
            continue
        if sharded:
            out.append(
                Comm(
                    "all-gather",
                    data,
                    whole,
                    _gathers(arr.role, arr.layer, c.remat),
                    f"{where} FSDP gather",
                )
            )
        if sharded and c.reduce_scatter:
            out.append(
                Comm(
                    "reduce-scatter", data, whole // n, c.micro, f"{where} gradient reduce-scatter"
                )
            )
        else:
            out.append(Comm("all-reduce", data, whole, reductions, f"{where} gradient all-reduce"))
    return out


def _norm_comms(c: _Ctx) -> list[Comm]:
    """Global gradient norm: a float32 partial sum per array and splitting axis, computed once."""
    per_axis: dict[str, int] = defaultdict(int)
    for lay in c.layouts:
        for a in lay.split_axes:
            per_axis[a] += 1
    return [
        Comm("all-reduce", a, 4, k, f"gradient norm partial sums ({k} arrays)")
        for a, k in per_axis.items()
    ]


def _activation_bytes(c: _Ctx, compute_bytes: int, flash: bool) -> int:
    """Activations alive at the start of the backward pass, per device.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    eq. 2, tensor parallel without sequence parallel) adapted to this block: no dropout masks,
    RMSNorm, ``compute_bytes`` per value. Per token and layer:
    ``4d`` (both norms' inputs and outputs, whole on every device) ``+ (4d + 2f + a*s) / t``
    (q, k, v, attention output, GELU input and output, softmax probabilities, split t ways).
    ``flash`` drops the ``a*s`` probabilities: on GPUs with 16-bit compute
    ``jax.nn.dot_product_attention`` uses cuDNN's fused attention, which keeps none.
    Plus, per token, the logits (``V/t`` values, in the compute dtype and again in float32
    for the loss), the embedding output, and under a vocabulary split the one-hot ids the
    embedding's product keeps for its gradient (``V/t``). With remat only each block's input
    is kept, and one block is recomputed at a time.
    """
    cfg, by_role = c.cfg, {x.array.role: x for x in c.layouts}
    d, f, h = cfg.d_model, cfg.hidden, cfg.n_heads

    def tensor_split(role: str) -> int:  # FSDP splits weights at rest, not activations
        return by_role[role].split(c.mesh, by_role[role].split_axes - set(c.batch_axes))

    t_h, t_f, t_v = tensor_split("qkv"), tensor_split("up"), tensor_split("head")
    tokens = c.rows * c.seq
    probs = 0 if flash else h * c.seq
    block = tokens * compute_bytes * (4 * d + (4 * d + probs) // t_h + 2 * f // t_f)
    vocab = tokens * cfg.vocab_size // t_v * (compute_bytes + 4 + (compute_bytes if t_v > 1 else 0))
    kept = tokens * d * compute_bytes * cfg.n_layers + block if c.remat else block * cfg.n_layers
    return kept + vocab + tokens * d * compute_bytes


def _gathered_bytes(c: _Ctx, param_bytes: int) -> int:
    """FSDP: whole copies of split weights alive at once (all of them without remat: the
    backward pass reuses the forward's gathers; with remat one block's, plus those outside)."""
    extra = 0
    for lay in c.layouts:
        ways = lay.split(c.mesh, c.batch_axes)
        if ways == 1 or (c.remat and (lay.array.layer or 0) > 0):
            continue
        extra += math.prod(lay.array.shape) // lay.split(c.mesh) * (ways - 1) * param_bytes
    return extra


def _flops(cfg: GPTConfig, tokens: int, seq: int, remat: bool) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) of one step: 6·N·tokens + causal attention.

    N counts the matmul weights (blocks and head; the embedding and position tables are
    lookups). Causal attention: QK^T and AV cost 2·s·d each per token and layer forward, half
    of it masked: 6·L·s·d per token for forward and backward. Remat adds one forward (2·N, 2·L·s·d).
    """
    d, f = cfg.d_model, cfg.hidden
    n_mm = cfg.n_layers * (4 * d * d + 2 * d * f) + d * cfg.vocab_size
    model = 6 * n_mm * tokens + 6 * cfg.n_layers * seq * d * tokens
    return model, model * (4 / 3 if remat else 1)
