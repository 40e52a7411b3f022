"""What a run leaves for other tools: TensorBoard scalars and a ``jax.profiler`` trace.

Example:
    >>> import tempfile
    >>> logdir = tempfile.mkdtemp()
    >>> board = TensorBoard(logdir)
    >>> board.write({"step": 1, "loss": 2.5, "mfu": 0.31})
    >>> board.close()
    >>> read_scalars(logdir)["loss"]
    [(1, 2.5)]
    >>> parse_window("3:5")
    (3, 5)
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax
import numpy as np

from jmp.errors import ConfigError
from jmp.train.speed import Clock


class TensorBoard:
    """Every number of each metrics row as a TensorBoard scalar (``tensorboardX`` event files)."""

    def __init__(self, logdir: str, /) -> None:
        from tensorboardX import SummaryWriter  # imported by runs that ask for it

        self.writer = SummaryWriter(logdir)

    def write(self, row: dict[str, float], /) -> None:
        step = int(row["step"])
        for name, value in row.items():
            if name == "step":
                continue
            if isinstance(value, list):  # e.g. expert_load[layer][expert]: one scalar each
                for index, x in np.ndenumerate(np.asarray(value)):
                    self.writer.add_scalar(f"{name}/{'.'.join(map(str, index))}", x, step)
            else:
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def read_scalars(logdir: str, /) -> dict[str, list[tuple[int, float]]]:
    """The scalars written under ``logdir``: name -> [(step, value)], read from the event files.

    An event file is a TFRecord stream (length, its CRC, an ``Event`` protobuf, its CRC);
    tensorboardX writes it and ships the ``Event`` message, not a reader.
    """
    import struct

    from tensorboardX.proto.event_pb2 import Event  # pyright: ignore[reportAttributeAccessIssue]

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = Event.FromString(f.read(length))
                f.read(4)  # the data's CRC
                for value in event.summary.value:
                    found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def parse_window(text: str, /) -> tuple[int, int]:
    """``"START:END"`` (steps, 1-based, inclusive) as ``(START, END)``, or a ConfigError."""
    start, sep, end = text.partition(":")
    if not (sep and start.strip().isdigit() and end.strip().isdigit()):
        raise ConfigError(f"profile window {text!r} is not START:END (e.g. 10:12).")
    window = int(start), int(end)
    check_window(window)
    return window


def check_window(window: tuple[int, int], /) -> None:
    start, end = window
    if not 1 <= start <= end:
        raise ConfigError(
            f"profile window {start}:{end} must have 1 <= START <= END (steps, 1-based)."
        )


class ProfileWindow:
    """A ``jax.profiler`` trace of steps START..END, written under ``logdir`` (Perfetto and
    TensorBoard's profile plugin open it)."""

    def __init__(self, window: tuple[int, int], logdir: str, /) -> None:
        check_window(window)
        self.start, self.end = window
        self.logdir, self.active = logdir, False

    def before(self, step: int) -> None:
        """Call before dispatching ``step`` (1-based)."""
        if step == self.start and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, state: Any) -> None:
        """Call once ``step``'s results are read; the trace ends after ``END``."""
        if self.active and step >= self.end:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


class RunLog:
    """Where each metrics row goes: ``metrics.jsonl``, TensorBoard, and the profiler window.

    With ``out_dir=None`` (no folder, or not process 0) it only keeps the clock.
    """

    def __init__(
        self, out_dir: str | None, /, *, tensorboard: bool, profile: tuple[int, int] | None
    ) -> None:
        self.clock = Clock()
        self.metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a") if out_dir else None  # noqa: SIM115
        self.board = (
            TensorBoard(os.path.join(out_dir, "tensorboard")) if out_dir and tensorboard else None
        )
        self.profile = (
            ProfileWindow(profile, os.path.join(out_dir, "profile"))
            if out_dir and profile
            else None
        )

    def said_peak(self, console: Any, speed: Any) -> None:
        from jmp.train.progress import say

        if console is not None and speed.peak is not None:
            say(console, f"MFU: model FLOPs / {speed.peak.source}")

    def before(self, step: int) -> None:
        if self.profile:
            self.profile.before(step)

    def write(self, row: dict[str, float], state: Any) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        if self.board:
            self.board.write(row)
        if self.profile:
            self.profile.after(int(row["step"]), state)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.board:
            self.board.close()
        if self.profile:
            self.profile.stop()
