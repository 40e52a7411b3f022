"""Devices: simulated CPU devices for laptops and CI.

JAX decides how many CPU devices exist when its backend starts (the first JAX operation). Asking
for another count later is silently ignored by ``XLA_FLAGS``; :func:`simulate_cpu_devices` fails
loudly instead.

Example:
    >>> import jmp
    >>> jmp.simulate_cpu_devices(8)  # before any JAX operation
    >>> import jax; jax.device_count()
    8
"""

from __future__ import annotations

import jax

from jmp.errors import DeviceError


def simulate_cpu_devices(n: int, /) -> None:
    """Make ``n`` CPU devices available to JAX.

    Call it before any JAX operation. Calling it again with the count already in force is a
    no-op, so notebooks can re-run their first cell.

    Raises:
        DeviceError: ``n`` is not positive, or JAX's backend already started with another count.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DeviceError(f"simulate_cpu_devices needs a positive int, got {n!r}.")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise DeviceError(
            f"Cannot simulate {n} CPU devices: JAX's backend already started with {have} "
            f"CPU device(s). Fix: call jmp.simulate_cpu_devices({n}) before any JAX operation "
            f"(right after import), or restart the Python process / notebook kernel."
        ) from err


def backend_started() -> bool:
    """Whether JAX's backend has started (after which the device count is fixed)."""
    from jax._src import xla_bridge  # no public API tells this without starting the backend

    return bool(xla_bridge._backends)


#: XLA flags that let an NVIDIA GPU's collectives overlap its compute, as JAX's GPU
#: performance guide and MaxText set them: the latency-hiding scheduler orders the program so
#: transfers run while kernels do, collectives go on a high-priority stream, small ones are
#: combined (up to 128 MiB) and, inside loops (scanned layers, pipelines), the next
#: iteration's all-gather / reduce-scatter / all-reduce is started during this one.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)


def with_gpu_flags(xla_flags: str, /) -> str:
    """``xla_flags`` with each of :data:`GPU_XLA_FLAGS` it does not set itself appended: a
    flag the user already gives keeps the user's value.

    Example:
        >>> mine = "--xla_gpu_enable_latency_hiding_scheduler=false"
        >>> merged = with_gpu_flags(mine)
        >>> merged.startswith(mine), merged.count("latency_hiding_scheduler")
        (True, 1)
        >>> len(with_gpu_flags("").split()) == len(GPU_XLA_FLAGS)
        True
    """
    given = {part.split("=")[0] for part in xla_flags.split()}
    extra = [flag for flag in GPU_XLA_FLAGS if flag.split("=")[0] not in given]
    return " ".join([*xla_flags.split(), *extra])


def _cuda_plugin_installed() -> bool:
    import importlib.metadata

    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return any(n.lower().replace("_", "-").startswith("jax-cuda") for n in names)


def use_gpu_xla_flags() -> bool:
    """Add :data:`GPU_XLA_FLAGS` to ``XLA_FLAGS`` when jaxlib's CUDA plugin is installed, before
    JAX's backend starts (``jmp train`` and the other commands call it). Off with
    ``JMP_GPU_XLA_FLAGS=0``; a flag already in ``XLA_FLAGS`` keeps its value. Returns whether
    the flags were added.
    """
    import os

    if os.environ.get("JMP_GPU_XLA_FLAGS", "1") == "0" or backend_started():
        return False
    if not _cuda_plugin_installed():
        return False
    os.environ["XLA_FLAGS"] = with_gpu_flags(os.environ.get("XLA_FLAGS", ""))
    return True
