"""Shared test helpers: run an NNX model sharded, and compare against dense formulas."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmp

MESHES = ["model=8", "data=2,model=4", "data=4,model=2", "data=1,model=8", "data=8,model=1"]


def rules_for(mesh):
    """dp_tp rules, or tp on a mesh with only a model axis."""
    return jmp.rules.preset("tp" if "data" not in mesh.shape else "dp_tp", mesh)


def batch_sharded(mesh, x):
    """Place ``x`` with its leading (batch) dim split over 'data' when the mesh has it."""
    return jax.device_put(x, NamedSharding(mesh, P("data" if "data" in mesh.shape else None)))


def compile_sharded(fn, mesh, rules, *args):
    """jit ``fn`` traced under ``jmp.activate(mesh, rules)``; returns the compiled program."""

    def traced(*a):
        with jmp.activate(mesh, rules):
            return fn(*a)

    with jmp.activate(mesh, rules):
        return jax.jit(traced).lower(*args).compile()


def forward_and_grads(model, mesh, rules, x, probe):
    """Sharded output, and gradients of sum(y * probe) w.r.t. the state and the input.

    Returns (y, state_grads, x_grad, compiled_forward, compiled_grad).
    """
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    def loss(state, x):
        return (forward(state, x) * probe).sum()

    fwd = compile_sharded(forward, mesh, rules, state, x)
    # value_and_grad, as in a train step: the forward's collectives stay live in the program.
    grad = compile_sharded(jax.value_and_grad(loss, argnums=(0, 1)), mesh, rules, state, x)
    _, (state_grads, x_grad) = grad(state, x)
    return fwd(state, x), state_grads, x_grad, fwd, grad


def value(v):
    """A parameter (or gradient) as a numpy array, gathered from all devices."""
    return np.asarray(v[...] if isinstance(v, nnx.Variable) else v)
