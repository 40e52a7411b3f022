"""Pipeline parallelism: a GPT's blocks split into stages over a ``'stage'`` mesh axis.

Three parts, all over the same idea (stage s holds blocks ``s*L .. (s+1)*L - 1`` and passes its
activations to stage s+1 with ``jax.lax.ppermute``, one microbatch per tick):

- **Planning**: :func:`split_stages` splits the blocks uniformly or balanced by parameters or
  FLOPs (embedding counted on the first stage, final norm and head on the last), and returns a
  :class:`StageSplit` report that prints as a table.
- **Model**: :class:`PipelinedGPT` is :class:`jmp.models.gpt.GPT` with its blocks' parameters
  stacked as ``(stage, layers, ...)`` (logical names ``'stage'``, ``'layers'``), so the
  ``'stage'`` rule shards them over the mesh's stage axis. The same seed gives the same numbers
  as ``GPT``; :meth:`PipelinedGPT.from_gpt` / :meth:`PipelinedGPT.to_gpt` convert.
- **Schedules**: :func:`pipeline_loss` / :func:`pipeline_loss_and_grads` run GPipe (all
  forwards, then autodiff does all backwards) or 1F1B (one forward and one backward per tick,
  with an explicit ``jax.vjp`` per stage) inside ``jax.shard_map``, manual over ``{'stage'}``
  only: ``'data'`` and ``'model'`` stay with the compiler and the tensor-parallel layers.

Where the ends run: inside the pipelined region, once per microbatch, the embedding on the
first stage and the final norm, head and cross-entropy on the last (that is what lets 1F1B
start a microbatch's backward as soon as its forward reaches the end). Their parameters are
replicated over ``'stage'`` (split over ``'model'`` as usual) and their gradients summed over
``'stage'`` once per step (one all-reduce; the other stages contribute zeros). In SPMD every
stage runs the same ops: each computes the embedding and the head and a select keeps the
first's and the last's (a ``lax.cond`` would skip that work, but with tensor-parallel
collectives inside its branches XLA's CPU runtime deadlocked). That costs S - 1 extra
embeddings and heads per tick: small next to the blocks for byte vocabularies, about a block
each for a 32k vocabulary.

Memory: GPipe keeps every tick's activations for autodiff: M + S - 1 microbatches' worth per
stage (only each block's input with ``GPTConfig.remat``). 1F1B keeps only each stage's
*input* per microbatch in flight, at most ``2(S - 1 - s) + 1 <= 2S - 1`` on stage s whatever
M (a lockstep tick moves an activation one stage, so the round trip is 2(S - 1 - s) ticks;
asynchronous PipeDream 1F1B keeps S), and recomputes the stage's forward inside its
``jax.vjp``: about one extra forward per microbatch and stage.

What is not supported: stages with unequal block counts in the stacked model (a balanced
:class:`StageSplit` is a planning report; :class:`PipelinedGPT` needs ``n_layers`` divisible
by the number of stages), ``GPTConfig.mode='manual'`` inside the pipeline (see
:func:`check_pipeline`), interleaved/virtual stages, and zero-bubble schedules. Gradients of a
data-parallel batch are all-reduced over ``'data'`` by the compiler once per backward tick, not
once per step (as in :mod:`jmp.train`'s gradient accumulation).

Example:
    >>> mesh = jmp.make_mesh("stage=4,data=2")
    >>> rules = jmp.rules.preset("dp", mesh)
    >>> model = jmp.shard_init(lambda r: PipelinedGPT(cfg, num_stages=4, rngs=r), mesh, rules)
    >>> with jmp.activate(mesh, rules):
    ...     loss, grads = jax.jit(functools.partial(pipeline_loss_and_grads, mesh=mesh,
    ...                                             num_microbatches=8))(model, batch)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jmp.context import activation_spec, constrain
from jmp.errors import ConfigError
from jmp.layers import ColumnParallelLinear, Mode, ParallelEmbed, RMSNorm, named_param
from jmp.losses import cross_entropy
from jmp.models.gpt import GPT, Block, GPTConfig
from jmp.rules import Rules
from jmp.sharding import named_shardings

STAGE = "stage"
ScheduleName = Literal["gpipe", "1f1b"]
SCHEDULES = ("gpipe", "1f1b")
Batch = tuple[jax.Array, jax.Array]


# --- planning: how many blocks per stage ---------------------------------------------------


def block_params(cfg: GPTConfig, /) -> int:
    """Parameters of one transformer block (attention, MLP, two norms)."""
    d, f = cfg.d_model, cfg.hidden
    return 4 * d * d + d + 2 * d * f + f + d + 2 * d


def block_flops(cfg: GPTConfig, /) -> int:
    """Forward FLOPs of one block on one sequence of ``seq_len`` tokens (matmuls + attention)."""
    d, f, t = cfg.d_model, cfg.hidden, cfg.seq_len
    return 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d  # QK^T and AV over the full T x T


def _end_costs(cfg: GPTConfig, balance: str) -> tuple[int, int]:
    """(first stage's extra, last stage's extra) cost: embedding; final norm + head."""
    d, v, t = cfg.d_model, cfg.vocab_size, cfg.seq_len
    if balance == "flops":
        return 0, 2 * t * d * v  # the lookup is a gather (no FLOPs); the head is a matmul
    return v * d + t * d, d + d * v


@dataclass(frozen=True)
class StageSplit:
    """How a GPT's blocks are split into pipeline stages, with each stage's load.

    Attributes:
        blocks: number of blocks on each stage (contiguous, in order).
        params: parameters held by each stage (embedding on the first, head on the last).
        flops: forward FLOPs of each stage for one sequence of ``seq_len`` tokens.
        balance: ``'uniform'``, ``'params'`` or ``'flops'``: what the split balanced.
    """

    blocks: tuple[int, ...]
    params: tuple[int, ...]
    flops: tuple[int, ...]
    balance: str

    @property
    def num_stages(self) -> int:
        return len(self.blocks)

    @property
    def uniform(self) -> bool:
        """Whether every stage has the same number of blocks (what :class:`PipelinedGPT` runs)."""
        return len(set(self.blocks)) == 1

    def first_block(self, stage: int, /) -> int:
        """Index (in the GPT) of the first block of ``stage``."""
        return sum(self.blocks[:stage])

    def imbalance(self, what: str = "flops") -> float:
        """max / mean of the per-stage ``'params'`` or ``'flops'``: 1.0 is perfectly balanced."""
        load = np.asarray(getattr(self, what), dtype=float)
        return float(load.max() / load.mean())

    def table(self) -> str:
        """A plain-text table: one row per stage, then the totals."""
        head = f"{'stage':>5}  {'blocks':>11}  {'params':>13}  {'GFLOP/seq':>10}"
        rows = [f"stage split ({self.balance}): params imbalance {self.imbalance('params'):.3f}, "
                f"FLOPs imbalance {self.imbalance('flops'):.3f} (max/mean)", head]
        for s, (n, p, f) in enumerate(zip(self.blocks, self.params, self.flops, strict=True)):
            first = self.first_block(s)
            span = f"{n:>3} [{first:>2}-{first + n - 1:>2}]"
            rows.append(f"{s:>5}  {span:>11}  {p:>13,}  {f / 1e9:>10.3f}")
        rows.append(f"{'total':>5}  {sum(self.blocks):>11}  {sum(self.params):>13,}  "
                    f"{sum(self.flops) / 1e9:>10.3f}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _balanced_counts(n_blocks: int, num_stages: int, weight: int,
                     extra: tuple[int, ...]) -> list[int]:
    """Equal-weight blocks onto stages with fixed extra loads, minimising the largest load.

    One block per stage first, then each next block to the stage whose load would grow the
    least: optimal for identical blocks (the bottleneck only ever takes the smallest step).
    """
    counts = [1] * num_stages
    for _ in range(n_blocks - num_stages):
        s = min(range(num_stages), key=lambda i: ((counts[i] + 1) * weight + extra[i], i))
        counts[s] += 1
    return counts


def split_stages(cfg: GPTConfig, num_stages: int, /, *,
                 balance: Literal["uniform", "params", "flops"] = "uniform") -> StageSplit:
    """Split ``cfg.n_layers`` blocks into ``num_stages`` contiguous stages.

    ``'uniform'`` gives every stage ``n_layers / num_stages`` blocks (what :class:`PipelinedGPT`
    runs); ``'params'`` / ``'flops'`` give the first and last stages fewer blocks when the
    embedding or the head weighs as much as a block (a report for planning: see the module
    docstring).

    Example:
        >>> print(split_stages(GPTConfig.named("1b"), 4, balance="params"))
    """
    problems = check_stages(cfg, num_stages, uniform=balance == "uniform")
    if balance not in ("uniform", "params", "flops"):
        problems.append(f"balance={balance!r} must be 'uniform', 'params' or 'flops'")
    if problems:
        raise ConfigError("Cannot split into stages: " + "; ".join(problems) + ".")
    n = cfg.n_layers
    if balance == "uniform":
        counts = [n // num_stages] * num_stages
    else:
        weight = block_params(cfg) if balance == "params" else block_flops(cfg)
        first, last = _end_costs(cfg, balance)
        extra = tuple((first if s == 0 else 0) + (last if s == num_stages - 1 else 0)
                      for s in range(num_stages))
        counts = _balanced_counts(n, num_stages, weight, extra)
    loads = {}
    for what in ("params", "flops"):
        weight = block_params(cfg) if what == "params" else block_flops(cfg)
        first, last = _end_costs(cfg, what)
        loads[what] = tuple(c * weight + (first if s == 0 else 0) +
                            (last if s == num_stages - 1 else 0) for s, c in enumerate(counts))
    return StageSplit(tuple(counts), loads["params"], loads["flops"], balance)


def check_stages(cfg: GPTConfig, num_stages: int, /, *, uniform: bool = True) -> list[str]:
    """Problems (empty if none) with splitting ``cfg``'s blocks into ``num_stages`` stages."""
    n = cfg.n_layers
    if not isinstance(num_stages, int) or num_stages < 1:
        return [f"num_stages={num_stages!r} must be a positive int"]
    if num_stages > n:
        return [f"{num_stages} stages exceed n_layers={n} (every stage needs a block). Fix: use "
                f"a 'stage' mesh axis of size in {_divisors(n)}"]
    if uniform and n % num_stages:
        return [f"n_layers={n} is not divisible by the {num_stages} stages (the 'stage' mesh axis "
                f"size). Fix: use a 'stage' axis of size in {_divisors(n)}, or n_layers a "
                f"multiple of {num_stages} (e.g. {n + (-n) % num_stages})"]
    return []


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --- the stacked model ---------------------------------------------------------------------


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_states(states: list[nnx.State], num_stages: int) -> nnx.State:
    """Blocks' states -> one state with leaves ``(stage, layers, ...)`` named accordingly."""

    def stack(*vs: nnx.Variable) -> nnx.Variable:
        value = jnp.stack([v.get_value() for v in vs])
        value = value.reshape(num_stages, len(vs) // num_stages, *value.shape[1:])
        names = tuple(vs[0].get_metadata()["out_sharding"])
        return vs[0].replace(value, out_sharding=(STAGE, "layers") + names)

    return jax.tree.map(stack, *states, is_leaf=_is_var)


class PipelinedGPT(nnx.Module):
    """:class:`~jmp.models.gpt.GPT` with its blocks' parameters stacked per pipeline stage.

    ``blocks`` is one :class:`~jmp.models.gpt.Block` whose every parameter has two leading
    dims ``(num_stages, n_layers // num_stages)`` named ``('stage', 'layers')``. Parameters are
    created in the same order as ``GPT``'s, so the same seed gives the same values.
    Called directly it runs the blocks in order on one program (no pipeline): the reference,
    and what generation uses.

    Example:
        >>> model = PipelinedGPT(GPTConfig.named("tiny", n_layers=4), num_stages=2,
        ...                      rngs=nnx.Rngs(0))
        >>> model.blocks.attn.qkv.shape[:2]
        (2, 2)
    """

    def __init__(self, cfg: GPTConfig, *, num_stages: int, rngs: nnx.Rngs) -> None:
        problems = check_stages(cfg, num_stages)
        if problems:
            raise ConfigError("Cannot build PipelinedGPT: " + "; ".join(problems) + ".")
        self.cfg, self.num_stages = cfg, num_stages
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        mode: Mode = cfg.mode  # type: ignore[assignment]
        self.embed = ParallelEmbed(cfg.vocab_size, cfg.d_model, mode=mode, dtype=dtype,
                                   param_dtype=pdtype, rngs=rngs)
        self.position = named_param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.seq_len, cfg.d_model), pdtype),
            (None, "embed"))
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
        graphdef = nnx.split(blocks[0])[0]
        self.blocks = nnx.merge(graphdef, _stack_states([nnx.split(b)[1] for b in blocks],
                                                        num_stages))
        self.norm = RMSNorm(cfg.d_model, param_dtype=pdtype)
        self.head = ColumnParallelLinear(cfg.d_model, cfg.vocab_size, use_bias=False,
                                         names=("embed", "vocab"), mode=mode, dtype=dtype,
                                         param_dtype=pdtype,
                                         kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    @property
    def blocks_per_stage(self) -> int:
        return self.cfg.n_layers // self.num_stages

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token plus position embeddings ``(batch, seq, d_model)``: the first stage's input."""
        seq = tokens.shape[-1]
        if seq > self.cfg.seq_len:
            raise ConfigError(f"sequence of {seq} tokens exceeds the model's seq_len="
                              f"{self.cfg.seq_len}.")
        x = self.embed(tokens) + self.position[:seq].astype(jnp.dtype(self.cfg.dtype))
        return constrain(x, ("batch", "seq", "embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and head: ``(batch, seq, vocab)``, split over the vocabulary under tp."""
        return self.head(self.norm(x))

    def head_loss(self, x: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean cross-entropy of the logits of ``x``: the last stage's output."""
        return cross_entropy(self.logits(x), targets, mode=self.cfg.mode)  # type: ignore[arg-type]

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(batch, seq, vocab)``, the blocks run in order (no pipelining)."""
        graphdef, state = nnx.split(self.blocks)
        x = self.embed_tokens(tokens)
        for s in range(self.num_stages):
            x = run_blocks(graphdef, jax.tree.map(lambda a, s=s: a[s], state), x,
                           remat=self.cfg.remat)
        return self.logits(x)

    @classmethod
    def from_gpt(cls, gpt: nnx.Module, /, *, num_stages: int, mesh: Mesh | None = None,
                 rules: Rules | None = None) -> PipelinedGPT:
        """The same model with its blocks stacked into ``num_stages`` stages.

        With ``mesh`` and ``rules`` the parameters are placed on their shardings there (e.g.
        the pipeline mesh); otherwise they stay where ``jnp.stack`` puts them.
        """
        cfg = gpt.cfg
        abstract = nnx.eval_shape(lambda: cls(cfg, num_stages=num_stages, rngs=nnx.Rngs(0)))
        state = stack_params(nnx.state(gpt), num_stages)
        if (mesh is None) != (rules is None):
            raise ConfigError("from_gpt places parameters with both mesh= and rules=, or "
                              "neither; got only one. Fix: pass both.")
        if mesh is not None and rules is not None:
            state = jax.device_put(state, named_shardings(state, rules, mesh))
        return nnx.merge(nnx.graphdef(abstract), state)

    def to_gpt(self) -> nnx.Module:
        """The ordinary :class:`~jmp.models.gpt.GPT` with the same parameters."""
        cfg = self.cfg
        abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
        return nnx.merge(nnx.graphdef(abstract), unstack_params(nnx.state(self)))


def stack_params(state: nnx.State, num_stages: int, /) -> nnx.State:
    """A ``GPT``'s state (or gradients) in :class:`PipelinedGPT`'s layout.

    ``blocks/i/...`` becomes ``blocks/...`` with leading dims ``(stage, layer)``, block i at
    ``(i // L, i % L)``; everything else is unchanged.
    """
    n = len(state["blocks"])
    new = {k: v for k, v in state.items() if k != "blocks"}
    new["blocks"] = _stack_states([state["blocks"][i] for i in range(n)], num_stages)
    return nnx.State(new)


def unstack_params(state: nnx.State, /) -> nnx.State:
    """The inverse of :func:`stack_params`: a :class:`PipelinedGPT`'s state in ``GPT``'s layout."""
    leaves = jax.tree.leaves(state["blocks"], is_leaf=_is_var)
    stages, per = leaves[0].get_value().shape[:2]

    def one(v: nnx.Variable, i: int) -> nnx.Variable:
        names = tuple(v.get_metadata()["out_sharding"])[2:]
        return v.replace(v.get_value()[i // per, i % per], out_sharding=names)

    new = {k: v for k, v in state.items() if k != "blocks"}
    new["blocks"] = {i: jax.tree.map(lambda v, i=i: one(v, i), state["blocks"], is_leaf=_is_var)
                     for i in range(stages * per)}
    return nnx.State(new)


def run_blocks(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, /, *,
               remat: bool = False) -> jax.Array:
    """Apply blocks whose parameters are stacked on a leading ``layers`` dim, in order."""

    def one(layer: nnx.State, h: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, layer)(h)

    if remat:
        one = jax.checkpoint(one)
    return jax.lax.scan(lambda h, layer: (one(layer, h), None), x, state)[0]


# --- schedules -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Schedule:
    """Which microbatch each stage works on at each tick: the plan the pipeline executes.

    Attributes:
        forward: ``(ticks, stages)`` microbatch ids whose forward runs then, ``-1`` when idle.
        backward: the same for backwards (GPipe's are autodiff's mirror of its forwards).
    """

    name: str
    num_stages: int
    num_microbatches: int
    forward: np.ndarray
    backward: np.ndarray

    @property
    def ticks(self) -> int:
        return int(self.forward.shape[0])

    def tick_costs(self, fwd_cost: float = 1.0, bwd_cost: float = 2.0) -> np.ndarray:
        """Duration of each tick in lockstep: forward and/or backward, if any stage has one."""
        return ((self.forward >= 0).any(1) * fwd_cost + (self.backward >= 0).any(1) * bwd_cost)

    def idle_fraction(self, fwd_cost: float = 1.0, bwd_cost: float = 2.0) -> float:
        """Share of stage-time spent idle (the bubble), counting the executed ticks.

        Theory for both schedules: ``(S - 1) / (M + S - 1)``.
        """
        useful = (self.forward >= 0).sum() * fwd_cost + (self.backward >= 0).sum() * bwd_cost
        return float(1 - useful / (self.num_stages * self.tick_costs(fwd_cost, bwd_cost).sum()))

    def in_flight(self) -> np.ndarray:
        """Per stage, the most microbatches whose forward ran and backward has not yet."""
        peak = np.zeros(self.num_stages, int)
        for s in range(self.num_stages):
            live = 0
            for f, b in zip(self.forward[:, s], self.backward[:, s], strict=True):
                live += int(f >= 0)
                peak[s] = max(peak[s], live)
                live -= int(b >= 0)
        return peak

    def phases(self) -> list[tuple[int, int, bool, bool]]:
        """``(first tick, end tick, any forward, any backward)`` of each run of like ticks."""
        has_f = (self.forward >= 0).any(1).tolist()
        has_b = (self.backward >= 0).any(1).tolist()
        out: list[tuple[int, int, bool, bool]] = []
        for t, key in enumerate(zip(has_f, has_b, strict=True)):
            if out and out[-1][2:] == key:
                out[-1] = (out[-1][0], t + 1, *key)
            else:
                out.append((t, t + 1, *key))
        return out

    def render(self) -> str:
        """The schedule as text: one row per stage, ``F3``/``B3``/``..`` per tick."""
        rows = []
        for s in range(self.num_stages):
            cells = []
            for f, b in zip(self.forward[:, s], self.backward[:, s], strict=True):
                cell = (f"F{f}" if f >= 0 else "") + (f"B{b}" if b >= 0 else "")
                cells.append(cell or "..")
            rows.append(f"stage {s}: " + " ".join(f"{c:>5}" for c in cells))
        return "\n".join(rows)


def make_schedule(name: str, num_stages: int, num_microbatches: int, /) -> Schedule:
    """The ``'gpipe'`` or ``'1f1b'`` plan for ``num_stages`` stages and that many microbatches.

    Stage s runs microbatch m's forward at tick ``m + s``. GPipe then runs every backward, in
    reverse. 1F1B runs m's backward at tick ``m + 2(S - 1) - s``: the last stage does a
    microbatch's forward and backward in the same tick, and each stage holds at most
    ``2(S - 1 - s) + 1`` microbatches' inputs (never more than ``M``), whatever ``M``.
    """
    S, M = num_stages, num_microbatches
    if name not in SCHEDULES:
        raise ConfigError(f"schedule={name!r} must be one of {SCHEDULES}.")
    if not (isinstance(M, int) and M >= 1 and isinstance(S, int) and S >= 1):
        raise ConfigError(f"num_stages={S!r} and num_microbatches={M!r} must be positive ints.")
    t = np.arange(M + S - 1)[:, None]
    s = np.arange(S)[None, :]
    fwd = np.where((t - s >= 0) & (t - s < M), t - s, -1)
    if name == "gpipe":
        idle = np.full_like(fwd, -1)
        return Schedule(name, S, M, np.concatenate([fwd, idle]),
                        np.concatenate([idle, fwd[::-1]]))
    t = np.arange(M + 2 * S - 2)[:, None]
    f = t - s
    b = t - (2 * S - 2 - s)
    return Schedule(name, S, M, np.where((f >= 0) & (f < M), f, -1),
                    np.where((b >= 0) & (b < M), b, -1))


# --- running a schedule --------------------------------------------------------------------


def split_microbatches(batch: Batch, num_microbatches: int, /) -> Batch:
    """``(B, T)`` arrays -> ``(M, B / M, T)``; microbatch m holds rows m, m + M, m + 2M, ...

    Strided rows keep each device's rows on that device: a device holding a contiguous block
    of the batch holds the same share of every microbatch, so the split moves no data. (The
    mean loss over the batch does not depend on which rows share a microbatch.)
    """
    M = num_microbatches

    def split(a: jax.Array) -> jax.Array:
        a = a.reshape(a.shape[0] // M, M, *a.shape[1:]).swapaxes(0, 1)
        return constrain(a, (None, "batch") + (None,) * (a.ndim - 2))

    return split(batch[0]), split(batch[1])


def _batch_ways(mesh: Mesh) -> tuple[tuple[str, ...], int]:
    spec = activation_spec(("batch",))
    entry = spec[0] if spec else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return axes, int(np.prod([mesh.shape[a] for a in axes]))


def check_pipeline(model: PipelinedGPT, mesh: Mesh, /, *, num_microbatches: int,
                   batch_size: int | None = None) -> None:
    """Raise a :class:`~jmp.ConfigError` listing everything that stops this pipeline run."""
    S, M = model.num_stages, num_microbatches
    problems = []
    if STAGE not in mesh.shape:
        problems.append(f"the mesh {dict(mesh.shape)} has no 'stage' axis. Fix: build one with "
                        f"it, e.g. jmp.make_mesh('stage={S},data=-1')")
    elif mesh.shape[STAGE] != S:
        problems.append(f"the model has {S} stages but the mesh's 'stage' axis has size "
                        f"{mesh.shape[STAGE]}. Fix: build the model with num_stages="
                        f"{mesh.shape[STAGE]} (n_layers={model.cfg.n_layers} must be divisible "
                        f"by it), or use a mesh with stage={S}")
    if model.cfg.mode != "auto":
        problems.append("GPTConfig.mode='manual' is not supported inside the pipeline (the "
                        "layers' own shard_map, nested in the stage shard_map, fails to lower "
                        "when differentiated). Fix: mode='auto': the compiler then places the "
                        "same tensor-parallel collectives")
    if not isinstance(M, int) or M < 1:
        problems.append(f"num_microbatches={M!r} must be a positive int")
    elif batch_size is not None:
        axes, ways = _batch_ways(mesh)
        if batch_size % (M * ways):
            problems.append(f"a batch of {batch_size} rows does not split into {M} microbatches "
                            f"whose rows split over the batch axes {axes} (size {ways}). Fix: "
                            f"use a batch size that is a multiple of {M * ways}")
    if problems:
        raise ConfigError("Cannot run the pipeline: " + "; ".join(problems) + ".")


def _shift(x: jax.Array, num_stages: int, direction: int) -> jax.Array:
    """Send ``x`` to the next (+1) or previous (-1) stage; the end stage receives zeros.

    Only neighbours talk: no wrap-around pair (nothing useful ever flows from the last stage
    to the first), so the compiled collective-permutes pair stage s with s +- 1 only.
    """
    if num_stages == 1:
        return jnp.zeros_like(x)
    pairs = [(i, i + direction) for i in range(num_stages) if 0 <= i + direction < num_stages]
    return jax.lax.ppermute(x, STAGE, perm=pairs)


def _varying(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.lax.pcast(a, STAGE, to="varying"), tree)


class _Stage:
    """What one stage computes, as pure functions of (its blocks, the shared parameters).

    Built inside the ``shard_map`` body: ``blocks`` is this stage's ``(layers, ...)`` slice,
    ``tokens``/``targets`` all ``M`` microbatches ``(M, rows, seq)``.
    """

    def __init__(self, model: PipelinedGPT, tokens: jax.Array, targets: jax.Array) -> None:
        self.graphdef = nnx.graphdef(model)
        self.blocks_def = nnx.graphdef(model.blocks)
        self.S, self.M, self.remat = model.num_stages, tokens.shape[0], model.cfg.remat
        self.dtype = jnp.dtype(model.cfg.dtype)
        self.act_shape = (*tokens.shape[1:], model.cfg.d_model)
        self.tokens, self.targets = tokens, targets
        self.index = jax.lax.axis_index(STAGE)

    def _model(self, blocks: nnx.State, shared: nnx.State) -> PipelinedGPT:
        return nnx.merge(self.graphdef, blocks, shared)

    def zeros(self, *lead: int) -> jax.Array:
        """A stage-varying zero activation (for loop carries), with leading dims ``lead``."""
        return _varying(jnp.zeros((*lead, *self.act_shape), self.dtype))

    def forward(self, blocks: nnx.State, shared: nnx.State, x: jax.Array,
                micro: jax.Array) -> jax.Array:
        """This stage's output for microbatch ``micro`` (the first stage embeds its tokens)."""
        tokens = self.tokens[jnp.clip(micro, 0, self.M - 1)]
        # Every stage embeds and only the first keeps it: a select, not a lax.cond. With
        # collectives inside a branch taken by only some devices, XLA's CPU runtime was seen
        # to deadlock; the same ops in the same order on every device is what SPMD is safe with.
        h = jnp.where(self.index == 0, self._model(blocks, shared).embed_tokens(tokens), x)
        return run_blocks(self.blocks_def, blocks, h.astype(self.dtype), remat=self.remat)

    def forward_loss(self, blocks: nnx.State, shared: nnx.State, x: jax.Array,
                     micro: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(output, loss): the loss is the last stage's cross-entropy, 0 on the others."""
        y = self.forward(blocks, shared, x, micro)
        targets = self.targets[jnp.clip(micro, 0, self.M - 1)]
        loss = self._model(blocks, shared).head_loss(y, targets).astype(jnp.float32)
        return y, jnp.where(self.index == self.S - 1, loss, 0.0)


def _gpipe_body(model: PipelinedGPT, schedule: Schedule) -> Callable:
    ticks = schedule.ticks // 2  # the forward half; autodiff runs the backward half

    def body(blocks: nnx.State, shared: nnx.State, tokens: jax.Array,
             targets: jax.Array) -> jax.Array:
        stage = _Stage(model, tokens, targets)
        blocks = jax.tree.map(lambda a: a[0], blocks)
        # Varying from here on: the transpose of this cast is the one psum over 'stage' of the
        # shared parameters' gradients (cast inside the loop, it would be one psum per tick).
        shared = _varying(shared)

        def tick(carry: tuple, row: jax.Array) -> tuple[tuple, None]:
            x, total = carry
            micro = row[stage.index]
            y, loss = stage.forward_loss(blocks, shared, x, micro)
            return (_shift(y, stage.S, +1), total + jnp.where(micro >= 0, loss, 0.0)), None

        init = (stage.zeros(), _varying(jnp.zeros((), jnp.float32)))
        (_, total), _ = jax.lax.scan(tick, init, jnp.asarray(schedule.forward[:ticks]))
        return jax.lax.psum(total, STAGE) / stage.M

    return body


def _onefoneb_body(model: PipelinedGPT, schedule: Schedule) -> Callable:
    S, M = schedule.num_stages, schedule.num_microbatches
    slots = min(M, 2 * S - 1)  # stage inputs kept for the backward: 2(S-1-s)+1 on stage s

    def body(blocks: nnx.State, shared: nnx.State, tokens: jax.Array,
             targets: jax.Array) -> tuple[jax.Array, nnx.State, nnx.State]:
        stage = _Stage(model, tokens, targets)
        blocks = jax.tree.map(lambda a: a[0], blocks)
        shared = _varying(shared)  # gradients summed over 'stage' once, at the end
        carry = dict(x=stage.zeros(), g=stage.zeros(), stash=stage.zeros(slots),
                     grads=jax.tree.map(jnp.zeros_like, (blocks, shared)),
                     loss=_varying(jnp.zeros((), jnp.float32)))

        def forward(c: dict, micro: jax.Array) -> dict:
            y = stage.forward(blocks, shared, c["x"], micro)
            slot = jnp.where(micro >= 0, micro % slots, 0)
            kept = jnp.where(micro >= 0, c["x"], c["stash"][slot])
            return {**c, "x": _shift(y, S, +1),
                    "stash": jax.lax.dynamic_update_index_in_dim(c["stash"], kept, slot, 0)}

        def backward(c: dict, micro: jax.Array) -> dict:
            # Recompute this stage's forward from its kept input, then pull the cotangent
            # back through it: only the stage's input is kept between forward and backward.
            x = c["stash"][jnp.where(micro >= 0, micro % slots, 0)]
            (_, loss), vjp = jax.vjp(lambda bl, sh, x_: stage.forward_loss(bl, sh, x_, micro),
                                     blocks, shared, x)
            last = stage.index == S - 1
            dy = jnp.where(last, 0.0, c["g"]).astype(x.dtype)
            g_blocks, g_shared, g_x = vjp((dy, jnp.where(last, 1.0 / M, 0.0)))
            valid = micro >= 0
            grads = jax.tree.map(lambda acc, g: acc + jnp.where(valid, g, 0).astype(acc.dtype),
                                 c["grads"], (g_blocks, g_shared))
            return {**c, "g": _shift(g_x, S, -1), "grads": grads,
                    "loss": c["loss"] + jnp.where(valid & last, loss, 0.0)}

        # One scan per phase, each doing only what its ticks need: forwards only (warm-up),
        # one forward and one backward (steady state), backwards only (cool-down).
        for lo, hi, do_f, do_b in schedule.phases():
            def tick(c: dict, rows: tuple, do_f: bool = do_f, do_b: bool = do_b) -> tuple:
                c = forward(c, rows[0][stage.index]) if do_f else c
                return (backward(c, rows[1][stage.index]) if do_b else c), None

            rows = (jnp.asarray(schedule.forward[lo:hi]), jnp.asarray(schedule.backward[lo:hi]))
            carry, _ = jax.lax.scan(tick, carry, rows)
        g_blocks, g_shared = carry["grads"]
        return (jax.lax.psum(carry["loss"], STAGE) / M,
                jax.tree.map(lambda g: g[None], g_blocks),
                jax.tree.map(lambda g: jax.lax.psum(g, STAGE), g_shared))

    return body


def _run(model: PipelinedGPT, batch: Batch, mesh: Mesh, num_microbatches: int,
         schedule: str) -> Any:
    """The loss (GPipe) or (loss, block grads, shared grads) (1F1B) of one pipelined run."""
    check_pipeline(model, mesh, num_microbatches=num_microbatches,
                   batch_size=batch[0].shape[0])
    plan = make_schedule(schedule, model.num_stages, num_microbatches)
    tokens, targets = split_microbatches(batch, num_microbatches)
    _, blocks, shared = nnx.split(model, nnx.PathContains("blocks"), ...)
    if schedule == "gpipe":
        body, out_specs = _gpipe_body(model, plan), P()
    else:
        body, out_specs = _onefoneb_body(model, plan), (P(), P(STAGE), P())
    # Manual over 'stage' only: inside, 'data' and 'model' stay with the compiler, so the
    # layers' tensor-parallel collectives and the batch split work as without a pipeline.
    return jax.shard_map(body, mesh=mesh, in_specs=(P(STAGE), P(), P(), P()),
                         out_specs=out_specs, axis_names={STAGE})(blocks, shared, tokens, targets)


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r} must be one of {SCHEDULES}.")


def pipeline_loss_and_grads(model: PipelinedGPT, batch: Batch, /, *, mesh: Mesh,
                            num_microbatches: int, schedule: ScheduleName = "1f1b",
                            ) -> tuple[jax.Array, nnx.State]:
    """Mean next-token loss of ``batch`` and its gradients, pipelined over ``'stage'``.

    Call it inside ``jax.jit`` and :func:`jmp.activate` (the layers read the rules from it).

    Args:
        model: a :class:`PipelinedGPT` with ``num_stages == mesh.shape['stage']``.
        batch: ``(inputs, targets)``, each ``(batch, seq)`` integer tokens.
        num_microbatches: M; the batch splits into M microbatches of ``batch / M`` rows.
        schedule: ``'gpipe'`` (all forwards, then all backwards by autodiff: every
            microbatch's activations live at once) or ``'1f1b'`` (an explicit per-stage
            ``jax.vjp``: at most ``2S - 1`` microbatches' stage inputs live on a stage, and each
            stage's forward is recomputed in its backward).

    Returns:
        ``(loss, grads)``, ``grads`` an ``nnx.State`` shaped like ``nnx.state(model)``.

    Example:
        >>> with jmp.activate(mesh, rules):
        ...     loss, grads = jax.jit(functools.partial(pipeline_loss_and_grads, mesh=mesh,
        ...                           num_microbatches=8))(model, batch)
    """
    _check_schedule(schedule)
    if schedule == "gpipe":
        graphdef, params = nnx.split(model)
        return jax.value_and_grad(lambda p: _run(nnx.merge(graphdef, p), batch, mesh,
                                                 num_microbatches, "gpipe"))(params)
    loss, g_blocks, g_shared = _run(model, batch, mesh, num_microbatches, "1f1b")
    return loss, _merge_grads(model, g_blocks, g_shared)


def _merge_grads(model: PipelinedGPT, g_blocks: nnx.State, g_shared: nnx.State) -> nnx.State:
    return nnx.state(nnx.merge(nnx.graphdef(model), g_blocks, g_shared))


def pipeline_loss(model: PipelinedGPT, batch: Batch, /, *, mesh: Mesh, num_microbatches: int,
                  schedule: ScheduleName = "1f1b") -> jax.Array:
    """The pipelined mean loss, differentiable by ``jax.grad`` under either schedule.

    Not differentiated, both run GPipe's forward only. Differentiated, GPipe goes through
    autodiff and 1F1B computes its gradients while it computes the loss (a ``jax.custom_vjp``
    whose backward only scales them), so ``jax.value_and_grad`` costs one 1F1B run. This is
    the ``loss_fn`` for :func:`jmp.train.make_step` (see :func:`make_loss_fn`).
    """
    _check_schedule(schedule)
    if schedule == "gpipe":
        return _run(model, batch, mesh, num_microbatches, "gpipe")
    graphdef, params = nnx.split(model)
    return _onefoneb_loss(graphdef, mesh, num_microbatches, params, batch)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _onefoneb_loss(graphdef: nnx.GraphDef, mesh: Mesh, num_microbatches: int,
                   params: nnx.State, batch: Batch) -> jax.Array:
    return _run(nnx.merge(graphdef, params), batch, mesh, num_microbatches, "gpipe")


def _onefoneb_fwd(graphdef: nnx.GraphDef, mesh: Mesh, num_microbatches: int,
                  params: nnx.State, batch: Batch) -> tuple[jax.Array, nnx.State]:
    model = nnx.merge(graphdef, params)
    loss, g_blocks, g_shared = _run(model, batch, mesh, num_microbatches, "1f1b")
    return loss, _merge_grads(model, g_blocks, g_shared)


def _onefoneb_bwd(graphdef: nnx.GraphDef, mesh: Mesh, num_microbatches: int,
                  grads: nnx.State, ct: jax.Array) -> tuple[nnx.State, None]:
    return jax.tree.map(lambda g: (g * ct).astype(g.dtype), grads), None  # tokens: no grad


_onefoneb_loss.defvjp(_onefoneb_fwd, _onefoneb_bwd)


def make_loss_fn(*, mesh: Mesh, num_microbatches: int, schedule: ScheduleName = "1f1b",
                 ) -> Callable[[nnx.Module, Batch], jax.Array]:
    """A ``loss_fn(model, batch)`` for :func:`jmp.train.make_step` that runs the pipeline.

    Example:
        >>> step = jmp.train.make_step(model, optimizer, mesh, rules, loss_fn=make_loss_fn(
        ...     mesh=mesh, num_microbatches=8, schedule="1f1b"))
    """
    make_schedule(schedule, 1, num_microbatches)  # fail now, not at the first step

    def loss_fn(model: nnx.Module, batch: Batch, /) -> jax.Array:
        return pipeline_loss(model, batch, mesh=mesh, num_microbatches=num_microbatches,
                             schedule=schedule)

    return loss_fn
