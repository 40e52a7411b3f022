"""The Llama decoder (Llama 2/3, Mistral, Qwen2) from jmp's tensor-parallel layers.

Pre-norm blocks of grouped-query attention with rotary positions and a SwiGLU MLP, RMSNorm, a
vocabulary-parallel embedding and head (or the embedding reused as the head, tied). Parameter
paths, shapes and logical names follow Hugging Face's layout closely enough that its weights
load by transposes and reshapes only (``jmp.hf``): ``q.kernel (embed, heads, kv)``, RoPE in the
``rotate_half`` layout, and so on.

The blocks are one module whose parameters are stacked on a leading ``'layers'`` dim and run
by one ``jax.lax.scan``: the compiled program holds one block however deep the model, so
compile time does not grow with depth. With ``num_stages > 1`` the stack is
``(stage, layers, ...)``, the layout of :mod:`jmp.pipeline.stack`, and the model is
:class:`~jmp.pipeline.stack.Pipelinable` (``embed_inputs``, ``head_loss``, ``remat``): the
``pp_*`` strategies pipeline it. The same seed gives the same values in both layouts. Packed
batches (``segment_ids``, ``positions``) run outside pipelines: between stages the pipeline
passes one activation, and its blocks see the default positions.

Under a tensor-parallel strategy a block costs the Megatron count: 2 all-reduces over the model
axis forward (attention output, MLP output) and 2 backward (the inputs' gradients of the fused
q/k/v and gate/up projections).

Example:
    >>> cfg = LlamaConfig.named("tiny")
    >>> model = jmp.shard_init(lambda r: Llama(cfg, rngs=r), mesh, rules)
    >>> model.blocks.attn.k.kernel.shape                # (layers, embed, kv_heads, kv)
    (2, 64, 2, 8)
    >>> with jmp.activate(mesh, rules):                 # model=4 > 2 kv heads: k/v replicated
    ...     logits = jax.jit(model)(jnp.zeros((8, cfg.seq_len), jnp.int32))
    >>> logits.shape, model.blocks.attn.k.kernel.sharding.spec
    ((8, 64, 256), P())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from jmp.context import constrain, param_axis
from jmp.errors import ConfigError
from jmp.layers import (
    CP_IMPLS,
    ColumnParallelLinear,
    GatedMLP,
    GroupedQueryAttention,
    Mode,
    ParallelEmbed,
    RMSNorm,
    RopeScaling,
    column_parallel_matmul,
    kv_heads_name,
)
from jmp.layers import context_parallel as cp
from jmp.layers.base import activation_names
from jmp.layers.moe import MoE, MoEAux
from jmp.layers.remat import Remat, checkpointed, normalize_remat, remat_problems
from jmp.losses import cross_entropy
from jmp.models.experts import ExpertsConfig, make_moe
from jmp.pipeline.stack import STAGE, check_layers
from jmp.rules import Rules
from jmp.strategies import MODES

_LLAMA3_SCALING = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def _hf(vocab: int, hidden: int, layers: int, heads: int, kv: int, ff: int, **rest: Any) -> dict:
    """A shape in the order of config.json's vocab_size, hidden_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, intermediate_size."""
    sizes = dict(vocab_size=vocab, d_model=hidden, n_layers=layers, n_heads=heads)
    return {**sizes, "n_kv_heads": kv, "d_ff": ff, **rest}


