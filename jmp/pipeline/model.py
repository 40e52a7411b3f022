"""The stacked model: :class:`PipelinedGPT`, a GPT whose blocks are stacked per pipeline stage.

:class:`PipelinedGPT` is :class:`jmp.models.gpt.GPT` with its blocks' parameters stacked as
``(stage, layers, ...)`` (logical names ``'stage'``, ``'layers'``), so the ``'stage'`` rule
shards them over the mesh's stage axis and each stage holds only its own blocks. The same seed
gives the same numbers as ``GPT``; :meth:`PipelinedGPT.from_gpt` / :meth:`PipelinedGPT.to_gpt`
and :func:`stack_params` / :func:`unstack_params` convert models, states and gradients between
the two layouts. Called directly it runs the blocks in order on one program: the reference the
pipeline is tested against, and what generation uses.

Stages hold equal block counts (``n_layers`` divisible by the number of stages): a stack needs
one shape. The schedules in :mod:`jmp.pipeline.run` call :meth:`PipelinedGPT.embed_tokens`,
:func:`run_blocks` and :meth:`PipelinedGPT.head_loss` piece by piece, one stage at a time.

Example:
    >>> model = PipelinedGPT(GPTConfig.named("tiny", n_layers=4), num_stages=2,
    ...                      rngs=nnx.Rngs(0))
    >>> model.blocks.attn.qkv.shape[:2]      # (stage, layers)
    (2, 2)
    >>> gpt = model.to_gpt()                 # and back: PipelinedGPT.from_gpt(gpt, num_stages=2)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jmp import strategies
from jmp.errors import ConfigError
from jmp.losses import cross_entropy
from jmp.models.gpt import GPT, Block, GPTConfig
from jmp.pipeline.split import check_stages
from jmp.rules import Rules
from jmp.sharding import named_shardings

#: The mesh axis (and logical axis name) the stages are split over.
STAGE = strategies.STAGE_AXIS


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


class PipelinedGPT(GPT):
    """:class:`~jmp.models.gpt.GPT` with its blocks' parameters stacked per pipeline stage.

    The embedding and output ends, ``embed_tokens`` and ``logits`` are GPT's own.

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
        self.num_stages = num_stages
        self._init_embedding(cfg, rngs)
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
        graphdef = nnx.split(blocks[0])[0]
        self.blocks = nnx.merge(
            graphdef, _stack_states([nnx.split(b)[1] for b in blocks], num_stages)
        )
        self._init_output(cfg, rngs)

    @property
    def blocks_per_stage(self) -> int:
        return self.cfg.n_layers // self.num_stages

    def head_loss(self, x: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean cross-entropy of the logits of ``x``: the last stage's output."""
        return cross_entropy(self.logits(x), targets, mode=self.cfg.mode)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(batch, seq, vocab)``, the blocks run in order (no pipelining)."""
        graphdef, state = nnx.split(self.blocks)
        x = self.embed_tokens(tokens)
        for s in range(self.num_stages):
            x = run_blocks(
                graphdef, jax.tree.map(lambda a, s=s: a[s], state), x, remat=self.cfg.remat
            )
        return self.logits(x)

    @classmethod
    def from_gpt(
        cls, gpt: GPT, /, *, num_stages: int, mesh: Mesh | None = None, rules: Rules | None = None
    ) -> PipelinedGPT:
        """The same model with its blocks stacked into ``num_stages`` stages.

        With ``mesh`` and ``rules`` the parameters are placed on their shardings there (e.g.
        the pipeline mesh); otherwise they stay where ``jnp.stack`` puts them.
        """
        cfg = gpt.cfg
        abstract = nnx.eval_shape(lambda: cls(cfg, num_stages=num_stages, rngs=nnx.Rngs(0)))
        state = stack_params(nnx.state(gpt), num_stages)
        if (mesh is None) != (rules is None):
            raise ConfigError(
                "from_gpt places parameters with both mesh= and rules=, or "
                "neither; got only one. Fix: pass both."
            )
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
    new["blocks"] = {
        i: jax.tree.map(lambda v, i=i: one(v, i), state["blocks"], is_leaf=_is_var)
        for i in range(stages * per)
    }
    return nnx.State(new)


def run_blocks(
    graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, /, *, remat: bool = False
) -> jax.Array:
    """Apply blocks whose parameters are stacked on a leading ``layers`` dim, in order."""

    def one(layer: nnx.State, h: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, layer)(h)

    if remat:
        one = jax.checkpoint(one)
    return jax.lax.scan(lambda h, layer: (one(layer, h), None), x, state)[0]
