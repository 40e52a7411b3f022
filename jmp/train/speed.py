"""How fast a run goes: step time, tokens/s, model FLOP/s and MFU, against the hardware's peak.

**Model FLOPs** of a step are 3x the matrix-multiply FLOPs of the model's forward pass (one
forward, two for the backward: the convention behind "6 x parameters x tokens"), counted in the
forward's jaxpr for any model: each ``dot_general`` (and convolution) is ``2 x output size x
contracted size``; a ``scan`` body counts ``length`` times, a ``shard_map`` body (local shapes)
once per device of its manual axes, the larger branch of a ``cond``. Recomputation (remat) is
not model work, so it is not counted; elementwise work is left out, as is usual for MFU. Two
cases count more than the model needs: a pipeline's idle (bubble) ticks, which compute on
placeholders, and the compiled program's cuDNN attention on GPUs is not a ``dot_general`` and
counts nothing.

**MFU** is model FLOP/s over the peak of the devices: a GPU's preset (:mod:`jmp.plan.hardware`,
dense bf16) times the device count; on CPU, the matmul rate this process measures once
(:func:`measured_cpu_peak`), since simulated devices share the machine's cores.

Example (a 2-layer MLP on 8 rows: forward 2*8*16*64 + 2*8*64*16 FLOPs, times 3):
    >>> def loss(params, x):
    ...     return (jax.nn.relu(x @ params["up"]) @ params["down"]).mean()
    >>> params = {"up": jnp.ones((16, 64)), "down": jnp.ones((64, 16))}
    >>> model_flops(loss, params, jnp.ones((8, 16)))
    98304.0
    >>> meter = Speedometer(flops_per_step=1e9, tokens_per_step=512,
    ...                     peak=Peak(1e11, "a made-up device"))
    >>> meter.measure(2.0, 0.5)                  # 2 steps in 0.5 s
    {'step_time_s': 0.25, 'tokens_per_s': 2048.0, 'flops_per_s': 4000000000.0, 'mfu': 0.04}
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from jmp.layers.base import model_rows_share
from jmp.plan.hardware import DEVICES

# --- counting the forward's matmul FLOPs in its jaxpr -----------------------------------------


def _dot_flops(eqn: Any) -> float:
    """2 x output elements x contracted size; a ``ragged_dot`` (a MoE's grouped matmul) has
    one output row per real row. Matmuls over padding count only their real rows' share."""
    lhs = eqn.invars[0].aval
    if eqn.primitive.name == "ragged_dot_general":
        (contract, _), _ = eqn.params["ragged_dot_dimension_numbers"].dot_dimension_numbers
    else:
        (contract, _), _ = eqn.params["dimension_numbers"]
    contracted = math.prod(lhs.shape[d] for d in contract)
    share = model_rows_share(str(eqn.source_info.name_stack))
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted * share


def _conv_flops(eqn: Any) -> float:
    rhs = eqn.invars[1].aval
    out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs.shape) / out_features


def _sub_jaxprs(value: Any) -> list[Any]:
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _repeats(eqn: Any) -> int:
    """How many times the eqn's sub-jaxpr runs: a scan's length, a shard_map's devices."""
    name = eqn.primitive.name
    if name == "scan":
        return int(eqn.params["length"])
    if name == "shard_map":
        mesh = eqn.params["mesh"]
        return math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"])
    return 1


def jaxpr_flops(jaxpr: Any, /) -> float:
    """Matrix-multiply FLOPs of a jaxpr, loops and manual regions applied (see the module)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "ragged_dot_general"):
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in _sub_jaxprs(eqn.params["branches"]))
        else:
            inner = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
            if name == "while":  # its trip count is not known here: its body once
                inner = _sub_jaxprs(eqn.params["body_jaxpr"])
            total += _repeats(eqn) * sum(jaxpr_flops(j) for j in inner)
    return total


def model_flops(forward: Callable[..., Any], /, *args: Any) -> float:
    """Model FLOPs of one training step on ``args``: 3x the forward's matmul FLOPs.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``; nothing is computed.
    """
    return 3.0 * jaxpr_flops(jax.make_jaxpr(forward)(*args).jaxpr)


# --- the peak the FLOP/s are measured against ----------------------------------------------


@dataclass(frozen=True)
class Peak:
    """The devices' combined peak FLOP/s, and where the figure comes from."""

    flops_per_s: float
    source: str


@functools.cache
def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """This machine's float32 matmul rate on one CPU device, FLOP/s (best of ``repeats``)."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def _gpu_preset(kind: str) -> Any:
    kind = kind.lower()
    return next((d for name, d in DEVICES.items() if name != "cpu" and name in kind), None)


def device_peak(devices: Sequence[Any], /) -> Peak | None:
    """The peak of ``devices`` (a mesh's), or None when jmp knows no figure for them."""
    first = devices[0]
    if first.platform == "cpu":
        rate = measured_cpu_peak()
        return Peak(rate, f"CPU matmul peak measured in this process: {rate / 1e9:.0f} GFLOP/s")
    preset = _gpu_preset(getattr(first, "device_kind", ""))
    if preset is None:
        return None
    total = preset.peak_flops * len(devices)
    return Peak(
        total,
        f"{preset.name} preset, dense bf16 {preset.peak_flops / 1e12:.0f} TFLOP/s x {len(devices)}",
    )


def memory_in_use_gib() -> float | None:
    """The largest peak bytes in use over this process's devices, GiB (None on CPU)."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 2**30 if peaks else None


# --- the figures of a run ------------------------------------------------------------------


@dataclass
class Speedometer:
    """Turns (steps, seconds) into the speed fields of a metrics row."""

    flops_per_step: float | None = None
    tokens_per_step: int | None = None
    peak: Peak | None = None

    def measure(self, steps: float, seconds: float) -> dict[str, float]:
        """Average speed over ``steps`` that took ``seconds`` (compilation excluded)."""
        if steps <= 0 or seconds <= 0:
            return {}
        row = {"step_time_s": seconds / steps}
        if self.tokens_per_step:
            row["tokens_per_s"] = self.tokens_per_step * steps / seconds
        if self.flops_per_step:
            row["flops_per_s"] = self.flops_per_step * steps / seconds
            if self.peak:
                row["mfu"] = row["flops_per_s"] / self.peak.flops_per_s
        return row


class Clock:
    """Training time between metric reads, without the first step (compilation) or evaluation.

    Example:
        >>> clock = Clock()
        >>> clock.lap(Speedometer(tokens_per_step=100))   # the first step: starts the clock
        {}
        >>> sorted(clock.lap(Speedometer(tokens_per_step=100)))
        ['step_time_s', 'tokens_per_s']
    """

    def __init__(self) -> None:
        self.t0: float | None = None
        self.laps, self.excluded = 0, 0.0

    def lap(self, speed: Speedometer) -> dict[str, float]:
        """One more step has run: the speed fields so far (with memory where reported)."""
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
            return {}
        self.laps += 1
        row = speed.measure(self.laps, now - self.t0 - self.excluded)
        memory = memory_in_use_gib()
        if memory is not None:
            row["memory_gib"] = memory
        return row

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (evaluation)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t
