"""The training input pipeline over a prepared corpus, built with ``grain``.

Batch ``k`` is a pure function of (seed, k) and the corpus, never of the process count, so a run
resumes exactly, onto any number of processes. The global row ``g = k * batch_size + r``
(``r`` the row in the batch) is found in two shuffles:

1. grain's global shuffle (``grain.MapDataset.range(R).shuffle(seed).repeat()``) maps ``g`` to
   the packed row ``epoch * R + i``: every epoch visits its ``R`` rows once, in a fresh order;
2. row ``i`` of that epoch's stream is packed as :mod:`jmp.train.data.packing` says, the
   documents laid end to end in the epoch's own seeded order (so rows mix other documents
   each epoch).

Each process computes only its own rows of each batch (``rows``, ``sharding``, or a contiguous
block from ``process_index`` / ``process_count``). grain's worker threads (``ReadOptions``)
build the next batches while the step runs; :meth:`Loader.device_batches` also puts them on
the devices ahead of time.

Example:
    >>> import tempfile
    >>> from jmp.train.data.corpus import write_corpus
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_corpus(folder, [np.arange(1, 40), np.arange(50, 75)], vocab_size=100)
    >>> loader = Loader(folder, seq_len=16, batch_size=4, seed=0)
    >>> batch = loader.batches(0)
    >>> sorted(batch), batch["inputs"].shape, loader.rows_per_epoch
    (['inputs', 'loss_mask', 'positions', 'segment_ids', 'targets'], (4, 16), 4)
    >>> loader.state()["step"]
    1
    >>> loader.close()
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from jmp.errors import ConfigError
from jmp.train.data.corpus import Corpus
from jmp.train.data.packing import KEYS, Layout, document_order, pack
from jmp.train.data.text import local_rows
from jmp.train.data.tokenizer import Tokenizer, fingerprint_of

Batch = dict[str, np.ndarray]
#: What :meth:`Loader.state` holds; :meth:`Loader.restore` needs all of it.
STATE_KEYS = ("seed", "step", "corpus", "seq_len", "batch_size")


class Loader:
    """Packed batches of a corpus: ``batches(step)``, iteration, ``state()`` / ``restore()``.

    Args:
        corpus: a :class:`~jmp.train.data.corpus.Corpus` or its folder.
        seq_len: tokens per row.
        batch_size: rows of the global batch.
        seed: orders rows and documents (``0 <= seed < 2**32``).
        rows: the rows of the global batch this process reads, sorted.
        sharding: or: the batch sharding; this process reads the rows its devices hold (and
            :meth:`device_batches` places batches with it).
        process_index: or: this process's place among ``process_count`` processes, each reading
            a contiguous block of ``batch_size // process_count`` rows. Default: JAX's.
        process_count: see ``process_index``.
        threads: grain worker threads building batches ahead of the step.
        prefetch: batches built ahead (host memory: ``prefetch`` local batches).
    """

    def __init__(
        self,
        corpus: Corpus | str,
        /,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rows: Sequence[int] | None = None,
        sharding: NamedSharding | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        threads: int = 2,
        prefetch: int = 4,
    ) -> None:
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Loader {name}={value!r} must be a positive int.")
        if threads < 0 or prefetch < 0:
            raise ConfigError(f"Loader threads={threads} and prefetch={prefetch} must be >= 0.")
        self.seq_len, self.batch_size, self.sharding = seq_len, batch_size, sharding
        self.threads, self.prefetch = threads, prefetch
        self.rows = _resolve_rows(batch_size, seq_len, rows, sharding, process_index, process_count)
        self.rows_per_epoch = -(-self.corpus.n_tokens // seq_len)
        self._layouts: dict[int, Layout] = {}
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[int, Iterator[Any]]] = {}
        weakref.finalize(self, _close_streams, self._streams)  # before interpreter teardown
        self._next = 0
        self._set_seed(seed)

    # --- what the trainer calls ---------------------------------------------------------------

    def batches(self, step: int, /) -> Batch:
        """This process's rows of the global batch of ``step``: a dict of ``(rows, seq_len)``.

        Consecutive steps come from grain's prefetch; another step restarts it there.
        """
        return self._from_stream("host", step)

    def device_batches(self, step: int, /) -> dict[str, jax.Array]:
        """The global batch of ``step`` as ``jax.Array`` s placed with ``sharding`` (each process
        gives its rows), transferred ahead of time by a grain prefetch thread."""
        if self.sharding is None:
            raise ConfigError(
                "device_batches needs the batch sharding. Fix: Loader(..., sharding="
                "jmp.train.data.batch_sharding(mesh, rules))."
            )
        return self._from_stream("device", step)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> Batch:
        """The batch at the current position (0, or the restored step), then the next..."""
        return self.batches(self._next)

    def state(self) -> dict[str, Any]:
        """A small JSON-able dict: enough to continue exactly here (:meth:`restore`)."""
        return {
            "seed": self.seed,
            "step": self._next,
            "corpus": self.corpus.fingerprint,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
        }

    def restore(self, state: dict[str, Any], /) -> None:
        """Continue from ``state`` (its seed and step): the next batch is the one after it.

        Raises:
            ConfigError: the state is of another corpus, sequence length or batch size (its
                batches would be other ones), or is not a loader state.
        """
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ConfigError(
                f"Loader state {state!r} lacks {missing}. Fix: pass what Loader.state() gave."
            )
        changed = [
            f"{k}: {state[k]!r} in the state, {getattr(self, k)!r} here"
            for k in ("seq_len", "batch_size")
            if state[k] != getattr(self, k)
        ]
        if state["corpus"] != self.corpus.fingerprint:
            changed.append(
                f"corpus: {state['corpus'][:12]} in the state, {self.corpus.fingerprint[:12]} "
                f"here ({self.corpus.path})"
            )
        if changed:
            raise ConfigError(
                "Cannot restore the loader: " + "; ".join(changed) + ". Fix: resume with the "
                "corpus, --seq and --batch the run was started with."
            )
        if state["seed"] != self.seed:
            self._set_seed(int(state["seed"]))
        self.close()
        self._next = int(state["step"])

    def check(
        self,
        *,
        seq_len: int | None = None,
        vocab_size: int | None = None,
        tokenizer: Tokenizer | str | None = None,
    ) -> None:
        """Refuse a model or run this corpus cannot feed; each problem in one line.

        Args:
            seq_len: the model's longest sequence: the loader's rows must fit.
            vocab_size: the model's vocabulary: the corpus's tokenizer must not be larger
                (an id past the embedding table gives a NaN loss).
            tokenizer: the run's tokenizer (an object, a spec such as ``"bytes"`` or a
                tokenizer.json path, or a fingerprint): the corpus must be made by it.
        """
        info = self.corpus.header["tokenizer"]
        problems = []
        if seq_len is not None and self.seq_len > seq_len:
            problems.append(
                f"rows of {self.seq_len} tokens are longer than the model's seq_len={seq_len} "
                f"(fix: a sequence length <= {seq_len})"
            )
        if vocab_size is not None and self.corpus.vocab_size > vocab_size:
            problems.append(
                f"the corpus's {info['kind']} tokenizer has {self.corpus.vocab_size} ids, more "
                f"than the model's vocab_size={vocab_size} (fix: a model with vocab_size >= "
                f"{self.corpus.vocab_size}, or a corpus prepared with a smaller vocabulary)"
            )
        if tokenizer is not None and fingerprint_of(tokenizer) != info["fingerprint"]:
            theirs = tokenizer if isinstance(tokenizer, str) else tokenizer.spec
            problems.append(
                f"the corpus was made by the {info['kind']} tokenizer {info['spec']!r} "
                f"(fingerprint {info['fingerprint'][:12]}), not the run's {theirs!r} (fix: "
                "prepare the corpus with the run's tokenizer, or train with the corpus's)"
            )
        if problems:
            raise ConfigError(f"Corpus {self.corpus.path!r}: " + "; ".join(problems) + ".")

    def close(self) -> None:
        """Stop the prefetch threads (a later batch starts them again)."""
        _close_streams(self._streams)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- how a batch is made ------------------------------------------------------------------

    @property
    def tokens_per_epoch(self) -> int:
        return self.corpus.n_tokens

    def global_rows(self, step: int, /) -> np.ndarray:
        """Packed-row numbers (``epoch * rows_per_epoch + row``) of this process's rows of
        ``step``: grain's per-epoch global shuffle of the rows."""
        first = step * self.batch_size
        return np.array([self._order[first + r] for r in self.rows], dtype=np.int64)

    def local_batch(self, step: int, /) -> Batch:
        """This process's rows of ``step``, computed now (what the prefetch threads run)."""
        packed = self.global_rows(step)
        epochs, rows = np.divmod(packed, self.rows_per_epoch)
        out = {k: np.empty((len(packed), self.seq_len), _dtype(k)) for k in KEYS}
        for epoch in np.unique(epochs):  # one epoch, or two across an epoch's end
            pick = epochs == epoch
            part = pack(
                self.corpus.tokens, self._layout(int(epoch)), rows[pick], seq_len=self.seq_len
            )
            for k in KEYS:
                out[k][pick] = part[k]
        return out

    def _set_seed(self, seed: int) -> None:
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ConfigError(f"Loader seed={seed!r} must be an int in [0, 2**32).")
        self.close()  # no prefetch thread may read the old order
        self.seed = int(seed)
        self._order = grain.MapDataset.range(self.rows_per_epoch).shuffle(seed=self.seed).repeat()
        self._order[0]  # grain's stats start on first use, not thread-safely: start them here
        with self._lock:
            self._layouts.clear()

    def _layout(self, epoch: int) -> Layout:
        """The epoch's document stream (kept for the two latest epochs: threads share it)."""
        with self._lock:
            layout = self._layouts.get(epoch)
            if layout is None:
                order = document_order(self.seed, epoch, self.corpus.n_documents)
                layout = Layout.of(self.corpus.offsets, order=order)
                self._layouts[epoch] = layout
                for old in sorted(self._layouts)[:-2]:
                    del self._layouts[old]
            return layout

    def _from_stream(self, kind: str, step: int) -> Any:
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ConfigError(f"Batch step {step!r} must be an int >= 0.")
        at, stream = self._streams.get(kind, (-1, None))
        if stream is None or at != step:
            self._streams.pop(kind, None)
            _close(stream)
            stream = iter(self._pipeline(kind, int(step)))
            _start(stream)
        batch = next(stream)
        self._streams[kind] = (int(step) + 1, stream)
        self._next = int(step) + 1
        return batch

    def _pipeline(self, kind: str, start: int) -> Any:
        """grain: steps from ``start`` -> local batches, built ahead by ``threads`` threads."""
        steps = grain.MapDataset.range(start, sys.maxsize).map(self.local_batch)
        ds = steps.to_iter_dataset(
            grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
        )
        if kind == "device":
            sharding, shape = self.sharding, (self.batch_size, self.seq_len)

            def place(batch: Batch) -> dict[str, jax.Array]:
                return {
                    k: jax.make_array_from_process_local_data(sharding, v, shape)
                    for k, v in batch.items()
                }

            # a thread transfers the next batches while the step runs (grain's device_put shape)
            ds = grain.experimental.ThreadPrefetchIterDataset(ds.map(place), prefetch_buffer_size=2)
        return ds


