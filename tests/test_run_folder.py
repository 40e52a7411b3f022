"""Run folders through ``jmp train``: never two runs in one folder, nothing changed by a refusal.

Every refused command must exit 2 with one line naming the culprit and the fix, and leave
every file of the run folder byte-identical (config, metrics, plot, checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from tests.cli_util import run_jmp, set_unwritable

TINY = ["--model", "tiny", "--batch", "8", "--eval-every", "100", "--sample", "0"]
RUN = [*TINY, "--steps", "4", "--checkpoint-every", "2"]


def snapshot(folder: str) -> dict[str, str]:
    """{relative path: sha256} of every file (and link target) under ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def refused(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one line on stderr, no traceback, containing every needle."""
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and len(err.splitlines()) == 1, done.stderr[-3000:]
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Fix" in err, err
    return err


@pytest.fixture(scope="module")
def a_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4 (made once; tests copy it)."""
    out = str(tmp_path_factory.mktemp("runs") / "a")
    done = run_jmp("train", *RUN, "--out", out, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(a_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(a_run, out, symlinks=True)
    return out


def test_a_new_run_into_a_run_folder_is_refused_or_moves_the_old_run_aside(run_copy):
    before = snapshot(run_copy)
    err = refused(
        run_jmp("train", *RUN, "--seed", "1", "--out", run_copy, timeout=120),
        "already holds a run",
        "checkpoints up to step 4",
        "--resume",
        "--overwrite",
    )
    assert run_copy in err
    assert snapshot(run_copy) == before
    done = run_jmp("train", *RUN, "--seed", "1", "--out", run_copy, "--overwrite", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    moved = [p for p in os.listdir(os.path.dirname(run_copy)) if ".replaced-" in p]
    assert len(moved) == 1 and f"aside to {os.path.join(os.path.dirname(run_copy), moved[0])}" in (
        done.stdout.replace("\n", "")
    )
    assert snapshot(os.path.join(os.path.dirname(run_copy), moved[0])) == before  # intact
    with open(os.path.join(run_copy, "config.json")) as f:
        assert json.load(f)["train"]["seed"] == 1
    assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["2", "4"]
    with open(os.path.join(run_copy, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]  # not appended


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--seq", "32", "--steps", "6"], ["model.seq_len: 64 in the run, 32 now"]),
        (["--seed", "1", "--steps", "4"], ["train.seed: 0 in the run, 1 now"]),
        (["--lr", "0.01", "--steps", "4"], ["train.lr"]),
        (["--steps", "2"], ["--steps 2 is behind the run", "step 4"]),
        (["--steps", "6"], ["differs from the run's 4", "learning-rate schedule", "--extend"]),
        (["--steps", "4", "--strategy", "pp_dp"], ["pipeline stage", "dp_tp", "pp_dp"]),
    ],
    ids=["seq", "seed", "lr", "fewer-steps", "more-steps", "pipeline"],
)
def test_a_resume_with_other_settings_is_refused_and_changes_nothing(run_copy, args, needles):
    before = snapshot(run_copy)
    err = refused(
        run_jmp("train", *TINY, *args, "--out", run_copy, "--resume", timeout=120), *needles
    )
    assert run_copy in err or "--steps" in err
    assert snapshot(run_copy) == before


def test_a_resume_on_other_data_is_refused(run_copy, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("def f(x):\n    return x + 1\n" * 400)
    before = snapshot(run_copy)
    refused(
        run_jmp("train", *RUN, "--data", str(other), "--out", run_copy, "--resume", timeout=120),
        "data.sha256",
    )
    assert snapshot(run_copy) == before


def test_generate_still_works_after_a_refused_resume_and_extend_continues(run_copy):
    assert run_jmp("train", *TINY, "--seq", "32", "--out", run_copy, "--resume").returncode == 2
    gen = run_jmp("generate", "--run", run_copy, "--tokens", "8", timeout=120)
    assert gen.returncode == 0, gen.stderr[-3000:]
    done = run_jmp(
        "train", *TINY, "--steps", "6", "--out", run_copy, "--resume", "--extend", timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "learning-rate schedule is recomputed for 6 steps" in " ".join(done.stdout.split())
    with open(os.path.join(run_copy, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
    with open(os.path.join(run_copy, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 6  # changed exactly as the message said


def test_out_at_a_file_under_a_file_or_in_a_read_only_folder(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    refused(run_jmp("train", *RUN, "--out", str(a_file), timeout=60), "is a file")
    refused(run_jmp("train", *RUN, "--out", str(a_file / "run"), timeout=60), "which is a file")
    assert a_file.read_text() == "keep me"
    locked = tmp_path / "locked"
    locked.mkdir()
    if not set_unwritable(str(locked), True):
        pytest.skip("cannot make a folder read-only here (chattr unavailable)")
    try:
        refused(run_jmp("train", *RUN, "--out", str(locked / "run"), timeout=60), "not writable")
    finally:
        set_unwritable(str(locked), False)
    assert os.listdir(locked) == []
