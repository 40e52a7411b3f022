"""Byte-level text data: tokens are bytes (vocabulary 256), batches are pure functions of step.

(This is ``jmp train``'s path for plain text files; prepared corpora are read by
:mod:`jmp.train.data.loader`.)

The default corpus is the Python standard library's own ``.py`` sources, found on the machine
(nothing is downloaded). The batch for step k depends only on (seed, k, split), so a resumed run
sees exactly the batches it would have seen. Global batches are assembled with
``jax.make_array_from_process_local_data``: each process builds only the rows its devices hold.

Example:
    >>> data = TextData.from_paths(None)          # the stdlib sources
    >>> x, y = data.batch(0, batch_size=8, seq_len=128, mesh=mesh, rules=rules)
    >>> x.shape, x.sharding.spec, bool((x[:, 1:] == y[:, :-1]).all())   # y is x shifted by one
    ((8, 128), P('data',), True)
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jmp.errors import ConfigError
from jmp.rules import Rules
from jmp.train.run_folder import fingerprint

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 8_000_000


def default_corpus_files() -> list[str]:
    """The standard library's ``.py`` files on this machine, sorted (deterministic)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(
        glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py"))
    )
    return [f for f in files if "site-packages" not in f]


_NO_MATCH_FIX = (
    "Fix: pass an existing file, folder or glob (e.g. 'texts/*.txt'), or omit --data to use "
    "the Python standard library's sources."
)


def expand_paths(paths: Sequence[str], *, fix: str = _NO_MATCH_FIX) -> list[str]:
    """Files named by ``paths`` (files, folders searched recursively, or globs), sorted.

    Raises:
        ConfigError: a path matches no file (the message ends with ``fix``).
    """
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                p
                for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                if os.path.isfile(p)
            )
        else:
            found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not found:
            raise ConfigError(f"Data path {path!r} matches no file. {fix}")
        files += found
    return files


def read_bytes(files: Sequence[str], max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Concatenate files (separated by a newline) into a uint8 array of at most max_bytes."""
    chunks, total = [], 0
    for name in files:
        try:
            with open(name, "rb") as f:
                blob = f.read(max_bytes - total)
        except OSError as err:
            raise ConfigError(
                f"Cannot read data file {name!r}: {err.strerror}. Fix: check "
                f"the path and its permissions."
            ) from None
        chunks.append(blob + b"\n")
        total += len(blob) + 1
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


@dataclass(frozen=True)
class TextData:
    """A byte corpus split into train (first 95%) and validation (last 5%) parts."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str] | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        val_fraction: float = 0.05,
    ) -> TextData:
        files = default_corpus_files() if not paths else expand_paths(paths)
        if not files:
            raise ConfigError(
                "No data files found (the standard library's sources are missing "
                "on this machine). Fix: pass --data PATH."
            )
        tokens = read_bytes(files, max_bytes)
        return cls.from_tokens(tokens, val_fraction=val_fraction)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, *, val_fraction: float = 0.05) -> TextData:
        split = int(len(tokens) * (1 - val_fraction))
        return cls(train=tokens[:split], val=tokens[split:])

    def check(self, seq_len: int, vocab_size: int | None = None) -> None:
        """Raise if either split is too short for one sequence of ``seq_len + 1`` tokens, or
        holds a token id the model's vocabulary does not have (its loss would be NaN)."""
        for name, part in (("train", self.train), ("validation", self.val)):
            if len(part) < seq_len + 2:
                raise ConfigError(
                    f"The {name} split has {len(part)} bytes, fewer than one "
                    f"sequence of {seq_len + 1}. Fix: give more text or a "
                    f"shorter --seq."
                )
            top = int(part.max()) if len(part) else 0
            if vocab_size is not None and (top >= vocab_size or int(part.min()) < 0):
                raise ConfigError(
                    f"The {name} split holds token id {top}, outside the model's vocabulary "
                    f"of {vocab_size} (its loss would be NaN). Fix: a model with "
                    f"vocab_size > {top}, or data whose ids are below {vocab_size}."
                )

    def fingerprint(self) -> str:
        """sha256 of the train and validation tokens: what identifies this data in a run."""
        return fingerprint(self.train, self.val)

    def rows(
        self,
        step: int,
        rows: Sequence[int],
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        split: str = "train",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-byte targets for the given rows of the global batch of ``step``."""
        tokens = self.train if split == "train" else self.val
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)[list(rows)]
        window = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
        return window[:, :-1], window[:, 1:]

    def batch(
        self,
        step: int,
        /,
        *,
        batch_size: int,
        seq_len: int,
        mesh: Mesh,
        rules: Rules,
        seed: int = 0,
        split: str = "train",
    ) -> tuple[jax.Array, jax.Array]:
        """The global batch of ``step`` as two ``(batch, seq)`` arrays sharded over data axes."""
        sharding = batch_sharding(mesh, rules)
        shape = (batch_size, seq_len)
        local = local_rows(sharding, shape)
        x, y = self.rows(
            step, local, batch_size=batch_size, seq_len=seq_len, seed=seed, split=split
        )
        return (
            jax.make_array_from_process_local_data(sharding, x, shape),
            jax.make_array_from_process_local_data(sharding, y, shape),
        )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Token batches: rows split as the activation rule for 'batch' says."""
    return NamedSharding(mesh, rules.activation_spec(("batch", None), mesh=mesh))


def local_rows(sharding: NamedSharding, shape: tuple[int, int]) -> list[int]:
    """Rows of the global batch held by this process's devices, in order."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        assert index is not None  # typed Optional, but a NamedSharding gives every device one
        rows.update(range(*index[0].indices(shape[0])))
    return sorted(rows)
