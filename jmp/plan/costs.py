"""The analytic planner: memory, communication, FLOPs and time of a GPT train step, per device.

``estimate`` predicts, for a :class:`~jmp.models.gpt.GPTConfig`, a mesh shape and a strategy of
:func:`jmp.rules.preset`, what ``jmp.train.make_step`` compiles to: per-device bytes of parameters,
gradients, optimizer state and activations, and every collective of the step (kind, mesh axis,
result bytes per device, executions per step, what it is for), with the same accounting as
:func:`jmp.inspect.collectives` (``Collective.bytes * count`` summed per axis). ``search``
enumerates mesh shapes and strategies, keeps those that fit and ranks them by step time.

The collectives are the ones XLA emits for jmp's model, checked against compiled steps on 8
simulated CPU devices (``tests/test_plan.py``) for every strategy:

- tensor axis (``tp``, ``dp_tp``, ``fsdp_tp``): Megatron's 4 activation all-reduces per block (the
  attention and MLP row-parallel outputs forward, the qkv and MLP-up input gradients backward),
  one forward for the vocabulary-parallel embedding (a one-hot product), one backward for the
  head's input gradient, 3 small ones for the cross-entropy over the split vocabulary (max,
  sum of exponentials, target logit), and with remat one more per block (the attention output is
  recomputed; the MLP output is not needed by the backward pass, so XLA drops its recompute).
- batch axis: one reduction of every gradient (whole over the batch axis, split over the tensor
  axis) per microbatch -- XLA keeps it inside the accumulation loop -- and the loss's mean.
- FSDP (``embed`` split over the batch axis): each split parameter is all-gathered once forward
  (outside the microbatch loop) and kept for the backward pass; norm scales are gathered again
  for the backward pass; with remat every block's kernels (and its norm scales, attention bias)
  are gathered again to recompute. The embedding table of pure ``fsdp`` (vocabulary whole) is
  never gathered: the token ids are all-gathered, each device looks up its embedding columns and
  two all-to-alls (forward, backward) move them to the batch layout.
- the global gradient norm: one float per parameter array and mesh axis that splits it,
  all-reduced over that axis, twice (``clip_by_global_norm`` and the ``grad_norm`` metric are not
  merged by XLA).

Pipelines (``pp``, ``pp_dp``, ``pp_tp``, ``pp_dp_tp``: :mod:`jmp.pipeline` with ``microbatches``
as its M and ``schedule`` '1f1b' or 'gpipe'), also checked against compiled steps: each stage
holds its ``n_layers / S`` stacked blocks, the embedding, position, final norm and head are
replicated over ``'stage'`` (so is their optimizer state). Per step a stage runs ``M + S - 1``
forward and as many backward ticks; every stage computes the embedding and head every tick.
Over ``'stage'``: one collective-permute of a microbatch's activations per tick and direction
(1F1B: less the sends XLA finds dead once it inlines a one-tick phase, i.e. the last backward
send when S = 2), one all-reduce of the replicated ends' gradients, the loss and the norm sums.
Within a stage the tensor axis adds the Megatron all-reduces per forward (1F1B: forward ticks
plus the recompute in its backward ticks) and backward, and the batch axis all-reduces every
gradient once per backward tick (not once per step); with the vocabulary whole the embedding's
gradient is an all-gather of the output gradient and the ids instead. Memory: GPipe keeps
``M + S - 1`` ticks' activations, 1F1B ``min(M, 2S - 1)`` stage inputs and one microbatch's
activations. Time: ``compute * (M + S - 1) / M + comm``; the ``reason`` states the bubble.

What depends on the backend is a property of :class:`Device` (``platform``): XLA's GPU compiler
turns "all-reduce then keep my slice" into a reduce-scatter (so FSDP gradients are
reduce-scattered), its CPU compiler does not; and on CPU 16-bit values travel as float32.

Time is a roofline, not a simulation: compute runs at the device's peak FLOP/s (so MFU is an
upper bound), each collective moves its ring volume at ``link_bandwidth`` (one figure for every
axis: an axis that crosses nodes is slower in reality), and nothing overlaps.

Example:
    >>> est = estimate(GPTConfig.named("7b"), {"data": 8, "model": 8}, "fsdp_tp",
    ...                batch_size=64, device=DEVICES["h100"])
    >>> est.fits, est.comm_bytes["model"], f"{est.mfu:.0%}"
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from jax.sharding import AbstractMesh

from jmp.errors import ConfigError, JmpError
from jmp.mesh import fitting_shapes, format_mesh_shape
from jmp.models.gpt import GPTConfig
from jmp.rules import Rules, preset, raise_problems, resolve
from jmp.units import human_bytes

# --- devices ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One accelerator, as the cost model sees it.

    Attributes:
        peak_flops: dense bf16 FLOP/s (the MFU denominator).
        memory_bytes: memory per device.
        link_bandwidth: bytes/s one device sends (and receives) in a collective.
        platform: ``'gpu'`` or ``'cpu'``: which XLA compiler, hence which collectives (see the
            module docstring: reduce-scatter on GPU, float32 wires on CPU).
        memory_fraction: the share of memory a plan may use. JAX preallocates 75% of a GPU by
            default (``XLA_PYTHON_CLIENT_MEM_FRACTION``); set that variable and this field
            together to plan closer to the limit.
    """

    name: str
    peak_flops: float
    memory_bytes: int
    link_bandwidth: float
    platform: str = "gpu"
    memory_fraction: float = 0.75

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.memory_fraction)

    def __post_init__(self) -> None:
        bad = [f"{n}={getattr(self, n)!r}" for n in ("peak_flops", "memory_bytes",
                                                     "link_bandwidth") if getattr(self, n) <= 0]
        if not 0 < self.memory_fraction <= 1:
            bad.append(f"memory_fraction={self.memory_fraction!r} (use a value in (0, 1])")
        if self.platform not in ("gpu", "cpu"):
            bad.append(f"platform={self.platform!r} (use 'gpu' or 'cpu')")
        if bad:
            raise ConfigError(f"Invalid Device {self.name!r}: {', '.join(bad)} must be positive.")


