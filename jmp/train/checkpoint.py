"""Checkpoints on orbax: save a train state, restore it onto any mesh and strategy.

Each array is restored directly into its target sharding (orbax reads only the slices each
device needs), so a model saved on ``data=2,model=4`` loads on ``model=8`` without ever being
gathered on one device. Configs are saved beside the arrays as JSON.

Example:
    >>> import tempfile
    >>> step = jmp.train.make_step(model, optax.sgd(0.1), mesh, rules)
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), max_to_keep=3)
    >>> ckpt.save(1, step.init_state(), meta={"model": cfg.to_dict()})
    >>> ckpt.wait()
    >>> state = ckpt.restore(ckpt.latest_step(), target=step.abstract_state())
    >>> int(state.step), ckpt.meta(1)["model"]["n_layers"]
    (0, 2)
    >>> ckpt.close()
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from jmp.errors import JmpError


class CheckpointError(JmpError):
    """A checkpoint is missing, corrupt, or belongs to another model, or a save failed."""


class _OrbaxErrorFilter(logging.Filter):
    """Drop orbax's own ERROR logs (with tracebacks): :class:`Checkpointer` raises each failure
    as one :class:`CheckpointError` line instead. Also its "Waiting for previous save to
    complete took N seconds" warning: on a loaded machine a save can outlast the next
    ``checkpoint_every`` steps, the wait is correct, and the line would precede (and break)
    the one line that a failed save gives."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno >= logging.ERROR:
            return False
        return "Waiting for previous save to complete" not in record.getMessage()


def _from_orbax(tb: Any) -> bool:
    """Whether a traceback passes through orbax's code."""
    while tb is not None:
        if "/orbax/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _OrbaxTaskFilter(logging.Filter):
    """Drop asyncio's "Task exception was never retrieved" for orbax's read tasks that a
    failed restore abandoned (each with a traceback, after our one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and _from_orbax(exc.__traceback__))


def _quiet_closed_loop(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    # When a restore fails (a truncated file), tensorstore's reads still in flight finish later
    # and call back into orbax's closed asyncio loop: "RuntimeError: Event loop is closed",
    # printed as unraisable exceptions, several tracebacks after our one-line error; so do
    # orbax's read coroutines dropped with their error. Only those are dropped; every other
    # unraisable exception goes to the previous hook.
    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
            return
        # the same failed restore's other reads: orbax coroutines dropped with their error
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and "/orbax/" in tb.tb_frame.f_code.co_filename:
            return
        previous(unraisable)

    return hook


_QUIETED = False


def _quiet_orbax() -> None:
    global _QUIETED
    if not _QUIETED:
        logging.getLogger("absl").addFilter(_OrbaxErrorFilter())
        logging.getLogger("asyncio").addFilter(_OrbaxTaskFilter())
        sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
        _QUIETED = True


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
        _quiet_orbax()
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
        )

    def save(self, step: int, state: Any, *, meta: dict[str, Any]) -> None:
        """Start saving asynchronously (training goes on); :meth:`wait` to block.

        Raises:
            CheckpointError: this save, or an earlier one still in the background, failed.
        """
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )
        except Exception as err:
            raise self._save_failed(err) from None

    def check(self) -> None:
        """Raise :class:`CheckpointError` now if a save running in the background has failed.

        Cheap (no I/O): the trainer calls it every step, so a failed save stops the run at the
        next step rather than at the next save.
        """
        try:
            self.manager.check_for_errors()
        except Exception as err:
            raise self._save_failed(err) from None

    def wait(self) -> None:
        """Block until every save has finished; raise :class:`CheckpointError` if one failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as err:
            raise self._save_failed(err) from None

    def kept(self) -> str:
        """What is left on disk after a stop, in words (for the messages that stop a run)."""
        last = self.latest_step()
        if last is None:
            return "no checkpoint was written"
        return f"the last good checkpoint (step {last}) is kept"

    def _save_failed(self, err: Exception) -> CheckpointError:
        return CheckpointError(
            f"Saving a checkpoint into {self.directory!r} failed ({type(err).__name__}: "
            f"{err}); stopped, {self.kept()}. Fix: make that folder writable (permissions, free "
            f"space), then continue with --resume (resume=True)."
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def set_aside(self, step: int, into: str) -> str:
        """Move checkpoint ``step`` out of the way (into the folder ``into``); returns its path.

        For a checkpoint that does not restore: orbax never writes a step at or below its
        latest, so left in place it would block the saves of the steps redone after it.
        """
        os.makedirs(into, exist_ok=True)
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(into, str(step))
        os.replace(src, dst)
        self.manager.reload()
        return dst

    def all_steps(self) -> list[int]:
        """The committed checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

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
