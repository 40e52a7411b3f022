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
