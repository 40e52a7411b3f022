"""The parameter arrays of jmp's GPT and how a strategy's rules lay them out on a mesh.

What every cost term starts from: :func:`param_arrays` lists the arrays ``GPT(cfg)`` creates
(path, shape, logical names, role), and ``_layouts`` resolves them strictly with jmp's own rules
(as ``shard_init`` would), keeping for each dimension the mesh axes of size > 1 that split it.

Example:
    >>> [a.path for a in param_arrays(GPTConfig.named("tiny"))][:3]
    ['embed/embedding', 'position', 'blocks/0/norm1/scale']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from jax.sharding import AbstractMesh

from jmp.models.gpt import GPTConfig
from jmp.rules import Rules, raise_problems, resolve


class ParamArray(NamedTuple):
    """One parameter array of :class:`~jmp.models.gpt.GPT`: path as ``nnx.state`` names it."""

    path: str
    shape: tuple[int, ...]
    names: tuple[str | None, ...]
    role: str  # embedding, position, norm, qkv, out, out_bias, up, up_bias, down, down_bias, head
    layer: int | None = None


def param_arrays(cfg: GPTConfig, /) -> list[ParamArray]:
    """The parameter arrays of ``GPT(cfg)``: shapes and logical names as the model creates them."""
    d, h, k, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab_size
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
        ]
        out += _moe_arrays(cfg, p, i) if cfg.is_moe_layer(i) else _mlp_arrays(cfg, p, i)
    return out + [
        ParamArray("norm/scale", (d,), ("embed",), "norm"),
        ParamArray("head/kernel", (d, v), ("embed", "vocab"), "head"),
    ]


def _mlp_arrays(cfg: GPTConfig, p: str, i: int) -> list[ParamArray]:
    d, f = cfg.d_model, cfg.hidden
    return [
        ParamArray(p + "mlp/up/kernel", (d, f), ("embed", "mlp"), "up", i),
        ParamArray(p + "mlp/up/bias", (f,), ("mlp",), "up_bias", i),
        ParamArray(p + "mlp/down/kernel", (f, d), ("mlp", "embed"), "down", i),
        ParamArray(p + "mlp/down/bias", (d,), ("embed",), "down_bias", i),
    ]


def _moe_arrays(cfg: GPTConfig, p: str, i: int) -> list[ParamArray]:
    """A MoE block's MLP (:class:`jmp.layers.MoE`): router, routed experts, shared experts."""
    d, e, f = cfg.d_model, cfg.n_experts, cfg.expert_width(cfg.hidden)
    out = [
        ParamArray(p + "mlp/router", (d, e), ("embed", None), "router", i),
        ParamArray(p + "mlp/gate", (e, d, f), ("expert", "embed", "mlp"), "expert", i),
        ParamArray(p + "mlp/up", (e, d, f), ("expert", "embed", "mlp"), "expert", i),
        ParamArray(p + "mlp/down", (e, f, d), ("expert", "mlp", "embed"), "expert", i),
    ]
    if cfg.n_shared_experts:
        s = f * cfg.n_shared_experts
        out += [
            ParamArray(p + "mlp/shared/gate/kernel", (d, s), ("embed", "mlp"), "shared", i),
            ParamArray(p + "mlp/shared/up/kernel", (d, s), ("embed", "mlp"), "shared", i),
            ParamArray(p + "mlp/shared/down/kernel", (s, d), ("mlp", "embed"), "shared", i),
        ]
    return out


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
