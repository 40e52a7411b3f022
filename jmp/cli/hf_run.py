"""Runs that start from a Hugging Face folder: ``jmp train --init hf:PATH`` and what follows.

- :func:`init_source` reads ``--init hf:PATH`` while the command line is parsed.
- :class:`Start` is the folder read without its weights (its config and tokenizer) and
  :meth:`Start.record`, what the run's ``config.json`` stores under ``"init"``: the path, the
  architecture and fingerprints of ``config.json`` and of the tokenizer (a resume from another
  folder, or from this one changed, is refused by :func:`jmp.train.run_folder.check_resume`).
  :meth:`Start.load` then reads the weights straight into their shardings (:func:`jmp.hf.load`).
- :func:`token_data`: the training text as the folder tokenizer's ids, in the windows and
  splits of the byte path (:class:`jmp.train.data.TextData`: batch k a pure function of
  (seed, k)).
- :func:`unchanged`: a finished run's folder, checked against its record, for ``jmp export``
  and ``jmp generate --run`` (they use its config and tokenizer).

Parameters train in float32 (``--dtype`` is the compute dtype, as for jmp's GPT); ``jmp
export`` writes the dtype the folder recorded.

Example:
    >>> init_source("hf:models/llama")
    'models/llama'
    >>> init_source("models/llama")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: 'models/llama' is not hf:PATH (a local Hugging Face folder)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jmp.errors import ConfigError

PREFIX = "hf:"
#: The files of a folder's tokenizer that ``jmp export`` copies as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def init_source(text: str) -> str:
    """The folder of ``--init hf:PATH`` (argparse ``type=``); other sources are refused."""
    path = text[len(PREFIX) :] if text.startswith(PREFIX) else ""
    if not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not hf:PATH (a local Hugging Face folder)")
    return path


def _sha256(*blobs: bytes) -> str:
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(len(blob).to_bytes(8, "little") + blob)  # lengths: no two splits collide
    return digest.hexdigest()


def config_fingerprint(hf_config: dict[str, Any], /) -> str:
    """sha256 of a ``config.json``'s content (its keys sorted: formatting does not count)."""
    return _sha256(json.dumps(hf_config, sort_keys=True).encode())


def tokenizer_record(path: str, tokenizer: Any, /) -> dict[str, Any]:
    """What identifies a folder's tokenizer: its kind, and for ``tokenizer.json`` the files'
    fingerprint, vocabulary size and end-of-sequence id."""
    if tokenizer.kind == "bytes":
        return {"kind": "bytes"}
    blobs = []
    for name in TOKENIZER_FILES[:2]:  # tokenizer.json, and the config that names its eos
        file = os.path.join(path, name)
        blobs.append(open(file, "rb").read() if os.path.exists(file) else b"")
    return {
        "kind": tokenizer.kind,
        "sha256": _sha256(*blobs),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
    }