#: The strategies the cost model covers, with the mesh axes each one splits. The pipeline ones
#: (``pp*``) stack the blocks over ``'stage'`` (``jmp.pipeline``) and run the rest within a stage.
_NEEDS = {"dp": ("data",), "fsdp": ("data",), "tp": ("model",), "dp_tp": ("data", "model"),
          "fsdp_tp": ("data", "model"), "pp": ("stage",), "pp_dp": ("stage", "data"),
          "pp_tp": ("stage", "model"), "pp_dp_tp": ("stage", "data", "model")}
STRATEGIES = tuple(_NEEDS)
PIPELINE_SCHEDULES = ("1f1b", "gpipe")

STAGE_AXIS = "stage"
MiB, GiB = 2**20, 2**30
#: Public figures: dense bf16 tensor-core peak FLOP/s; memory as ``nvidia-smi`` reports it (the
#: marketing "80 GB" is 81559 MiB); NVLink bandwidth per direction. JAX preallocates 75% of it
#: by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``): raise that for runs planned near the limit.
DEVICES: dict[str, Device] = {
    "h100": Device("h100", 989e12, 81559 * MiB, 450e9),  # H100 SXM5, NVLink 4: 900 GB/s both ways
    "h200": Device("h200", 989e12, 143771 * MiB, 450e9),  # same compute and NVLink, 141 GB HBM3e
    "a100": Device("a100", 312e12, 81920 * MiB, 300e9),  # A100 SXM 80GB, NVLink 3: 600 GB/s both
    "cpu": Device("cpu", 5e10, 24 * GiB, 1e10, platform="cpu", memory_fraction=1.0),
}


def get_device(name: str | Device, /) -> Device:
    """A preset by name (``'h100'``...), or ``name`` itself if it already is a :class:`Device`."""
    if isinstance(name, Device):
        return name
    if name not in DEVICES:
        raise ConfigError(f"Unknown device {name!r}. Known devices: {', '.join(DEVICES)}. Fix: "
                          f"pick one, or pass jmp.plan.Device(name, peak_flops, memory_bytes, "
                          f"link_bandwidth).")
    return DEVICES[name]


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
    out = [ParamArray("embed/embedding", (v, d), ("vocab", "embed"), "embedding"),
           ParamArray("position", (cfg.seq_len, d), (None, "embed"), "position")]
    for i in range(cfg.n_layers):
        p = f"blocks/{i}/"
        out += [ParamArray(p + "norm1/scale", (d,), ("embed",), "norm", i),
                ParamArray(p + "attn/qkv", (d, 3, h, k), ("embed", None, "heads", "kv"), "qkv", i),
                ParamArray(p + "attn/out", (h, k, d), ("heads", "kv", "embed"), "out", i),
                ParamArray(p + "attn/out_bias", (d,), ("embed",), "out_bias", i),
                ParamArray(p + "norm2/scale", (d,), ("embed",), "norm", i),
                ParamArray(p + "mlp/up/kernel", (d, f), ("embed", "mlp"), "up", i),
                ParamArray(p + "mlp/up/bias", (f,), ("mlp",), "up_bias", i),
                ParamArray(p + "mlp/down/kernel", (f, d), ("mlp", "embed"), "down", i),
                ParamArray(p + "mlp/down/bias", (d,), ("embed",), "down_bias", i)]
    return out + [ParamArray("norm/scale", (d,), ("embed",), "norm"),
                  ParamArray("head/kernel", (d, v), ("embed", "vocab"), "head")]


