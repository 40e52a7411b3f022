"""Faults, each bounded in time: a corrupt latest checkpoint, a checkpoint folder that becomes
unwritable mid-run, and a killed or stopped (SIGSTOP) peer of a 2-process launch.

(SIGKILL at random moments, inside a save too, is in tests/test_checkpoint.py and, for jmp.fit,
tests/test_fit.py.) What each asserts is what the user sees: one line naming the culprit and
the fix, no traceback, no C++ frames, and the last good checkpoint kept.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.cli_util import run_jmp, set_unwritable
from tests.test_checkpoint import _losses
from tests.test_distributed import ROOT, _env, _launch_cmd

NO_TRACE = ("Traceback", "*** Check failure", "@     0x", "Fatal Python error")


def _clean(text: str) -> None:
    for marker in NO_TRACE:
        assert marker not in text, text[-3000:]


# --- a peer that stops answering ------------------------------------------------------------


@pytest.mark.parametrize("victim", [1, 0])
def test_a_stopped_peer_is_named_within_the_timeout(victim):
    """SIGSTOP keeps the process's sockets open: only its silence can tell it is gone."""
    timeout_s = 12
    cmd = _launch_cmd(90, 2, 4, timeout_s, "tick", "-1")
    proc = subprocess.Popen(
        cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, pid, stopped_at = [], None, None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if m := re.match(rf"\[p{victim}\] ready pid=(\d+)", line):
                pid = int(m.group(1))
            if pid and stopped_at is None and line.startswith(f"[p{victim}] tick 2"):
                os.kill(pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
        code = proc.wait(timeout=60)
    finally:
        if pid:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = "".join(lines)
    assert stopped_at is not None, output[-3000:]
    took = time.monotonic() - stopped_at
    survivor = 1 - victim
    assert code != 0
    assert re.search(
        rf"\[p{survivor}\] jmp: error: process {victim} \(\S+\) stopped answering", output
    ), output[-3000:]
    assert f"jmp launch: process {victim} (p{victim}) failed: it stopped answering" in output
    _clean(output)
    # named within the timeout (+ the launcher's grace and kill delay)
    assert took < timeout_s + 12, (took, output[-2000:])


# --- checkpoints ----------------------------------------------------------------------------

TINY = ["--model", "tiny", "--batch", "8", "--eval-every", "100", "--sample", "0"]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    args = [*TINY, "--steps", "6", "--checkpoint-every", "2"]
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    assert run_jmp("train", *args, "--out", whole, timeout=240).returncode == 0
    shutil.copytree(whole, broken, symlinks=True)
    files = [
        p for p in glob.glob(f"{broken}/checkpoints/6/**", recursive=True) if os.path.isfile(p)
    ]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:  # a save cut short by a full disk, say
        f.truncate(os.path.getsize(biggest) // 2)
    done = run_jmp("train", *args, "--out", broken, "--resume", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    said = " ".join(done.stdout.split())
    assert "checkpoint step 6" in said and "does not restore" in said, said[-2000:]
    assert "resuming from step 4, the newest that does" in said
    assert os.path.isdir(os.path.join(broken, "unreadable-checkpoints", "6"))  # kept, aside
    assert sorted(os.listdir(os.path.join(broken, "checkpoints"))) == ["2", "4", "6"]
    _clean(done.stdout + done.stderr)
    assert _losses(broken) == _losses(whole)  # steps 5 and 6 redone, bitwise


def test_an_unwritable_checkpoint_folder_stops_the_run_at_once(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "jmp.cli", "train", *TINY, "--steps", "200"]
    cmd += ["--checkpoint-every", "2", "--out", out]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt, metrics, locked_at = (
        os.path.join(out, "checkpoints"),
        os.path.join(out, "metrics.jsonl"),
        None,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and len(open(metrics).readlines()) >= 5:
                if not set_unwritable(ckpt, True):
                    pytest.skip("cannot make a folder unwritable here (chattr unavailable)")
                locked_at = time.monotonic()
                break
            time.sleep(0.05)
        assert locked_at is not None, "the run ended before the folder could be locked"
        _, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - locked_at
    finally:
        set_unwritable(ckpt, False)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr[-3000:]
    line = stderr.strip()
    assert len(line.splitlines()) == 1, stderr[-3000:]
    assert f"Saving a checkpoint into '{ckpt}' failed" in line
    assert "the last good checkpoint (step " in line and "Fix" in line
    _clean(stderr)
    assert took < 60, took  # at once: within a few steps, not minutes
    steps = len(_losses(out))
    assert steps < 200
    # the last good checkpoint restores: the run continues from it
    done = run_jmp(
        "train",
        *TINY,
        "--checkpoint-every",
        "2",
        "--out",
        out,
        "--resume",
        "--steps",
        "12",
        "--extend",
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
