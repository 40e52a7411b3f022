"""Human-readable sizes for tables and messages.

Example:
    >>> human_bytes(3 * 2**20)
    '3.0 MiB'
"""

from __future__ import annotations


def human_bytes(n: float, /) -> str:
    """Bytes in B / KiB / MiB / GiB / TiB with one decimal (whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
