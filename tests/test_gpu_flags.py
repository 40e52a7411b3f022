"""The XLA flags jmp sets for GPUs (jmp.devices.GPU_XLA_FLAGS): merged without overriding the
user's, added only where jaxlib's CUDA plugin is installed, and every one known to the pinned
XLA (an unknown flag in XLA_FLAGS aborts the process when the backend starts)."""

import os
import subprocess
import sys

import pytest

from jmp import devices
from jmp.devices import GPU_XLA_FLAGS, use_gpu_xla_flags, with_gpu_flags


def test_the_users_own_value_wins_and_nothing_is_doubled():
    mine = "--xla_force_host_platform_device_count=8 --xla_gpu_enable_pipelined_all_gather=false"
    merged = with_gpu_flags(mine).split()
    assert merged[:2] == mine.split()
    assert "--xla_gpu_enable_pipelined_all_gather=true" not in merged
    assert len(merged) == 2 + len(GPU_XLA_FLAGS) - 1
    assert with_gpu_flags(with_gpu_flags("")) == with_gpu_flags("")


def test_flags_are_added_only_with_a_cuda_plugin_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(devices, "backend_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    monkeypatch.setattr(devices, "_cuda_plugin_installed", lambda: False)
    assert not use_gpu_xla_flags()  # a CPU machine: XLA_FLAGS as it was
    monkeypatch.setattr(devices, "_cuda_plugin_installed", lambda: True)
    monkeypatch.setenv("JMP_GPU_XLA_FLAGS", "0")
    assert not use_gpu_xla_flags()
    monkeypatch.delenv("JMP_GPU_XLA_FLAGS")
    assert use_gpu_xla_flags()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_gpu_enable_latency_hiding_scheduler=false"
    assert set(GPU_XLA_FLAGS) - set(flags) == {"--xla_gpu_enable_latency_hiding_scheduler=true"}


@pytest.mark.parametrize("flags", [" ".join(GPU_XLA_FLAGS), "--xla_gpu_no_such_flag=true"])
def test_every_flag_is_known_to_this_xla(flags):
    """The backend starts with all of them (and the check can fail: an unknown flag aborts)."""
    done = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
        env={"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    known = "no_such_flag" not in flags
    assert (done.returncode == 0) == known, done.stderr[-2000:]
    if not known:
        assert "Unknown flag in XLA_FLAGS: --xla_gpu_no_such_flag" in done.stderr
