"""Sampling bytes from a trained GPT: greedy or with temperature.

The model runs on a fixed window of ``seq_len`` tokens (one compilation); each new byte is read
from the logits at the last filled position.

Example:
    >>> text = generate(model, "def ", mesh=mesh, rules=rules, max_new_tokens=100)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jmp.context import activate
from jmp.errors import ConfigError
from jmp.models.gpt import GPT
from jmp.rules import Rules


def generate(
    model: GPT,
    prompt: str,
    /,
    *,
    mesh: Mesh,
    rules: Rules,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` by ``max_new_tokens`` bytes; ``temperature=0`` is greedy."""
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 means greedy).")
    seq_len = model.cfg.seq_len
    # one sequence: the batch is not split (it could not be divided over the data axes)
    rules = rules.replace(activations={"batch": None})
    graphdef, state = nnx.split(model)

    def next_logits(state: nnx.State, window: jax.Array, pos: jax.Array) -> jax.Array:
        with activate(mesh, rules):
            logits = nnx.merge(graphdef, state)(window[None])[0]
        return jax.lax.dynamic_index_in_dim(logits, pos, keepdims=False).astype(jnp.float32)

    step = jax.jit(next_logits)
    tokens = list(prompt.encode("utf-8")) or [ord("\n")]
    key = jax.random.key(seed)
    with jax.set_mesh(mesh):
        for _ in range(max_new_tokens):
            context = tokens[-seq_len:]
            window = np.zeros(seq_len, np.int32)
            window[: len(context)] = context
            logits = step(state, jnp.asarray(window), jnp.asarray(len(context) - 1))
            if temperature == 0:
                nxt = int(jnp.argmax(logits))
            else:
                key, sub = jax.random.split(key)
                nxt = int(jax.random.categorical(sub, logits / temperature))
            tokens.append(nxt)
    return bytes(tokens).decode("utf-8", errors="replace")