class _Layout(NamedTuple):
    """How one array is split: mesh axes (size > 1) per dimension."""

    array: ParamArray
    axes: tuple[tuple[str, ...], ...]

    def split(self, mesh: Mapping[str, int], only: Iterable[str] | None = None) -> int:
        keep = None if only is None else set(only)
        return math.prod(mesh[a] for dim in self.axes for a in dim
                         if keep is None or a in keep)

    @property
    def split_axes(self) -> set[str]:
        return {a for dim in self.axes for a in dim}


def _layouts(cfg: GPTConfig, rules: Rules, mesh: AbstractMesh,
             arrays: list[ParamArray] | None = None) -> list[_Layout]:
    """Resolve every array strictly (jmp's own rules), or raise one ShardingError listing all."""
    problems: list[str] = []
    out = []
    for arr in param_arrays(cfg) if arrays is None else arrays:
        spec, found = resolve(arr.names, rules.params_dict, shape=arr.shape, mesh=mesh,
                              path=arr.path)
        problems += found
        entries = list(spec) + [None] * (len(arr.shape) - len(spec))
        axes = tuple(tuple(a for a in ((e,) if isinstance(e, str) else (e or ()))
                           if mesh.shape[a] > 1) for e in entries)
        out.append(_Layout(arr, axes))
    raise_problems(problems, what="parameter")
    return out


# --- the estimate ----------------------------------------------------------------------------


class Comm(NamedTuple):
    """One predicted collective: result bytes per device of one op, executions per step."""

    kind: str  # all-reduce | all-gather | reduce-scatter | all-to-all
    axis: str
    bytes: int
    count: int
    what: str

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count


@dataclass(frozen=True)
class Estimate:
    """Predicted per-device cost of one train step (see :func:`estimate`).

    Memory fields are bytes per device; ``comm`` lists every collective; ``comm_bytes`` sums
    ``bytes * count`` per mesh axis; times are seconds (``step_time = compute_time + comm_time``:
    no overlap of compute and communication is assumed, so it is an upper bound).
    """

    strategy: str
    mesh_shape: dict[str, int]
    device: Device
    batch_size: int
    seq_len: int
    microbatches: int
    remat: bool
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    gathered_bytes: int  # FSDP: whole-over-data copies of parameters alive at the peak
    total_bytes: int
    comm: tuple[Comm, ...]
    comm_bytes: dict[str, int]
    flops: float  # model FLOPs per device per step (remat's recompute not counted)
    compute_time: float
    comm_time: float
    step_time: float
    mfu: float
    fits: bool
    reason: str
    schedule: str | None = None  # pipeline strategies: '1f1b' or 'gpipe'
    bubble: float = 0.0  # pipeline idle share of the compute: (S - 1) / (M + S - 1)

    @property
    def mesh(self) -> str:
        return format_mesh_shape(self.mesh_shape)

    @property
    def state_bytes(self) -> int:
        """What the compiled step takes as its state argument: params, optimizer, step counter."""
        return self.params_bytes + self.optimizer_bytes + 4

    def comm_report(self) -> str:
        """The predicted collectives, one per line, and the per-axis totals."""
        lines = [f"  {c.kind:14s} {c.axis:6s} {c.bytes:>12,d} B x{c.count:<4d} {c.what}"
                 for c in self.comm]
        lines += [f"  total over {a!r}: {b:,d} B" for a, b in self.comm_bytes.items()]
        return "\n".join(lines)


