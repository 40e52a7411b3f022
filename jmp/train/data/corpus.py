"""The on-disk corpus: token ids in one memory-mapped array, document boundaries, a JSON header.

A corpus folder holds:

- ``tokens.bin``: every document's token ids end to end, little-endian ``uint16`` when the
  vocabulary fits in 16 bits, else ``uint32`` (read with ``np.memmap``: nothing is loaded);
- ``documents.npy``: ``int64`` offsets, ``D + 1`` of them: document ``i`` is
  ``tokens[offsets[i]:offsets[i + 1]]`` (no document is empty);
- ``corpus.json``: the header: format and version, the tokenizer (kind, spec, fingerprint,
  vocabulary size, end-of-text id), the dtype, token and document counts, what the inputs were
  (files, bytes, fingerprint), and ``fingerprint``: sha256 of the tokens and the offsets, what
  identifies this corpus in a run's state;
- ``tokenizer.json``: the tokenizer, when it is not the bytes one.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> header = write_corpus(folder, [np.array([5, 6, 7]), np.array([8])], vocab_size=16)
    >>> corpus = Corpus(folder)
    >>> corpus.n_tokens, corpus.n_documents, corpus.document(1).tolist(), corpus.tokens.dtype
    (4, 2, [8], dtype('uint16'))
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from jmp.errors import ConfigError

FORMAT, VERSION = "jmp-corpus", 1
HEADER, TOKENS, DOCUMENTS, TOKENIZER = (
    "corpus.json",
    "tokens.bin",
    "documents.npy",
    "tokenizer.json",
)
#: Every file a corpus may hold: what a folder may contain to be replaced as a corpus.
FILES = (HEADER, TOKENS, DOCUMENTS, TOKENIZER)


class CorpusError(ConfigError):
    """A folder that is not a readable corpus (missing, another format, truncated)."""


def token_dtype(vocab_size: int, /) -> np.dtype:
    """``uint16`` when every id of the vocabulary fits in 16 bits, else ``uint32``."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def is_corpus(path: str, /) -> bool:
    """Whether ``path`` is a folder with a corpus header."""
    return os.path.isfile(os.path.join(path, HEADER))


class CorpusWriter:
    """Writes a corpus into an empty folder, one document at a time (memory stays flat).

    ``add(ids)`` appends a document; ``finish(**header)`` writes the boundaries and the header
    and returns it. The corpus fingerprint is hashed as the tokens stream by.
    """

    def __init__(self, folder: str, /, *, vocab_size: int) -> None:
        self.folder, self.vocab_size = folder, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.offsets = [0]
        self._hash = hashlib.sha256()
        self._file = open(os.path.join(folder, TOKENS), "xb")  # noqa: SIM115 (closed in finish)

    def add(self, ids: np.ndarray, /) -> None:
        if len(ids) == 0:
            return  # an empty document holds nothing to learn
        top = int(np.max(ids))
        if top >= self.vocab_size or int(np.min(ids)) < 0:
            raise ConfigError(
                f"Token id {top} is outside the vocabulary of {self.vocab_size}. Fix: give the "
                "vocabulary size of the tokenizer that made the ids."
            )
        blob = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self._file.write(blob)
        self._hash.update(blob)
        self.offsets.append(self.offsets[-1] + len(ids))

    def finish(self, **header: Any) -> dict[str, Any]:
        self._file.close()
        if len(self.offsets) == 1:
            raise ConfigError(
                "The corpus is empty: no document holds a token. Fix: give text files that are "
                "not empty."
            )
        offsets = np.asarray(self.offsets, dtype=np.int64)
        np.save(os.path.join(self.folder, DOCUMENTS), offsets)
        self._hash.update(offsets.tobytes())
        full = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokens": int(offsets[-1]),
            "documents": len(offsets) - 1,
            "fingerprint": self._hash.hexdigest(),
            **header,
        }
        write_json(os.path.join(self.folder, HEADER), full)
        return full

    def abort(self) -> None:
        self._file.close()


