"""The stacked model: :class:`PipelinedGPT`, a GPT whose blocks are stacked per pipeline stage.

:class:`PipelinedGPT` is :class:`jmp.models.gpt.GPT` with its blocks' parameters stacked as
``(stage, layers, ...)`` (logical names ``'stage'``, ``'layers'``), so the ``'stage'`` rule
shards them over the mesh's stage axis and each stage holds only its own blocks. The same seed
gives the same numbers as ``GPT``; :meth:`PipelinedGPT.from_gpt` / :meth:`PipelinedGPT.to_gpt`
and :func:`stack_params` / :func:`unstack_params` convert models, states and gradients between
the two layouts. Called directly it runs the blocks in order on one program: the reference the
pipeline is tested against, and what generation uses.

Stages hold equal block counts (``n_layers`` divisible by the number of stages): a stack needs
one shape. It is one :class:`~jmp.pipeline.stack.Pipelinable` model: the schedules in
:mod:`jmp.pipeline.run` call its ``embed_inputs``, its stacked ``blocks`` and ``head_loss`` piece
by piece, one stage at a time, as they do for any model built with
:func:`~jmp.pipeline.stack.stack_blocks`.

Example:
    >>> model = PipelinedGPT(GPTConfig.named("tiny", n_layers=4), num_stages=2,
    ...                      rngs=nnx.Rngs(0))
    >>> model.blocks.attn.qkv.shape[:2]      # (stage, layers)
    (2, 2)
    >>> gpt = model.to_gpt()                 # and back: PipelinedGPT.from_gpt(gpt, num_stages=2)
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from jmp.errors import ConfigError
from jmp.layers.remat import Remat
from jmp.losses import cross_entropy
from jmp.models.gpt import GPT, Block, GPTConfig
from jmp.pipeline.split import check_stages
from jmp.pipeline.stack import run_stack, stack_blocks, stack_states, unstack_states
from jmp.rules import Rules
from jmp.sharding import named_shardings


class PipelinedGPT(GPT):
    """:class:`~jmp.models.gpt.GPT` with its blocks' parameters stacked per pipeline stage.

    The embedding and output ends, ``embed_tokens`` and ``logits`` are GPT's own;
    ``embed_inputs`` and ``head_loss`` are the pipeline's view of them.

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
        self.blocks = stack_blocks(
            lambda r: Block(cfg, rngs=r), num_layers=cfg.n_layers, num_stages=num_stages, rngs=rngs
        )
        self._init_output(cfg, rngs)

    @property
    def blocks_per_stage(self) -> int:
        return self.cfg.n_layers // self.num_stages

    @property
    def remat(self) -> Remat:
        return self.cfg.remat

    def embed_inputs(self, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """The first stage's input: the embedded tokens of ``batch = (inputs, targets)``."""
        if isinstance(batch, dict):
            raise ConfigError(
                "A pipelined GPT takes (inputs, targets) batches; packed batches (a dict with "
                "segment_ids) are not supported under pp_* strategies: the stages pass one "
                "activation, not the segments. Fix: use a strategy without pp, or unpacked text."
            )
        return self.embed_tokens(batch[0])

    def head_loss(self, x: jax.Array, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Mean cross-entropy of the logits of ``x`` (the last stage's output) on the targets."""
        return cross_entropy(self.logits(x), batch[1], mode=self.cfg.mode)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``(batch, seq, vocab)``, the blocks run in order (no pipelining).

        Packed batches are refused: the stacked blocks run without segments (see
        :meth:`embed_inputs`).
        """
        if segment_ids is not None or positions is not None:
            raise ConfigError(
                "A pipelined GPT runs unpacked sequences; segment_ids/positions are not "
                "supported. Fix: use GPT for packed documents."
            )
        return self.logits(run_stack(self.blocks, self.embed_tokens(tokens), remat=self.cfg.remat))

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
    new["blocks"] = stack_states([state["blocks"][i] for i in range(n)], num_stages)
    return nnx.State(new)


def unstack_params(state: nnx.State, /) -> nnx.State:
    """The inverse of :func:`stack_params`: a :class:`PipelinedGPT`'s state in ``GPT``'s layout."""
    new = {k: v for k, v in state.items() if k != "blocks"}
    new["blocks"] = dict(enumerate(unstack_states(state["blocks"])))
    return nnx.State(new)
