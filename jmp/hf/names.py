"""The one table from Hugging Face tensor names to jmp's Llama parameters, and its transforms.

HF stores a linear layer's weight as ``(out, in)``; jmp's kernels are ``(in, out...)`` with the
head dims split out (``q_proj.weight (H*D, d)`` is ``q.kernel (d, H, D)``). Every entry says
that with one :data:`Layout`: jmp's dims (after the stacked layer dims) split into consecutive
groups, each group the row-major split of one HF dim. So a slice of the jmp parameter maps to a
slice of the HF tensor, which is all a sharded load reads (:func:`hf_index`, :func:`from_hf`),
and a jmp array becomes the HF tensor by merging each group and reordering (:func:`to_hf`).
RoPE uses HF's ``rotate_half`` layout, so no row permutation is needed (see
``/work/prompts/llama_contract.md``).

A mixture of experts (Mixtral) stacks its experts on a leading ``expert`` dim that HF keeps in
one of two layouts. The Hub's (what ``save_pretrained`` writes, transformers 4 and 5) is one
tensor per expert, ``block_sparse_moe.experts.{j}.w1.weight``: an entry whose name has ``{j}``
maps each expert's slice of the jmp parameter to its own tensor. Transformers 5's in-memory
layout (``save_pretrained(save_original_format=False)``) fuses them into 3-D tensors, gate and
up concatenated in ``mlp.experts.gate_up_proj``: an entry with a ``part`` is one of equal
chunks of an HF dim (:data:`FUSED_EXPERTS`, chosen by :func:`entries_for`).

Example:
    >>> entry = ENTRIES["blocks.attn.q.kernel"]        # q_proj.weight (H*D, d) -> (d, H, D)
    >>> entry.hf_name(3)
    'model.layers.3.self_attn.q_proj.weight'
    >>> hf_shape(entry, (64, 8, 8))
    (64, 64)
    >>> w = np.arange(64 * 64.0).reshape(64, 64)        # an HF weight, (out, in)
    >>> index = (slice(0, 64), slice(2, 4), slice(0, 8))  # heads 2-3: what one tp shard holds
    >>> block = from_hf(entry, lambda s: w[s], index, (64, 8, 8))
    >>> np.array_equal(block, w.T.reshape(64, 8, 8)[index])
    True
    >>> np.array_equal(to_hf(entry, w.T.reshape(64, 8, 8)), w)
    True
    >>> up = FUSED_EXPERTS["blocks.mlp.up"]     # the second half of gate_up_proj (E, 2F, d)
    >>> hf_shape(up, (4, 64, 32)), hf_index(up, (slice(0, 2), slice(0, 64), slice(0, 32)),
    ...                                       (4, 64, 32))[1]
    ((4, 64, 64), slice(32, 64, None))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

#: For each HF dim, in jmp's dim order: (which HF dim, how many jmp dims it splits into).
Layout = tuple[tuple[int, int], ...]

#: The stacked block's parameters start with this path (they carry the layer dims).
BLOCKS = "blocks."

_SAME: Layout = ((0, 1), (1, 1))  # (V, d) as is
_LINEAR: Layout = ((1, 1), (0, 1))  # (out, in) -> (in, out)
_IN_HEADS: Layout = ((1, 1), (0, 2))  # (H*D, d) -> (d, H, D)
_OUT_HEADS: Layout = ((1, 2), (0, 1))  # (d, H*D) -> (H, D, d)
_VECTOR: Layout = ((0, 1),)
_HEAD_BIAS: Layout = ((0, 2),)  # (H*D,) -> (H, D)
_FUSED: Layout = ((0, 1), (2, 1), (1, 1))  # (E, out, in) -> (E, in, out)

#: (HF dim, k, n): the parameter is the k-th of n equal chunks of that HF dim.
Part = tuple[int, int, int]


@dataclass(frozen=True)
class Entry:
    """One jmp parameter path and the HF tensor(s) it is made of."""

    path: str  # jmp's nnx state path, joined by '.'
    hf: str  # the HF name; '{i}' the layer index (stacked blocks), '{j}' the expert index
    layout: Layout  # of one HF tensor: for a per-expert entry, one expert's (no expert dim)
    part: Part | None = None  # a chunk of a fused HF tensor (gate and up in gate_up_proj)

    @property
    def per_layer(self) -> bool:
        return self.path.startswith(BLOCKS)

    @property
    def per_expert(self) -> bool:
        """One HF tensor per expert: the jmp parameter's first per-layer dim is the expert."""
        return "{j}" in self.hf

    def hf_name(self, layer: int | None = None, expert: int | None = None) -> str:
        return self.hf.format(i=layer, j=expert)


