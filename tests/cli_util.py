"""Run the ``jmp`` command in a subprocess (a fresh JAX for each run)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_jmp(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "jmp.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def set_unwritable(path: str, on: bool) -> bool:
    """Make ``path`` unwritable (``on``) or writable again, for root too (``chattr +i``, as
    root ignores permission bits); False where that is not possible here."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555 if on else 0o755)
        return True
    flag = "+i" if on else "-i"
    return subprocess.run(["chattr", flag, path], capture_output=True).returncode == 0


def train_then_sigkill(args: list[str], out: str, *, checkpoint: int, after_steps: int) -> None:
    """Run ``jmp train ARGS --out OUT`` and SIGKILL it once checkpoint ``checkpoint`` is
    committed and ``metrics.jsonl`` holds ``after_steps`` rows (asserting it was still running).
    """
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jmp.cli", "train", *args, "--out", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 240
    commit = os.path.join(out, "checkpoints", str(checkpoint), "commit_success.txt")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(commit) and os.path.exists(metrics):
            with open(metrics) as f:
                if len(f.readlines()) >= after_steps:
                    break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
