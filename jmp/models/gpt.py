"""A decoder-only transformer (GPT) built from jmp's tensor-parallel layers.

Vocabulary-parallel embedding and output head, pre-norm blocks of heads-parallel causal
attention and a column->row MLP. Under a tensor-parallel strategy a block costs the Megatron
count: 2 all-reduces over the model axis forward (attention output, MLP output) and 2 backward
(the inputs' gradients of the fused qkv and the MLP up-projection).

Example:
    >>> cfg = GPTConfig.named("tiny")
    >>> model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules)
    >>> tokens = jnp.zeros((8, cfg.seq_len), jnp.int32)
    >>> with jmp.activate(mesh, rules):
    ...     logits = jax.jit(model)(tokens)     # (batch, seq, vocab), split over vocab
    >>> logits.shape, logits.sharding.spec
    ((8, 64, 256), P('data', None, 'model'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx

from jmp.context import constrain
from jmp.errors import ConfigError
from jmp.layers import (
    CP_IMPLS,
    ColumnParallelLinear,
    Mode,
    ParallelAttention,
    ParallelEmbed,
    ParallelMLP,
    RMSNorm,
    named_param,
)
from jmp.layers import context_parallel as cp
from jmp.layers.remat import Remat, checkpointed, normalize_remat, remat_problems
from jmp.models.experts import ExpertsConfig, make_moe
from jmp.strategies import MODES

MODEL_SIZES: dict[str, dict[str, Any]] = {
    # small enough for 8 simulated CPU devices on 2 cores
    "tiny": dict(d_model=64, n_layers=2, n_heads=8, seq_len=64),
    "small": dict(d_model=128, n_layers=4, n_heads=8, seq_len=128),
    "medium": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, vocab_size=1024, seq_len=128),
    # for planning (jmp plan): the GPT-3 family's shapes (Brown et al. 2020, table 2.1) with a
    # GPT-2 style vocabulary padded to a multiple of 128
    "1b": dict(d_model=2048, n_layers=24, n_heads=16, vocab_size=50304, seq_len=2048),
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, vocab_size=50304, seq_len=2048),
    "13b": dict(d_model=5120, n_layers=40, n_heads=40, vocab_size=50304, seq_len=2048),
    "70b": dict(d_model=8192, n_layers=80, n_heads=64, vocab_size=50304, seq_len=2048),
}

_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class GPTConfig(ExpertsConfig):
    """Sizes and numerics of a :class:`GPT`; validated on creation.

    A mixture of experts with ``n_experts > 0`` (the fields of
    :class:`~jmp.models.experts.ExpertsConfig`: ``top_k``, ``n_shared_experts``, ``moe_every``,
    ``moe_d_ff``, ``capacity_factor``, the two loss weights, ``expert_activation``): those
    blocks' MLPs are SwiGLU experts, or GELU ones with ``expert_activation='gelu'``.

    Attributes:
        dtype: compute dtype (``'bfloat16'`` on GPUs); parameters are kept in ``param_dtype``.
        remat: what each block keeps for the backward pass, one of
            :data:`jmp.layers.remat.REMAT_POLICIES` (``True`` is ``'full'``: recompute the
            block; ``False`` is ``'none'``).
        mode: how every parallel layer writes its collectives, one of
            :data:`jmp.strategies.MODES`.
        cp_impl: context-parallel attention, ``'ring'`` or ``'allgather'`` (used under ``cp``
            strategies: :mod:`jmp.layers.context_parallel`).
        cp_load_balance: under ``cp``, device i holds sequence chunks i and 2c-1-i (equal
            causal work); False: contiguous blocks.
    """

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None  # default 4 * d_model
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: Remat = False
    mode: Mode = "auto"
    cp_impl: cp.CpImpl = "ring"
    cp_load_balance: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "remat", normalize_remat(self.remat))
        problems = [
            f"{name}={getattr(self, name)!r} must be a positive int"
            for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            problems.append(f"d_ff={self.d_ff!r} must be a positive int or None")
        if not problems and self.d_model % self.n_heads:
            problems.append(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {_DTYPES}")
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r} must be one of {MODES}")
        if self.cp_impl not in CP_IMPLS:
            problems.append(f"cp_impl={self.cp_impl!r} must be one of {CP_IMPLS}")
        if not isinstance(self.cp_load_balance, bool):
            problems.append(f"cp_load_balance={self.cp_load_balance!r} must be True or False")
        problems += remat_problems(self.remat)
        problems += self.expert_problems()
        if problems:
            raise ConfigError("Invalid GPTConfig: " + "; ".join(problems) + ".")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.d_ff or 4 * self.d_model

    @classmethod
    def named(cls, name: str, /, **overrides: Any) -> GPTConfig:
        """A named size (``tiny``, ``small``, ``medium``, ``1b``, ``7b``, ...) with overrides."""
        if name not in MODEL_SIZES:
            raise ConfigError(f"Unknown model size {name!r}; known: {', '.join(MODEL_SIZES)}.")
        return cls(**{**MODEL_SIZES[name], **overrides})

    def num_params(self) -> int:
        """Parameter count (embeddings included; every expert of a mixture of experts)."""
        return self._count(active=False)

    def num_active_params(self) -> int:
        """Parameters one token uses: a MoE block counts its router, ``top_k`` routed experts
        and the shared ones (equals :meth:`num_params` for a dense model)."""
        return self._count(active=True)

    def _count(self, *, active: bool) -> int:
        d, f, v = self.d_model, self.hidden, self.vocab_size
        mlp = 2 * d * f + f + d
        block = 3 * d * d + d * d + d + mlp + 2 * d
        moe = self.moe_params(d, f)[1 if active else 0] - mlp  # a MoE block's instead of mlp
        blocks = self.n_layers * block + self.moe_layers(self.n_layers) * moe
        return v * d + self.seq_len * d + blocks + d + d * v


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); with ``moe`` the
    MLP is a mixture of experts."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, moe: bool = False) -> None:
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        mode: Mode = cfg.mode
        self.norm1 = RMSNorm(cfg.d_model, param_dtype=pdtype)
        self.attn = ParallelAttention(
            cfg.d_model,
            num_heads=cfg.n_heads,
            mode=mode,
            cp_impl=cfg.cp_impl,
            dtype=dtype,
            param_dtype=pdtype,
            rngs=rngs,
        )
        self.norm2 = RMSNorm(cfg.d_model, param_dtype=pdtype)
        self.mlp = (
            make_moe(
                cfg, cfg.d_model, cfg.hidden, mode=mode, dtype=dtype, param_dtype=pdtype, rngs=rngs
            )
            if moe
            else ParallelMLP(
                cfg.d_model, cfg.hidden, mode=mode, dtype=dtype, param_dtype=pdtype, rngs=rngs
            )
        )

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm1(x), segment_ids=segment_ids)
        y = cast(jax.Array, self.mlp(self.norm2(x)))  # a MoE sows its aux losses (nnx.capture)
        return constrain(x + y, ("batch", "seq", "embed"))


class GPT(nnx.Module):
    """Decoder-only transformer over byte (or any integer) tokens.

    Example:
        >>> model = GPT(GPTConfig.named("tiny"), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 64), jnp.int32)).shape
        (2, 64, 256)
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self._init_embedding(cfg, rngs)
        self.blocks = nnx.List(
            [Block(cfg, rngs=rngs, moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layers)]
        )
        self._init_output(cfg, rngs)

    # The two ends are shared with jmp.pipeline.PipelinedGPT, which stacks the blocks instead;
    # parameters are drawn in the same order (embedding, blocks, output), so one seed gives the
    # same values in both.
    def _init_embedding(self, cfg: GPTConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        mode: Mode = cfg.mode
        pdtype = jnp.dtype(cfg.param_dtype)
        self.embed = ParallelEmbed(
            cfg.vocab_size,
            cfg.d_model,
            mode=mode,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=pdtype,
            rngs=rngs,
        )
        self.position = named_param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.seq_len, cfg.d_model), pdtype),
            (None, "embed"),
        )

    def _init_output(self, cfg: GPTConfig, rngs: nnx.Rngs) -> None:
        mode: Mode = cfg.mode
        pdtype = jnp.dtype(cfg.param_dtype)
        self.norm = RMSNorm(cfg.d_model, param_dtype=pdtype)
        self.head = ColumnParallelLinear(
            cfg.d_model,
            cfg.vocab_size,
            use_bias=False,
            names=("embed", "vocab"),
            mode=mode,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=pdtype,
            kernel_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Token plus position embeddings ``(batch, seq, d_model)``.

        ``positions`` ``(batch, seq)`` (default ``0..seq-1``) restart per packed document.
        """
        seq = tokens.shape[-1]
        self._check_length(tokens)
        table = self.position[...].astype(jnp.dtype(self.cfg.dtype))
        # whole before the lookup (fsdp splits its embed dim over 'data', as the batch of the
        # positions: XLA's partitioner aborts on that gather inside a context-parallel region)
        table = constrain(table, (None, "embed")) if cp.current_region() else table
        if positions is None:  # inside a context-parallel region: the tokens' true positions
            positions = cp.local_positions(tokens.shape[0])
        where = table[:seq] if positions is None else jnp.take(table, positions, axis=0)
        x = self.embed(tokens) + where
        return constrain(x, ("batch", "seq", "embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and head: ``(batch, seq, vocab)``, split over the vocabulary under tp."""
        return self.head(self.norm(x))

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``(batch, seq, vocab)`` (split over the vocabulary under tp).

        For packed documents (:mod:`jmp.train.data`'s batches): ``segment_ids`` ``(batch,
        seq)``, so no token attends across a document boundary, and ``positions``, restarting
        at 0 in each document. Under a ``cp`` strategy the whole forward runs with the sequence
        split over the context axis (:func:`jmp.layers.context_parallel.run_sharded`).
        """
        self._check_length(tokens)
        return cp.logits(  # the sequence split over 'context' under a cp strategy
            self,
            tokens,
            segment_ids=segment_ids,
            positions=positions,
            balanced=self.cfg.cp_load_balance,
        )

    def _check_length(self, tokens: jax.Array) -> None:
        if tokens.shape[-1] > self.cfg.seq_len:
            raise ConfigError(
                f"sequence of {tokens.shape[-1]} tokens exceeds the model's "
                f"seq_len={self.cfg.seq_len}."
            )

    def hidden(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Embeddings and every block: the final hidden state ``(batch, seq, d_model)``."""
        x = self.embed_tokens(tokens, positions)
        apply = checkpointed(
            lambda b, h: b(h, segment_ids=segment_ids), self.cfg.remat, module=True
        )
        for block in self.blocks:
            x = apply(block, x)
        return x