def write_json(path: str, data: dict[str, Any], /) -> None:
    """Write JSON atomically (a reader never sees half a header)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_corpus(
    folder: str,
    documents: Iterable[np.ndarray],
    /,
    *,
    vocab_size: int,
    eos_id: int | None = None,
    tokenizer: dict[str, Any] | None = None,
    **header: Any,
) -> dict[str, Any]:
    """A corpus of the given token-id documents in ``folder`` (made if needed, must be empty).

    For hand-made corpora (tests, examples, ids from elsewhere); ``jmp data prepare`` makes
    corpora from text. ``tokenizer`` is what the header records about the tokenizer (kind,
    spec, fingerprint); by default an unnamed one of ``vocab_size`` ids.
    """
    os.makedirs(folder, exist_ok=True)
    if os.listdir(folder):
        raise ConfigError(f"{folder!r} is not empty. Fix: write the corpus into a new folder.")
    writer = CorpusWriter(folder, vocab_size=vocab_size)
    try:
        for ids in documents:
            writer.add(np.asarray(ids))
    except BaseException:
        writer.abort()
        raise
    info = tokenizer or {"kind": "ids", "spec": "ids", "fingerprint": f"ids:{vocab_size}"}
    info = {**info, "vocab_size": vocab_size, "eos_id": eos_id}
    return writer.finish(tokenizer=info, **header)


class Corpus:
    """A prepared corpus, opened read-only: ``tokens`` is memory-mapped, ``offsets`` in memory.

    Raises:
        CorpusError: ``path`` is no corpus, has another format version, or its files disagree
            with its header (say, a ``tokens.bin`` cut short).
    """

    def __init__(self, path: str, /) -> None:
        self.path = os.path.abspath(path)
        self.header = self._read_header()
        n, dtype = int(self.header["tokens"]), np.dtype(self.header["dtype"])
        tokens_path = os.path.join(self.path, TOKENS)
        size = os.path.getsize(tokens_path) if os.path.isfile(tokens_path) else -1
        if size != n * dtype.itemsize:
            raise CorpusError(
                f"Corpus {self.path!r}: {TOKENS} holds {max(size, 0)} bytes, its header says "
                f"{n} tokens of {dtype.itemsize} bytes. Fix: prepare the corpus again "
                "(jmp data prepare ... --overwrite)."
            )
        self.tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n,))
        self.offsets = np.load(os.path.join(self.path, DOCUMENTS))
        if len(self.offsets) != self.n_documents + 1 or int(self.offsets[-1]) != n:
            raise CorpusError(
                f"Corpus {self.path!r}: {DOCUMENTS} does not match its header. Fix: prepare "
                "the corpus again (jmp data prepare ... --overwrite)."
            )

    def _read_header(self) -> dict[str, Any]:
        if not is_corpus(self.path):
            raise CorpusError(
                f"{self.path!r} is not a prepared corpus (no {HEADER}). Fix: make one with "
                f"`jmp data prepare TEXTS... --out {self.path}`."
            )
        try:
            with open(os.path.join(self.path, HEADER), encoding="utf-8") as f:
                header = json.load(f)
        except (OSError, ValueError) as err:
            raise CorpusError(
                f"Cannot read {HEADER} of {self.path!r} ({err}). Fix: prepare it again."
            ) from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise CorpusError(
                f"{self.path!r} holds format {header.get('format')!r} version "
                f"{header.get('version')!r}, not {FORMAT!r} version {VERSION}. Fix: prepare it "
                "again with this jmp."
            )
        return header

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokens and the document offsets."""
        return str(self.header["fingerprint"])

    @property
    def vocab_size(self) -> int:
        return int(self.header["vocab_size"])

    @property
    def eos_id(self) -> int | None:
        return self.header["tokenizer"].get("eos_id")

    @property
    def n_tokens(self) -> int:
        return int(self.header["tokens"])

    @property
    def n_documents(self) -> int:
        return int(self.header["documents"])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per document."""
        return np.diff(self.offsets)

    def document(self, i: int, /) -> np.ndarray:
        """The token ids of document ``i`` (a view of the memory map)."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def tokenizer(self) -> Any:
        """The tokenizer that made this corpus (:mod:`jmp.train.data.tokenizer`)."""
        from jmp.train.data.tokenizer import ByteTokenizer, load_tokenizer

        kind = self.header["tokenizer"]["kind"]
        if kind == "bytes":
            return ByteTokenizer()
        path = os.path.join(self.path, TOKENIZER)
        if not os.path.isfile(path):
            raise CorpusError(
                f"Corpus {self.path!r} was made by a {kind!r} tokenizer it does not hold. Fix: "
                "use the tokenizer that made its ids."
            )
        return load_tokenizer(path)

    def __repr__(self) -> str:
        kind = self.header["tokenizer"]["kind"]
        return (
            f"Corpus({self.path!r}: {self.n_documents} documents, {self.n_tokens} tokens, "
            f"{kind} vocabulary {self.vocab_size})"
        )
