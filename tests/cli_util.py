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
