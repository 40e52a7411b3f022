"""Stage split planning: how many of a GPT's blocks each pipeline stage holds, and its load.

:func:`split_stages` splits ``cfg.n_layers`` blocks into contiguous stages, uniformly (what
:class:`~jmp.pipeline.PipelinedGPT` runs) or balanced by parameters or forward FLOPs, counting
the embedding on the first stage and the final norm and head on the last. It returns a
:class:`StageSplit` report that prints as a table. :func:`check_stages` lists what stops a
split; the model's constructor asks it too.

A balanced split is a planning report: the stacked model needs the same block count on every
stage (``n_layers`` divisible by the number of stages), so it runs only the uniform split.

Pure arithmetic over a :class:`~jmp.models.gpt.GPTConfig`: nothing here touches arrays or
devices, which is why it sits below the model and the schedules.

Example:
    >>> split = split_stages(GPTConfig.named("1b"), 4, balance="params")
    >>> split.blocks            # the embedding and the head weigh about two blocks each
    (5, 7, 7, 5)
    >>> round(split.imbalance("params"), 3)
    1.012
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from jmp.errors import ConfigError
from jmp.models.gpt import GPTConfig
from jmp.pipeline.stack import check_layers


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
        rows = [
            f"stage split ({self.balance}): params imbalance {self.imbalance('params'):.3f}, "
            f"FLOPs imbalance {self.imbalance('flops'):.3f} (max/mean)",
            head,
        ]
        for s, (n, p, f) in enumerate(zip(self.blocks, self.params, self.flops, strict=True)):
            first = self.first_block(s)
            span = f"{n:>3} [{first:>2}-{first + n - 1:>2}]"
            rows.append(f"{s:>5}  {span:>11}  {p:>13,}  {f / 1e9:>10.3f}")
        rows.append(
            f"{'total':>5}  {sum(self.blocks):>11}  {sum(self.params):>13,}  "
            f"{sum(self.flops) / 1e9:>10.3f}"
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _balanced_counts(
    n_blocks: int, num_stages: int, weight: int, extra: tuple[int, ...]
) -> list[int]:
    """Equal-weight blocks onto stages with fixed extra loads, minimising the largest load.

    One block per stage first, then each next block to the stage whose load would grow the
    least: optimal for identical blocks (the bottleneck only ever takes the smallest step).
    """
    counts = [1] * num_stages
    for _ in range(n_blocks - num_stages):
        s = min(range(num_stages), key=lambda i: ((counts[i] + 1) * weight + extra[i], i))
        counts[s] += 1
    return counts


def split_stages(
    cfg: GPTConfig,
    num_stages: int,
    /,
    *,
    balance: Literal["uniform", "params", "flops"] = "uniform",
) -> StageSplit:
    """Split ``cfg.n_layers`` blocks into ``num_stages`` contiguous stages.

    ``'uniform'`` gives every stage ``n_layers / num_stages`` blocks (what :class:`PipelinedGPT`
    runs); ``'params'`` / ``'flops'`` give the first and last stages fewer blocks when the
    embedding or the head weighs as much as a block (a report for planning: see the module
    docstring).

    Example:
        >>> print(split_stages(GPTConfig.named("1b"), 4, balance="params"))
        stage split (params): params imbalance 1.012, FLOPs imbalance 1.087 (max/mean)
        stage       blocks         params   GFLOP/seq
            0    5 [ 0- 4]    358,957,056    1202.591
            1    7 [ 5-11]    352,436,224    1683.627
            2    7 [12-18]    352,436,224    1683.627
            3    5 [19-23]    354,764,800    1624.571
        total           24  1,418,594,304    6194.417
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
        extra = tuple(
            (first if s == 0 else 0) + (last if s == num_stages - 1 else 0)
            for s in range(num_stages)
        )
        counts = _balanced_counts(n, num_stages, weight, extra)
    loads = {}
    for what in ("params", "flops"):
        weight = block_params(cfg) if what == "params" else block_flops(cfg)
        first, last = _end_costs(cfg, what)
        loads[what] = tuple(
            c * weight + (first if s == 0 else 0) + (last if s == num_stages - 1 else 0)
            for s, c in enumerate(counts)
        )
    return StageSplit(tuple(counts), loads["params"], loads["flops"], balance)


def check_stages(cfg: GPTConfig, num_stages: int, /, *, uniform: bool = True) -> list[str]:
    """Problems (empty if none) with splitting ``cfg``'s blocks into ``num_stages`` stages.

    A uniform split is what runs (see :func:`jmp.pipeline.stack.check_layers` for why an
    uneven one is only a report); a balanced split only needs a block per stage.
    """
    problems = check_layers(cfg.n_layers, num_stages)
    if not uniform:  # a balanced split may be uneven
        problems = [p for p in problems if "not divisible" not in p]
    return problems + cfg.pipeline_problems(num_stages)
