"""Sampling from a trained decoder (jmp's GPT, or a Llama): greedy or with temperature.

The model runs on a fixed window of ``seq_len`` tokens (one compilation); each new token is
read from the logits at the last filled position. There is no KV cache: every new token is a
full forward pass over the window. That is fine for the small models this is meant for (tests,
a look at what a run learned), and slow for large ones.

Text goes in and out through a tokenizer (anything with ``encode(text)``, ``decode(ids)`` and
``vocab_size``, such as :func:`jmp.hf.load_tokenizer`'s); without one the tokens are bytes. A
bytes prompt given as ``str`` is encoded as UTF-8, and bytes that were not UTF-8 on the command
line (which Python hands over as lone surrogates, ``'\\udcff'`` for the byte 0xff) become those
bytes again.

Example:
    >>> text = generate(model, "def ", mesh=mesh, rules=rules, max_new_tokens=100)
    >>> ids = generate_ids(model, [100, 101], mesh=mesh, rules=rules, max_new_tokens=3)
    >>> len(ids)
    5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jmp.context import activate
from jmp.errors import ConfigError
from jmp.models.gpt import GPT
from jmp.models.llama import Llama
from jmp.rules import Rules

#: The byte vocabulary: without a tokenizer only these ids can be sampled (a vocabulary padded
#: past 256, as the medium GPT's 1024, must not yield a token that is no byte).
BYTES = 256


def generate(
    model: GPT | Llama,
    prompt: str | bytes,
    /,
    *,
    mesh: Mesh,
    rules: Rules,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    seed: int = 0,
    tokenizer: Any = None,
) -> str:
    """Continue ``prompt`` by ``max_new_tokens`` tokens; ``temperature=0`` is greedy.

    Args:
        model: a decoder with ``cfg.seq_len`` and ``cfg.vocab_size`` whose call maps tokens
            ``(batch, seq)`` to logits (:class:`~jmp.models.GPT`, :class:`~jmp.models.Llama`),
            sharded on ``mesh`` by ``rules``.
        prompt: the text to continue.
        tokenizer: encodes the prompt (no special tokens added: as training text is encoded)
            and decodes the result; None for bytes. Sampling stops early at its ``eos_id``.

    Returns:
        The prompt and its continuation, decoded together.

    Raises:
        ConfigError: a temperature that is negative or not finite, a negative or non-integer
            ``max_new_tokens``, or a prompt token the model's vocabulary does not hold.
    """
    if tokenizer is None or getattr(tokenizer, "kind", None) == "bytes":
        ids = list(prompt_bytes(prompt))
        _check_prompt(ids, model.cfg.vocab_size, "byte")
        out = generate_ids(model, ids, mesh=mesh, rules=rules, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, vocab_limit=BYTES)  # fmt: skip
        return bytes(out).decode("utf-8", errors="replace")
    if not isinstance(prompt, str):
        raise ConfigError(
            f"With a tokenizer the prompt must be text (str), got {type(prompt).__name__}."
        )
    out = generate_ids(
        model,
        tokenizer.encode(prompt),
        mesh=mesh,
        rules=rules,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        vocab_limit=tokenizer.vocab_size,
        eos_id=getattr(tokenizer, "eos_id", None),
    )
    return tokenizer.decode(out)


def generate_ids(
    model: GPT | Llama,
    ids: Sequence[int],
    /,
    *,
    mesh: Mesh,
    rules: Rules,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    seed: int = 0,
    vocab_limit: int | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """The token ids of ``ids`` continued by up to ``max_new_tokens`` sampled ones.

    Args:
        ids: the prompt's token ids (an empty prompt starts from a newline byte, 10).
        vocab_limit: only ids below it are sampled (what the tokenizer can decode); default:
            the model's whole vocabulary.
        eos_id: stop after sampling it (it is kept, as ``transformers``' ``generate`` does).

    Greedy decoding (``temperature=0``) takes the argmax of the last position's logits, as
    ``transformers``' ``generate(do_sample=False)`` does; with a temperature, a categorical
    draw from ``logits / temperature`` with a key split from ``seed`` for each token.
    """
    _check_options(max_new_tokens, temperature)
    seq_len, vocab = model.cfg.seq_len, model.cfg.vocab_size
    tokens = [int(i) for i in ids] or [ord("\n")]
    _check_prompt(tokens, vocab, "token")
    limit = vocab if vocab_limit is None else min(vocab, vocab_limit)
    # one sequence: the batch is not split (it could not be divided over the data axes)
    rules = rules.replace(activations={"batch": None})
    graphdef, state = nnx.split(model)

    def next_logits(state: nnx.State, window: jax.Array, pos: jax.Array) -> jax.Array:
        with activate(mesh, rules):
            logits = nnx.merge(graphdef, state)(window[None])[0]
        last = jax.lax.dynamic_index_in_dim(logits, pos, keepdims=False).astype(jnp.float32)
        return last[:limit]

    step = jax.jit(next_logits)
    key = jax.random.key(seed)
    with jax.set_mesh(mesh):
        for _ in range(max_new_tokens):
            context = tokens[-seq_len:]
            window = np.zeros(seq_len, np.int32)  # causal: the padding after is never seen
            window[: len(context)] = context
            logits = step(state, jnp.asarray(window), jnp.asarray(len(context) - 1))
            if temperature == 0:
                nxt = int(jnp.argmax(logits))
            else:
                key, sub = jax.random.split(key)
                nxt = int(jax.random.categorical(sub, logits / temperature))
            tokens.append(nxt)
            if nxt == eos_id:
                break
    return tokens


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


def _check_prompt(tokens: Sequence[int], vocab: int, what: str) -> None:
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ConfigError(
            f"The prompt holds the {what} {bad}, outside the model's vocabulary of {vocab} "
            f"tokens (it would be read as another token). Fix: a prompt of {what}s below "
            f"{vocab}."
        )


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
