"""`jmp train --data CORPUS`: a prepared corpus trains through the grain loader, packed.

The loss of step 1 equals the loss of the loader's batch 0 on a freshly built model (the run
reads what the loader gives, packed attention and loss mask included); a run cut after its
step-3 checkpoint and resumed continues bitwise, and on another mesh equal to float precision;
wrong combinations are one-line refusals that leave the run folder as it was.
"""

import json
import os
import random
import shutil

import jax
import numpy as np
import pytest

import jmp
from jmp.models import GPT, GPTConfig
from jmp.train import next_token_loss
from jmp.train.data import Loader, batch_sharding, prepare
from tests.cli_util import run_jmp, train_then_sigkill

RUN = [
    "--model",
    "tiny",
    "--batch",
    "8",
    "--steps",
    "6",
    "--checkpoint-every",
    "3",
    "--sample",
    "0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "(x)", ":", "\n"]
    for i in range(60):  # documents of 10 to 100 bytes: several to a row of 64
        text = " ".join(rng.choice(words, size=2 + i % 15))
        (root / f"doc{i}.txt").write_text(text)
    out = str(tmp_path_factory.mktemp("corpus") / "c")
    prepare([str(root)], out, progress=False)
    return out


@pytest.fixture(scope="module")
def whole(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "whole")
    done = run_jmp("train", *RUN, "--data", corpus, "--out", out, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no validation split" in done.stdout
    return out


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_step_one_is_the_loss_of_the_loaders_first_batch(corpus, whole, make_mesh):
    mesh = make_mesh("data=2,model=4")  # the CLI's default for dp_tp
    rules = jmp.rules.preset("dp_tp", mesh)
    model = jmp.shard_init(lambda rngs: GPT(GPTConfig.named("tiny"), rngs=rngs), mesh, rules)
    loader = Loader(corpus, seq_len=64, batch_size=8, seed=0, sharding=batch_sharding(mesh, rules))
    batch = loader.device_batches(0)
    assert int(np.asarray(batch["segment_ids"]).max()) > 1  # rows hold several documents

    @jax.jit
    def loss(b):
        with jmp.activate(mesh, rules):
            return next_token_loss(model, b)

    with jax.set_mesh(mesh):
        expected = float(loss(batch))
    loader.close()
    assert _losses(whole)[0] == pytest.approx(expected, rel=1e-6)
    with open(os.path.join(whole, "config.json")) as f:
        data = json.load(f)["data"]
    assert data["corpus"]["seed"] == 0 and data["paths"] == [corpus] and data["bytes"] > 0


def test_a_cut_run_resumes_bitwise_and_on_another_mesh(corpus, whole, tmp_path):
    cut = str(tmp_path / "cut")
    shutil.copytree(whole, cut)
    shutil.rmtree(os.path.join(cut, "checkpoints", "6"))  # as if killed after step 3's save
    done = run_jmp("train", *RUN, "--data", corpus, "--out", cut, "--resume", timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(cut) == _losses(whole)
    other = str(tmp_path / "other")
    shutil.copytree(whole, other)
    shutil.rmtree(os.path.join(other, "checkpoints", "6"))
    done = run_jmp(
        "train", *RUN, "--data", corpus, "--out", other, "--resume",
        "--strategy", "fsdp", "--mesh", "data=8", timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(_losses(other), _losses(whole), rtol=1e-5)


def _listing(folder):
    return sorted(
        (os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
        for d, _, files in os.walk(folder)
        for f in files
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "{corpus}", "README.md"], "mixes a prepared corpus with other paths"),
        (["--data", "{corpus}", "--strategy", "pp_dp", "--mesh", "stage=2,data=4"],
         "packed batches (a dict with segment_ids) are not supported under pp_"),
        (["--data", "README.md"], "data"),  # another corpus (or text) than the run's
    ],
)  # fmt: skip
def test_refusals_are_one_line_and_leave_the_run_as_it_was(corpus, whole, tmp_path, extra, message):
    out = str(tmp_path / "run")
    shutil.copytree(whole, out)
    before = _listing(out)
    args = [a.replace("{corpus}", corpus) for a in extra]
    done = run_jmp("train", *RUN, *args, "--out", out, "--resume", timeout=240)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert _listing(out) == before


def test_two_processes_train_the_corpus_as_one_and_resume_in_one(corpus, whole, tmp_path):
    # each of two processes reads only its rows of every batch; the global order does not
    # depend on the process count, so the two-process run equals the one-process run, and its
    # step-3 checkpoint resumes in one process with the batches the uninterrupted run saw
    two = str(tmp_path / "two")
    done = run_jmp(
        "launch", "-n", "2", "--local-devices", "4", "--",
        "train", *RUN, "--data", corpus, "--out", two, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    np.testing.assert_allclose(_losses(two), _losses(whole), rtol=1e-5)
    shutil.rmtree(os.path.join(two, "checkpoints", "6"))
    done = run_jmp("train", *RUN, "--data", corpus, "--out", two, "--resume", timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(_losses(two), _losses(whole), rtol=1e-5)


def test_sigkill_at_a_random_step_then_resume_sees_the_same_batches(corpus, tmp_path):
    """A real kill (not a removed checkpoint): the resumed run's losses equal an uninterrupted
    run's bitwise, so the loader gave it the very batches it would have seen."""
    args = [*RUN[:4], "--steps", "24", "--checkpoint-every", "4", "--sample", "0"]
    args += ["--data", corpus]
    whole = str(tmp_path / "whole")
    done = run_jmp("train", *args, "--out", whole, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = str(tmp_path / "killed")
    kill_after = random.Random().randint(6, 14)  # between checkpoints or on one
    train_then_sigkill(args, killed, checkpoint=4, after_steps=kill_after)
    assert len(_losses(killed)) < 24
    resumed = run_jmp("train", *args, "--out", killed, "--resume", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(killed) == _losses(whole)
