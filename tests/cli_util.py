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
