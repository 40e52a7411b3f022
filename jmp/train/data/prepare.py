"""``prepare``: tokenize local text files into a corpus (``jmp data prepare``).

One document per file: each input file (files, folders searched recursively, globs; sorted) is
one document, followed by the tokenizer's end-of-text id when it has one (a trained BPE does,
the bytes tokenizer does not). Empty files are skipped (and counted in the header).

What happens, in order; nothing is written until every check has passed, and the corpus is
built in a temporary folder beside ``out_dir``, renamed into place only when complete:

1. the tokenizer spec and the inputs are checked (no file matched: refused);
2. every file is read, hashed and checked to be UTF-8 text, in parallel (a binary file is
   refused, by name; no text at all is refused as an empty corpus);
3. if ``out_dir`` already holds the corpus of these inputs and this tokenizer, nothing is done
   (and it says so); if it holds another corpus, it is refused unless ``overwrite``, which
   moves the old one aside to ``<out_dir>.replaced-<time>`` (never deleted); a folder holding
   anything else is never touched;
4. a ``bpe:N`` tokenizer is trained on the texts; the files are tokenized in parallel threads,
   written in input order.

Example:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "a.txt"), "w") as f:
    ...     _ = f.write("hello world")
    >>> done = prepare([folder], os.path.join(folder, "corpus"), progress=False)
    >>> done.corpus.n_tokens, done.corpus.n_documents, done.reused
    (11, 1, False)
    >>> prepare([os.path.join(folder, "a.txt")], done.corpus.path, progress=False).reused
    True
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from jmp.errors import ConfigError
from jmp.train.data import corpus as fmt
from jmp.train.data.corpus import Corpus, CorpusWriter, is_corpus
from jmp.train.data.text import expand_paths
from jmp.train.data.tokenizer import Tokenizer, load_tokenizer, parse_spec, train_bpe
from jmp.train.progress import make_console, say

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` did: the corpus, whether it was already up to date, and where an
    overwritten corpus was moved (None if none was)."""

    corpus: Corpus
    reused: bool
    replaced: str | None = None


@dataclass(frozen=True)
class _Scan:
    """What reading the inputs found: sizes and the fingerprint of their contents in order."""

    files: list[str]
    sizes: list[int]
    fingerprint: str

    @property
    def total(self) -> int:
        return sum(self.sizes)


def prepare(
    inputs: Sequence[str] | str,
    out_dir: str,
    /,
    *,
    tokenizer: str = "bytes",
    workers: int | None = None,
    overwrite: bool = False,
    progress: Any = True,
) -> Prepared:
    """Tokenize the text files ``inputs`` name into a corpus in ``out_dir`` (see the module).

    Args:
        inputs: files, folders (searched recursively) or globs.
        out_dir: the corpus folder (created; must be new, empty, or hold a corpus).
        tokenizer: ``"bytes"``, ``"bpe:<vocab_size>"`` (trained here on the inputs and saved
            as ``tokenizer.json`` in the corpus), or a ``tokenizer.json`` / Hugging Face folder.
        workers: threads reading and tokenizing files (default: the CPU count, at most 8).
        overwrite: replace a corpus of other inputs or another tokenizer (moved aside).
        progress: ``True`` for a rich progress bar, a ``rich`` console, or False for silence.

    Raises:
        ConfigError: no input file, a file that is not UTF-8 text, no text at all, a bad
            tokenizer, or an ``out_dir`` holding something else; nothing is written then.
    """
    kind, value = parse_spec(tokenizer)
    out = os.path.abspath(out_dir)
    files = _input_files([inputs] if isinstance(inputs, str) else list(inputs), out)
    workers = workers or min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"workers={workers} must be >= 1.")
    _check_out_dir(out)
    console = make_console(progress)
    scan = _scan(files, workers, console)
    if scan.total == 0:
        raise ConfigError(
            f"The corpus is empty: the {len(files)} input file(s) hold no text. Fix: give text "
            "files that are not empty."
        )
    if is_corpus(out):
        old = Corpus(out).header
        if _same_request(old, scan, kind, value):
            _say(
                console,
                f"{out}: already prepared from these {len(files)} files with this "
                f"tokenizer ({old['tokens']:,} tokens): nothing to do.",
            )
            return Prepared(Corpus(out), reused=True)
        if not overwrite:
            raise ConfigError(
                f"{out!r} already holds another corpus ({_describe(old)}). Fix: --overwrite "
                "(overwrite=True) to move it aside to <out>.replaced-<time>, or another --out."
            )
    return _build(scan, out, kind, value, workers, console)