def _ring_factor(kind: str, n: int) -> float:
    """Bytes each device sends per result byte, for a ring of n devices."""
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1,
            "collective-permute": 1.0}.get(kind, (n - 1) / n)


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
        out.append(Comm("all-reduce", vocab, act, c.micro,
                        "embedding vocab-parallel lookup (one-hot product) forward"))
    for i in range(c.cfg.n_layers):
        if heads:
            out.append(Comm("all-reduce", heads, act, c.micro,
                            f"layer {i} attention out-proj row-parallel forward"))
            if c.remat:
                out.append(Comm("all-reduce", heads, act, c.micro,
                                f"layer {i} attention out-proj recomputed (remat)"))
            out.append(Comm("all-reduce", heads, act, c.micro,
                            f"layer {i} qkv input gradient (column-parallel) backward"))
        if mlp:
            out.append(Comm("all-reduce", mlp, act, c.micro,
                            f"layer {i} MLP down row-parallel forward"))
            out.append(Comm("all-reduce", mlp, act, c.micro,
                            f"layer {i} MLP up input gradient (column-parallel) backward"))
    if vocab:
        out.append(Comm("all-reduce", vocab, act, c.micro,
                        "head input gradient (column-parallel) backward"))
        tok = c.rows * c.seq * 4  # the loss is computed in float32
        for what in ("max", "sum of exp", "target logit"):
            out.append(Comm("all-reduce", vocab, tok, c.micro,
                            f"cross-entropy {what} over the split vocabulary"))
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
    out: list[Comm] = [Comm("all-reduce", data, 4, c.micro, "mean loss over the batch split")]
    for lay in c.layouts:
        arr, sharded = lay.array, data in lay.split_axes
        whole = math.prod(arr.shape) // lay.split(c.mesh, lay.split_axes - {data}) * c.pwire
        if arr.role == "position":  # only the rows in use are gathered and reduced
            whole = whole * c.seq // arr.shape[0]
        where = arr.path
        if sharded and arr.role == "embedding" and not lay.split_axes - {data}:
            # vocabulary whole: jnp.take on a table split by columns, never gathered
            act = c.rows * c.seq * c.cfg.d_model * c.wire
            out += [Comm("all-gather", data, c.rows * n * c.seq * 4, c.micro,
                         "token ids for the column-split embedding lookup"),
                    Comm("all-to-all", data, act, c.micro, "embedding columns -> batch forward"),
                    Comm("all-to-all", data, act, c.micro, "embedding gradient -> columns")]
            continue
        if sharded:
            out.append(Comm("all-gather", data, whole, _gathers(arr.role, arr.layer, c.remat),
                            f"{where} FSDP gather"))
        if sharded and c.reduce_scatter:
            out.append(Comm("reduce-scatter", data, whole // n, c.micro,
                            f"{where} gradient reduce-scatter"))
        else:
            out.append(Comm("all-reduce", data, whole, c.micro, f"{where} gradient all-reduce"))
    return out


def _norm_comms(c: _Ctx) -> list[Comm]:
    """Global gradient norm: a float32 partial sum per array and splitting axis, computed twice."""
    per_axis: dict[str, int] = defaultdict(int)
    for lay in c.layouts:
        for a in lay.split_axes:
            per_axis[a] += 1
    return [Comm("all-reduce", a, 4, 2 * k, f"gradient norm partial sums ({k} arrays x "
                 f"clip and metric)") for a, k in per_axis.items()]


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
    vocab = tokens * cfg.vocab_size // t_v * (compute_bytes + 4 + (compute_bytes if t_v > 1
                                                                   else 0))
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

# --- pipelines -------------------------------------------------------------------------------


def pipeline_arrays(cfg: GPTConfig, num_stages: int, /) -> list[ParamArray]:
    """The parameter arrays of ``PipelinedGPT(cfg, num_stages=S)``: each block parameter stacked
    ``(stage, layers, ...)`` (one array per role, path ``blocks/...``); the ends as in ``GPT``."""
    per = cfg.n_layers // num_stages
    out = []
    for arr in param_arrays(cfg):
        if arr.layer is None:
            out.append(arr)
        elif arr.layer == 0:
            out.append(ParamArray("blocks/" + arr.path.split("/", 2)[2],
                                  (num_stages, per, *arr.shape), ("stage", "layers", *arr.names),
                                  arr.role))
    return out


def _pipeline_sends(schedule: str, S: int, M: int) -> int:
    """Collective-permutes of one stage per step: one per tick and direction, less the dead ones.

    GPipe: the forward scan sends every tick, its transpose sends back every tick. 1F1B runs one
    ``scan`` per phase (warm-up, steady, cool-down); XLA inlines a scan of one tick, and then a
    send whose result no later phase reads is dead code (with S = 2 the cool-down's last send of
    an input gradient). In a scan of more ticks the send stays in the loop body.
    """
    from jmp.pipeline.schedule import make_schedule

    plan = make_schedule(schedule, S, M)
    if schedule == "gpipe":
        return 2 * (M + S - 1)
    phases = plan.phases()
    sends = 0
    for i, (lo, hi, do_f, do_b) in enumerate(phases):
        later_f = any(p[2] for p in phases[i + 1:])
        later_b = any(p[3] for p in phases[i + 1:])
        for does, later in ((do_f, later_f), (do_b, later_b)):
            if does:
                sends += hi - lo if hi - lo > 1 or later else 0
    return sends


