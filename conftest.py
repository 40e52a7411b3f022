"""Doctests of jmp/: the names every docstring example may use, on 8 simulated CPU devices.

`make test` runs the examples in jmp's docstrings (``pytest --doctest-modules jmp``). An
example starts from this namespace: the usual imports, a ``data=2,model=4`` mesh with
``dp_tp`` rules, a tiny GPT sharded on it (``model``, ``cfg``) and a token ``batch`` of 8 rows
(``(inputs, targets)``), so each docstring shows only its own point.
"""

import os

_ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jmp  # noqa: E402

jmp.simulate_cpu_devices(8)

import functools  # noqa: E402

import pytest  # noqa: E402
from _pytest.doctest import DoctestItem  # noqa: E402


@functools.cache
def _names() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jmp.models import GPT, GPTConfig

    mesh = jmp.make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    cfg = GPTConfig.named("tiny")
    model = jmp.shard_init(lambda r: GPT(cfg, rngs=r), mesh, rules, seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, cfg.seq_len + 1))
    batch = (jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32))
    return dict(
        functools=functools,
        jax=jax,
        jnp=jnp,
        np=np,
        nnx=nnx,
        optax=optax,
        jmp=jmp,
        mesh=mesh,
        rules=rules,
        cfg=cfg,
        GPT=GPT,
        GPTConfig=GPTConfig,
        model=model,
        batch=batch,
    )


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace):
    # only doctests need the namespace (the model in it costs an init)
    if isinstance(request.node, DoctestItem):
        doctest_namespace.update(_names())