def _dtype(key: str) -> type:
    return np.float32 if key == "loss_mask" else np.int32


def _resolve_rows(
    batch_size: int,
    seq_len: int,
    rows: Sequence[int] | None,
    sharding: NamedSharding | None,
    process_index: int | None,
    process_count: int | None,
) -> list[int]:
    """This process's rows of the global batch, sorted (the order the sharding places them)."""
    given = [rows is not None, sharding is not None, process_index is not None]
    if sum(given) > 1:
        raise ConfigError(
            "Give the loader one of rows=, sharding= or process_index=/process_count=."
        )
    if sharding is not None:
        return local_rows(sharding, (batch_size, seq_len))
    if rows is not None:
        rows = [int(r) for r in rows]
        if rows != sorted(set(rows)) or not rows or rows[0] < 0 or rows[-1] >= batch_size:
            raise ConfigError(
                f"Loader rows={rows} must be sorted, distinct and in [0, {batch_size}). Fix: "
                "e.g. jmp.train.data.local_rows(sharding, (batch, seq))."
            )
        return rows
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count or batch_size % count:
        raise ConfigError(
            f"process_index={index}, process_count={count}: the index must be in "
            f"[0, {count}) and the count must divide batch_size={batch_size}. Fix: a batch "
            "size that is a multiple of the process count."
        )
    share = batch_size // count
    return list(range(index * share, (index + 1) * share))


def _start(stream: Any) -> None:
    """Start building batches now, not at the first ``next`` (grain waits for it)."""
    starter = getattr(stream, "start_prefetch", None)
    if starter is not None:
        starter()


def _close(stream: Any) -> None:
    closer = getattr(stream, "close", None)
    if closer is not None:
        closer()


def _close_streams(streams: dict[str, tuple[int, Any]]) -> None:
    for _, stream in list(streams.values()):
        _close(stream)
    streams.clear()