_LAYER = "model.layers.{i}."
_MOE = _LAYER + "block_sparse_moe."
ENTRIES: Mapping[str, Entry] = {
    e.path: e
    for e in (
        Entry("embed.embedding", "model.embed_tokens.weight", _SAME),
        Entry("blocks.attn_norm.scale", _LAYER + "input_layernorm.weight", _VECTOR),
        Entry("blocks.attn.q.kernel", _LAYER + "self_attn.q_proj.weight", _IN_HEADS),
        Entry("blocks.attn.k.kernel", _LAYER + "self_attn.k_proj.weight", _IN_HEADS),
        Entry("blocks.attn.v.kernel", _LAYER + "self_attn.v_proj.weight", _IN_HEADS),
        Entry("blocks.attn.q.bias", _LAYER + "self_attn.q_proj.bias", _HEAD_BIAS),
        Entry("blocks.attn.k.bias", _LAYER + "self_attn.k_proj.bias", _HEAD_BIAS),
        Entry("blocks.attn.v.bias", _LAYER + "self_attn.v_proj.bias", _HEAD_BIAS),
        Entry("blocks.attn.o.kernel", _LAYER + "self_attn.o_proj.weight", _OUT_HEADS),
        Entry("blocks.mlp_norm.scale", _LAYER + "post_attention_layernorm.weight", _VECTOR),
        Entry("blocks.mlp.gate.kernel", _LAYER + "mlp.gate_proj.weight", _LINEAR),
        Entry("blocks.mlp.up.kernel", _LAYER + "mlp.up_proj.weight", _LINEAR),
        Entry("blocks.mlp.down.kernel", _LAYER + "mlp.down_proj.weight", _LINEAR),
        Entry("norm.scale", "model.norm.weight", _VECTOR),
        Entry("head.kernel", "lm_head.weight", _LINEAR),
        # Mixtral's router and experts (the Hub layout): jmp's MoE on every block
        Entry("blocks.mlp.router", _MOE + "gate.weight", _LINEAR),  # (E, d) -> (d, E)
        Entry("blocks.mlp.gate", _MOE + "experts.{j}.w1.weight", _LINEAR),  # (F, d) -> (d, F)
        Entry("blocks.mlp.up", _MOE + "experts.{j}.w3.weight", _LINEAR),
        Entry("blocks.mlp.down", _MOE + "experts.{j}.w2.weight", _LINEAR),  # (d, F) -> (F, d)
    )
}

#: Transformers 5's fused expert tensors, for the same jmp parameters: the router renamed,
#: ``gate_up_proj (E, 2F, d)`` (w1 then w3 along dim 1) and ``down_proj (E, d, F)``.
FUSED_EXPERTS: Mapping[str, Entry] = {
    e.path: e
    for e in (
        Entry("blocks.mlp.router", _LAYER + "mlp.gate.weight", _LINEAR),
        Entry("blocks.mlp.gate", _LAYER + "mlp.experts.gate_up_proj", _FUSED, part=(1, 0, 2)),
        Entry("blocks.mlp.up", _LAYER + "mlp.experts.gate_up_proj", _FUSED, part=(1, 1, 2)),
        Entry("blocks.mlp.down", _LAYER + "mlp.experts.down_proj", _FUSED),
    )
}