def _pipeline_comms(c: _Ctx, S: int, schedule: str) -> list[Comm]:
    """Every collective of a pipelined step (``jmp.pipeline.make_loss_fn`` in ``make_step``).

    Each stage runs ``ticks = M + S - 1`` forward ticks and as many backward ticks (GPipe's are
    autodiff's transpose of its forward scan; 1F1B's recompute the stage's forward inside a
    ``jax.vjp``). Every stage computes the embedding and the head every tick (SPMD: a select
    keeps the first's and the last's), so their collectives run every tick too.
    """
    cfg, M = c.cfg, c.micro
    ticks, per = M + S - 1, cfg.n_layers // S
    by_role = {x.array.role: x for x in c.layouts if not x.array.path.startswith("norm")}
    act = c.rows * c.seq * cfg.d_model * c.wire
    out = [Comm("collective-permute", STAGE_AXIS, act, _pipeline_sends(schedule, S, M),
                "stage activations forward / input gradients backward (neighbours only)"),
           Comm("all-reduce", STAGE_AXIS, 4, 1, "loss summed over stages")]
    for lay in c.layouts:
        if STAGE_AXIS not in lay.split_axes:
            local = math.prod(lay.array.shape) // lay.split(c.mesh) * c.pwire
            out.append(Comm("all-reduce", STAGE_AXIS, local, 1,
                            f"{lay.array.path} gradient summed over stages (replicated end)"))

    def tensor_axis(role: str) -> str | None:
        axes = by_role[role].split_axes - set(c.batch_axes) - {STAGE_AXIS}
        return _one_axis(axes, f"the {role} split") if axes else None

    vocab, heads, mlp = tensor_axis("head"), tensor_axis("qkv"), tensor_axis("up")
    # forward computations of a stage per step: GPipe once per tick; 1F1B in its forward ticks
    # and again (recomputed) in its backward ticks. Losses and backwards: once per tick.
    fwd = ticks * (2 if schedule == "1f1b" else 1)
    for axis, n_fwd, n_bwd, what in ((heads, 1 + c.remat, 1, "attention"),
                                     (mlp, 1, 1, "MLP")):
        if axis:
            out += [Comm("all-reduce", axis, act, per * fwd * n_fwd,
                         f"{what} row-parallel output forward, {per} layer(s)"
                         + (" (+ remat recompute)" if n_fwd > 1 else "")),
                    Comm("all-reduce", axis, act, per * ticks * n_bwd,
                         f"{what} column-parallel input gradient backward, {per} layer(s)")]
    if vocab:
        tok = c.rows * c.seq * 4
        out += [Comm("all-reduce", vocab, act, fwd, "embedding vocab-parallel lookup forward"),
                Comm("all-reduce", vocab, act, ticks, "head input gradient backward"),
                Comm("all-reduce", vocab, tok, 3 * ticks,
                     "cross-entropy max, sum of exp, target logit over the split vocabulary")]
    if c.batch_axes:
        data = _one_axis(c.batch_axes, "the batch split")
        ways = c.mesh[data]
        out.append(Comm("all-reduce", data, 4, ticks, "mean loss over the batch split"))
        for lay in c.layouts:
            arr = lay.array
            local = math.prod(arr.shape) // lay.split(c.mesh) * c.pwire
            if arr.role == "position":
                local = local * c.seq // arr.shape[0]
            if arr.role == "embedding" and not lay.split_axes:
                # jnp.take's transpose (a scatter-add) on a batch-split cotangent: XLA gathers
                # the cotangent and the ids over the batch axis instead of reducing the table
                out += [Comm("all-gather", data, c.rows * ways * c.seq * cfg.d_model * c.wire,
                             ticks, "embedding output gradient gathered for the scatter-add"),
                        Comm("all-gather", data, c.rows * ways * c.seq * 4, ticks,
                             "token ids gathered for the embedding scatter-add")]
                continue
            layers = arr.shape[1] if STAGE_AXIS in lay.split_axes else 1
            out.append(Comm("all-reduce", data, local // layers, ticks * layers,
                            f"{arr.path} gradient all-reduce every backward tick"
                            + (f", per layer ({layers})" if layers > 1 else "")))
    norm: dict[str, int] = defaultdict(int)
    for lay in c.layouts:
        for a in lay.split_axes:
            norm[a] += 1
    out += [Comm("all-reduce", a, 4, 2 * k, f"gradient norm partial sums ({k} arrays x clip "
                 f"and metric)") for a, k in norm.items()]
    return out


