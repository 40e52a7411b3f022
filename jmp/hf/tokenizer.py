"""Text <-> token ids: a folder's ``tokenizer.json`` (Hugging Face ``tokenizers``), else bytes.

:func:`load_tokenizer` gives a :class:`HFTokenizer` when the folder has a ``tokenizer.json``
and the :class:`ByteTokenizer` (jmp's default: a token is a byte, vocabulary 256, as in
:mod:`jmp.train.data`) otherwise. Both have the same small interface: ``encode(text)``,
``decode(ids)``, ``vocab_size``, ``eos_id`` and ``kind``.

The end-of-sequence id is read from ``tokenizer_config.json`` (``eos_token``), else from
``config.json`` (``eos_token_id``); it is None when neither names one.

Example:
    >>> import tempfile
    >>> tok = load_tokenizer(tempfile.mkdtemp())         # no tokenizer.json: bytes
    >>> tok.kind, tok.vocab_size, tok.encode("hé")
    ('bytes', 256, [104, 195, 169])
    >>> tok.decode([104, 195, 169])
    'hé'
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from jmp.errors import ConfigError
from jmp.hf.files import CONFIG, read_json

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256, no end-of-sequence token)."""

    kind = "bytes"
    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str, /) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], /) -> str:
        # a sampled byte sequence may cut a character in two: show it, do not fail
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (from ``tokenizer.json``) and its eos id.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
        >>> raw = Tokenizer(models.BPE())
        >>> raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
        >>> raw.train_from_iterator(["a small text, a small test"] * 10,
        ...     trainers.BpeTrainer(vocab_size=280, special_tokens=["</s>"],
        ...                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        >>> tok = HFTokenizer(raw, eos_id=raw.token_to_id("</s>"))
        >>> tok.decode(tok.encode("a small test")), tok.eos_id
        (' a small test', 0)
    """

    kind = TOKENIZER

    def __init__(self, tokenizer: Any, /, *, eos_id: int | None = None) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, /) -> HFTokenizer:
        """The folder's ``tokenizer.json``, its eos id from the configs beside it."""
        from tokenizers import Tokenizer

        path = os.path.join(os.fspath(folder), TOKENIZER)
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on a bad file
            raise ConfigError(
                f"Cannot read tokenizer {path!r}: {str(err).splitlines()[0]}. Fix: restore the "
                f"file, or remove it to use bytes."
            ) from None
        return cls(tokenizer, eos_id=_eos_id(os.fspath(folder), tokenizer))

    @property
    def vocab_size(self) -> int:
        """Ids run below this (added special tokens included)."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, /, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the tokenizer's
        post-processor adds (e.g. Llama's ``<|begin_of_text|>``)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], /) -> str:
        return str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False))

    def save(self, folder: str | os.PathLike, /) -> None:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` naming the eos token."""
        folder = os.fspath(folder)
        self.tokenizer.save(os.path.join(folder, TOKENIZER))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if self.eos_id is not None:
            config["eos_token"] = self.tokenizer.id_to_token(self.eos_id)
        with open(os.path.join(folder, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)


Tokenizer = HFTokenizer | ByteTokenizer


def _eos_id(folder: str, tokenizer: Any) -> int | None:
    token_config = os.path.join(folder, TOKENIZER_CONFIG)
    if os.path.exists(token_config):
        eos = read_json(token_config, what="The tokenizer config").get("eos_token")
        if isinstance(eos, dict):  # {"content": "</s>", ...} in older files
            eos = eos.get("content")
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return int(tokenizer.token_to_id(eos))
    config = os.path.join(folder, CONFIG)
    if os.path.exists(config):
        eos = read_json(config, what="The model config").get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos  # Llama 3 lists several
        if isinstance(eos, int):
            return eos
    return None


def load_tokenizer(folder: str | os.PathLike, /) -> Tokenizer:
    """The folder's ``tokenizer.json`` as an :class:`HFTokenizer`, else a :class:`ByteTokenizer`."""
    if os.path.exists(os.path.join(os.fspath(folder), TOKENIZER)):
        return HFTokenizer.from_folder(folder)
    return ByteTokenizer()
