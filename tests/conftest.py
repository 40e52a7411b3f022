"""Test setup: 8 simulated CPU devices, set once before JAX starts, and a mesh fixture."""

import math
import os

# Read when JAX is imported: set them first (the Makefile exports the same defaults).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jmp  # noqa: E402

N_DEVICES = 8
jmp.simulate_cpu_devices(N_DEVICES)

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def make_mesh():
    """``make_mesh("data=2,model=4")``; skips the test when there are too few devices."""

    def build(spec):
        shape = jmp.mesh.resolve_mesh_shape(spec, N_DEVICES)
        if math.prod(shape.values()) > jax.device_count():
            pytest.skip(f"needs {math.prod(shape.values())} devices")
        return jmp.make_mesh(spec)

    return build