#: Named sizes. The published ones are the values of each model's Hugging Face config.json,
#: written from memory of those files (not downloaded here); their parameter counts equal the
#: model cards' (tests/test_llama.py). ``seq_len`` is a training length, not HF's
#: max_position_embeddings.
# fmt: off
LLAMA_SIZES: dict[str, dict[str, Any]] = {
    # small enough for 8 simulated CPU devices on 2 cores (GQA: 8 query heads, 2 kv heads)
    "tiny": dict(d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=192, seq_len=64),
    "small": dict(d_model=128, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=384, seq_len=128),
    # meta-llama/Meta-Llama-3-8B: rope_theta 500000, rms_norm_eps 1e-5, context 8192, untied
    "llama3-8b": _hf(128256, 4096, 32, 32, 8, 14336, rope_theta=5e5, norm_eps=1e-5, seq_len=8192),
    # meta-llama/Llama-3.1-8B: the same, with rope_scaling {rope_type llama3, factor 8,
    # low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192}
    "llama3.1-8b": _hf(128256, 4096, 32, 32, 8, 14336, rope_theta=5e5, norm_eps=1e-5,
                       seq_len=8192, rope_scaling=_LLAMA3_SCALING),
    # meta-llama/Meta-Llama-3-70B: rope_theta 500000, rms_norm_eps 1e-5, untied
    "llama3-70b": _hf(128256, 8192, 80, 64, 8, 28672, rope_theta=5e5, norm_eps=1e-5, seq_len=8192),
    # mistralai/Mistral-7B-v0.1: rope_theta 10000, rms_norm_eps 1e-5, sliding_window 4096
    "mistral-7b": _hf(32000, 4096, 32, 32, 8, 14336, rope_theta=1e4, norm_eps=1e-5,
                      sliding_window=4096, seq_len=8192),
    # Qwen/Qwen2.5-7B: rope_theta 1000000, rms_norm_eps 1e-6, q/k/v biases (Qwen2),
    # use_sliding_window false, untied
    "qwen2.5-7b": _hf(152064, 3584, 28, 28, 4, 18944, rope_theta=1e6, norm_eps=1e-6,
                      qkv_bias=True, seq_len=4096),
    # mistralai/Mixtral-8x7B-v0.1: num_local_experts 8, num_experts_per_tok 2 (weights
    # renormalized), rope_theta 1e6, rms_norm_eps 1e-5, untied; 46.7B parameters, 12.9B active
    "mixtral-8x7b": _hf(32000, 4096, 32, 32, 8, 14336, rope_theta=1e6, norm_eps=1e-5,
                        seq_len=8192, n_experts=8, top_k=2),
    # Qwen/Qwen1.5-MoE-A2.7B, a fine-grained MoE with shared experts (DeepSeek-MoE's design):
    # 60 experts of moe_intermediate_size 1408, 4 per token, shared_expert_intermediate_size
    # 5632 (= 4 shared experts of 1408), q/k/v biases, rope_theta 1e6, rms_norm_eps 1e-6.
    # Shaped like it, not equal: jmp renormalizes the top-k weights (Qwen's norm_topk_prob is
    # false) and has no sigmoid gate on the shared experts (2048 parameters a layer)
    "qwen1.5-moe-a2.7b": _hf(151936, 2048, 24, 16, 16, 5632, rope_theta=1e6, norm_eps=1e-6,
                             qkv_bias=True, seq_len=4096, n_experts=60, top_k=4,
                             n_shared_experts=4, moe_d_ff=1408),
}
# fmt: on

