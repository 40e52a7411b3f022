"""What a training run shows and draws: the console, the progress bar, notes, the loss plot.

Kept apart from the loop (:mod:`jmp.train.trainer`) so that the loop reads as training only,
and so rich and matplotlib are imported when a run first shows something, not with jmp.

Example:
    >>> console = make_console(False)            # silent: fit(progress=False)
    >>> with ProgressBar(console, total=3, start=0) as advance:
    ...     advance({"loss": 1.0})
    >>> say(console, "a note")                   # no console: logged as a warning instead
"""

from __future__ import annotations

import logging
from typing import Any

from jmp.layers.moe import AUX_LOSS, DROPPED


def make_console(progress: Any) -> Any:
    """A ``rich`` console for ``progress=True``, the console given, or None for silence."""
    if progress is True:
        from rich.console import Console

        return Console()
    return progress or None


def say(console: Any, text: str) -> None:
    """Print a note on the console as it is (no markup), or log it when there is none."""
    if console is not None:
        console.print(text, markup=False, highlight=False)
    else:
        logging.getLogger("jmp").warning(text)


class ProgressBar:
    """A rich progress bar showing loss and throughput (silent without a console).

    ``with ProgressBar(...) as advance:`` gives ``advance(row)``, called once per step with
    that step's metrics row.
    """

    def __init__(self, console: Any, total: int, start: int, *, enabled: bool = True) -> None:
        self.console, self.total, self.start, self.enabled = console, total, start, enabled
        self.bar: Any = None

    def __enter__(self) -> Any:
        if self.console is None or not self.enabled:
            return lambda row: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        task = self.bar.add_task("train", total=self.total, completed=self.start, info="")
        self.bar.start()

        def advance(row: dict[str, float]) -> None:
            info = f"loss {row['loss']:.3f}"
            if "val_loss" in row:
                info += f" | val {row['val_loss']:.3f}"
            if AUX_LOSS in row:  # a mixture of experts: its auxiliary loss, drops if any
                info += f" | aux {row[AUX_LOSS]:.3f}"
                if row.get(DROPPED):
                    info += f" | dropped {row[DROPPED]:.0f}"
            if "tokens_per_s" in row:
                info += f" | {row['tokens_per_s']:,.0f} tok/s"
            if "mfu" in row:
                info += f" | MFU {100 * row['mfu']:.1f}%"
            self.bar.update(task, advance=1, info=info)

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def expert_load_table(load: list[list[float]], /, *, step: int) -> str:
    """Each MoE layer's share of the routed tokens per expert, in percent (1/E is balanced).

    Example:
        >>> print(expert_load_table([[0.5, 0.25, 0.25, 0.0]], step=3))
        expert load at step 3 (% of routed tokens; balanced = 25.0)
          moe layer 0:   50.0  25.0  25.0   0.0
    """
    n = len(load[0]) if load else 1
    lines = [f"expert load at step {step} (% of routed tokens; balanced = {100 / n:.1f})"]
    for i, shares in enumerate(load):
        lines.append(f"  moe layer {i}: " + "".join(f"{100 * x:6.1f}" for x in shares))
    return "\n".join(lines)


def plot_losses(history: list[dict[str, float]], path: str, /) -> None:
    """Train and validation loss against step, as a PNG."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train")
    val = [r for r in history if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