def _pipeline_activations(c: _Ctx, S: int, schedule: str, cb: int) -> int:
    """Activations alive at the peak on one stage (see :mod:`jmp.pipeline.run`).

    GPipe keeps what autodiff saves for each of the ``M + S - 1`` ticks of its forward scan (a
    stage's blocks, and the embedding and head every stage computes); with remat only the block
    inputs. 1F1B keeps ``min(M, 2S - 1)`` stage inputs (its stash) plus one microbatch's
    activations inside the ``jax.vjp`` being pulled back.
    """
    cfg = c.cfg
    by_role = {x.array.role: x for x in c.layouts if not x.array.path.startswith("norm")}
    d, f, h, per = cfg.d_model, cfg.hidden, cfg.n_heads, cfg.n_layers // S
    t_h, t_f, t_v = (by_role[r].split(c.mesh, by_role[r].split_axes - set(c.batch_axes)
                                      - {STAGE_AXIS}) for r in ("qkv", "up", "head"))
    tokens = c.rows * c.seq
    x = tokens * d * cb
    block = tokens * cb * (4 * d + (4 * d + h * c.seq) // t_h + 2 * f // t_f)
    ends = tokens * cfg.vocab_size // t_v * (cb + 4 + (cb if t_v > 1 else 0)) + x
    one = (x * per + block if c.remat else block * per) + ends
    if schedule == "gpipe":
        return (c.micro + S - 1) * one
    return min(c.micro, 2 * S - 1) * x + one


def _pipeline_flops(cfg: GPTConfig, tokens: int, seq: int, remat: bool, S: int,
                    schedule: str) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs): every stage also runs the head (S - 1 wasted copies), and
    1F1B recomputes each stage's forward (blocks and head) inside its ``jax.vjp``."""
    model, executed = _flops(cfg, tokens, seq, remat)
    head = 2 * cfg.d_model * cfg.vocab_size * tokens  # one forward of the head
    executed += 3 * head * (S - 1)
    if schedule == "1f1b":
        blocks = (model - 3 * head) / 3  # one forward of the blocks
        executed += blocks + head * S
    return model, executed


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def _check_inputs(cfg: GPTConfig, strategy: str, mesh_shape: Mapping[str, int], batch_size: int,
                  seq_len: int, microbatches: int, optimizer: str, schedule: str) -> None:
    problems = []
    if strategy not in STRATEGIES:
        raise ConfigError(f"Strategy {strategy!r} is not in the planner's cost model, which "
                          f"covers {', '.join(STRATEGIES)}.")
    if schedule not in PIPELINE_SCHEDULES:
        problems.append(f"schedule={schedule!r} must be one of {PIPELINE_SCHEDULES}")
    if strategy.startswith("pp") and isinstance(mesh_shape.get(STAGE_AXIS), int):
        from jmp.pipeline.split import check_stages

        problems += check_stages(cfg, mesh_shape[STAGE_AXIS])
    if not mesh_shape or any(not isinstance(n, int) or n < 1 for n in mesh_shape.values()):
        problems.append(f"mesh_shape={dict(mesh_shape)!r} must map axis names to sizes >= 1")
    for name, value in (("batch_size", batch_size), ("microbatches", microbatches),
                        ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r} must be a positive int")
    if not problems and seq_len > cfg.seq_len:
        problems.append(f"seq_len={seq_len} exceeds the model's seq_len={cfg.seq_len}")
    if not problems and batch_size % microbatches:
        problems.append(f"microbatches={microbatches} must divide batch_size={batch_size}")
    if optimizer not in ("adamw", "sgd"):
        problems.append(f"optimizer={optimizer!r} must be 'adamw' or 'sgd'")
    if problems:
        raise ConfigError("Invalid plan input: " + "; ".join(problems) + ".")


def _batch_rows(rules: Rules, mesh: AbstractMesh, batch_size: int, microbatches: int,
                ) -> tuple[tuple[str, ...], int]:
    spec = rules.activation_spec(("batch",), mesh=mesh)
    entry = spec[0] if len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    ways = math.prod(mesh.shape[a] for a in axes)
    micro = batch_size // microbatches
    if micro % ways:
        raise ConfigError(f"Batch of {batch_size} in {microbatches} microbatch(es) gives {micro} "
                          f"rows, which the batch axes {axes} of size {ways} do not divide. Fix: "
                          f"use a batch size that is a multiple of {ways * microbatches}.")
    return axes, micro // ways