_DTYPES = ("float32", "bfloat16", "float16", "float64")
_POSITIVE = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "seq_len")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class LlamaConfig(ExpertsConfig):
    """Sizes and numerics of a :class:`Llama`; validated on creation (every problem at once).

    With ``n_experts > 0`` every block's MLP is a mixture of experts, SwiGLU (Mixtral) unless
    ``expert_activation='gelu'`` (the fields of :class:`~jmp.models.experts.ExpertsConfig`).
    ``moe_every`` must be 1: the blocks are one scanned stack, so they are all alike.

    Attributes:
        d_model, n_layers, n_heads, n_kv_heads, d_ff: Hugging Face's ``hidden_size``,
            ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
            ``intermediate_size``; ``n_kv_heads`` divides ``n_heads``.
        head_dim: per-head size; None means ``d_model // n_heads``.
        seq_len: the training length (rotary positions have no table: longer inputs run).
        rope_theta, rope_scaling: RoPE base and optional Llama 3 scaling (a dict is accepted).
        norm_eps: RMSNorm epsilon (HF ``rms_norm_eps``).
        qkv_bias: biases on q, k and v (Qwen2); o never has one.
        tie_embeddings: the head is the embedding table transposed (no ``head`` parameter).
        sliding_window: Mistral's attention window (a token sees itself and ``w - 1`` before).
        dtype, param_dtype: compute and parameter dtypes.
        remat: what each block keeps for the backward pass, one of
            :data:`jmp.layers.remat.REMAT_POLICIES` (``True``: ``'full'``, ``False``: ``'none'``).
        mode: how every parallel layer writes its collectives, one of
            :data:`jmp.strategies.MODES`.
        cp_impl: context-parallel attention, ``'ring'`` or ``'allgather'`` (used under ``cp``
            strategies: :mod:`jmp.layers.context_parallel`).
        cp_load_balance: under ``cp``, device i holds sequence chunks i and 2c-1-i (equal
            causal work); False: contiguous blocks.

    Example:
        >>> LlamaConfig.named("llama3-8b").num_params() / 1e9
        8.030261248
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int = 192
    seq_len: int = 64
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: Remat = False
    mode: Mode = "auto"
    cp_impl: cp.CpImpl = "ring"
    cp_load_balance: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from to_dict() / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "remat", normalize_remat(self.remat))
        problems = self._problems()
        if problems:
            raise ConfigError("Invalid LlamaConfig: " + "; ".join(problems) + ".")

    def _problems(self) -> list[str]:
        problems = [
            f"{n}={getattr(self, n)!r} must be a positive int"
            for n in _POSITIVE
            if not _is_int(getattr(self, n)) or getattr(self, n) < 1
        ]
        if self.head_dim is not None and (not _is_int(self.head_dim) or self.head_dim < 1):
            problems.append(f"head_dim={self.head_dim!r} must be a positive int or None")
        if problems:
            return problems  # the checks below compare these numbers
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            problems.append(
                f"n_heads={self.n_heads} must divide d_model={self.d_model} (or give head_dim)"
            )
        elif self.head_size % 2:
            problems.append(f"the head dim {self.head_size} must be even (rotary pairs)")
        for name in ("rope_theta", "norm_eps"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                problems.append(f"{name}={v!r} must be a finite number > 0")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            problems.append(f"rope_scaling={self.rope_scaling!r} must be a RopeScaling or None")
        if self.sliding_window is not None and (
            not _is_int(self.sliding_window) or self.sliding_window < 1
        ):
            problems.append(f"sliding_window={self.sliding_window!r} must be a positive int")
        if self.cp_impl not in CP_IMPLS:
            problems.append(f"cp_impl={self.cp_impl!r} must be one of {CP_IMPLS}")
        for name in ("qkv_bias", "tie_embeddings", "cp_load_balance"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be True or False")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {_DTYPES}")
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r} must be one of {MODES}")
        problems += remat_problems(self.remat)
        problems += self.expert_problems()
        if self.n_experts and self.moe_every != 1:
            problems.append(
                f"moe_every={self.moe_every} must be 1 (Llama's blocks are one scanned stack, "
                f"all alike; jmp's GPT mixes dense and MoE blocks)"
            )
        return problems

    @property
    def head_size(self) -> int:
        """The head dim in use: ``head_dim``, or ``d_model // n_heads``."""
        return self.head_dim or self.d_model // self.n_heads

    @classmethod
    def named(cls, name: str, /, **overrides: Any) -> LlamaConfig:
        """A named size (see :data:`LLAMA_SIZES`) with some fields overridden."""
        if name not in LLAMA_SIZES:
            raise ConfigError(f"Unknown Llama size {name!r}; known: {', '.join(LLAMA_SIZES)}.")
        return cls(**{**LLAMA_SIZES[name], **overrides})

    def num_params(self) -> int:
        """Parameter count, embeddings (and the head unless tied) included; every expert."""
        return self._count(active=False)

    def num_active_params(self) -> int:
        """Parameters one token uses (a MoE counts its router, ``top_k`` routed experts and
        the shared ones; :meth:`num_params` for a dense model)."""
        return self._count(active=True)

    def _count(self, *, active: bool) -> int:
        d, f, v, D = self.d_model, self.d_ff, self.vocab_size, self.head_size
        H, K = self.n_heads, self.n_kv_heads
        attn = d * H * D * 2 + d * K * D * 2 + ((H + 2 * K) * D if self.qkv_bias else 0)
        mlp = self.moe_params(d, f)[1 if active else 0] if self.n_experts else 3 * d * f
        block = attn + mlp + 2 * d
        return v * d + self.n_layers * block + d + (0 if self.tie_embeddings else d * v)


