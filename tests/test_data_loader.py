"""The grain loader over a prepared corpus: packing, coverage per epoch, processes, resume, checks.

The reference packing below is written with plain Python loops over a token stream, apart
from jmp's vectorized ``pack``. Corpora here are hand-made with distinct token ids (id = place
in the corpus), so each token seen can be traced back to the one place it came from.
"""

import json

import jax
import numpy as np
import pytest

import jmp
from jmp.errors import ConfigError
from jmp.train.data import Layout, Loader, document_order, pack, prepare, write_corpus

SEQ, BATCH, SEED = 16, 8, 3


def reference_rows(docs, seq_len):
    """Concatenate-and-split, one token at a time: a dict of (rows, seq_len) arrays."""
    stream = [(d, int(tok)) for d, doc in enumerate(docs) for tok in doc]
    n_rows = -(-len(stream) // seq_len)
    out = {k: np.zeros((n_rows, seq_len), np.int64) for k in ("inputs", "targets", "segment_ids")}
    out["positions"] = np.zeros((n_rows, seq_len), np.int64)
    out["loss_mask"] = np.zeros((n_rows, seq_len), np.float32)
    for r in range(n_rows):
        segment, current, seg_start = 0, None, 0
        for i in range(seq_len):
            t = r * seq_len + i
            if t >= len(stream):
                break  # padding: zeros everywhere
            doc, tok = stream[t]
            if doc != current:
                segment, current, seg_start = segment + 1, doc, i
            out["inputs"][r, i] = tok
            out["segment_ids"][r, i] = segment
            out["positions"][r, i] = i - seg_start
            if t + 1 < len(stream) and stream[t + 1][0] == doc:
                out["targets"][r, i] = stream[t + 1][1]
                out["loss_mask"][r, i] = 1.0
    return out


def make_docs(seed=0, n_docs=13, longest=40):
    """Documents of lengths 1..longest (some longer than a row) with distinct token ids."""
    lengths = np.random.default_rng(seed).integers(1, longest, n_docs)
    lengths[:3] = (1, SEQ, 3 * SEQ + 5)  # a one-token document, a row exactly, several rows
    ends = np.cumsum(lengths)
    return [np.arange(e - n, e) for n, e in zip(lengths, ends, strict=True)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    docs = make_docs()
    folder = str(tmp_path_factory.mktemp("corpus"))
    write_corpus(folder, docs, vocab_size=int(sum(map(len, docs))))
    return folder, docs


def rows_of(batch, j):
    return {k: v[j] for k, v in batch.items()}


# --- packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 5, 16, 64])
def test_packing_equals_the_loop_reference(corpus_dir, seq_len):
    folder, docs = corpus_dir
    corpus = jmp.train.data.Corpus(folder)
    order = np.random.default_rng(seq_len).permutation(len(docs))
    layout = Layout.of(corpus.offsets, order=order)
    got = pack(corpus.tokens, layout, np.arange(layout.n_rows(seq_len)), seq_len=seq_len)
    want = reference_rows([docs[i] for i in order], seq_len)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["inputs"].dtype == np.int32 and got["loss_mask"].dtype == np.float32


def test_document_order_is_a_fresh_permutation_each_epoch_and_seed():
    orders = [document_order(s, e, 50).tolist() for s in (0, 1) for e in (0, 1)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4


# --- every token once per epoch, for 1, 2 and 4 processes -------------------------------------


def epoch_rows(corpus_dir, processes, epoch):
    """{global row: packed row} of one epoch, read by ``processes`` simulated processes."""
    folder, _ = corpus_dir
    loaders = [
        Loader(
            folder,
            seq_len=SEQ,
            batch_size=BATCH,
            seed=SEED,
            process_index=p,
            process_count=processes,
            threads=1,
        )
        for p in range(processes)
    ]
    per_epoch = loaders[0].rows_per_epoch
    first, last = epoch * per_epoch, (epoch + 1) * per_epoch
    seen, batches = {}, []
    for step in range(first // BATCH, -(-last // BATCH)):
        parts = [loader.batches(step) for loader in loaders]
        batches.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        for loader, part in zip(loaders, parts, strict=True):
            for j, r in enumerate(loader.rows):
                g = step * BATCH + r
                if first <= g < last:
                    seen[g] = rows_of(part, j)
    for loader in loaders:
        loader.close()
    return seen, batches


@pytest.mark.parametrize("processes", [1, 2, 4])
@pytest.mark.parametrize("epoch", [0, 1])
def test_every_token_is_seen_once_per_epoch(corpus_dir, processes, epoch):
    _, docs = corpus_dir
    seen, _ = epoch_rows(corpus_dir, processes, epoch)
    tokens = np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in seen.values()])
    np.testing.assert_array_equal(np.sort(tokens), np.arange(sum(map(len, docs))))
    # every within-document (token, next token) pair is a target exactly once, nothing else
    pairs = sorted(
        (int(a), int(b))
        for r in seen.values()
        for a, b, m in zip(r["inputs"], r["targets"], r["loss_mask"], strict=True)
        if m
    )
    assert pairs == sorted((int(d[i]), int(d[i + 1])) for d in docs for i in range(len(d) - 1))


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_rows_together_are_the_one_process_batch(corpus_dir, processes):
    _, one = epoch_rows(corpus_dir, 1, 0)
    _, many = epoch_rows(corpus_dir, processes, 0)
    for a, b in zip(one, many, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_rows_are_the_reference_rows_of_their_epoch(corpus_dir):
    """Each loader row is row i of its epoch's document stream (the documents in that epoch's
    seeded order), and the rows of two epochs differ in order and in packing."""
    folder, docs = corpus_dir
    with Loader(folder, seq_len=SEQ, batch_size=BATCH, seed=SEED) as loader:
        per_epoch = loader.rows_per_epoch
        for step in (0, per_epoch // BATCH + 1):
            batch, packed = loader.batches(step), loader.global_rows(step)
            for j, g in enumerate(packed):
                epoch, i = divmod(int(g), per_epoch)
                order = document_order(SEED, epoch, len(docs))
                want = reference_rows([docs[d] for d in order], SEQ)
                for k in want:
                    np.testing.assert_array_equal(batch[k][j], want[k][i], err_msg=(k, g))
        assert loader.global_rows(0).tolist() != list(range(BATCH))  # rows are shuffled


def test_batch_is_a_pure_function_of_seed_and_step(corpus_dir):
    folder, _ = corpus_dir
    with Loader(folder, seq_len=SEQ, batch_size=BATCH, seed=SEED, threads=3) as a:
        in_order = [a.batches(k) for k in range(6)]
    with Loader(folder, seq_len=SEQ, batch_size=BATCH, seed=SEED, threads=0, prefetch=0) as b:
        for k in (5, 2, 3, 0):  # random access, no prefetch
            for key, value in b.batches(k).items():
                np.testing.assert_array_equal(value, in_order[k][key])
    with Loader(folder, seq_len=SEQ, batch_size=BATCH, seed=SEED + 1) as c:
        assert not np.array_equal(c.batches(0)["inputs"], in_order[0]["inputs"])


# --- resume ------------------------------------------------------------------------------------


def test_restore_gives_exactly_the_batches_after_that_step(corpus_dir):
    folder, _ = corpus_dir
    with Loader(folder, seq_len=SEQ, batch_size=BATCH, seed=SEED) as run:
        straight = [next(run) for _ in range(7)]
    with Loader(folder, seq_len=SEQ, batch_size=BATCH, seed=SEED) as before:
        for _ in range(3):
            next(before)
        saved = json.loads(json.dumps(before.state()))  # what a checkpoint stores
    assert saved["step"] == 3 and saved["seed"] == SEED
    # restored in a fresh loader built with another seed and onto 2 processes: the state rules
    halves = []
    for p in range(2):
        with Loader(
            folder, seq_len=SEQ, batch_size=BATCH, seed=0, process_index=p, process_count=2
        ) as after:
            after.restore(saved)
            halves.append([next(after) for _ in range(4)])
    for k in range(4):
        for key in straight[0]:
            both = np.concatenate([halves[0][k][key], halves[1][k][key]])
            np.testing.assert_array_equal(both, straight[3 + k][key])


def test_restore_refuses_another_corpus_sequence_or_batch(corpus_dir, tmp_path):
    folder, docs = corpus_dir
    other = str(tmp_path / "other")
    write_corpus(other, docs[::-1], vocab_size=int(sum(map(len, docs))))
    with Loader(folder, seq_len=SEQ, batch_size=BATCH) as loader:
        state = loader.state()
    for path, seq, batch, culprit in [
        (other, SEQ, BATCH, "corpus:"),
        (folder, SEQ * 2, BATCH, "seq_len: 16 in the state, 32 here"),
        (folder, SEQ, BATCH // 2, "batch_size: 8 in the state, 4 here"),
    ]:
        with Loader(path, seq_len=seq, batch_size=batch) as loader:
            with pytest.raises(ConfigError, match=culprit) as err:
                loader.restore(state)
        assert "\n" not in str(err.value) and "Fix:" in str(err.value)
    with Loader(folder, seq_len=SEQ, batch_size=BATCH) as loader:
        with pytest.raises(ConfigError, match="lacks"):
            loader.restore({"step": 3})


# --- checks the trainer makes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def text_corpora(tmp_path_factory):
    """A bytes corpus and a BPE corpus of the same small texts."""
    root = tmp_path_factory.mktemp("texts")
    for i in range(3):
        (root / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 30)
    inputs = [str(root / f"{i}.txt") for i in range(3)]
    quiet = dict(progress=False)
    raw = prepare(inputs, str(root / "bytes"), **quiet).corpus
    bpe = prepare(inputs, str(root / "bpe"), tokenizer="bpe:300", **quiet).corpus
    return raw, bpe


def test_check_refuses_a_vocabulary_larger_than_the_models(text_corpora):
    _, bpe = text_corpora
    with Loader(bpe, seq_len=SEQ, batch_size=BATCH) as loader:
        loader.check(vocab_size=bpe.vocab_size)  # as large: fine
        with pytest.raises(
            ConfigError, match=f"{bpe.vocab_size} ids, more than the model's vocab_size=256"
        ) as err:
            loader.check(vocab_size=256)
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


def test_check_refuses_a_corpus_made_by_another_tokenizer(text_corpora):
    raw, bpe = text_corpora
    bpe_json = f"{bpe.path}/tokenizer.json"
    with Loader(raw, seq_len=SEQ, batch_size=BATCH) as loader:
        loader.check(tokenizer="bytes", vocab_size=256, seq_len=SEQ)
        with pytest.raises(ConfigError, match="made by the bytes tokenizer 'bytes'"):
            loader.check(tokenizer=bpe_json)
    with Loader(bpe, seq_len=SEQ, batch_size=BATCH) as loader:
        loader.check(tokenizer=bpe_json)
        loader.check(tokenizer=bpe.tokenizer())  # the object, or its fingerprint
        loader.check(tokenizer=bpe.header["tokenizer"]["fingerprint"])
        with pytest.raises(ConfigError, match="not the run's 'bytes'"):
            loader.check(tokenizer="bytes")


def test_check_refuses_rows_longer_than_the_model(text_corpora):
    raw, _ = text_corpora
    with Loader(raw, seq_len=64, batch_size=BATCH) as loader:
        with pytest.raises(
            ConfigError, match="rows of 64 tokens are longer than the model's seq_len=32"
        ):
            loader.check(seq_len=32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rows=[3, 1]), "must be sorted"),
        (dict(rows=[0, 8]), r"in \[0, 8\)"),
        (dict(process_index=0, process_count=3), "must divide batch_size=8"),
        (dict(process_index=2, process_count=2), r"index must be in \[0, 2\)"),
        (dict(rows=[0], process_index=0), "one of rows="),
        (dict(seed=-1), "seed=-1"),
        (dict(seed=2**32), "seed="),
    ],
)
def test_loader_refuses_bad_rows_and_seeds(corpus_dir, kwargs, message):
    folder, _ = corpus_dir
    with pytest.raises(ConfigError, match=message):
        Loader(folder, seq_len=SEQ, batch_size=BATCH, **kwargs)


def test_device_batches_are_the_global_batch_sharded_over_data(corpus_dir, make_mesh):
    folder, _ = corpus_dir
    mesh = make_mesh("data=2,model=4")
    sharding = jmp.train.data.batch_sharding(mesh, jmp.rules.preset("dp_tp", mesh))
    with Loader(folder, seq_len=SEQ, batch_size=BATCH, seed=SEED, sharding=sharding) as loader:
        assert loader.rows == list(range(BATCH))  # one process holds every row
        for step in (0, 1, 4):
            placed, host = loader.device_batches(step), loader.batches(step)
            for k, v in placed.items():
                assert isinstance(v, jax.Array) and v.shape == (BATCH, SEQ)
                assert v.sharding.is_equivalent_to(sharding, 2)
                np.testing.assert_array_equal(np.asarray(v), host[k])
    with Loader(folder, seq_len=SEQ, batch_size=BATCH) as loader:
        with pytest.raises(ConfigError, match="needs the batch sharding"):
            loader.device_batches(0)
