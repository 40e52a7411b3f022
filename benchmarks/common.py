"""Helpers shared by the benchmarks: devices, models, timing, collective accounting, output.

Import this module before anything else touches JAX (``import common`` first): it sets the
persistent compilation cache defaults, and :func:`setup` simulates 8 CPU devices.

Conventions:
    * Timings are measured side by side: variants alternate inside one run (these 2-core
      machines are shared and noisy) and we report medians and ratios of medians.
    * Communication is compared in bytes a ring algorithm moves per device:
      all-reduce ``2(n-1)/n * S``, all-gather and reduce-scatter ``(n-1)/n * S``, all-to-all
      ``(n-1)/n * S``, collective-permute ``S``, where S is the full (unsharded over the group)
      size of the tensor. ``jmp.inspect.Collective.bytes`` is the op's RESULT size per device,
      so S = result for all-reduce/all-to-all/permute, result for all-gather, and
      ``n * result`` for reduce-scatter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if _ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jmp  # noqa: E402
import jmp.inspect as jinspect  # noqa: E402
from jmp.models.gpt import GPT, GPTConfig  # noqa: E402
from jmp.train import TrainConfig, make_optimizer, make_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_DEVICES = 8
#: strategy -> the mesh the benchmarks run it on (8 devices): each non-pipeline strategy of the
#: registry on its default mesh (``jmp.strategies.default_mesh``)
STRATEGY_MESHES = {
    s: jmp.mesh.format_mesh_shape(
        jmp.mesh.resolve_mesh_shape(jmp.strategies.default_mesh(s), N_DEVICES)
    )
    for s in jmp.strategies.names()
    if not jmp.strategies.parse(s).pipelined
}


# --- setup ---------------------------------------------------------------------------------


def parse_args(
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    if extra:
        extra(parser)
    return parser.parse_args()


def setup(n: int = N_DEVICES) -> list[jax.Device]:
    """Simulate ``n`` CPU devices (before any JAX operation) and return the devices to use.

    The CPU benchmarks always run on the simulated CPU devices, even on a machine that also has
    a GPU, so their figures stay comparable.
    """
    jmp.simulate_cpu_devices(n)
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise SystemExit(f"need {n} CPU devices, have {len(devices)}")
    return devices[:n]


def mesh_for(spec: str, devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
    shape = (
        jmp.mesh.resolve_mesh_shape(spec, len(devices))
        if "-1" in spec
        else jmp.mesh.parse_mesh_spec(spec)
    )
    return jmp.make_mesh(spec, devices=list(devices)[: math.prod(shape.values())])


def build(
    cfg: GPTConfig,
    strategy: str,
    mesh: jax.sharding.Mesh,
    *,
    train_cfg: TrainConfig | None = None,
    seed: int = 0,
) -> tuple[Any, Any, Any]:
    """(model, step, rules): the real jmp train step for ``cfg`` under ``strategy``."""
    rules = jmp.rules.preset(strategy, mesh)
    model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules, seed=seed)
    step = make_step(model, make_optimizer(train_cfg or TrainConfig()), mesh, rules)
    return model, step, rules


def random_batch(
    sharding: jax.sharding.NamedSharding, batch_size: int, seq_len: int, vocab: int, seed: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Random (inputs, next-token targets) of shape (batch, seq), placed with ``sharding``."""
    rng = np.random.default_rng(seed)
    window = rng.integers(0, vocab, size=(batch_size, seq_len + 1), dtype=np.int32)
    return (jax.device_put(window[:, :-1], sharding), jax.device_put(window[:, 1:], sharding))


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


# --- timing --------------------------------------------------------------------------------


