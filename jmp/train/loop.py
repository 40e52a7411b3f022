"""jmp's models on token text, trained by :func:`jmp.fit` (what ``jmp train`` runs).

A GPT starts from a seeded initialization (:func:`build_model`); any other start, e.g. the
sharded :class:`~jmp.models.Llama` of a Hugging Face folder (``jmp train --init hf:PATH``,
:func:`jmp.hf.load`), is passed as ``start=`` and training continues from its values. Either
way the batches are windows of ``data``'s token ids (bytes, or the ids of a tokenizer), batch k a
pure function of (seed, k), and a ``stage`` mesh axis pipelines the blocks.

Example:
    >>> result = run_training(GPTConfig.named("tiny"), TrainConfig(steps=3, eval_every=3),
    ...                       mesh, rules, TextData.from_tokens(np.arange(5000) % 256))
    >>> [r["step"] for r in result.history]
    [1, 2, 3]
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from flax import nnx
from jax.sharding import Mesh

from jmp.errors import ConfigError
from jmp.models.gpt import GPT, GPTConfig
from jmp.models.llama import LlamaConfig
from jmp.rules import Rules
from jmp.sharding import abstract_shardings, shard_init
from jmp.train.data import TextData
from jmp.train.progress import plot_losses
from jmp.train.step import (
    TrainConfig,
    check_batch,
    lr_schedule,
    make_optimizer,
    next_token_loss,
)
from jmp.train.trainer import FitResult, NonFiniteError, fit

if TYPE_CHECKING:  # jmp.pipeline is imported only when a mesh has a 'stage' axis
    from jmp.pipeline import ScheduleName
    from jmp.train.data.loader import Loader

#: the result of run_training: .model is a GPT (PipelinedGPT on 'stage'), or the trained start
RunResult = FitResult
__all__ = ["NonFiniteError", "RunResult", "build_model", "plot_losses", "run_training"]


def run_training(
    model_cfg: GPTConfig | LlamaConfig,
    cfg: TrainConfig,
    mesh: Mesh,
    rules: Rules,
    data: TextData | Loader,
    /,
    *,
    start: nnx.Module | None = None,
    out_dir: str | None = None,
    console: Any = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    skip_nonfinite: bool = False,
    meta: dict[str, Any] | None = None,
    schedule: ScheduleName = "1f1b",
    overwrite: bool = False,
    show_params: bool = False,
    tensorboard: bool = False,
    profile: tuple[int, int] | None = None,
) -> RunResult:
    """Train a GPT, or ``start``; write ``metrics.jsonl``, ``loss.png`` and checkpoints under
    ``out_dir``.

    ``start`` is a model already sharded on ``mesh`` whose values are the start (the
    :class:`~jmp.models.Llama` of :func:`jmp.hf.load`, its blocks laid out for the mesh's
    stages); ``model_cfg`` is then its config.

    ``data`` is token text (:class:`~jmp.train.data.TextData`: windows, with a validation
    split) or a prepared corpus's :class:`~jmp.train.data.Loader` (packed documents: segment
    ids, restarting positions and a loss mask reach the model; a corpus has no validation split,
    so no ``val_loss``). With ``resume``, the latest checkpoint in ``out_dir`` is restored onto
    ``mesh`` (any mesh or strategy) and training continues from its step with the very batches
    it would have seen (for a corpus: its loader's order, a function of the seed and the step).
    A mesh with a ``stage`` axis pipelines the blocks over it (``schedule``: '1f1b' or 'gpipe',
    ``cfg.microbatches`` microbatches).
    """
    check_batch(cfg.batch_size, cfg.microbatches, mesh, rules)
    make_model, loss_fn, eval_loss_fn, microbatches = _parts(model_cfg, cfg, mesh, schedule, start)
    from jmp.train.data.loader import Loader  # grain: loaded by the runs that use it

    if isinstance(data, Loader):  # a prepared corpus: packed documents, no validation split
        data.check(seq_len=model_cfg.seq_len, vocab_size=model_cfg.vocab_size)
        batches: Any = data.device_batches if data.sharding is not None else data.batches
        eval_batches = None
    else:
        data.check(model_cfg.seq_len, model_cfg.vocab_size)
        batches, eval_batches = _text_batches(data, model_cfg, cfg, mesh, rules)
    return fit(
        make_model,
        loss_fn,
        batches,
        mesh=mesh,
        rules=rules,
        optimizer=make_optimizer(cfg),
        steps=cfg.steps,
        out_dir=out_dir,
        resume=resume,
        checkpoint_every=checkpoint_every,
        seed=cfg.seed,
        microbatches=microbatches,
        eval_batches=eval_batches,
        num_eval_batches=cfg.eval_batches,
        eval_every=cfg.eval_every,
        eval_loss_fn=eval_loss_fn,
        skip_nonfinite=skip_nonfinite,
        overwrite=overwrite,
        show_params=show_params,
        progress=console or False,
        meta={"model": model_cfg.to_dict(), "train": cfg.to_dict(), **(meta or {})},
        schedule=lr_schedule(cfg),
        tokens_per_batch=cfg.batch_size * model_cfg.seq_len,
        tensorboard=tensorboard,
        profile=profile,
    )


def _text_batches(
    data: TextData, model_cfg: Any, cfg: TrainConfig, mesh: Mesh, rules: Rules
) -> tuple[Any, Any]:
    """(step -> train batch, i -> validation batch): windows of the text's token ids."""

    def batch(k: int, split: str = "train") -> Any:
        return data.batch(
            k,
            batch_size=cfg.batch_size,
            seq_len=model_cfg.seq_len,
            mesh=mesh,
            rules=rules,
            seed=cfg.seed,
            split=split,
        )

    return batch, lambda i: batch(i, "val")


def build_model(model_cfg: GPTConfig, mesh: Mesh, rules: Rules, *, seed: int) -> GPT:
    """A sharded GPT, or a PipelinedGPT when the mesh has a 'stage' axis of size > 1."""
    stages = mesh.shape.get("stage", 1)
    if stages == 1:
        return shard_init(lambda rngs: GPT(model_cfg, rngs=rngs), mesh, rules, seed=seed)
    from jmp.pipeline import PipelinedGPT

    return shard_init(
        lambda rngs: PipelinedGPT(model_cfg, num_stages=stages, rngs=rngs), mesh, rules, seed=seed
    )


def check_model(
    model_cfg: Any, cfg: TrainConfig, mesh: Mesh, rules: Rules, /, *, schedule: ScheduleName
) -> None:
    """Raise what building ``model_cfg``'s model on ``mesh`` would (a dim the mesh does not
    divide, experts the expert axis does not divide, ...), from abstract shapes: nothing is
    allocated. ``jmp train`` calls it before it writes into a run folder."""
    check_batch(cfg.batch_size, cfg.microbatches, mesh, rules)
    abstract_shardings(_parts(model_cfg, cfg, mesh, schedule, None)[0], mesh, rules)


def _parts(
    model_cfg: Any, cfg: TrainConfig, mesh: Mesh, schedule: ScheduleName, start: Any
) -> tuple[Any, Any, Any, int]:
    """Factory (or start), train loss, eval loss and accumulation steps; 'stage' pipelines."""
    stages = mesh.shape.get("stage", 1)
    if start is not None and getattr(start, "num_stages", 1) != stages:
        raise ConfigError(
            f"The start model's blocks are laid out for {start.num_stages} pipeline stage(s), "
            f"but the mesh has stage={stages}. Fix: build it for this mesh (jmp.hf.load with "
            f"the same mesh and rules)."
        )
    if stages == 1:
        make = start if start is not None else (lambda rngs: GPT(model_cfg, rngs=rngs))
        # validation is the cross-entropy alone (a MoE's auxiliary losses only train)
        return make, next_token_loss, partial(next_token_loss, aux=False), cfg.microbatches
    from jmp.pipeline import PipelinedGPT, make_loss_fn

    def make_pipelined(rngs: nnx.Rngs) -> PipelinedGPT:
        return PipelinedGPT(model_cfg, num_stages=stages, rngs=rngs)

    # the pipeline splits the batch into cfg.microbatches itself: no accumulation around it
    return (
        start if start is not None else make_pipelined,
        make_loss_fn(mesh=mesh, num_microbatches=cfg.microbatches, schedule=schedule),
        make_loss_fn(mesh=mesh, num_microbatches=cfg.microbatches, schedule="gpipe"),
        1,
    )
