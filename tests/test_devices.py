"""jmp.simulate_cpu_devices: a no-op when the count is already in force, loud otherwise."""

import os
import subprocess
import sys

import jax
import pytest

import jmp


def _start_backend():
    # conftest asked for 8 devices; any JAX operation starts the backend with them.
    assert jax.device_count() == 8


def test_same_count_after_start_is_noop():
    _start_backend()
    assert jmp.simulate_cpu_devices(8) is None
    assert jmp.simulate_cpu_devices(8) is None
    assert jax.device_count() == 8


def test_other_count_after_start_raises():
    _start_backend()
    with pytest.raises(jmp.DeviceError) as err:
        jmp.simulate_cpu_devices(4)
    msg = str(err.value)
    assert "4" in msg
    assert "8" in msg
    assert "before any JAX operation" in msg
    # Nothing changed.
    assert jax.device_count() == 8


def test_device_error_is_value_error():
    assert issubclass(jmp.DeviceError, ValueError)
    assert issubclass(jmp.DeviceError, jmp.JmpError)


@pytest.mark.parametrize("n", [0, -1, "8", 8.0, True, None])
def test_bad_arguments(n):
    with pytest.raises(jmp.DeviceError) as err:
        jmp.simulate_cpu_devices(n)
    assert repr(n) in str(err.value)


def _fresh_env():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_fresh_process_gets_requested_count():
    code = "import jmp; jmp.simulate_cpu_devices(4); import jax; print(jax.device_count())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_fresh_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"
