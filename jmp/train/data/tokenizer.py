"""Tokenizers for prepared corpora: UTF-8 bytes, or a Hugging Face ``tokenizers`` model.

Three specs name a tokenizer (:func:`parse_spec`): ``"bytes"`` (ids 0-255 are the bytes of
the UTF-8 text; no end-of-text id), ``"bpe:<vocab_size>"`` (a byte-level BPE trained on the
corpus itself by :func:`train_bpe`, with ``<|endoftext|>`` as id 0), or the path of a
``tokenizer.json`` or of a Hugging Face folder holding one. Each tokenizer has a fingerprint
(sha256 of its canonical serialization) that a corpus records, so a run can refuse a corpus
made by another tokenizer than its own.

Example:
    >>> tok = load_tokenizer("bytes")
    >>> tok.vocab_size, tok.eos_id, tok.encode("hé").tolist(), tok.decode([104, 195, 169])
    (256, None, [104, 195, 169], 'hé')
    >>> bpe = train_bpe(["the cat sat on the mat"] * 20, vocab_size=270)
    >>> bpe.vocab_size <= 270, bpe.eos_id, bpe.decode(bpe.encode("the mat"))
    (True, 0, 'the mat')
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jmp.errors import ConfigError

#: The end-of-text token a trained BPE reserves (id 0), as GPT-2 names it.
EOS_TOKEN = "<|endoftext|>"
#: Names a Hugging Face tokenizer's end-of-text token goes by, when no config says which.
_EOS_NAMES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
_BYTES_FINGERPRINT = hashlib.sha256(
    b"jmp tokenizer: the bytes of UTF-8 text, ids 0-255"
).hexdigest()
#: A byte-level BPE needs its 256 byte symbols and the end-of-text token.
MIN_BPE_VOCAB = 257


class ByteTokenizer:
    """Token ids are the bytes of the UTF-8 text (vocabulary 256, no end-of-text id)."""

    kind = "bytes"
    spec = "bytes"
    vocab_size = 256
    eos_id: int | None = None
    fingerprint = _BYTES_FINGERPRINT

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")

    def save(self, folder: str) -> None:
        """Nothing to save: the bytes tokenizer is the same everywhere."""


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (a trained BPE or a ``tokenizer.json``)."""

    def __init__(self, tok: Any, *, kind: str, spec: str, eos_id: int | None) -> None:
        self.tok, self.kind, self.spec, self.eos_id = tok, kind, spec, eos_id
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.fingerprint = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        # added tokens written in the text (say a literal "<|endoftext|>") are matched as such
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, folder: str) -> None:
        """Write ``tokenizer.json`` into ``folder`` (a corpus keeps its own tokenizer)."""
        self.tok.save(os.path.join(folder, "tokenizer.json"))


Tokenizer = ByteTokenizer | HFTokenizer


def parse_spec(spec: str, /) -> tuple[str, Any]:
    """``("bytes", None)``, ``("bpe", vocab_size)`` or ``("file", path of a tokenizer.json)``.

    Raises:
        ConfigError: a malformed ``bpe:`` size, or a path holding no ``tokenizer.json``.

    Example:
        >>> parse_spec("bpe:4096")
        ('bpe', 4096)
    """
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or not MIN_BPE_VOCAB <= int(size) < 2**31:
            raise ConfigError(
                f"Tokenizer {spec!r}: the BPE vocabulary size must be a whole number from "
                f"{MIN_BPE_VOCAB} (256 bytes + end-of-text) to 2**31. Fix: e.g. --tokenizer "
                "bpe:4096."
            )
        return "bpe", int(size)
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ConfigError(
            f"Tokenizer {spec!r} is not 'bytes', 'bpe:<vocab_size>', a tokenizer.json or a "
            "folder holding one. Fix: e.g. --tokenizer bytes, --tokenizer bpe:4096 or "
            "--tokenizer path/to/hf_model."
        )
    return "file", os.path.abspath(path)


def load_tokenizer(spec: str, /) -> Tokenizer:
    """The tokenizer ``"bytes"`` or a ``tokenizer.json`` path (or its folder) names.

    A ``bpe:`` spec is trained on a corpus, not loaded: see :func:`train_bpe`.
    """
    kind, value = parse_spec(spec)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        raise ConfigError(
            f"Tokenizer {spec!r} is trained on a corpus by `jmp data prepare`, not loaded. Fix: "
            "pass the prepared corpus's tokenizer.json instead."
        )
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_file(value)
    except Exception as err:  # tokenizers raises a bare Exception for unreadable JSON
        raise ConfigError(
            f"Cannot read the tokenizer {value!r} ({' '.join(str(err).split())[:200]}). Fix: "
            "pass a tokenizer.json written by Hugging Face tokenizers."
        ) from None
    return HFTokenizer(tok, kind="hf", spec=value, eos_id=_find_eos(tok, os.path.dirname(value)))


def _find_eos(tok: Any, folder: str) -> int | None:
    """The end-of-text id: the folder's tokenizer_config.json says, else a well-known name."""
    config = os.path.join(folder, "tokenizer_config.json")
    names: list[str] = []
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError):
            eos = None
        if isinstance(eos, dict):  # older configs: {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, str):
            names.append(eos)
    for name in [*names, *_EOS_NAMES]:
        found = tok.token_to_id(name)
        if found is not None:
            return int(found)
    return None


def train_bpe(texts: Iterable[str], /, *, vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2's scheme) trained on ``texts`` to at most ``vocab_size`` ids.

    Byte-level: every text is representable, and ``decode(encode(t)) == t`` exactly. Id 0 is
    ``<|endoftext|>``. Training is deterministic: the same texts give the same tokenizer.
    The vocabulary may come out smaller than asked when the texts have fewer merges to learn.
    """
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # jmp shows its own progress
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, kind="bpe", spec=f"bpe:{vocab_size}", eos_id=tok.token_to_id(EOS_TOKEN))


def fingerprint_of(tokenizer: Tokenizer | str, /) -> str:
    """The fingerprint of a tokenizer, of the spec naming one, or a fingerprint itself.

    Example:
        >>> fingerprint_of("bytes") == ByteTokenizer.fingerprint
        True
    """
    if not isinstance(tokenizer, str):
        return tokenizer.fingerprint
    if len(tokenizer) == 64 and all(c in "0123456789abcdef" for c in tokenizer):
        return tokenizer  # already a sha256
    return load_tokenizer(tokenizer).fingerprint
