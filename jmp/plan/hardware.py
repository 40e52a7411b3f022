"""Device presets for the planner: what the cost model needs to know about one accelerator.

A :class:`Device` is peak FLOP/s, memory, link bandwidth and the XLA backend (``platform``),
which decides which collectives XLA emits: its GPU compiler turns "all-reduce then keep my
slice" into a reduce-scatter (so FSDP gradients are reduce-scattered), its CPU compiler does
not; and on CPU 16-bit values travel as float32.

Example:
    >>> get_device("h100").usable_bytes / 2**30
    59.73...
    >>> get_device(Device("mi300x", 1307e12, 192 * GiB, 448e9)).name
    'mi300x'
"""

from __future__ import annotations

from dataclasses import dataclass

from jmp.errors import ConfigError


@dataclass(frozen=True)
class Device:
    """One accelerator, as the cost model sees it.

    Attributes:
        peak_flops: dense bf16 FLOP/s (the MFU denominator).
        memory_bytes: memory per device.
        link_bandwidth: bytes/s one device sends (and receives) in a collective.
        platform: ``'gpu'`` or ``'cpu'``: which XLA compiler, hence which collectives (see the
            module docstring: reduce-scatter on GPU, float32 wires on CPU).
        memory_fraction: the share of memory a plan may use. JAX preallocates 75% of a GPU by
            default (``XLA_PYTHON_CLIENT_MEM_FRACTION``); set that variable and this field
            together to plan closer to the limit.
        matmul_efficiency: the share of ``peak_flops`` the step's compute is assumed to reach
            (large bf16 GEMMs reach 70-80% of the dense peak on H100s; the rest of a step,
            attention, norms and the optimizer, brings a whole step lower: the best published
            MFUs are 40-55%). Not calibrated against a run of jmp's: no GPU run exists yet.
        link_efficiency: the share of ``link_bandwidth`` a collective is assumed to reach (NCCL
            reaches about 75-80% of NVLink's per-direction bandwidth in its bus bandwidth).
    """

    name: str
    peak_flops: float
    memory_bytes: int
    link_bandwidth: float
    platform: str = "gpu"
    memory_fraction: float = 0.75
    matmul_efficiency: float = 0.6
    link_efficiency: float = 0.75

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.memory_fraction)

    @property
    def achieved_flops(self) -> float:
        """FLOP/s the planner assumes a step reaches: ``peak_flops * matmul_efficiency``."""
        return self.peak_flops * self.matmul_efficiency

    @property
    def achieved_bandwidth(self) -> float:
        """Bytes/s the planner assumes a collective reaches."""
        return self.link_bandwidth * self.link_efficiency

    def assumptions(self) -> str:
        """The efficiency assumptions, in words (``jmp plan`` prints them)."""
        return (
            f"assumes {self.matmul_efficiency:.0%} of {self.name}'s peak "
            f"{self.peak_flops / 1e12:g} TFLOP/s for compute and {self.link_efficiency:.0%} of "
            f"its {self.link_bandwidth / 1e9:g} GB/s link bandwidth for collectives "
            f"(not calibrated by a measured run); nothing overlaps"
        )

    def __post_init__(self) -> None:
        bad = [
            f"{n}={getattr(self, n)!r}"
            for n in ("peak_flops", "memory_bytes", "link_bandwidth")
            if getattr(self, n) <= 0
        ]
        for name in ("memory_fraction", "matmul_efficiency", "link_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                bad.append(f"{name}={getattr(self, name)!r} (use a value in (0, 1])")
        if self.platform not in ("gpu", "cpu"):
            bad.append(f"platform={self.platform!r} (use 'gpu' or 'cpu')")
        if bad:
            raise ConfigError(f"Invalid Device {self.name!r}: {', '.join(bad)} must be positive.")


MiB, GiB = 2**20, 2**30
#: Public figures: dense bf16 tensor-core peak FLOP/s; memory as ``nvidia-smi`` reports it (the
#: marketing "80 GB" is 81559 MiB); NVLink bandwidth per direction. JAX preallocates 75% of it
#: by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``): raise that for runs planned near the limit.
DEVICES: dict[str, Device] = {
    "h100": Device("h100", 989e12, 81559 * MiB, 450e9),  # H100 SXM5, NVLink 4: 900 GB/s both ways
    "h200": Device("h200", 989e12, 143771 * MiB, 450e9),  # same compute and NVLink, 141 GB HBM3e
    "a100": Device("a100", 312e12, 81920 * MiB, 300e9),  # A100 SXM 80GB, NVLink 3: 600 GB/s both
    "cpu": Device("cpu", 5e10, 24 * GiB, 1e10, platform="cpu", memory_fraction=1.0),
}


def get_device(name: str | Device, /) -> Device:
    """A preset by name (``'h100'``...), or ``name`` itself if it already is a :class:`Device`."""
    if isinstance(name, Device):
        return name
    if name not in DEVICES:
        raise ConfigError(
            f"Unknown device {name!r}. Known devices: {', '.join(DEVICES)}. Fix: "
            f"pick one, or pass jmp.plan.Device(name, peak_flops, memory_bytes, "
            f"link_bandwidth)."
        )
    return DEVICES[name]
