"""Training data: byte text as pure functions of the step, and prepared token corpora.

- :mod:`~jmp.train.data.text`: the bytes of local text files; batch ``k`` a pure function of
  (seed, k) (``jmp train --data FILES``).
- :mod:`~jmp.train.data.tokenizer`: bytes, a locally trained BPE, or a ``tokenizer.json``.
- :mod:`~jmp.train.data.corpus`: the on-disk corpus (memory-mapped tokens, document offsets,
  a JSON header).
- :mod:`~jmp.train.data.prepare`: :func:`prepare` (``jmp data prepare``) makes one from text.
- :mod:`~jmp.train.data.packing`: documents packed into rows with segment ids and positions.
- :mod:`~jmp.train.data.loader`: :class:`Loader`, the grain pipeline a trainer calls.

``Loader`` imports grain (which imports JAX), so it loads when first used.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with open(f"{folder}/a.txt", "w") as f:
    ...     _ = f.write("def f(x):\\n    return x\\n" * 20)
    >>> corpus = prepare([f"{folder}/a.txt"], f"{folder}/corpus", progress=False).corpus
    >>> with jmp.train.data.Loader(corpus, seq_len=32, batch_size=4, seed=0) as loader:
    ...     loader.check(seq_len=64, vocab_size=256, tokenizer="bytes")
    ...     batch = loader.batches(0)
    >>> batch["inputs"].shape, batch["segment_ids"].max() >= 1
    ((4, 32), np.True_)
"""

import importlib
from typing import TYPE_CHECKING, Any

from jmp.train.data.corpus import Corpus, CorpusError, write_corpus
from jmp.train.data.packing import Layout, document_order, pack
from jmp.train.data.prepare import Prepared, prepare
from jmp.train.data.text import (
    DEFAULT_MAX_BYTES,
    VOCAB_SIZE,
    TextData,
    batch_sharding,
    default_corpus_files,
    expand_paths,
    local_rows,
    read_bytes,
)
from jmp.train.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

if TYPE_CHECKING:
    from jmp.train.data.loader import Loader

_LAZY_NAMES = {"Loader": "jmp.train.data.loader"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'jmp.train.data' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_BYTES",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "Corpus",
    "CorpusError",
    "HFTokenizer",
    "Layout",
    "Loader",
    "Prepared",
    "TextData",
    "batch_sharding",
    "default_corpus_files",
    "document_order",
    "expand_paths",
    "load_tokenizer",
    "local_rows",
    "pack",
    "prepare",
    "read_bytes",
    "train_bpe",
    "write_corpus",
]
