"""Checkpoints on orbax: save a train state, restore it onto any mesh and strategy.

Each array is restored directly into its target sharding (orbax reads only the slices each
device needs), so a model saved on ``data=2,model=4`` loads on ``model=8`` without ever being
gathered on one device. Configs are saved beside the arrays as JSON.

Example:
    >>> ckpt = Checkpointer("/abs/path/runs/x/checkpoints", max_to_keep=3)
    >>> ckpt.save(step, state, meta={"model": cfg.to_dict()})
    >>> state = ckpt.restore(ckpt.latest_step(), target=abstract_state)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jmp.errors import JmpError


class CheckpointError(JmpError):
    """A checkpoint is missing, corrupt, or belongs to another model."""


def abstract_like(tree: Any, shardings: Any) -> Any:
    """A tree of ``jax.ShapeDtypeStruct`` with ``shardings``: the restore target."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpointer:
    """Save and restore (state, meta) pairs under ``directory`` with orbax's manager."""

    def __init__(self, directory: str, /, *, max_to_keep: int = 3, create: bool = True) -> None:
        directory = os.path.abspath(directory)  # orbax needs absolute paths
        if not create and not os.path.isdir(directory):
            raise CheckpointError(
                f"Checkpoint folder {directory!r} does not exist. Fix: check "
                f"the run folder, or train without --resume first."
            )
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
        )

    def save(self, step: int, state: Any, *, meta: dict[str, Any]) -> None:
        """Start saving asynchronously (training goes on); :meth:`wait` to block."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, step: int) -> dict[str, Any]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types for unreadable files
            raise CheckpointError(
                f"Cannot read the configs of checkpoint step {step} in {self.directory!r}: {err}"
            ) from None
        return dict(out["meta"])

    def restore(self, step: int, *, target: Any) -> Any:
        """Restore the state of ``step`` into ``target``'s shapes, dtypes and shardings."""
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except Exception as err:
            raise CheckpointError(
                f"Cannot restore checkpoint step {step} from "
                f"{self.directory!r}: {type(err).__name__}: {err}"
            ) from None
        return out["state"]

    def restore_params(self, step: int, *, target: Any) -> Any:
        """Only the parameters of ``step`` (no optimizer state is read or allocated).

        ``target`` is the abstract parameters (shapes, dtypes, shardings), e.g.
        ``step.abstract_state().params``; what sampling or evaluation needs.
        """
        item = {"params": target}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=item, restore_args=restore_args, partial_restore=True
                    )
                ),
            )
        except Exception as err:
            raise CheckpointError(
                f"Cannot restore the parameters of checkpoint step {step} from "
                f"{self.directory!r}: {type(err).__name__}: {err}"
            ) from None
        return out["state"]["params"]

    def close(self) -> None:
        self.manager.close()
