"""Checkpoints: exact resume after SIGKILL, restore onto other meshes, refusal of bad input."""

import json
import os
import random
import re
import shutil

import jax
import numpy as np
import pytest

import jmp
from jmp.errors import ConfigError
from jmp.models import GPT, GPTConfig
from jmp.train import TrainConfig, make_eval_step, make_optimizer, make_step
from jmp.train.checkpoint import Checkpointer, CheckpointError
from jmp.train.data import TextData
from jmp.train.loop import run_training
from tests.cli_util import run_jmp, train_then_sigkill

TINY = ["--model", "tiny", "--batch", "8", "--eval-every", "100", "--sample", "0"]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _final_params(out, mesh, rules, cfg, train_cfg):
    model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules)
    step = make_step(model, make_optimizer(train_cfg), mesh, rules)
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), create=False)
    target = step.abstract_state()
    state = ckpt.restore(ckpt.latest_step(), target=target)
    ckpt.close()
    return jax.tree.map(np.asarray, state.params)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, make_mesh):
    steps = 40  # enough steps that the kill lands mid-run
    args = [*TINY, "--steps", str(steps), "--checkpoint-every", "4"]
    whole = str(tmp_path / "whole")
    done = run_jmp("train", *args, "--out", whole)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = str(tmp_path / "killed")
    kill_after = random.Random().randint(6, 20)  # a random step, between checkpoints or not
    train_then_sigkill(args, killed, checkpoint=4, after_steps=kill_after)
    assert len(_losses(killed)) < steps
    print(f"killed after {len(_losses(killed))} logged steps")

    resumed = run_jmp("train", *args, "--out", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(killed) == _losses(whole)  # the curve continues identically, bitwise
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    cfg, train_cfg = GPTConfig.named("tiny"), TrainConfig(steps=steps, batch_size=8)
    a = _final_params(whole, mesh, rules, cfg, train_cfg)
    b = _final_params(killed, mesh, rules, cfg, train_cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


DATA = TextData.from_tokens(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8))
CFG = GPTConfig.named("tiny")


def _train_and_save(tmp_path, mesh, rules, steps=3):
    cfg = TrainConfig(steps=steps, batch_size=8, eval_every=100)
    out = str(tmp_path / "saved")
    result = run_training(CFG, cfg, mesh, rules, DATA, out_dir=out)
    return out, cfg, result


@pytest.mark.parametrize(
    "strategy,spec", [("fsdp", "data=8"), ("tp", "model=8"), ("fsdp_tp", "data=4,model=2")]
)
def test_restore_onto_another_mesh_and_strategy(tmp_path, make_mesh, strategy, spec):
    src_mesh = make_mesh("data=2,model=4")
    src_rules = jmp.rules.preset("dp_tp", src_mesh)
    out, train_cfg, saved = _train_and_save(tmp_path, src_mesh, src_rules)

    mesh = make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    model = jmp.shard_init(lambda rngs: GPT(CFG, rngs=rngs), mesh, rules, seed=1)
    step = make_step(model, make_optimizer(train_cfg), mesh, rules)
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), create=False)
    target = step.abstract_state()
    state = ckpt.restore(ckpt.latest_step(), target=target)
    ckpt.close()
    assert int(state.step) == 3
    for got, want, sharding in zip(
        jax.tree.leaves(state.params),
        jax.tree.leaves(saved.state.params),
        jax.tree.leaves(step.state_shardings.params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
    # the next step's loss agrees with the one computed on the original mesh
    batch = DATA.batch(3, batch_size=8, seq_len=CFG.seq_len, mesh=mesh, rules=rules)
    src_batch = DATA.batch(3, batch_size=8, seq_len=CFG.seq_len, mesh=src_mesh, rules=src_rules)
    here = make_eval_step(model, mesh, rules)(state.params, batch)
    there = make_eval_step(saved.model, src_mesh, src_rules)(saved.state.params, src_batch)
    np.testing.assert_allclose(float(here), float(there), rtol=1e-5)


def test_same_seed_same_curve(tmp_path, make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    cfg = TrainConfig(steps=4, batch_size=8, eval_every=100)
    first = run_training(CFG, cfg, mesh, rules, DATA)
    second = run_training(CFG, cfg, mesh, rules, DATA)
    assert [r["loss"] for r in first.history] == [r["loss"] for r in second.history]


def test_leftover_temporary_folder_of_an_interrupted_save_is_ignored(tmp_path, make_mesh):
    """A save killed midway leaves orbax's *.orbax-checkpoint-tmp-* folder: resume ignores it."""
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    out, train_cfg, saved = _train_and_save(tmp_path, mesh, rules)
    ckpt_dir = os.path.join(out, "checkpoints")
    partial = os.path.join(ckpt_dir, "9.orbax-checkpoint-tmp-1234")
    shutil.copytree(os.path.join(ckpt_dir, "3"), partial)
    os.remove(os.path.join(partial, "commit_success.txt"))
    ckpt = Checkpointer(ckpt_dir, create=False)
    assert ckpt.latest_step() == 3
    ckpt.close()
    resumed = run_training(
        CFG,
        TrainConfig(steps=5, batch_size=8, eval_every=100),
        mesh,
        rules,
        DATA,
        out_dir=out,
        resume=True,
    )
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    out, train_cfg, _ = _train_and_save(tmp_path, mesh, rules)
    state_dir = os.path.join(out, "checkpoints", "3", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            if name != "commit_success.txt":
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(7)  # truncated files, as after a full disk
    with pytest.raises(CheckpointError, match="Cannot restore checkpoint step 3"):
        run_training(
            CFG,
            TrainConfig(steps=5, batch_size=8, eval_every=100),
            mesh,
            rules,
            DATA,
            out_dir=out,
            resume=True,
        )


def test_cli_resume_errors(tmp_path):
    missing = run_jmp(
        "train", *TINY, "--steps", "2", "--out", str(tmp_path / "nope"), "--resume", timeout=120
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    out = str(tmp_path / "run")
    assert run_jmp("train", *TINY, "--steps", "2", "--out", out).returncode == 0
    other = run_jmp(
        "train",
        "--model",
        "small",
        "--batch",
        "8",
        "--sample",
        "0",
        "--steps",
        "3",
        "--out",
        out,
        "--resume",
        timeout=120,
    )
    assert other.returncode == 2 and "these settings differ" in other.stderr, other.stderr
    assert "model.d_model" in other.stderr and "Traceback" not in other.stderr
    # resume on another mesh and strategy through the CLI
    moved = run_jmp(
        "train",
        *TINY,
        "--steps",
        "3",
        "--out",
        out,
        "--resume",
        "--strategy",
        "fsdp",
        "--mesh",
        "data=8",
        "--extend",  # 3 steps, not the run's 2: the learning-rate schedule is recomputed
        timeout=120,
    )
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert "resharding the run from dp_tp" in moved.stdout and "--extend" in moved.stdout
    assert len(_losses(out)) == 3


def test_empty_data_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    done = run_jmp(
        "train",
        *TINY,
        "--steps",
        "2",
        "--out",
        str(tmp_path / "r"),
        "--data",
        str(empty),
        timeout=120,
    )
    assert done.returncode == 2 and "train split has" in done.stderr, done.stderr


def test_nonfinite_stops_naming_step_and_keeps_the_last_good_checkpoint(tmp_path, make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    out = str(tmp_path / "nan")
    exploding = TrainConfig(steps=10, batch_size=8, lr=1e8, warmup_steps=0, eval_every=100)
    with pytest.raises(
        jmp.train.loop.NonFiniteError, match=r"Non-finite (loss|grad_norm)=(nan|inf) at step 3;"
    ):
        run_training(CFG, exploding, mesh, rules, DATA, out_dir=out, checkpoint_every=2)
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), create=False)
    assert ckpt.latest_step() == 2  # nothing written after the bad step
    model = jmp.shard_init(lambda rngs: GPT(CFG, rngs=rngs), mesh, rules)
    step = make_step(model, make_optimizer(exploding), mesh, rules)
    state = ckpt.restore(2, target=step.abstract_state())
    ckpt.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_skip_nonfinite_counts_and_goes_on(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    exploding = TrainConfig(steps=6, batch_size=8, lr=1e8, warmup_steps=0, eval_every=100)
    result = run_training(CFG, exploding, mesh, rules, DATA, skip_nonfinite=True)
    assert result.skipped == 4 and [r.get("skipped", 0) for r in result.history] == [
        0,
        0,
        1,
        2,
        3,
        4,
    ]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))


def test_cli_nonfinite_is_exit_2(tmp_path):
    done = run_jmp(
        "train", *TINY, "--steps", "6", "--lr", "1e8", "--out", str(tmp_path / "r"), timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(r"Non-finite (loss|grad_norm|parameters)(=(nan|inf))? at step \d", done.stderr)
    assert "Traceback" not in done.stderr


def test_cli_skip_nonfinite_gives_up_after_ten_in_a_row(tmp_path):
    # lr 1e30 blows every update up; a skipped update leaves the parameters as they were, so
    # each following step is non-finite again: the guard must stop, not skip forever
    out = tmp_path / "r"
    done = run_jmp(
        "train",
        *TINY,
        "--steps",
        "30",
        "--lr",
        "1e30",
        "--skip-nonfinite",
        "--out",
        str(out),
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert re.search(
        r"11 non-finite updates in a row \(the last: \w+=(nan|inf) at step \d+\)", done.stderr
    ), done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] == 10 and len(rows) < 30  # stopped, 10 skips logged


def test_train_config_refuses_a_seed_numpy_cannot_take():
    with pytest.raises(ConfigError, match=r"seed=-1 must be an int in \[0, 2\*\*32\)"):
        TrainConfig(seed=-1)


def test_non_finite_parameters_are_never_checkpointed():
    from jmp.train import TrainState
    from jmp.train.trainer import _check_finite_params

    good = TrainState(np.int32(1), {"w": np.ones(3, np.float32)}, ())
    _check_finite_params(good, 1)
    bad = TrainState(np.int32(1), {"w": np.array([1.0, np.inf, 0.0], np.float32)}, ())
    with pytest.raises(jmp.train.loop.NonFiniteError, match="Non-finite parameters at step 7"):
        _check_finite_params(bad, 7)