def interleaved(
    runners: dict[str, Callable[[], Any]], *, rounds: int, steps: int = 1, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each runner, alternating runners round by round.

    Each round runs every runner ``steps`` times (blocking after each call); the runner order is
    rotated every round so none always runs right after another. Returns per-call times.
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            block(runners[name]())
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            for _ in range(steps):
                t0 = time.perf_counter()
                block(runners[name]())
                times[name].append(time.perf_counter() - t0)
    return times


def compiled_and_timed(
    cfg: GPTConfig, strategy: str, mesh: jax.sharding.Mesh, *, rows: int, rounds: int
) -> tuple[Any, float]:
    """(compiled step, median seconds per step) of jmp's train step for ``cfg`` under
    ``strategy`` on a random batch of ``rows`` sequences of ``cfg.seq_len``."""
    _, step, _ = build(cfg, strategy, mesh)
    state = step.init_state()
    batch = random_batch(step.batch_sharding, rows, cfg.seq_len, cfg.vocab_size)
    compiled = step.lower(state, batch).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    return compiled, median(interleaved({"step": run}, rounds=rounds)["step"])


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else math.nan


def paired_ratio(num: Sequence[float], den: Sequence[float], group: int) -> float:
    """Median over rounds of (median of ``num`` in the round) / (median of ``den`` in it).

    Pairing by round cancels slow drifts in machine load that a ratio of global medians keeps.
    """
    ratios = []
    for i in range(0, min(len(num), len(den)), group):
        a, b = median(num[i : i + group]), median(den[i : i + group])
        if b > 0:
            ratios.append(a / b)
    return median(ratios)


@contextmanager
def timer() -> Any:
    out = {"s": math.nan}
    t0 = time.perf_counter()
    yield out
    out["s"] = time.perf_counter() - t0


# --- collectives ---------------------------------------------------------------------------


def collectives(compiled: Any, mesh: jax.sharding.Mesh) -> tuple[list, int]:
    """``jmp.inspect.collectives``, and how many executions have unread replica groups.

    jmp.inspect reads a collective whose ``replica_groups`` it cannot parse as running over all
    devices (``group_size`` 0); counting those keeps a new XLA spelling from silently moving bytes
    onto the wrong mesh axes (jmp < f5d1853 misread ``mesh[...], device_ids=(...) {...}``).
    """
    found = jinspect.collectives(compiled, mesh)
    return found, sum(c.count for c in found if c.group_size == 0)


def group_size(c: Any, mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[a] for a in c.axes) if c.axes else max(c.group_size, 1)


def full_size(c: Any, mesh: jax.sharding.Mesh) -> int:
    """S: the full size of the tensor over the op's group, from the per-device result size."""
    return c.bytes * group_size(c, mesh) if c.kind == "reduce-scatter" else c.bytes


def ring_bytes(c: Any, mesh: jax.sharding.Mesh) -> float:
    """Bytes one device sends per step for this op with a ring algorithm (count applied)."""
    n = group_size(c, mesh)
    if n <= 1:
        return 0.0
    factor = {
        "all-reduce": 2 * (n - 1) / n,
        "all-gather": (n - 1) / n,
        "reduce-scatter": (n - 1) / n,
        "all-to-all": (n - 1) / n,
        "collective-permute": 1.0,
    }[c.kind]
    return factor * full_size(c, mesh) * c.count


def is_scalar(c: Any) -> bool:
    """A one-element result (a partial sum such as a gradient-norm term or the loss)."""
    return c.bytes <= 8


# --- output --------------------------------------------------------------------------------


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()
) -> None:
    """A rich table (plain text when rich is missing), then the notes."""
    cells = [[_fmt(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in cells:
            table.add_row(*row)
        console = Console(width=max(100, sum(len(c) + 3 for c in columns) + 10))
        console.print(table)
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    for note in notes:
        print(f"  - {note}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def mib(n: float) -> float:
    return n / 2**20


def write_json(name: str, data: dict[str, Any]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.devices()][:1],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, **data}, f, indent=2, default=_json_default)
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    """A matplotlib Figure (no pyplot: no global state, no display needed) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def save_figure(fig: Any, name: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.png")
    fig.savefig(path, dpi=110)
    return path


def finish(name: str, data: dict[str, Any], fig: Any, started: float) -> None:
    data["runtime_s"] = round(time.perf_counter() - started, 1)
    paths = [write_json(name, data), save_figure(fig, name)]
    print(f"wrote {', '.join(os.path.relpath(p) for p in paths)} ({data['runtime_s']:.0f} s)")
