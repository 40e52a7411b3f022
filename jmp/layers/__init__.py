"""Tensor-parallel Flax NNX layers (Megatron-style), each parameter named by logical axes.

The core is the row-parallel product **y = sum_i W_i x_i + b**: device i holds the block W_i of
rows of W and the matching block x_i of the input's features, multiplies them locally, one psum
over the tensor-parallel mesh axis joins the partial sums, and the bias is added once after it.
A column-parallel layer splits W by output features instead and needs no communication.

Every layer has modes (:data:`jmp.strategies.MODES`) that must give the same numbers:

- ``mode="manual"``: the psum is written out with ``jax.shard_map`` (partial-manual over the
  tensor axis only, so data axes stay with the compiler).
- ``mode="auto"``: only sharding annotations; XLA's partitioner inserts the all-reduce.
- ``mode="collective"``: manual, and under sequence parallelism (``sp``) the all-gather before
  a column-parallel matmul and the reduce-scatter after a row-parallel one are collective
  matmuls: c - 1 ring steps (collective-permutes) interleaved with the c partial products, so
  a GPU overlaps the transfers with the compute. Without ``sp`` it is ``manual``.

Under ``sp`` the sequence collectives are explicit in every mode (XLA:CPU's partitioner,
given only annotations, all-reduces and slices where a reduce-scatter belongs).

The tensor axis is not a layer argument: it is whatever mesh axis the current rules map the
split dimension to (``'mlp'`` -> ``'model'`` under ``tp``; -> nothing under ``dp``). Outside
:func:`jmp.activate`, layers compute the dense product: the single-device reference.

GPT's layers: :class:`ParallelAttention` (fused qkv, learned positions in the model),
:class:`ParallelMLP` (GELU). Llama's: :class:`GroupedQueryAttention` (rotary positions from
:mod:`~jmp.layers.rope`, kv heads shared by groups of query heads, sliding window, packed
documents), :class:`GatedMLP` (SwiGLU); both use :class:`RMSNorm`.

Example (the seed model, ``Linear(10,10) -> ReLU -> Linear(10,1)``, tensor-parallel):
    >>> class Seed(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.up = ColumnParallelLinear(10, 8, rngs=rngs)
    ...         self.down = RowParallelLinear(8, 1, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.down(jax.nn.relu(self.up(x)))
"""

from jmp.layers.attention import GroupedQueryAttention, ParallelAttention, kv_heads_name
from jmp.layers.base import (
    Initializer,
    Mode,
    default_embedding_init,
    default_kernel_init,
    named_param,
)
from jmp.layers.context_parallel import CP_IMPLS, CpImpl
from jmp.layers.embed import ParallelEmbed
from jmp.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    column_parallel_matmul,
    row_parallel_matmul,
)
from jmp.layers.mlp import GatedMLP, ParallelMLP
from jmp.layers.moe import MoE, MoEAux, aux_metrics, captured_aux
from jmp.layers.norm import RMSNorm
from jmp.layers.rope import RopeScaling, apply_rope, inverse_frequencies, rope_cos_sin

__all__ = [
    "CP_IMPLS",
    "CpImpl",
    "ColumnParallelLinear",
    "GatedMLP",
    "GroupedQueryAttention",
    "Initializer",
    "Mode",
    "MoE",
    "MoEAux",
    "ParallelAttention",
    "ParallelEmbed",
    "ParallelMLP",
    "RMSNorm",
    "RopeScaling",
    "RowParallelLinear",
    "apply_rope",
    "aux_metrics",
    "captured_aux",
    "column_parallel_matmul",
    "default_embedding_init",
    "default_kernel_init",
    "inverse_frequencies",
    "kv_heads_name",
    "named_param",
    "rope_cos_sin",
    "row_parallel_matmul",
]
