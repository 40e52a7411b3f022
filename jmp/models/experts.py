"""The mixture-of-experts fields that GPT and Llama configs share, and the MLP they choose.

A config with ``n_experts > 0`` replaces the MLP of every ``moe_every``-th block (blocks
``moe_every - 1``, ``2 * moe_every - 1``, ...) by a :class:`jmp.layers.MoE` of ``n_experts``
experts of width ``moe_d_ff`` (default: the dense MLP's), ``top_k`` of them per token,
plus ``n_shared_experts`` that every token uses. The experts are SwiGLU MLPs by default, for
GPT too (its MoE runs and checkpoints predate the choice); ``expert_activation="gelu"`` makes
them GELU MLPs like GPT's dense one (two kernels instead of three). Under an ``ep`` strategy the
experts split over the ``expert`` mesh axis (:mod:`jmp.strategies`).

Example:
    >>> from jmp.models import GPTConfig
    >>> cfg = GPTConfig.named("tiny", n_experts=4, top_k=2, moe_every=2)
    >>> [cfg.is_moe_layer(i) for i in range(cfg.n_layers)]
    [False, True]
    >>> cfg.num_params() > cfg.num_active_params()
    True
    >>> gelu = GPTConfig.named("tiny", n_experts=4, top_k=2, expert_activation="gelu")
    >>> gelu.moe_params(64, 256)[0] == 64 * 4 + 4 * 2 * 64 * 256
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jmp.layers import Mode, MoE
from jmp.layers.moe import ACTIVATIONS, Activation


@dataclass(frozen=True)
class ExpertsConfig:
    """Mixture-of-experts fields (all off by default: ``n_experts=0`` is a dense model).

    Attributes:
        n_experts: routed experts per MoE layer; 0 for a dense model.
        top_k: experts each token is sent to.
        n_shared_experts: experts every token uses (DeepSeek-MoE), fused into one MLP.
        moe_every: every k-th block is a MoE block (1: all of them).
        moe_d_ff: each expert's hidden width; None: the dense MLP's.
        capacity_factor: None for dropless routing; else each expert takes at most
            ``ceil(c * tokens * top_k / n_experts)`` of a device's tokens.
        aux_loss_weight, z_loss_weight: weights of the load-balancing and router z losses.
        expert_activation: ``"swiglu"`` (gate, up, down: the default) or ``"gelu"`` (up,
            down) experts, shared experts alike. Recorded by :meth:`to_dict` only when not
            the default, so SwiGLU runs' ``config.json`` reads as before the choice existed.
    """

    n_experts: int = 0
    top_k: int = 2
    n_shared_experts: int = 0
    moe_every: int = 1
    moe_d_ff: int | None = None
    capacity_factor: float | None = None
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    expert_activation: Activation = "swiglu"

    def expert_problems(self) -> list[str]:
        """What is wrong with the MoE fields, one phrase each (empty: nothing)."""
        ints = [("n_experts", 0), ("top_k", 1), ("n_shared_experts", 0), ("moe_every", 1)]
        problems = [
            f"{name}={getattr(self, name)!r} must be an int >= {low}"
            for name, low in ints
            if not _is_int(getattr(self, name)) or getattr(self, name) < low
        ]
        if self.moe_d_ff is not None and (not _is_int(self.moe_d_ff) or self.moe_d_ff < 1):
            problems.append(f"moe_d_ff={self.moe_d_ff!r} must be a positive int or None")
        c = self.capacity_factor
        if c is not None and (not isinstance(c, int | float) or not math.isfinite(c) or c <= 0):
            problems.append(f"capacity_factor={c!r} must be None or a finite number > 0")
        for name in ("aux_loss_weight", "z_loss_weight"):
            w = getattr(self, name)
            if not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                problems.append(f"{name}={w!r} must be a finite number >= 0")
        if self.expert_activation not in ACTIVATIONS:
            problems.append(
                f"expert_activation={self.expert_activation!r} must be one of {ACTIVATIONS}"
            )
        if not problems and self.n_experts and self.top_k > self.n_experts:
            problems.append(
                f"top_k={self.top_k} exceeds n_experts={self.n_experts} (choose top_k <= n_experts)"
            )
        return problems

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (``type(cfg)(**cfg.to_dict())`` gives it back). A dense model
        records no expert fields: its ``config.json`` reads as before mixtures of experts
        existed, so runs saved then still resume."""
        values = dataclasses.asdict(self)
        if not self.n_experts:
            for field in dataclasses.fields(ExpertsConfig):
                del values[field.name]
        elif self.expert_activation == "swiglu":  # the default, and all there was before it
            del values["expert_activation"]
        return values

    def pipeline_problems(self, num_stages: int, /) -> list[str]:
        """A mixture of experts in a pipeline, refused (empty: dense, or no pipeline)."""
        if not self.n_experts or num_stages <= 1:
            return []
        return [
            f"a mixture of experts (n_experts={self.n_experts}) does not run in a pipeline yet "
            f"(its all-to-all region does not nest in the stages'); train it without pp"
        ]

    def is_moe_layer(self, layer: int, /) -> bool:
        """Whether block ``layer`` (0-based) has a MoE instead of a dense MLP."""
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0

    def moe_layers(self, n_layers: int, /) -> int:
        """How many of ``n_layers`` blocks are MoE blocks."""
        return n_layers // self.moe_every if self.n_experts else 0

    def expert_width(self, dense_d_ff: int, /) -> int:
        return self.moe_d_ff or dense_d_ff

    def expert_params(self, d_model: int, dense_d_ff: int, /) -> int:
        """Parameters (all matmul weights) of one expert: SwiGLU's gate, up and down, or
        GELU's up and down."""
        kernels = 3 if self.expert_activation == "swiglu" else 2
        return kernels * d_model * self.expert_width(dense_d_ff)

    def moe_params(self, d_model: int, dense_d_ff: int, /) -> tuple[int, int]:
        """(all, active per token) parameters of one MoE layer: router, experts, shared."""
        expert = self.expert_params(d_model, dense_d_ff)
        router, shared = d_model * self.n_experts, self.n_shared_experts * expert
        return router + self.n_experts * expert + shared, router + self.top_k * expert + shared


def make_moe(
    cfg: ExpertsConfig,
    d_model: int,
    dense_d_ff: int,
    *,
    mode: Mode,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> MoE:
    """The :class:`~jmp.layers.MoE` of a MoE block of ``cfg``."""
    return MoE(
        d_model,
        cfg.expert_width(dense_d_ff),
        n_experts=cfg.n_experts,
        top_k=cfg.top_k,
        n_shared_experts=cfg.n_shared_experts,
        capacity_factor=cfg.capacity_factor,
        activation=cfg.expert_activation,
        aux_loss_weight=cfg.aux_loss_weight,
        z_loss_weight=cfg.z_loss_weight,
        mode=mode,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