def _say(console: Any, text: str) -> None:
    if console is not None:  # silent otherwise: Prepared tells the caller what happened
        say(console, text)


def _input_files(inputs: list[str], out: str) -> list[str]:
    """The input files, minus anything inside the corpus folder or its siblings we write."""
    if not inputs:
        raise ConfigError("No inputs given. Fix: name text files, folders or globs.")
    fix = "Fix: pass existing text files, folders or globs (e.g. 'texts/**/*.txt')."
    files = expand_paths(inputs, fix=fix)
    ours = (
        out + os.sep,
        out + ".replaced-",
        os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".tmp-"),
    )
    kept = [f for f in files if not os.path.abspath(f).startswith(ours)]
    if not kept:
        raise ConfigError(f"No input files outside the corpus folder {out!r}. {fix}")
    return kept


def _check_out_dir(out: str) -> None:
    """Refuse an ``out_dir`` that is a file, or a folder holding anything but a corpus."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is a file. Fix: name a folder for the corpus.")
    if os.path.isdir(out):
        others = sorted(set(os.listdir(out)) - set(fmt.FILES))
        if others or (os.listdir(out) and not is_corpus(out)):
            shown = ", ".join(others[:3]) or ", ".join(sorted(os.listdir(out))[:3])
            raise ConfigError(
                f"--out {out!r} holds files that are not a jmp corpus ({shown}...). Fix: name a "
                "new or empty folder (jmp never replaces other files)."
            )
    parent = os.path.dirname(out)
    if not os.access(parent if os.path.isdir(parent) else os.path.dirname(parent), os.W_OK):
        raise ConfigError(f"Cannot write into {parent!r}. Fix: an --out in a writable folder.")


def _read_text(path: str) -> tuple[bytes, str]:
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as err:
        raise ConfigError(
            f"Cannot read input {path!r}: {err.strerror}. Fix: check the path and its permissions."
        ) from None
    try:
        return blob, blob.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"Input {path!r} is not UTF-8 text (byte 0x{blob[err.start]:02x} at offset "
            f"{err.start}: a binary file?). Fix: leave it out of the inputs (e.g. a glob such "
            "as 'texts/**/*.txt') or convert it to UTF-8."
        ) from None


def _scan(files: list[str], workers: int, console: Any) -> _Scan:
    def one(path: str) -> tuple[int, bytes]:
        blob, _ = _read_text(path)
        return len(blob), hashlib.sha256(blob).digest()

    sizes, digest = [], hashlib.sha256()
    expected = sum(os.path.getsize(f) for f in files)
    with _Bar(console, "check", len(files), expected) as bar:
        for size, file_hash in _ordered(one, files, workers):
            sizes.append(size)
            digest.update(file_hash)  # the order of the files is part of the corpus
            bar.advance(size)
    return _Scan(files, sizes, digest.hexdigest())


def _same_request(old: dict[str, Any], scan: _Scan, kind: str, value: Any) -> bool:
    """Whether the corpus ``old`` is what these inputs and this tokenizer spec would give."""
    tok = old.get("tokenizer", {})
    if old.get("inputs", {}).get("fingerprint") != scan.fingerprint:
        return False
    if kind == "bytes":
        return tok.get("kind") == "bytes"
    if kind == "bpe":
        return tok.get("kind") == "bpe" and tok.get("spec") == f"bpe:{value}"
    return tok.get("kind") == "hf" and tok.get("fingerprint") == load_tokenizer(value).fingerprint


def _describe(header: dict[str, Any]) -> str:
    tok, inputs = header.get("tokenizer", {}), header.get("inputs", {})
    return (
        f"{header.get('tokens', '?'):,} tokens of {inputs.get('files', '?')} files, tokenizer "
        f"{tok.get('spec', '?')}"
    )


def _build(scan: _Scan, out: str, kind: str, value: Any, workers: int, console: Any) -> Prepared:
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        tok = _make_tokenizer(scan, kind, value, console)
        tok.save(tmp)
        header = _tokenize(scan, tok, tmp, workers, console)
        replaced = _move_aside(out) if is_corpus(out) else None
        if os.path.isdir(out):
            os.rmdir(out)  # an empty folder (checked): the finished corpus takes its place
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    moved = f"; the old corpus is in {replaced}" if replaced else ""
    _say(
        console,
        f"{out}: {header['documents']:,} documents, {header['tokens']:,} tokens "
        f"({header['dtype']}), tokenizer {tok.spec} of {tok.vocab_size:,} ids{moved}.",
    )
    return Prepared(Corpus(out), reused=False, replaced=replaced)


def _make_tokenizer(scan: _Scan, kind: str, value: Any, console: Any) -> Tokenizer:
    if kind != "bpe":
        return load_tokenizer("bytes" if kind == "bytes" else value)
    with _Bar(console, f"train bpe:{value}", len(scan.files), scan.total) as bar:

        def texts() -> Iterator[str]:
            for path, size in zip(scan.files, scan.sizes, strict=True):
                yield _read_text(path)[1]
                bar.advance(size)

        return train_bpe(texts(), vocab_size=value)


def _tokenize(scan: _Scan, tok: Tokenizer, folder: str, workers: int, console: Any) -> dict:
    eos = [] if tok.eos_id is None else [tok.eos_id]

    def one(path: str) -> np.ndarray:
        text = _read_text(path)[1]
        return np.concatenate([tok.encode(text), eos]) if text else np.zeros(0, np.int64)

    writer = CorpusWriter(folder, vocab_size=tok.vocab_size)
    empty = 0
    try:
        with _Bar(console, "tokenize", len(scan.files), scan.total) as bar:
            for ids, size in zip(_ordered(one, scan.files, workers), scan.sizes, strict=True):
                empty += size == 0
                writer.add(ids)
                bar.advance(size)
    except BaseException:
        writer.abort()
        raise
    info = {
        "kind": tok.kind,
        "spec": tok.spec,
        "fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
    }
    inputs = {
        "files": len(scan.files),
        "empty_files": empty,
        "bytes": scan.total,
        "fingerprint": scan.fingerprint,
    }
    return writer.finish(
        tokenizer=info, inputs=inputs, documents_are="one per input file", created=time.time()
    )


def _move_aside(out: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{out}.replaced-{stamp}", 1
    while os.path.exists(target):
        n += 1
        target = f"{out}.replaced-{stamp}-{n}"
    os.rename(out, target)
    return target


def _ordered(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """``map(fn, items)`` on ``workers`` threads, in order, at most ``2 * workers`` ahead (so
    memory holds a few files' tokens, not the corpus's)."""
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jmp-prepare") as pool:
        pending: deque[concurrent.futures.Future[_R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Bar:
    """A rich progress bar over the bytes of the inputs, with a count of files (silent without
    a console)."""

    def __init__(self, console: Any, what: str, files: int, nbytes: int) -> None:
        self.console, self.what, self.files, self.nbytes = console, what, files, nbytes
        self.bar: Any = None
        self.done = 0

    def __enter__(self) -> _Bar:
        if self.console is None:
            return self
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            TextColumn(f"[bold]{self.what}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[files]}"),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.bar.add_task(self.what, total=self.nbytes, files=self._files())
        self.bar.start()
        return self

    def _files(self) -> str:
        return f"{self.done}/{self.files} files"

    def advance(self, nbytes: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes, files=self._files())

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
