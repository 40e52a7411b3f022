"""Sampling bytes from a trained GPT: greedy or with temperature.

The model runs on a fixed window of ``seq_len`` tokens (one compilation); each new byte is read
from the logits at the last filled position. The prompt is bytes: a ``str`` is encoded as UTF-8,
and bytes that were not UTF-8 on the command line (which Python hands over as lone surrogates,
``'\\udcff'`` for the byte 0xff) become those bytes again.

Example:
    >>> text = generate(model, "def ", mesh=mesh, rules=rules, max_new_tokens=100)
"""

from __future__ import annotations

import math

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
    prompt: str | bytes,
    /,
    *,
    mesh: Mesh,
    rules: Rules,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` by ``max_new_tokens`` bytes; ``temperature=0`` is greedy.

    Raises:
        ConfigError: a temperature that is negative or not finite, a negative or non-integer
            ``max_new_tokens``, or a prompt byte the model's vocabulary does not hold.
    """
    _check_options(max_new_tokens, temperature)
    tokens = list(prompt_bytes(prompt)) or [ord("\n")]
    seq_len, vocab = model.cfg.seq_len, model.cfg.vocab_size
    if max(tokens) >= vocab:
        raise ConfigError(
            f"The prompt holds the byte {max(tokens)}, outside the model's vocabulary of "
            f"{vocab} tokens (it would be read as another token). Fix: a prompt of bytes "
            f"below {vocab}."
        )
    # one sequence: the batch is not split (it could not be divided over the data axes)
    rules = rules.replace(activations={"batch": None})
    graphdef, state = nnx.split(model)

    def next_logits(state: nnx.State, window: jax.Array, pos: jax.Array) -> jax.Array:
        with activate(mesh, rules):
            logits = nnx.merge(graphdef, state)(window[None])[0]
        last = jax.lax.dynamic_index_in_dim(logits, pos, keepdims=False).astype(jnp.float32)
        return last[:256]  # a vocabulary padded past 256 (medium: 1024) must not yield a non-byte

    step = jax.jit(next_logits)
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


def prompt_bytes(prompt: str | bytes, /) -> bytes:
    """The bytes of ``prompt``: UTF-8, with lone surrogates (undecodable command-line bytes, as
    Python's ``surrogateescape`` handler gives them) turned back into the bytes they stand for.

    Example:
        >>> prompt_bytes("def ") + prompt_bytes("\\udcff") + prompt_bytes(b"\\x00")
        b'def \\xff\\x00'
    """
    if isinstance(prompt, bytes | bytearray):
        return bytes(prompt)
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a str or bytes, got {type(prompt).__name__}.")
    try:
        return prompt.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError as err:  # a surrogate that stands for no byte, e.g. '\\ud800'
        raise ConfigError(
            f"The prompt holds {prompt[err.start : err.end]!r} at position {err.start}, which "
            f"is neither text nor an escaped byte. Fix: pass text or bytes."
        ) from None


def _check_options(max_new_tokens: int, temperature: float) -> None:
    problems = []
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        problems.append(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if (
        not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        problems.append(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if problems:
        raise ConfigError("Invalid sampling options: " + "; ".join(problems) + ".")
