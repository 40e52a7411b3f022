"""``prepare`` / ``jmp data prepare``: corpora from text files, checked against the files' own
bytes and against Hugging Face ``tokenizers`` used directly; no-op re-runs; every refusal is one
line and leaves the disk as it was."""

import io
import os

import numpy as np
import pytest
from rich.console import Console
from tokenizers import Tokenizer as HFTokenizer

import jmp.cli
from jmp.errors import ConfigError
from jmp.train.data import Corpus, CorpusError, load_tokenizer, prepare, write_corpus

TEXTS = {
    "a.txt": "def add(x, y):\n    return x + y\n",
    "sub/b.py": "héllo wörld ✓ — 日本語\n\ttabs and  spaces  \n",
    "sub/c.md": "# title\n\nsome *markdown* text, " * 20,
    "sub/empty.txt": "",
}
QUIET = dict(progress=False)


@pytest.fixture
def texts(tmp_path):
    root = tmp_path / "texts"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def files_in_order():
    """The inputs as prepare reads a folder: every file, sorted by path."""
    return sorted(TEXTS)


def snapshot(root):
    """Every path under ``root`` with its size and modification time."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_bytes_corpus_holds_each_files_utf8_bytes(texts, tmp_path):
    done = prepare([str(texts)], str(tmp_path / "corpus"), **QUIET)
    corpus = done.corpus
    want = [TEXTS[n].encode("utf-8") for n in files_in_order() if TEXTS[n]]
    assert corpus.n_documents == len(want)  # the empty file is no document
    for i, blob in enumerate(want):
        assert bytes(corpus.document(i).astype(np.uint8)) == blob
    h = corpus.header
    assert h["tokens"] == sum(map(len, want)) and h["dtype"] == "uint16"
    assert h["inputs"]["files"] == len(TEXTS) and h["inputs"]["empty_files"] == 1
    assert h["tokenizer"]["kind"] == "bytes" and h["tokenizer"]["eos_id"] is None
    assert h["vocab_size"] == 256 and not done.reused


def test_bpe_corpus_round_trips_through_decode(texts, tmp_path):
    corpus = prepare([str(texts)], str(tmp_path / "bpe"), tokenizer="bpe:300", **QUIET).corpus
    tok = corpus.tokenizer()
    assert corpus.header["tokenizer"]["kind"] == "bpe" and tok.eos_id == 0
    assert corpus.vocab_size == tok.vocab_size <= 300
    kept = [n for n in files_in_order() if TEXTS[n]]
    hf = HFTokenizer.from_file(os.path.join(corpus.path, "tokenizer.json"))  # not jmp's wrapper
    for i, name in enumerate(kept):
        doc = corpus.document(i).tolist()
        assert doc[-1] == tok.eos_id  # each document ends with end-of-text
        assert hf.decode(doc[:-1], skip_special_tokens=False) == TEXTS[name]
        assert doc[:-1] == hf.encode(TEXTS[name]).ids
    assert corpus.tokens.dtype == np.uint16


def test_a_tokenizer_json_path_gives_the_same_ids(texts, tmp_path):
    bpe = prepare([str(texts)], str(tmp_path / "bpe"), tokenizer="bpe:300", **QUIET).corpus
    again = prepare([str(texts)], str(tmp_path / "hf"), tokenizer=bpe.path, **QUIET).corpus
    np.testing.assert_array_equal(again.tokens, bpe.tokens)
    assert again.header["tokenizer"]["kind"] == "hf"
    assert again.header["tokenizer"]["fingerprint"] == bpe.header["tokenizer"]["fingerprint"]


def test_workers_do_not_change_the_corpus(texts, tmp_path):
    one = prepare([str(texts)], str(tmp_path / "one"), workers=1, **QUIET).corpus
    four = prepare([str(texts)], str(tmp_path / "four"), workers=4, **QUIET).corpus
    assert one.fingerprint == four.fingerprint


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    docs = [np.array([70_000, 3, 65_536]), np.array([65_535])]
    write_corpus(str(tmp_path / "c"), docs, vocab_size=70_001)
    corpus = Corpus(str(tmp_path / "c"))
    assert corpus.tokens.dtype == np.uint32
    assert corpus.document(0).tolist() == [70_000, 3, 65_536]
    assert corpus.document(1).tolist() == [65_535]


def test_prepare_again_is_a_no_op_and_says_so(texts, tmp_path):
    out = tmp_path / "corpus"
    prepare([str(texts)], str(out), tokenizer="bpe:300", **QUIET)
    before = snapshot(tmp_path)
    shown = io.StringIO()
    done = prepare([str(texts)], str(out), tokenizer="bpe:300", progress=Console(file=shown))
    assert done.reused and snapshot(tmp_path) == before
    assert "nothing to do" in " ".join(shown.getvalue().split())  # rich wraps lines


def test_inputs_holding_the_corpus_folder_leave_it_out(texts):
    out = texts / "corpus"  # inside the input folder: its own files are no input
    first = prepare([str(texts)], str(out), **QUIET).corpus
    assert prepare([str(texts)], str(out), **QUIET).reused
    assert first.n_documents == 3


def test_overwrite_moves_the_old_corpus_aside(texts, tmp_path):
    out = str(tmp_path / "corpus")
    old = prepare([str(texts)], out, **QUIET).corpus
    (texts / "a.txt").write_text("changed\n")
    with pytest.raises(ConfigError, match="already holds another corpus") as err:
        prepare([str(texts)], out, **QUIET)
    assert "--overwrite" in str(err.value) and "\n" not in str(err.value)
    done = prepare([str(texts)], out, overwrite=True, **QUIET)
    assert done.replaced is not None and done.replaced.startswith(out + ".replaced-")
    assert Corpus(done.replaced).fingerprint == old.fingerprint  # kept, not deleted
    assert bytes(done.corpus.document(0).astype(np.uint8)) == b"changed\n"


def test_another_tokenizer_is_another_corpus(texts, tmp_path):
    out = str(tmp_path / "corpus")
    prepare([str(texts)], out, **QUIET)
    with pytest.raises(ConfigError, match="tokenizer bytes"):
        prepare([str(texts)], out, tokenizer="bpe:300", **QUIET)


def test_a_truncated_corpus_is_refused_when_opened(texts, tmp_path):
    corpus = prepare([str(texts)], str(tmp_path / "corpus"), **QUIET).corpus
    with open(os.path.join(corpus.path, "tokens.bin"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(CorpusError, match="tokens.bin holds 10 bytes"):
        Corpus(corpus.path)


# --- refusals: one line, exit 2 on the command line, nothing written or changed ----------------


def binary_file(root):
    (root / "sub" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")


def empty_inputs(root):
    for name in TEXTS:
        (root / name).write_text("")


def other_corpus(root):
    prepare([str(root / "a.txt")], str(root.parent / "out"), **QUIET)


def foreign_files(root):
    (root.parent / "out").mkdir()
    (root.parent / "out" / "notes.txt").write_text("mine")


REFUSALS = [
    # (what the disk holds, inputs, options, words the one-line message must contain)
    (None, ["{root}/nothing*.txt"], [], "'{root}/nothing*.txt' matches no file"),
    (None, ["{root}/missing_folder"], [], "matches no file"),
    (binary_file, ["{root}"], [], "'{root}/sub/image.png' is not UTF-8 text (byte 0x89"),
    (empty_inputs, ["{root}"], [], "The corpus is empty"),
    (other_corpus, ["{root}"], [], "already holds another corpus"),
    (foreign_files, ["{root}"], ["--overwrite"], "holds files that are not a jmp corpus"),
    (None, ["{root}"], ["--tokenizer", "bpe:12"], "from 257"),
    (None, ["{root}"], ["--tokenizer", "bpe:many"], "whole number"),
    (None, ["{root}"], ["--tokenizer", "{root}/no_tokenizer"], "is not 'bytes', 'bpe:"),
    (None, ["{root}"], ["--tokenizer", "{root}/a.txt"], "Cannot read the tokenizer"),
]


@pytest.mark.parametrize("setup, inputs, options, words", REFUSALS)
def test_refusals_are_one_line_and_change_nothing(texts, capsys, setup, inputs, options, words):
    root = texts
    if setup is not None:
        setup(root)
    before = snapshot(root.parent)
    fill = {"root": str(root)}
    argv = ["data", "prepare", *(i.format(**fill) for i in inputs)]
    argv += ["--out", str(root.parent / "out"), *(o.format(**fill) for o in options)]
    code = jmp.cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("jmp data: error: ") and "\n" not in err, err
    assert words.format(**fill) in err and "Fix:" in err, err
    assert snapshot(root.parent) == before  # nothing written, nothing changed
    # the API raises the same one-line ConfigError
    api_options = {"tokenizer": options[1].format(**fill)} if "--tokenizer" in options else {}
    with pytest.raises(ConfigError):
        prepare(
            [i.format(**fill) for i in inputs],
            str(root.parent / "out"),
            **api_options,
            overwrite="--overwrite" in options,
            **QUIET,
        )
    assert snapshot(root.parent) == before


def test_load_tokenizer_refuses_bpe_specs():
    with pytest.raises(ConfigError, match="trained on a corpus"):
        load_tokenizer("bpe:300")


def test_command_line_prepare_then_no_op(texts, tmp_path, capsys):
    out = str(tmp_path / "corpus")
    assert jmp.cli.main(["data", "prepare", str(texts), "--out", out, "--workers", "2"]) == 0
    first = " ".join(capsys.readouterr().out.split())  # rich wraps lines at the terminal width
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS.values())
    assert f"3 documents, {n_bytes} tokens" in first and os.path.isfile(
        os.path.join(out, "corpus.json")
    )
    assert jmp.cli.main(["data", "prepare", str(texts), "--out", out]) == 0
    assert "nothing to do" in " ".join(capsys.readouterr().out.split())