def estimate(cfg: GPTConfig, mesh_shape: Mapping[str, int], strategy: str, /, *,
             batch_size: int, seq_len: int | None = None, microbatches: int = 1,
             remat: bool | None = None, device: Device | str = "cpu",
             param_bytes: int | None = None, compute_bytes: int | None = None,
             optimizer: str = "adamw", schedule: str = "1f1b") -> Estimate:
    """Predict memory, collectives, FLOPs and time per device of one train step.

    Args:
        cfg: the model.
        mesh_shape: ``{'data': 2, 'model': 4}``.
        strategy: one of ``jmp.rules.STRATEGIES``; the mesh must suit it (as ``preset`` checks).
        batch_size: global batch (sequences) per step, split into ``microbatches``.
        seq_len: tokens per sequence (default ``cfg.seq_len``).
        remat: recompute blocks in the backward pass (default ``cfg.remat``).
        device: a :class:`Device` or a preset name.
        param_bytes, compute_bytes: bytes per parameter / activation value (default from
            ``cfg.param_dtype`` / ``cfg.dtype``).
        optimizer: ``'adamw'`` (two moments in the parameters' dtype, as optax keeps them, and
            two int32 counts) or ``'sgd'`` (no state).
        schedule: pipeline strategies (``pp*``): ``'1f1b'`` or ``'gpipe'``, as
            ``jmp.pipeline.make_loss_fn`` runs it; ``microbatches`` is then the pipeline's M
            (``jmp.loop`` passes ``TrainConfig.microbatches``), not gradient accumulation.

    Raises:
        ConfigError: unknown strategy or device, bad sizes, a batch the batch axes do not divide.
        ShardingError: the mesh does not suit the strategy, or a parameter dimension is not
            divisible by its mesh axes (jmp's strict resolution, as ``shard_init`` would fail).

    Example:
        >>> est = estimate(GPTConfig.named("tiny"), {"model": 8}, "tp", batch_size=8)
        >>> est.comm_bytes
        {'model': 1316960}
    """
    seq = cfg.seq_len if seq_len is None else seq_len
    _check_inputs(cfg, strategy, mesh_shape, batch_size, seq, microbatches, optimizer, schedule)
    dev = get_device(device)
    remat = cfg.remat if remat is None else remat
    pb = param_bytes or _itemsize(cfg.param_dtype)
    cb = compute_bytes or _itemsize(cfg.dtype)
    amesh = AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    rules = preset(strategy, amesh)
    pipe = strategy.startswith("pp")
    S = mesh_shape[STAGE_AXIS] if pipe else 1
    layouts = _layouts(cfg, rules, amesh, pipeline_arrays(cfg, S) if pipe else None)
    batch_axes, rows = _batch_rows(rules, amesh, batch_size, microbatches)
    sizes = dict(mesh_shape)
    cpu = dev.platform == "cpu"  # XLA:CPU upcasts 16-bit collectives and has no reduce-scatter
    ctx = _Ctx(cfg, sizes, layouts, batch_axes, rows, seq, microbatches, remat,
               max(cb, 4) if cpu else cb, max(pb, 4) if cpu else pb, not cpu)
    if pipe:
        comm = tuple(c for c in _pipeline_comms(ctx, S, schedule) if c.count)
    else:
        comm = tuple(_tensor_comms(ctx) + _batch_comms(ctx) + _norm_comms(ctx))
    comm_bytes: dict[str, int] = defaultdict(int)
    for c in comm:
        comm_bytes[c.axis] += c.total_bytes
    local = sum(math.prod(x.array.shape) // x.split(sizes) for x in layouts) * pb
    opt = 2 * local + 8 if optimizer == "adamw" else 0
    if pipe:  # gradients accumulate over the ticks: the running sum + this tick's
        acts, gathered, grads = _pipeline_activations(ctx, S, schedule, ctx.wire), 0, 2 * local
        model_flops, executed = _pipeline_flops(cfg, batch_size * seq, seq, remat, S, schedule)
    else:
        acts = _activation_bytes(ctx, ctx.wire, flash=not cpu and cb == 2)  # CPU computes f32
        gathered = _gathered_bytes(ctx, pb)
        grads = local * (2 if microbatches > 1 else 1)  # accumulated + this microbatch's
        model_flops, executed = _flops(cfg, batch_size * seq, seq, remat)
    total = local + grads + opt + 4 + acts + gathered
    n_dev = math.prod(sizes.values())
    # the bubble: a stage works M of its M + S - 1 ticks (forward and backward alike)
    bubble = (S - 1) / (microbatches + S - 1) if pipe else 0.0
    compute_time = executed / n_dev / dev.peak_flops / (1 - bubble)
    comm_time = sum(c.total_bytes * _ring_factor(c.kind, sizes[c.axis]) for c in comm)
    comm_time /= dev.link_bandwidth
    step_time = compute_time + comm_time
    mfu = model_flops / n_dev / (step_time * dev.peak_flops) if step_time else 0.0
    fits = total <= dev.usable_bytes
    mesh = format_mesh_shape(sizes)
    reason = (f"{strategy} on {mesh}: {human_bytes(total)}/device of "
              f"{human_bytes(dev.usable_bytes)} usable ({'fits' if fits else 'does not fit'}), "
              f"{human_bytes(sum(comm_bytes.values()))} communicated per step, step "
              f"{_fmt_time(step_time)} ({_fmt_time(compute_time)} compute + "
              f"{_fmt_time(comm_time)} comm), MFU {mfu:.0%}")
    if pipe:
        reason += (f", {schedule} with {microbatches} microbatches over {S} stages: bubble "
                   f"{bubble:.0%} of the compute ((S-1)/(M+S-1))")
    return Estimate(strategy, sizes, dev, batch_size, seq, microbatches, remat, local, grads,
                    opt, acts, gathered, total, comm, dict(comm_bytes), model_flops / n_dev,
                    compute_time, comm_time, step_time, mfu, fits, reason,
                    schedule if pipe else None, bubble)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype]