class LlamaBlock(nnx.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``."""

    def __init__(self, cfg: LlamaConfig, *, split_kv_heads: bool, rngs: nnx.Rngs) -> None:
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype)
        self.attn = GroupedQueryAttention(
            cfg.d_model,
            num_heads=cfg.n_heads,
            num_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_size,
            qkv_bias=cfg.qkv_bias,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling,
            sliding_window=cfg.sliding_window,
            split_kv_heads=split_kv_heads,
            mode=cfg.mode,
            cp_impl=cfg.cp_impl,
            dtype=dtype,
            param_dtype=pdtype,
            rngs=rngs,
        )
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype)
        self.mlp: GatedMLP | MoE = (
            make_moe(
                cfg,
                cfg.d_model,
                cfg.d_ff,
                mode=cfg.mode,
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
            if cfg.n_experts
            else GatedMLP(
                cfg.d_model, cfg.d_ff, mode=cfg.mode, dtype=dtype, param_dtype=pdtype, rngs=rngs
            )
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        return self.with_aux(x, segment_ids=segment_ids, positions=positions)[0]

    def with_aux(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, MoEAux | None]:
        """The block's output, and its MoE's auxiliary losses (None for a dense MLP): blocks
        run inside a ``lax.scan``, where a module cannot sow, so the scan carries them out."""
        x = x + self.attn(self.attn_norm(x), segment_ids=segment_ids, positions=positions)
        aux = None
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(self.mlp_norm(x), return_aux=True)
        else:
            y = self.mlp(self.mlp_norm(x))
        return constrain(x + y, ("batch", "seq", "embed")), aux


def _stacked_blocks(
    cfg: LlamaConfig, rngs: nnx.Rngs, num_stages: int, split_kv_heads: bool
) -> nnx.Module:
    """``n_layers`` blocks as one module, parameters ``(layers, ...)`` or ``(stage, layers, ...)``.

    The blocks are initialized by one ``jax.vmap`` over per-layer keys (the init traces one
    block, whatever the depth), so both layouts hold the same values for the same seed.
    """

    def make(key: jax.Array) -> LlamaBlock:
        return LlamaBlock(cfg, split_kv_heads=split_kv_heads, rngs=nnx.Rngs(params=key))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(jax.random.key(0))))
    keys = jax.random.split(rngs.params(), cfg.n_layers)
    state = jax.vmap(lambda k: nnx.state(make(k)))(keys)
    lead = ("layers",) if num_stages == 1 else (STAGE, "layers")

    def restack(v: nnx.Variable) -> nnx.Variable:
        value = v.get_value()
        if num_stages > 1:
            value = value.reshape(num_stages, cfg.n_layers // num_stages, *value.shape[1:])
        return v.replace(value, out_sharding=lead + tuple(v.get_metadata()["out_sharding"]))

    state = jax.tree.map(restack, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


class Llama(nnx.Module):
    """Decoder-only Llama/Mistral/Qwen2 transformer; logits ``(batch, seq, vocab)``.

    Args:
        cfg: sizes and numerics.
        num_stages: 1 (blocks ``(layers, ...)``) or the pipeline's stage count (blocks
            ``(stage, layers, ...)``; ``n_layers`` divisible by it).
        mesh, rules: the mesh and rules the model will be sharded with, used only to decide
            whether the kv heads split over the tensor axis or are replicated
            (:func:`jmp.layers.kv_heads_name`); default: those active (``jmp.shard_init``
            builds the model with its mesh and rules active), else split.

    Example:
        >>> model = Llama(LlamaConfig.named("tiny"), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 16), jnp.int32)).shape
        (2, 16, 256)
    """

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        rngs: nnx.Rngs,
        num_stages: int = 1,
        mesh: Mesh | AbstractMesh | None = None,
        rules: Rules | None = None,
    ) -> None:
        problems = check_layers(cfg.n_layers, num_stages) + cfg.pipeline_problems(num_stages)
        if problems:
            raise ConfigError("Cannot build Llama: " + "; ".join(problems) + ".")
        self.cfg, self.num_stages = cfg, num_stages
        mode: Mode = cfg.mode
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        split_kv = kv_heads_name(cfg.n_kv_heads, mesh=mesh, rules=rules) is not None
        self.embed = ParallelEmbed(
            cfg.vocab_size,
            cfg.d_model,
            mode=mode,
            dtype=dtype,
            param_dtype=pdtype,
            rngs=rngs,
        )
        self.blocks = _stacked_blocks(cfg, rngs, num_stages, split_kv)
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype)
        self.head = (
            None
            if cfg.tie_embeddings
            else ColumnParallelLinear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                names=("embed", "vocab"),
                mode=mode,
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=nnx.initializers.normal(0.02),
                rngs=rngs,
            )
        )

    @property
    def remat(self) -> Remat:
        return self.cfg.remat

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings ``(batch, seq, d_model)``."""
        return constrain(self.embed(tokens), ("batch", "seq", "embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and head: ``(batch, seq, vocab)``, split over the vocabulary under tp."""
        h = self.norm(x)
        if self.head is not None:
            return self.head(h)
        # tied: the (vocab, embed) table is the head, a column-parallel product over 'vocab'
        table = self.embed.embedding[...].astype(h.dtype).T
        y = column_parallel_matmul(
            h, table, n_contract=1, axis=param_axis("vocab"), mode=self.cfg.mode
        )
        return constrain(y, activation_names(y.ndim, "vocab"))

    def run_blocks(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Every block in order: one ``lax.scan`` over the stacked parameters."""
        graphdef, state = nnx.split(self.blocks)
        lead = 1 if self.num_stages == 1 else 2  # (stage, layers) -> (layers,) to scan once
        state = jax.tree.map(lambda a: a.reshape(-1, *a.shape[lead:]), state)

        def apply(block: Any, h: jax.Array) -> tuple[jax.Array, MoEAux | None]:  # a LlamaBlock
            return block.with_aux(h, segment_ids=segment_ids, positions=positions)

        apply = checkpointed(apply, self.cfg.remat, module=True)

        def body(h: jax.Array, layer: nnx.State) -> tuple[jax.Array, MoEAux | None]:
            return apply(nnx.merge(graphdef, layer), h)

        x, aux = jax.lax.scan(body, x, state)
        if aux is not None and hasattr(self, "__captures__"):  # each field stacked (layers, ...)
            self.sow(nnx.Intermediate, "moe_aux", aux)
        return x

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``(batch, seq, vocab)`` of integer ``tokens (batch, seq)``.

        Args:
            segment_ids: ``(batch, seq)`` ints; tokens attend only within their segment
                (packed documents), causally.
            positions: ``(batch, seq)`` rotary positions (default ``0..seq-1``; restart them
                per packed document).

        Under a ``cp`` strategy the whole forward runs with the sequence split over the
        context axis (:func:`jmp.layers.context_parallel.run_sharded`).
        """
        for name, extra in (("segment_ids", segment_ids), ("positions", positions)):
            if extra is not None and tuple(extra.shape) != tuple(tokens.shape):
                raise ConfigError(
                    f"{name} has shape {tuple(extra.shape)} but tokens {tuple(tokens.shape)}. "
                    f"Fix: one {name[:-1] if name == 'positions' else 'segment id'} per token."
                )
        return cp.logits(  # the sequence split over 'context' under a cp strategy
            self,
            tokens,
            segment_ids=segment_ids,
            positions=positions,
            balanced=self.cfg.cp_load_balance,
        )

    def hidden(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Embeddings and every block: the final hidden state ``(batch, seq, d_model)``."""
        x = self.embed_tokens(tokens)
        return self.run_blocks(x, segment_ids=segment_ids, positions=positions)

    # the pipeline's view (jmp.pipeline.Pipelinable): first stage, blocks, last stage
    def embed_inputs(self, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """The first stage's input: the embedded tokens of ``batch = (inputs, targets)``."""
        return self.embed_tokens(batch[0])

    def head_loss(self, x: jax.Array, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Mean cross-entropy of the logits of ``x`` (the blocks' output) on the targets."""
        return cross_entropy(self.logits(x), batch[1], mode=self.cfg.mode)
