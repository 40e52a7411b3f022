"""Document packing: concatenate-and-split, with segment ids, positions and a loss mask.

The rule. For epoch ``e`` the documents are put in the order :func:`document_order` gives
(a permutation seeded by ``(seed, e)``) and laid end to end into one stream of ``N`` tokens (the
corpus's token count: every document once). The stream is cut into ``ceil(N / seq_len)`` rows
of ``seq_len`` tokens; the last row is padded. A document that does not fit where it starts
goes on in the next row of the stream, so no token is dropped or repeated in an epoch. In a row:

- ``inputs[i]``: the token at stream position ``row * seq_len + i`` (0 for padding);
- ``segment_ids[i]``: 1 for the first document piece of the row, 2 for the next, ...; 0 for
  padding, so attention can be kept within a segment (a document cut by a row boundary starts
  a new segment in the next row: it does not see its own beginning there);
- ``positions[i]``: the index of the token within its segment (0 at each segment's start; it
  never reaches ``seq_len``, so learned position tables of ``seq_len`` entries suffice);
- ``targets[i]``: the next token of the stream when it belongs to the same document (also across
  the row's end: the last token of a row predicts the first of the next one), else 0;
- ``loss_mask[i]``: 1.0 where ``targets[i]`` is such a next token; 0.0 for padding and for a
  document's last token (its successor starts another document).

Example:
    >>> offsets = np.array([0, 3, 5])                  # documents [10, 11, 12] and [20, 21]
    >>> tokens = np.array([10, 11, 12, 20, 21])
    >>> layout = Layout.of(offsets, order=np.array([1, 0]))    # document 1 first
    >>> row = pack(tokens, layout, np.array([0]), seq_len=4)
    >>> row["inputs"].tolist(), row["segment_ids"].tolist(), row["positions"].tolist()
    ([[20, 21, 10, 11]], [[1, 1, 2, 2]], [[0, 1, 0, 1]])
    >>> row["targets"].tolist(), row["loss_mask"].tolist()
    ([[21, 0, 11, 12]], [[1.0, 0.0, 1.0, 1.0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The keys of a packed batch; every value is ``(rows, seq_len)``.
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def document_order(seed: int, epoch: int, n_documents: int, /) -> np.ndarray:
    """The documents' order in the stream of ``epoch``: a permutation seeded by (seed, epoch).

    Example:
        >>> sorted(document_order(0, 3, 5).tolist())
        [0, 1, 2, 3, 4]
    """
    return np.random.default_rng([seed, epoch]).permutation(n_documents)


@dataclass(frozen=True)
class Layout:
    """Documents laid end to end in a given order: the stream that rows are cut from.

    Attributes:
        source: ``(D,)`` where the stream's ``i``-th document starts in the token array.
        start: ``(D + 1,)`` where it starts in the stream; ``start[-1]`` is the stream length.
    """

    source: np.ndarray
    start: np.ndarray

    @classmethod
    def of(cls, offsets: np.ndarray, /, *, order: np.ndarray) -> Layout:
        """The layout of documents ``order[0], order[1], ...`` (``offsets`` as in a corpus)."""
        lengths = np.diff(offsets)[order]
        start = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths, out=start[1:])
        return cls(source=np.asarray(offsets[:-1][order], dtype=np.int64), start=start)

    @property
    def n_tokens(self) -> int:
        return int(self.start[-1])

    def n_rows(self, seq_len: int, /) -> int:
        """Rows of ``seq_len`` the stream is cut into (the last one padded)."""
        return -(-self.n_tokens // seq_len)


def pack(
    tokens: np.ndarray, layout: Layout, rows: np.ndarray, /, *, seq_len: int
) -> dict[str, np.ndarray]:
    """The packed ``rows`` (indices into the stream's rows) as a dict of ``(len(rows), seq_len)``.

    Vectorized over every token of every row: one ``searchsorted`` finds each stream position's
    document, one gather reads the memory-mapped tokens.
    """
    n = layout.n_tokens
    # stream positions of each row's tokens, plus one past the end for the last target
    where = np.asarray(rows, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
    real = where < n
    safe = np.minimum(where, n - 1)
    doc = np.searchsorted(layout.start, safe, side="right") - 1
    begin = layout.start[doc]  # where each token's document starts in the stream
    ids = np.take(tokens, layout.source[doc] + (safe - begin)).astype(np.int32)
    ids[~real] = 0
    # a row's segments are its consecutive documents: no document is empty, so the stream
    # index of the document minus that of the row's first one, plus one
    segment = (doc - doc[:, :1] + 1).astype(np.int32)
    segment[~real] = 0
    position = (where - np.maximum(begin, where[:, :1])).astype(np.int32)
    position[~real] = 0
    same = real[:, 1:] & (doc[:, 1:] == doc[:, :-1])
    return {
        "inputs": ids[:, :-1],
        "targets": np.where(same, ids[:, 1:], 0),
        "segment_ids": segment[:, :-1],
        "positions": position[:, :-1],
        "loss_mask": same.astype(np.float32),
    }