@dataclass(frozen=True)
class Start:
    """A Hugging Face folder a run starts from, read without its weights.

    Attributes:
        path: the folder (absolute).
        config: its :class:`~jmp.models.LlamaConfig`, with the command's overrides.
        hf_config: its ``config.json``.
        architecture: the HF class (``'LlamaForCausalLM'``...).
        tokenizer: its ``tokenizer.json`` tokenizer, or bytes.
    """

    path: str
    config: Any
    hf_config: dict[str, Any] = field(repr=False)
    architecture: str
    tokenizer: Any = field(repr=False)
    overrides: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def read(cls, path: str, /, *, dtype: str, **overrides: Any) -> Start:
        """Read ``path``'s config and tokenizer; ``dtype`` is the compute dtype (parameters
        stay float32), ``overrides`` other config fields (``seq_len``, ``mode``, ``remat``)."""
        from jmp.hf import config_of, load_tokenizer
        from jmp.hf.config import architecture_of
        from jmp.hf.files import read_config

        path = os.path.abspath(path)
        hf_config = read_config(path)
        fields = {"param_dtype": "float32", **overrides}
        cfg = config_of(path, dtype=dtype, **fields)
        architecture = architecture_of(hf_config).name
        return cls(path, cfg, hf_config, architecture, load_tokenizer(path), fields)

    def record(self) -> dict[str, Any]:
        """What the run's ``config.json`` stores under ``"init"``."""
        return {
            "path": self.path,
            "architecture": self.architecture,
            "config_sha256": config_fingerprint(self.hf_config),
            "tokenizer": tokenizer_record(self.path, self.tokenizer),
        }

    def check_vocab(self) -> None:
        """Refuse a byte tokenizer for a model with fewer than 256 ids (the folder lacks its
        tokenizer.json)."""
        if self.tokenizer.kind == "bytes" and self.config.vocab_size < 256:
            raise ConfigError(
                f"hf:{self.path} has no tokenizer.json, so the text would be read as bytes "
                f"(ids 0-255), but its model has vocab_size={self.config.vocab_size}. Fix: put "
                f"the model's tokenizer.json in the folder."
            )

    def load(self, mesh: Any, rules: Any, /) -> Any:
        """The sharded model (:func:`jmp.hf.load`), its config this start's."""
        import jmp.hf

        dtype = self.config.dtype
        loaded = jmp.hf.load(self.path, mesh, rules, dtype=dtype, **self.overrides)
        assert loaded.config == self.config, (loaded.config, self.config)
        return loaded.model


def token_data(paths: Sequence[str] | None, tokenizer: Any, /) -> Any:
    """The training text of ``paths`` (default: the Python stdlib's sources) as token ids.

    Bytes (a folder without tokenizer.json) are today's byte data, unchanged. With a
    ``tokenizer.json`` the same bytes (each file followed by a newline, at most
    :data:`~jmp.train.data.DEFAULT_MAX_BYTES` in all) are decoded as UTF-8 (an undecodable byte
    becomes U+FFFD) and each file is encoded on its own, in parallel, without special tokens;
    the ids, concatenated, are split 95/5 into train and validation and cut into windows
    exactly as bytes are.
    """
    import numpy as np

    from jmp.hf import HFTokenizer
    from jmp.train.data import (
        DEFAULT_MAX_BYTES,
        TextData,
        default_corpus_files,
        expand_paths,
        read_bytes,
    )

    if tokenizer.kind == "bytes":
        return TextData.from_paths(paths)
    files = default_corpus_files() if not paths else expand_paths(paths)
    texts, total = [], 0
    for name in files:  # read_bytes' rule, one file at a time: the same bytes in all
        blob = read_bytes([name], DEFAULT_MAX_BYTES - total)
        texts.append(blob.tobytes().decode("utf-8", errors="replace"))
        total += len(blob)
        if total >= DEFAULT_MAX_BYTES:
            break
    if isinstance(tokenizer, HFTokenizer):  # the Rust tokenizer encodes the files in parallel
        encoded = tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [i for e in encoded for i in e.ids]
    else:
        ids = [i for text in texts for i in tokenizer.encode(text)]
    return TextData.from_tokens(np.asarray(ids, dtype=np.int32))


def unchanged(record: dict[str, Any], /) -> tuple[dict[str, Any], Any]:
    """The config.json and tokenizer of a run's start folder, refused if it has changed."""
    from jmp.hf import load_tokenizer
    from jmp.hf.files import read_config

    path = record["path"]
    fix = (
        "Fix: restore the folder as it was when the run started (its config.json and tokenizer "
        "are used here)."
    )
    if not os.path.isdir(path):
        raise ConfigError(f"The run was started from hf:{path}, which no longer exists. {fix}")
    hf_config, tokenizer = read_config(path), load_tokenizer(path)
    now = {
        "config_sha256": config_fingerprint(hf_config),
        "tokenizer": tokenizer_record(path, tokenizer),
    }
    changed = [k for k, v in now.items() if record.get(k) != v]
    if changed:
        raise ConfigError(
            f"The run was started from hf:{path}, whose {' and '.join(changed)} changed since. "
            f"{fix}"
        )
    return hf_config, tokenizer