# --- search ----------------------------------------------------------------------------------


def candidate_shapes(strategy: str, n_devices: int, /) -> list[dict[str, int]]:
    """Mesh shapes for ``strategy`` on ``n_devices``, every axis it uses of size > 1."""
    if strategy not in _NEEDS:
        raise ConfigError(f"Strategy {strategy!r} is not in the planner's cost model, which "
                          f"covers {', '.join(STRATEGIES)}.")
    shapes = fitting_shapes(_NEEDS[strategy], n_devices)
    return [s for s in shapes if n_devices == 1 or all(v > 1 for v in s.values())]


def search(cfg: GPTConfig, n_devices: int, device: Device | str, /, *, batch_size: int,
           seq_len: int | None = None, strategies: Sequence[str] = STRATEGIES,
           microbatches: int = 1, remat: bool | None = None,
           include_unfit: bool = False, schedule: str = "1f1b") -> list[Estimate]:
    """Every (strategy, mesh shape) jmp accepts on ``n_devices``, fitting ones ranked by step time.

    A candidate is dropped when ``jmp.rules.preset`` rejects the mesh, a parameter dimension is
    not divisible by its mesh axes, the batch does not split, or (pipelines) the ``'stage'``
    size does not divide ``n_layers``; then it is kept if it fits in memory (or always, after
    the fitting ones, with ``include_unfit``). Pipeline strategies use ``microbatches`` as their
    M and ``schedule``; their ``reason`` states the bubble.

    Example:
        >>> best = search(GPTConfig.named("7b"), 64, "h100", batch_size=256)[0]
        >>> best.reason
    """
    dev = get_device(device)
    if not isinstance(n_devices, int) or n_devices < 1:
        raise ConfigError(f"n_devices={n_devices!r} must be a positive int.")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"Strategies {unknown} are not in the planner's cost model. Planned "
                          f"strategies: "
                          f"{', '.join(STRATEGIES)}.")
    found = []
    for strategy in strategies:
        for shape in candidate_shapes(strategy, n_devices):
            try:
                found.append(estimate(cfg, shape, strategy, batch_size=batch_size,
                                      seq_len=seq_len, microbatches=microbatches, remat=remat,
                                      device=dev, schedule=schedule))
            except JmpError:
                continue  # the strategy does not apply to this shape: not a candidate
    found.sort(key=lambda e: (not e.fits, e.step_time, e.total_bytes))
    return found if include_unfit else [e for e in found if e.fits]


def format_table(estimates: Sequence[Estimate], /, *, title: str = "plan") -> Any:
    """A ``rich.table.Table``: one row per estimate, in the given order."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("#", "strategy", "mesh", "memory/device", "fits", "comm/step", "compute",
                "comm", "step", "MFU"):
        table.add_column(col, justify="left" if col in ("strategy", "mesh") else "right")
    for i, e in enumerate(estimates, 1):
        table.add_row(str(i), e.strategy, e.mesh, human_bytes(e.total_bytes),
                      "yes" if e.fits else "no", human_bytes(sum(e.comm_bytes.values())),
                      _fmt_time(e.compute_time), _fmt_time(e.comm_time),
                      _fmt_time(e.step_time), f"{e.mfu:.0%}")
    return table