def entries_for(tensor_names: Iterable[str], /) -> Mapping[str, Entry]:
    """The table for a checkpoint: :data:`ENTRIES`, with :data:`FUSED_EXPERTS` for the experts
    when the checkpoint holds fused ``gate_up_proj`` tensors."""
    if any(n.endswith(".mlp.experts.gate_up_proj") for n in tensor_names):
        return {**ENTRIES, **FUSED_EXPERTS}
    return ENTRIES


#: HF tensors that carry no weight jmp needs: old checkpoints store RoPE's inverse
#: frequencies as a buffer (jmp computes them from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

#: Read an HF tensor's slice: ``read(tuple of slices) -> np.ndarray``.
Reader = Callable[[tuple[slice, ...]], np.ndarray]


def _groups(layout: Layout) -> list[tuple[int, int, int]]:
    """(hf dim, first jmp dim, jmp dim count) per group."""
    out, start = [], 0
    for hf_dim, count in layout:
        out.append((hf_dim, start, count))
        start += count
    return out


def hf_shape(entry: Entry, shape: tuple[int, ...], /) -> tuple[int, ...]:
    """The HF tensor's shape for a jmp parameter of ``shape`` (one layer's, no layer dims)."""
    dims = [0] * len(entry.layout)
    for hf_dim, start, count in _groups(entry.layout):
        dims[hf_dim] = math.prod(shape[start : start + count])
    if entry.part is not None:
        hf_dim, _, n = entry.part
        dims[hf_dim] *= n
    return tuple(dims)


def hf_index(
    entry: Entry, index: tuple[slice, ...], shape: tuple[int, ...], /
) -> tuple[slice, ...]:
    """The HF slice holding the jmp block ``index`` (contiguous slices of one layer's shape).

    Within a group only the first jmp dim's range is exact; a sliced inner dim (a split
    head_dim, which no strategy makes) reads the whole rows and :func:`from_hf` cuts them.
    """
    out = [slice(None)] * len(entry.layout)
    for hf_dim, start, count in _groups(entry.layout):
        inner = math.prod(shape[start + 1 : start + count])
        first = index[start]
        offset = 0
        if entry.part is not None and entry.part[0] == hf_dim:  # the k-th chunk of that dim
            offset = entry.part[1] * math.prod(shape[start : start + count])
        out[hf_dim] = slice(offset + first.start * inner, offset + first.stop * inner)
    return tuple(out)


def from_hf(
    entry: Entry, read: Reader, index: tuple[slice, ...], shape: tuple[int, ...], /
) -> np.ndarray:
    """The jmp block ``index`` of one layer's parameter of ``shape``, read from the HF tensor.

    ``index`` holds contiguous slices with explicit start and stop (``slice.indices``).
    """
    block = read(hf_index(entry, index, shape))
    groups = _groups(entry.layout)
    block = block.transpose([hf_dim for hf_dim, _, _ in groups])  # HF dims into jmp's order
    split: list[int] = []
    for _, start, count in groups:
        split += [index[start].stop - index[start].start, *shape[start + 1 : start + count]]
    inner = tuple(
        slice(None) if d == start else index[d]
        for _, start, count in groups
        for d in range(start, start + count)
    )
    return np.ascontiguousarray(block.reshape(split)[inner])


def to_hf(entry: Entry, value: np.ndarray, /) -> np.ndarray:
    """One layer's whole jmp parameter as the HF tensor (the inverse of :func:`from_hf`); for a
    ``part`` entry, its chunk of the fused tensor."""
    groups = _groups(entry.layout)
    merged = value.reshape([math.prod(value.shape[s : s + c]) for _, s, c in groups])
    order = np.argsort([hf_dim for hf_dim, _, _ in groups])  # jmp's group order -> HF dims
    return np.ascontiguousarray(merged.transpose(order))
